"""One copy of an NVFP4 layer's weights: the checkpoint layout, or the W4A16 packing of the SM90 kernels.

``NVFP4Linear`` and ``NVFP4Experts`` load ModelOpt's layout: pairs ``weight`` uint8 ``[..., N, K/2]``
and ``weight_scale`` float8_e4m3fn ``[..., N, K/16]``. The SM90 W4A16 kernels read the same bytes
repacked (:func:`gemma4x.reference.nvfp4_w4a16.w4a16_pack`: ``[..., N/16, K/64, 576]``, 0.5625
bytes per weight like the checkpoint). Holding both would double the NVFP4 weight memory, so
:meth:`W4A16Storage.pack_w4a16_` replaces each pair by one packed parameter, freeing the pair.

It runs once, at a well-defined point outside any CUDA-graph capture: ``Gemma4Runtime`` calls
``Gemma4TextModel.pack_nvfp4_()`` after loading (and after quantize-at-load), and a layer that
was not packed packs itself on its first SM90 forward (refused during capture). Packing only
happens where the kernels run (a 9.0 GPU with the sm_90a build); elsewhere, the CPU included,
nothing changes.

A packed layer still reads as the checkpoint layout. Each read of a pair's name, and
``forward_native``, ``dequantized_weight(s)``, ``state_dict()`` (same keys, order, dtypes and
bytes), rebuilds the pair from the packed copy with the exact inverse
:func:`~gemma4x.reference.nvfp4_w4a16.w4a16_unpack`, on the fly: the rebuilt tensors are
temporaries, and writing into them changes nothing. To change a weight, assign the name (the
layer first goes back to the checkpoint layout), or use ``load_state_dict`` / the loader, which
restore the layout first (:meth:`W4A16Storage.restore_checkpoint_layout_`); ``load_state_dict``
packs again afterwards. ``Module.to`` moves the packed parameter like any other.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar

import torch
from torch import nn

from gemma4x.reference.nvfp4_w4a16 import (
    UNIT_BYTES,
    UNIT_K,
    UNIT_ROWS,
    _check_pack_args,
    w4a16_pack,
    w4a16_unpack,
)

__all__ = ["W4A16Storage", "pack_bounded", "unpack_bounded"]


@torch.no_grad()
def pack_bounded(weight: torch.Tensor, weight_scale: torch.Tensor, interleave_gate_up: bool = False) -> torch.Tensor:
    """:func:`w4a16_pack` of ``[N, K/2]`` or ``[E, N, K/2]``; the latter one expert at a time into
    one output, so temporaries stay one expert's worth (same bytes as packing all at once)."""
    if weight.dim() == 2:
        return w4a16_pack(weight, weight_scale, interleave_gate_up=interleave_gate_up)
    N, K = _check_pack_args(weight, weight_scale, interleave_gate_up)
    E = weight.shape[0]
    out = torch.empty(E, N // UNIT_ROWS, K // UNIT_K, UNIT_BYTES, dtype=torch.uint8, device=weight.device)
    for e in range(E):
        out[e] = w4a16_pack(weight[e], weight_scale[e], interleave_gate_up=interleave_gate_up)
    return out


@torch.no_grad()
def unpack_bounded(packed: torch.Tensor, interleave_gate_up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`w4a16_unpack` of ``[N/16, K/64, 576]`` or ``[E, ...]``, one expert at a time for the latter."""
    if packed.dim() == 3:
        return w4a16_unpack(packed, interleave_gate_up=interleave_gate_up)
    if packed.dim() != 4:
        raise ValueError(f"unpack_bounded: expected [N/16, K/64, 576] or [E, N/16, K/64, 576], got {list(packed.shape)}")
    E, R, U, _ = packed.shape
    weight = torch.empty(E, R * UNIT_ROWS, U * UNIT_K // 2, dtype=torch.uint8, device=packed.device)
    scale = torch.empty(E, R * UNIT_ROWS, U * UNIT_K // 16, dtype=torch.float8_e4m3fn, device=packed.device)
    for e in range(E):
        weight[e], scale[e] = w4a16_unpack(packed[e], interleave_gate_up=interleave_gate_up)
    return weight, scale


def _capturing() -> bool:
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class W4A16Storage:
    """Mixin (before ``nn.Module`` in the bases) holding checkpoint pairs or their W4A16 packing.

    A subclass declares ``_W4A16_PAIRS``: packed parameter name -> (weight name, weight_scale
    name, interleave_gate_up), and implements ``_w4a16_applicable(device)`` (the W4A16 kernels
    can run this layer's shapes there). Each pair is held in exactly one form at a time.
    """

    _W4A16_PAIRS: ClassVar[dict[str, tuple[str, str, bool]]] = {}
    _W4A16_BY_NAME: ClassVar[dict[str, tuple[str, int]]] = {}  # checkpoint name -> (packed name, 0 weight / 1 scale)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._W4A16_BY_NAME = {
            name: (packed, i) for packed, (w, s, _) in cls._W4A16_PAIRS.items() for i, name in enumerate((w, s))
        }

    def _w4a16_applicable(self, device: torch.device) -> bool:
        raise NotImplementedError

    # ---- state ------------------------------------------------------------------------------

    def _packed_names(self) -> list[str]:
        params = self.__dict__.get("_parameters", {})
        return [p for p in self._W4A16_PAIRS if p in params]

    @property
    def w4a16_is_packed(self) -> bool:
        """True when the weights are held only in the W4A16 layout (see :meth:`pack_w4a16_`)."""
        return len(self._packed_names()) == len(self._W4A16_PAIRS)

    def checkpoint_pair(self, packed_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, weight_scale)`` of one pair in the checkpoint layout: the parameters, or rebuilt."""
        w_name, s_name, interleave = self._W4A16_PAIRS[packed_name]
        params = self._parameters
        if packed_name in params:
            return unpack_bounded(params[packed_name].detach(), interleave)
        return params[w_name], params[s_name]

    def _reorder_params(self) -> None:
        """Keep ``_parameters`` in the order built (a packed parameter where its weight was)."""
        order = self.__dict__.get("_w4a16_order")
        if order is None:
            return
        rank = {n: i for i, n in enumerate(order)}
        for packed, (w, _, _) in self._W4A16_PAIRS.items():
            rank[packed] = rank.get(w, len(order))
        items = sorted(self._parameters.items(), key=lambda kv: rank.get(kv[0], len(order)))
        self._parameters.clear()
        self._parameters.update(items)

    # ---- packing / restoring ------------------------------------------------------------

    @torch.no_grad()
    def pack_w4a16_(self, *, force: bool = False) -> int:
        """Hold the weights only in the W4A16 layout; returns the bytes of checkpoint-layout tensors freed.

        Does nothing (returns 0) when already packed, or, unless ``force``, when the SM90 W4A16
        kernels cannot run on the weights' device (CPU, other GPUs, no sm_90a build). ``force``
        packs anyway (tests; every use of the checkpoint layout then rebuilds it). One pair at
        a time: a pair's checkpoint tensors are dropped as soon as its packed copy exists.
        Raises RuntimeError inside CUDA-graph capture (packing allocates and must run once).
        """
        todo = [p for p in self._W4A16_PAIRS if p not in self._parameters]
        if not todo:
            return 0
        params = self._parameters
        device = params[self._W4A16_PAIRS[todo[0]][0]].device
        if not force and not self._w4a16_applicable(device):
            return 0
        if _capturing():
            raise RuntimeError(
                f"{type(self).__name__}: packing the weights for the W4A16 kernels during CUDA-graph capture; "
                "call pack_w4a16_() (Gemma4TextModel.pack_nvfp4_(), as Gemma4Runtime does) before capturing"
            )
        return self._pack(todo)

    def _pack(self, todo: list[str]) -> int:
        params = self._parameters
        for packed_name in todo:  # all or nothing: every pair is checked before any is packed
            w_name, s_name, interleave = self._W4A16_PAIRS[packed_name]
            _check_pack_args(params[w_name], params[s_name], interleave)
        if "_w4a16_order" not in self.__dict__:
            self._w4a16_order = list(params)
            self._w4a16_attrs = {}
        freed = 0
        for packed_name in todo:
            w_name, s_name, interleave = self._W4A16_PAIRS[packed_name]
            w, s = params[w_name], params[s_name]
            p = nn.Parameter(pack_bounded(w.detach(), s.detach(), interleave), requires_grad=False)
            p.keep_dtype = True
            for name, t in ((w_name, w), (s_name, s)):
                self._w4a16_attrs[name] = dict(getattr(t, "__dict__", {}))  # loader hints (checkpoint_parts, ...)
                freed += t.numel() * t.element_size()
                del params[name]
            params[packed_name] = p
            del w, s
        self._reorder_params()
        return freed

    @torch.no_grad()
    def _restore_pair(self, packed_name: str) -> None:
        w_name, s_name, interleave = self._W4A16_PAIRS[packed_name]
        params = self._parameters
        w, s = unpack_bounded(params.pop(packed_name).detach(), interleave)
        for name, t in ((w_name, w), (s_name, s)):
            p = nn.Parameter(t, requires_grad=False)
            for k, v in self._w4a16_attrs.get(name, {}).items():
                setattr(p, k, v)
            params[name] = p
        self._reorder_params()

    def restore_checkpoint_layout_(self) -> None:
        """Hold the checkpoint layout again (the inverse of :meth:`pack_w4a16_`; nothing if not packed)."""
        for packed_name in self._packed_names():
            self._restore_pair(packed_name)

    def w4a16_packed_pairs(self) -> list[torch.Tensor]:
        """The packed parameters in ``_W4A16_PAIRS`` order, packing first if needed (see pack_w4a16_)."""
        if not self.w4a16_is_packed:
            self.pack_w4a16_(force=True)  # callers checked that the W4A16 path runs
        return [self._parameters[p] for p in self._W4A16_PAIRS]

    def _w4a16_storage_key(self) -> tuple:
        """Changes when the weight storage is replaced or written in place (for caches derived from it)."""
        key = []
        for packed_name, (w_name, s_name, _) in self._W4A16_PAIRS.items():
            names = (packed_name,) if packed_name in self._parameters else (w_name, s_name)
            for n in names:
                t = self._parameters[n]
                key.append((t.device, t.data_ptr(), t._version))
        return tuple(key)

    # ---- nn.Module integration ----------------------------------------------------------

    def __getattr__(self, name: str):
        hit = type(self)._W4A16_BY_NAME.get(name)
        if hit is not None and hit[0] in self.__dict__.get("_parameters", {}):
            return self.checkpoint_pair(hit[0])[hit[1]]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        hit = type(self)._W4A16_BY_NAME.get(name)
        if hit is not None and hit[0] in self.__dict__.get("_parameters", {}):
            self._restore_pair(hit[0])  # the other tensor of the pair comes back; this one is replaced
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        packed = self._packed_names()
        if not packed:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        own: OrderedDict = OrderedDict()
        super()._save_to_state_dict(own, prefix, keep_vars)
        rebuilt = {}
        for packed_name in packed:
            w_name, s_name, _ = self._W4A16_PAIRS[packed_name]
            own.pop(prefix + packed_name, None)
            rebuilt[w_name], rebuilt[s_name] = self.checkpoint_pair(packed_name)
        for name in self._w4a16_order:
            if name in rebuilt:
                destination[prefix + name] = rebuilt[name]
            elif prefix + name in own:
                destination[prefix + name] = own.pop(prefix + name)
        destination.update(own)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self._packed_names()
        for packed_name in packed:
            self._restore_pair(packed_name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if packed:
            with torch.no_grad():
                self._pack(packed)

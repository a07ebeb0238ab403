"""Gemma 4 MoE pieces: the router and the routed GeGLU experts (spec §2.8).

Router: ``w, i = topk(softmax_fp32(bf16(bf16(rms(h)*scale)*H^-0.5) @ Wr^T))``, renormalised
over the top-k, times ``per_expert_scale[i]``. Experts: ``sum_j w_j * GeGLU_{i_j}(x)`` with
an fp32 sum over the k slots. Parameter names follow the checkpoint
(``router.proj.weight``, ``router.scale``, ``router.per_expert_scale``,
``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``).

``Experts`` loaded through the checkpoint loader keep ``gate_up_proj`` with its gate/up rows
interleaved in blocks of 8 (repacked once as each tensor is loaded, no second copy; see
:func:`gemma4x.reference.moe.interleave_gate_up`), which lets the SM90 prefill path compute the
GeGLU in GEMM1's epilogue; every path (decode kernels, prefill, reference) reads that layout.
``state_dict()`` still gives, and ``load_state_dict`` still takes, HF's layout (gate rows first).

``NVFP4Experts`` holds the routed experts of a ModelOpt NVFP4 export: the checkpoint's
per-expert tensors ``experts.<e>.{gate,up,down}_proj.{weight,weight_scale,weight_scale_2,
input_scale}`` fused per layer (gate rows first, as in ``gate_up_proj``)::

    gate_up_weight        uint8          [E, 2I, H/2]     down_weight        uint8  [E, H, I/2]
    gate_up_weight_scale  float8_e4m3fn  [E, 2I, H/16]    down_weight_scale  e4m3   [E, H, I/16]
    gate_up_weight_scale_2 fp32          [E, 2] (gate, up)  down_weight_scale_2 fp32 [E]
    gate_up_input_scale   fp32           [E, 2]           down_input_scale   fp32   [E]   (W4A4 exports)

ModelOpt gives an expert's gate and up one shared ``weight_scale_2`` and all experts one
``input_scale`` per projection; the layout keeps each checkpoint scalar anyway. The reference
path dequantizes (``e2m1 * weight_scale * weight_scale_2``) and runs the BF16 expert op. On a
compute capability 9.0 GPU ``forward`` runs :func:`gemma4x.ops.nvfp4.w4a16_moe_experts` on the
weights repacked once (gate/up rows interleaved by 8) into ``w4a16_gate_up`` / ``w4a16_down``,
which replace the four checkpoint-layout tensors (one copy on the GPU; their names still read as
before, rebuilt on demand: :mod:`gemma4x.layers.nvfp4_storage`): the NVFP4 decode kernels at
``T*k <= 64`` (over token chunks up to 512 pairs), the W4A16 WGMMA grouped GEMMs beyond
(:mod:`gemma4x.ops.nvfp4_prefill`; dequantise-into-bf16 + the BF16 expert op is the fallback). On a compute capability 10.0
GPU, batches beyond decode size (``T*k > 64``) run W4A4 through two grouped block-scaled GEMMs
(:mod:`gemma4x.ops.nvfp4_moe_sm100`; **compiled, not run**). Other GPUs and cases dequantize as
the reference path does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from gemma4x.layers.dispatch import ops_for
from gemma4x.layers.linear import Linear, as_quant_param, quant_param, quantize_nvfp4
from gemma4x.layers.nvfp4_storage import W4A16Storage
from gemma4x.loader import CheckpointPart
from gemma4x.reference.moe import GATE_UP_BLOCK, deinterleave_gate_up, interleave_gate_up
from gemma4x.reference.quant import NVFP4_BLOCK, nvfp4_dequantize, nvfp4_global_scale


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.eps = eps
        self.proj = Linear(hidden_size, num_experts)
        self.scale = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts), requires_grad=False)

    def _run(self, h: torch.Tensor, native: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return ops_for(h, native).moe_router(
            h, self.proj.weight, self.scale, self.per_expert_scale, self.top_k, self.eps
        )

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [T, H]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]``)."""
        return self._run(h, native=False)

    def forward_native(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(h, native=True)


def _load_gate_up_interleaved(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """The loader's ``weight_loader`` of ``Experts.gate_up_proj``: HF layout in, interleaved stored.

    Repacks one checkpoint tensor (bounded temporaries: per expert) and marks the parameter
    (``param.gate_up_interleaved``); an ``I`` that is not a multiple of 8 keeps HF's layout.
    """
    E, I2, _ = tensor.shape
    if I2 % (2 * GATE_UP_BLOCK) != 0:
        param.copy_(tensor)
        param.gate_up_interleaved = False
        return
    for e in range(E):
        param[e].copy_(interleave_gate_up(tensor[e : e + 1])[0])
    param.gate_up_interleaved = True


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.gate_up_proj.weight_loader = _load_gate_up_interleaved
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self._register_state_dict_hook(_gate_up_state_dict_hf)

    @property
    def gate_up_interleaved(self) -> bool:
        """True when ``gate_up_proj`` holds gate/up rows interleaved in blocks of 8 (loaded by the loader)."""
        return bool(getattr(self.gate_up_proj, "gate_up_interleaved", False))

    def gate_up_hf(self) -> torch.Tensor:
        """``gate_up_proj`` in HF's layout (gate rows, then up rows): a copy when stored interleaved."""
        gu = self.gate_up_proj
        return deinterleave_gate_up(gu) if self.gate_up_interleaved else gu

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts carry HF's layout (see _gate_up_state_dict_hf): the plain copy stores it as is.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "gate_up_proj" in state_dict:
            self.gate_up_proj.gate_up_interleaved = False

    def _run(self, x, weights, idx, native: bool) -> torch.Tensor:
        return ops_for(x, native).moe_experts(
            x, idx, weights, self.gate_up_proj, self.down_proj, gate_up_interleaved=self.gate_up_interleaved
        )

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, routing ``weights/idx [T, k]`` -> ``[T, H]`` in ``x.dtype``."""
        return self._run(x, weights, idx, native=False)

    def forward_native(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._run(x, weights, idx, native=True)


def _gate_up_state_dict_hf(module: Experts, state_dict, prefix, local_metadata):
    """``state_dict()`` gives ``gate_up_proj`` in HF's layout whatever the stored one."""
    key = prefix + "gate_up_proj"
    if module.gate_up_interleaved and key in state_dict:
        state_dict[key] = deinterleave_gate_up(state_dict[key])
    return state_dict


def _into(index):
    """A part loader writing one checkpoint tensor into ``param[index]``."""

    def load(param: torch.Tensor, tensor: torch.Tensor) -> None:
        param[index].copy_(tensor)

    return load


class NVFP4Experts(W4A16Storage, nn.Module):
    _W4A16_PAIRS: ClassVar[dict[str, tuple[str, str, bool]]] = {
        "w4a16_gate_up": ("gate_up_weight", "gate_up_weight_scale", True),
        "w4a16_down": ("down_weight", "down_weight_scale", False),
    }

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        input_scale: bool = True,
        group_size: int = NVFP4_BLOCK,
    ):
        super().__init__()
        E, H, I, g = num_experts, hidden_size, intermediate_size, group_size
        for what, k in (("hidden_size", H), ("intermediate_size", I)):
            if k % g:
                raise ValueError(f"NVFP4Experts: {what}={k} is not a multiple of {g}")
        self.num_experts, self.hidden_size, self.intermediate_size, self.group_size = E, H, I, g
        self.gate_up_weight = quant_param((E, 2 * I, H // 2), torch.uint8)
        self.gate_up_weight_scale = quant_param((E, 2 * I, H // g), torch.float8_e4m3fn)
        self.gate_up_weight_scale_2 = quant_param((E, 2), torch.float32)
        self.down_weight = quant_param((E, H, I // 2), torch.uint8)
        self.down_weight_scale = quant_param((E, H, I // g), torch.float8_e4m3fn)
        self.down_weight_scale_2 = quant_param((E,), torch.float32)
        self.gate_up_input_scale = quant_param((E, 2), torch.float32) if input_scale else None
        self.down_input_scale = quant_param((E,), torch.float32) if input_scale else None
        self._declare_checkpoint_parts()

    def _declare_checkpoint_parts(self) -> None:
        """Which per-expert checkpoint key fills which slice (the loader's ``checkpoint_parts``)."""
        E, H, I, g = self.num_experts, self.hidden_size, self.intermediate_size, self.group_size
        halves = (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I)))
        parts: dict[str, list[CheckpointPart]] = {n: [] for n, _ in self.named_parameters(recurse=False)}
        for e in range(E):
            for h, (proj, rows) in enumerate(halves):
                parts["gate_up_weight"].append(CheckpointPart(f"{e}.{proj}.weight", (I, H // 2), _into((e, rows))))
                parts["gate_up_weight_scale"].append(
                    CheckpointPart(f"{e}.{proj}.weight_scale", (I, H // g), _into((e, rows)))
                )
                parts["gate_up_weight_scale_2"].append(CheckpointPart(f"{e}.{proj}.weight_scale_2", (), _into((e, h))))
                if "gate_up_input_scale" in parts:
                    parts["gate_up_input_scale"].append(CheckpointPart(f"{e}.{proj}.input_scale", (), _into((e, h))))
            parts["down_weight"].append(CheckpointPart(f"{e}.down_proj.weight", (H, I // 2), _into(e)))
            parts["down_weight_scale"].append(CheckpointPart(f"{e}.down_proj.weight_scale", (H, I // g), _into(e)))
            parts["down_weight_scale_2"].append(CheckpointPart(f"{e}.down_proj.weight_scale_2", (), _into(e)))
            if "down_input_scale" in parts:
                parts["down_input_scale"].append(CheckpointPart(f"{e}.down_proj.input_scale", (), _into(e)))
        for name, p in self.named_parameters(recurse=False):
            p.checkpoint_parts = parts[name]

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts) -> NVFP4Experts:
        """Quantize loaded BF16 experts (weight-only) with the reference quantizer.

        As ModelOpt's export: one ``weight_scale_2`` per expert for gate and up together
        (they read the same input), one per expert for down.
        """
        gu, dn = experts.gate_up_hf(), experts.down_proj
        E, I2, H = gu.shape
        with torch.device("meta"):  # every tensor is replaced below
            out = cls(E, H, I2 // 2, input_scale=False)
        g_gu = nvfp4_global_scale(gu.abs().amax(dim=(1, 2)))
        g_dn = nvfp4_global_scale(dn.abs().amax(dim=(1, 2)))
        w, s, _ = quantize_nvfp4(gu, g_gu)
        out.gate_up_weight, out.gate_up_weight_scale = as_quant_param(w), as_quant_param(s)
        out.gate_up_weight_scale_2 = as_quant_param(g_gu[:, None].expand(E, 2).contiguous())
        w, s, _ = quantize_nvfp4(dn, g_dn)
        out.down_weight, out.down_weight_scale = as_quant_param(w), as_quant_param(s)
        out.down_weight_scale_2 = as_quant_param(g_dn)
        return out

    def dequantized_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` in ``dtype``, as the BF16 Experts hold them."""
        I = self.intermediate_size
        g_rows = self.gate_up_weight_scale_2.repeat_interleave(I, dim=1)  # [E, 2I]: gate rows, then up rows
        gu_w, gu_s = self.checkpoint_pair("w4a16_gate_up")
        gu = nvfp4_dequantize(gu_w, gu_s, g_rows, dtype, self.group_size)
        del gu_w, gu_s  # rebuilt copies when packed: one pair alive at a time
        dn_w, dn_s = self.checkpoint_pair("w4a16_down")
        dn = nvfp4_dequantize(dn_w, dn_s, self.down_weight_scale_2, dtype, self.group_size)
        return gu, dn

    def _w4a16_applicable(self, device: torch.device) -> bool:
        H, I = self.hidden_size, self.intermediate_size
        if device.type != "cuda" or self.group_size != NVFP4_BLOCK or H % 64 or I % 64:
            return False
        from gemma4x.ops.nvfp4 import sm90_available

        return sm90_available(device)

    def w4a16_supported(self, x: torch.Tensor) -> bool:
        """True when ``forward`` takes the SM90 W4A16 path for inputs like ``x``."""
        return x.is_cuda and self._w4a16_applicable(x.device)

    def w4a16_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [E, 2I/16, H/64, 576], down [E, H/16, I/64, 576])`` in the W4A16 layout (gate/up
        interleaved by 8), packing the layer on the first call (see :meth:`pack_w4a16_`)."""
        gu, dn = self.w4a16_packed_pairs()
        return gu, dn

    def w4a4_sm100_supported(self, x: torch.Tensor) -> bool:
        """True when ``forward`` may take the SM100 W4A4 grouped-GEMM path for inputs like ``x``."""
        H, I = self.hidden_size, self.intermediate_size
        if not x.is_cuda or self.group_size != NVFP4_BLOCK or H % 64 or I % 64:
            return False
        from gemma4x.ops._launch import device_capability
        from gemma4x.ops._load import cuda_kernels_available, extension

        if device_capability(x.device) != (10, 0):
            return False

        return cuda_kernels_available() and bool(getattr(extension().gemm, "has_sm100", False))

    def w4a4_sm100_packed(self):
        """The experts in the SM100 grouped GEMM's layout (swizzled scales), built once; None if unusable."""
        key = self._w4a16_storage_key()
        if getattr(self, "_w4a4_key", None) != key:
            from gemma4x.ops.nvfp4_moe_sm100 import prepare_sm100_experts

            (gu_w, gu_s), (dn_w, dn_s) = self.checkpoint_pair("w4a16_gate_up"), self.checkpoint_pair("w4a16_down")
            try:
                packed = prepare_sm100_experts(
                    gu_w, gu_s, self.gate_up_weight_scale_2, dn_w, dn_s, self.down_weight_scale_2,
                    self.gate_up_input_scale, self.down_input_scale,
                )  # fmt: skip
            except ValueError:  # split gate/up global scales or per-expert input scales: dequantize instead
                packed = None
            self._w4a4, self._w4a4_key = packed, key
        return self._w4a4

    def _run(self, x, weights, idx, native: bool) -> torch.Tensor:
        if not native and idx.numel() > 64 and self.w4a4_sm100_supported(x):
            packed = self.w4a4_sm100_packed()
            if packed is not None:
                from gemma4x.ops.nvfp4_moe_sm100 import nvfp4_moe_w4a4

                return nvfp4_moe_w4a4(x, idx, weights, packed)
        if not native and self.w4a16_supported(x):
            from gemma4x.ops.nvfp4 import w4a16_moe_experts

            gu, dn = self.w4a16_packed()
            return w4a16_moe_experts(
                x, idx, weights, gu, self.gate_up_weight_scale_2, dn, self.down_weight_scale_2
            )
        # Reference path (and other GPUs): dequantize, then the BF16 expert op.
        gu, dn = self.dequantized_weights(x.dtype)
        return ops_for(x, native).moe_experts(x, idx, weights, gu, dn)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, routing ``weights/idx [T, k]`` -> ``[T, H]`` in ``x.dtype``."""
        return self._run(x, weights, idx, native=False)

    def forward_native(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._run(x, weights, idx, native=True)

    def extra_repr(self) -> str:
        packed = ", w4a16-packed" if self.w4a16_is_packed else ""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        return f"experts={E}, hidden={H}, intermediate={I}, nvfp4{packed}"

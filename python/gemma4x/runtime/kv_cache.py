"""Per-slot KV caches, allocated from the model's ``kv_cache_spec()`` (no model quirks here).

- ``full`` layers: ``[slots, max_seq_len, nKV, d]``; position p of a sequence lives at row p.
- ``sliding`` layers: a ring of ``R = window`` entries per slot; position p lives at row
  ``p % R``, and ``ring_pos[slot, r]`` records which position row r holds (-1 = empty), so
  attention masks by position and never by row order.
- ``none`` layers (KV-shared consumers) own nothing: the model hands them their producer's
  K/V from the same forward.

``KVCache.prefill_view`` / ``decode_view`` return the object the model's attention layers
talk to for one forward (a prefill of one sequence from position 0, or one decode step over
several slots). A decode step hands attention a ``CachedKV``: the cache tensors themselves,
which the CUDA decode kernel reads in place up to each sequence's own length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gemma4x.layers.attention import KV, CachedKV, LayerCacheSpec, SelfKV


class KVCache:
    def __init__(
        self,
        specs: Sequence[LayerCacheSpec],
        *,
        num_slots: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.specs = list(specs)
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.device = device
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        self.ring_pos: list[torch.Tensor | None] = []
        self.slot_ids = torch.arange(num_slots, device=device)
        for spec in self.specs:
            if spec.kind == "none":
                self.k.append(None)
                self.v.append(None)
                self.ring_pos.append(None)
                continue
            rows = max_seq_len if spec.kind == "full" else min(spec.window, max_seq_len)
            shape = (num_slots, rows, spec.num_kv_heads, spec.head_dim)
            # Zeros, not empty: masked-out rows still enter P @ V (as 0 * value); NaN garbage would leak.
            self.k.append(torch.zeros(shape, device=device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=device, dtype=dtype))
            self.ring_pos.append(
                torch.full((num_slots, rows), -1, device=device, dtype=torch.long) if spec.kind == "sliding" else None
            )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def prefill_view(self, slot: int) -> _PrefillView:
        """View for a prefill of one sequence into ``slot``, starting at position 0."""
        for rp in self.ring_pos:
            if rp is not None:
                rp[slot].fill_(-1)  # forget the slot's previous sequence
        return _PrefillView(self, slot)

    def decode_view(self, slots: int | Sequence[int], kv_len: int) -> _DecodeView:
        """View for one decode step; ``kv_len`` bounds ``max(position) + 1`` over the rows (a CUDA
        graph passes ``max_seq_len``; attention still reads each sequence only up to its position).

        ``slots`` is either an int B (rows are slots 0..B-1: plain slices of the cache, no
        gather and no host->device copy, which is what a CUDA graph needs) or a list of slots.
        """
        return _DecodeView(self, slots, kv_len)


class _PrefillView:
    """Writes a whole prompt; the prompt attends over itself (nothing older exists)."""

    def __init__(self, cache: KVCache, slot: int):
        self.cache = cache
        self.slot = slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KV:
        c = self.cache
        kc, vc, rp = c.k[layer], c.v[layer], c.ring_pos[layer]
        T = k.shape[1]
        if rp is None:  # full
            kc[self.slot, :T] = k[0]
            vc[self.slot, :T] = v[0]
        else:  # ring: only the last R tokens survive
            R = kc.shape[1]
            keep = min(T, R)
            pos = positions[0, T - keep :]
            rows = pos % R
            kc[self.slot, rows] = k[0, T - keep :]
            vc[self.slot, rows] = v[0, T - keep :]
            rp[self.slot, rows] = pos
        return SelfKV(k, v, positions)


class _DecodeView:
    """Writes one token per slot, then hands attention the cache itself (``CachedKV``)."""

    def __init__(self, cache: KVCache, slots: int | Sequence[int], kv_len: int):
        self.cache = cache
        self.kv_len = kv_len
        if isinstance(slots, int):
            self.batch, self.contiguous = slots, True
        else:
            self.batch = len(slots)
            # Slots 0..B-1 in order (the common case) are a plain slice: no gather copy.
            self.contiguous = list(slots) == list(range(self.batch))
        if self.contiguous:
            self.slots = cache.slot_ids[: self.batch]
        else:
            self.slots = torch.tensor(list(slots), device=cache.device, dtype=torch.long)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KV:
        c = self.cache
        kc, vc, rp = c.k[layer], c.v[layer], c.ring_pos[layer]
        pos = positions[:, 0]
        if _fused_write_ok(kc, k[:, 0], v[:, 0]):  # one kernel for K, V and the ring positions
            from gemma4x.ops.kv_cache import kv_cache_write

            kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], self.slots, pos)
        else:
            rows = pos if rp is None else pos % kc.shape[1]  # full: row = position; ring: p % R
            kc[self.slots, rows] = k[:, 0]
            vc[self.slots, rows] = v[:, 0]
            if rp is not None:
                rp[self.slots, rows] = pos
        return CachedKV(kc, vc, rp, None if self.contiguous else self.slots, self.kv_len)


def _fused_write_ok(k_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The CUDA KV-cache write applies: a CUDA cache, the extension built, 16-byte rows."""
    if not k_cache.is_cuda or k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        return False
    from gemma4x.ops import cuda_kernels_available

    if not cuda_kernels_available():
        return False
    from gemma4x.ops.kv_cache import supported

    return supported(k_cache, k, v)

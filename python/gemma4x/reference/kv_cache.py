"""Reference decode-step KV-cache write, the pure-PyTorch twin of :func:`gemma4x.ops.kv_cache.kv_cache_write`.

For each sequence ``b`` (``slot = slots[b]``, ``pos = positions[b]``)::

    row = pos % R if ring_pos is not None else pos          # R = rows per slot
    k_cache[slot, row] = k[b];  v_cache[slot, row] = v[b]
    ring_pos[slot, row] = pos                                # ring (sliding-window) layers

Entries whose slot or row falls outside the cache (or ``pos < 0``) are skipped, as the kernel skips them.
"""

from __future__ import annotations

import torch


def kv_cache_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ring_pos: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write ``k, v [B, nKV, d]`` at ``positions [B]`` of ``slots [B]``, in place."""
    S, R = k_cache.shape[0], k_cache.shape[1]
    pos = positions.to(torch.int64)
    rows = pos % R if ring_pos is not None else pos
    ok = (slots >= 0) & (slots < S) & (pos >= 0) & (rows < R)
    s, r = slots[ok], rows[ok]
    k_cache[s, r] = k[ok].to(k_cache.dtype)
    v_cache[s, r] = v[ok].to(v_cache.dtype)
    if ring_pos is not None:
        ring_pos[s, r] = pos[ok]

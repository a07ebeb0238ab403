"""Reference decode attention over a per-slot KV cache (the twin of ``gemma4x.ops.attention_decode``).

A decode step has ``Tq`` (1, or a few for speculative verification) new queries per sequence,
whose K/V are already in the cache. Sequence ``b`` lives in cache slot ``slots[b]`` (``b`` when
``slots`` is None). Two cache layouts, ``[num_slots, R, nKV, d]``:

- full layer (``ring_pos`` None): row ``r`` holds position ``r``; the rows past the sequence's
  last query position are stale or empty and are never visible;
- ring layer: row ``r`` holds position ``ring_pos[slot, r]`` (``-1`` = empty), position ``p`` at
  row ``p % R``.

Then ``out = attention(q, K[slot], V[slot], q_pos, k_pos, window_left, window_right=0, scale)``
(:func:`gemma4x.reference.attention.attention`): causal, Gemma's sliding bound
``q - W < k <= q`` with ``window_left = W - 1``, fp32 softmax, zeros for a query with no key.
"""

from __future__ import annotations

import torch

from gemma4x.reference.attention import attention, attention_sdpa, attention_sdpa_single_query


def dense_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: torch.Tensor | None = None,
    ring_pos: torch.Tensor | None = None,
    kv_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache rows of each sequence as plain ``(K, V, k_pos)`` ``[B, Tk, nKV, d]``, ``[B, Tk]``.

    Full layers keep the first ``kv_len`` rows (all when None; it must exceed every query
    position) and mark the rows past each sequence's last query position empty (-1).
    """
    B = q_pos.shape[0]

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[:B] if slots is None else t.index_select(0, slots)

    if ring_pos is not None:
        return rows(k_cache), rows(v_cache), rows(ring_pos)
    n = k_cache.shape[1] if kv_len is None else min(kv_len, k_cache.shape[1])
    ar = torch.arange(n, device=k_cache.device)
    last = q_pos[:, 0] if q_pos.shape[1] == 1 else q_pos.max(dim=1).values
    k_pos = torch.where(ar[None, :] <= last[:, None], ar[None, :], -1)
    return rows(k_cache)[:, :n], rows(v_cache)[:, :n], k_pos


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: torch.Tensor | None = None,
    ring_pos: torch.Tensor | None = None,
    *,
    window_left: int | None = None,
    scale: float = 1.0,
    max_kv_len: int | None = None,
) -> torch.Tensor:
    """fp32 oracle: ``[B, Tq, nH, d]`` in ``q.dtype`` (``max_kv_len`` is a performance hint, unused)."""
    K, V, k_pos = dense_kv(k_cache, v_cache, q_pos, slots, ring_pos)
    return attention(q, K, V, q_pos, k_pos, window_left=window_left, window_right=0, scale=scale)


def attention_decode_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: torch.Tensor | None = None,
    ring_pos: torch.Tensor | None = None,
    *,
    window_left: int | None = None,
    scale: float = 1.0,
    max_kv_len: int | None = None,
) -> torch.Tensor:
    """The same through torch SDPA over the first ``max_kv_len`` rows (the model's reference
    path: HF's own attention, bitwise on CPU)."""
    K, V, k_pos = dense_kv(k_cache, v_cache, q_pos, slots, ring_pos, max_kv_len)
    return attention_sdpa(q, K, V, q_pos, k_pos, window_left=window_left, window_right=0, scale=scale)


def attention_decode_sdpa_single_query(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: torch.Tensor | None = None,
    ring_pos: torch.Tensor | None = None,
    *,
    window_left: int | None = None,
    scale: float = 1.0,
    max_kv_len: int | None = None,
) -> torch.Tensor:
    """:func:`attention_decode_sdpa` with the GQA heads folded into queries (see
    :func:`gemma4x.reference.attention.attention_sdpa_single_query`): the CUDA fallback."""
    K, V, k_pos = dense_kv(k_cache, v_cache, q_pos, slots, ring_pos, max_kv_len)
    return attention_sdpa_single_query(q, K, V, q_pos, k_pos, window_left=window_left, window_right=0, scale=scale)

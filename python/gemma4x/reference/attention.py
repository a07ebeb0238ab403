"""Reference attention over keys with absolute positions (explicit mask, GQA, fp32 softmax).

``out[b,t,h] = sum_j softmax_j(scale * q[b,t,h] . k[b,j,h//g]) v[b,j,h//g]`` over the keys j
that are *allowed* for query t, where ``g = nH / nKV`` and, with ``p = q_pos[b,t]`` and
``s = k_pos[b,j]``::

    allowed = s >= 0                                   # negative position = empty cache slot
              and (window_left  is None or p - s <= window_left)
              and (window_right is None or s - p <= window_right)

Causal full attention is ``(None, 0)``; Gemma's sliding window W (``q-W < k <= q``) is
``(W-1, 0)``; bidirectional is ``(None, None)``. Keys may come in any order (a ring buffer
is fine): only their positions matter. Math in fp32, result rounded to ``q.dtype``. A query
with no allowed key (a padding row) returns zeros. This is the contract the CUDA
attention kernels are tested against.

``attention_sdpa`` has the same contract but runs ``torch.nn.functional.scaled_dot_product_attention``
with the boolean mask, which is what HF's default ``sdpa`` attention runs: on CPU it
reproduces HF's bf16 numbers bit for bit, so the model uses it until our kernels land.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window_left: int | None,
    window_right: int | None,
    q_block: torch.Tensor | None = None,
    k_block: torch.Tensor | None = None,
    *,
    unified: bool = False,
) -> torch.Tensor:
    """Boolean ``[..., Tq, Tk]`` mask (True = attend) for query/key positions ``[..., Tq]``, ``[..., Tk]``.

    Without block ids this is the module docstring's rule. With block ids (``q_block``
    ``[..., Tq]``, ``k_block`` ``[..., Tk]``, ``-1`` = not in a vision block) and
    ``same = q_block == k_block >= 0``::

        unified=False (Gemma4, HF create_masks_for_vision_model):
            allowed = s >= 0 and left_ok and (right_ok or same)
        unified=True  (gemma4_unified forward(), HF create_causal_mask(block_sequence_ids=...)):
            allowed = s >= 0 and ((left_ok and right_ok) or same)

    ``left_ok = p - s <= window_left`` and ``right_ok = s - p <= window_right`` (True when the
    bound is None). Gemma4 passes blocks on sliding layers only (full layers stay causal, spec
    §2.11.3); gemma4_unified passes them on both layer types (spec §6.5). An empty slot
    (``s < 0``) is never allowed, whatever its block id.
    """
    if (q_block is None) != (k_block is None):
        raise ValueError("attention_mask: give both q_block and k_block, or neither")
    p = q_pos[..., :, None]
    s = k_pos[..., None, :]
    valid = s >= 0
    left = torch.ones_like(valid) if window_left is None else (p - s <= window_left)
    right = torch.ones_like(valid) if window_right is None else (s - p <= window_right)
    if q_block is None:
        return valid & left & right
    if q_block.shape != q_pos.shape or k_block.shape != k_pos.shape:
        raise ValueError(
            f"attention_mask: q_block {tuple(q_block.shape)} must match q_pos {tuple(q_pos.shape)} and "
            f"k_block {tuple(k_block.shape)} must match k_pos {tuple(k_pos.shape)}"
        )
    qb = q_block[..., :, None]
    same = (qb == k_block[..., None, :]) & (qb >= 0)
    if unified:
        return valid & ((left & right) | same)
    return valid & left & (right | same)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window_left: int | None = None,
    window_right: int | None = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Masked GQA attention.

    Args:
        q: ``[B, Tq, nH, d]``.
        k, v: ``[B, Tk, nKV, d]`` with ``nH % nKV == 0``.
        q_pos: ``[B, Tq]`` integer absolute positions of the queries.
        k_pos: ``[B, Tk]`` integer absolute positions of the keys; ``< 0`` marks an empty slot.
        window_left / window_right: keys allowed at ``q_pos - left <= k_pos <= q_pos + right``
            (``None`` = unbounded).
        scale: multiplies ``q.k`` (Gemma 4 uses 1.0: q_norm/k_norm replace 1/sqrt(d)).

    Returns:
        ``[B, Tq, nH, d]`` in ``q.dtype``.
    """
    B, Tq, nH, d = q.shape
    Bk, Tk, nKV, dk = k.shape
    if (Bk, dk) != (B, d) or v.shape != k.shape:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree")
    if nH % nKV:
        raise ValueError(f"attention: {nH} query heads are not a multiple of {nKV} KV heads")
    if tuple(q_pos.shape) != (B, Tq) or tuple(k_pos.shape) != (B, Tk):
        raise ValueError(
            f"attention: q_pos {tuple(q_pos.shape)} must be {(B, Tq)} and k_pos {tuple(k_pos.shape)} must be {(B, Tk)}"
        )
    g = nH // nKV
    qf = q.float().view(B, Tq, nKV, g, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qf, k.float()) * scale  # [B, nKV, g, Tq, Tk]
    allowed = attention_mask(q_pos, k_pos, window_left, window_right)[:, None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Rows with no allowed key are all -inf -> NaN; they are padding, return zeros.
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float())
    return out.reshape(B, Tq, nH, d).to(q.dtype)


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window_left: int | None = None,
    window_right: int | None = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """:func:`attention` through torch SDPA (HF's default path; its own rounding, fp32 softmax)."""
    mask = attention_mask(q_pos, k_pos, window_left, window_right)[:, None]  # [B, 1, Tq, Tk]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    # A query with no visible key (padding row) comes out NaN; the contract says zeros.
    out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2)


def self_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    *,
    window_left: int | None = None,
    window_right: int | None = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """:func:`attention_sdpa` of tokens over themselves: ``k, v`` are the rows of ``q``'s own
    tokens, at the same ``positions``."""
    return attention_sdpa(q, k, v, positions, positions, window_left=window_left, window_right=window_right, scale=scale)


def attention_sdpa_single_query(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window_left: int | None = None,
    window_right: int | None = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """:func:`attention_sdpa` for decode steps (one query per sequence), without GQA expansion.

    With ``Tq == 1`` the ``g`` query heads that share a KV head have the same mask, so they go
    to SDPA as ``g`` queries of that one head: ``[B, nKV, g, d]`` against ``[B, nKV, Tk, d]``.
    SDPA's own GQA path (``enable_gqa`` with a mask runs the math backend) copies K and V ``g``
    times per layer, which dominated batch-8 decode. At batch 1 the folded form leaves SDPA only
    ``nKV`` (batch, head) pairs to spread over the GPU and measured slower (E2B on an H200: 6.95
    against 6.15 ms per step), so batch 1 and other shapes keep ``attention_sdpa``.
    """
    B, Tq, nH, d = q.shape
    nKV = k.shape[2]
    if Tq != 1 or nH == nKV or B == 1:
        return attention_sdpa(q, k, v, q_pos, k_pos, window_left=window_left, window_right=window_right, scale=scale)
    g = nH // nKV
    mask = attention_mask(q_pos, k_pos, window_left, window_right)[:, None]  # [B, 1, 1, Tk]
    out = F.scaled_dot_product_attention(
        q.view(B, nKV, g, d),  # Tq == 1: head h = kv * g + j
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
    )
    out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.reshape(B, 1, nH, d)

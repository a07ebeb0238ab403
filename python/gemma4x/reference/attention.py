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
) -> torch.Tensor:
    """Boolean ``[B, Tq, Tk]`` mask (True = attend) for query/key positions ``[B, Tq]``, ``[B, Tk]``."""
    p = q_pos[:, :, None]
    s = k_pos[:, None, :]
    allowed = s >= 0
    if window_left is not None:
        allowed = allowed & (p - s <= window_left)
    if window_right is not None:
        allowed = allowed & (s - p <= window_right)
    return allowed


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

"""Reference attention over packed variable-length batches (the CUDA prefill/decode contract).

For sequence ``b`` with queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys
``cu_seqlens_k[b]:cu_seqlens_k[b+1]``, query ``t`` (position ``p``, block ``bq``) and key ``j``
(position ``s``, block ``bk``)::

    out[t, h] = sum_j softmax_j(scale * q[t, h] . k[j, h // g]) v[j, h // g]     g = nH / nKV
    over the keys j of the same sequence with  allowed(p, s, bq, bk)

    left_ok  = window_left  is None or p - s <= window_left
    right_ok = window_right is None or s - p <= window_right
    same     = bq == bk and bq >= 0                      (only when block ids are given)
    allowed  = s >= 0 and left_ok and (right_ok or same)         unified=False (Gemma4)
    allowed  = s >= 0 and ((left_ok and right_ok) or same)       unified=True  (gemma4_unified forward)

The per-layer settings Gemma 4 uses (``W = sliding_window``):

=====================================  ===============  ============  ==========================
layer                                  window_left      window_right  blocks
=====================================  ===============  ============  ==========================
Gemma4 full layer                      None             0             None (causal only, §2.11.3)
Gemma4 sliding layer                   W - 1            0             vision block ids (prefill)
gemma4_unified full / sliding layer    None / W - 1     0             block ids, ``unified=True``
vision encoder (per image)             None             None          None (bidirectional)
=====================================  ===============  ============  ==========================

Keys may be in any order inside a sequence (a ring buffer is fine: only positions matter) and
``k_pos < 0`` marks an empty slot. Queries may follow a prefix already in the cache (a sequence
has more keys than queries): by default queries are aligned to the *end* of the keys
(``q_pos = Lk - Lq + i``, ``k_pos = j``), as in flash-attn. Empty sequences (``Lq == 0`` and/or
``Lk == 0``) are allowed. Math in fp32, result in ``q.dtype``; a query with no allowed key gets
zeros. Block ids must come from the whole sequence (HF indexes them by absolute position), so
chunked prefill gives the same result as one prefill only if no vision block is split across
chunks (spec §2.11.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from gemma4x.reference.attention import attention_mask

# mm_token_type_ids values that form bidirectional blocks (image, video). Audio (3) does not.
VISION_TOKEN_TYPES = (1, 2)


def vision_block_ids(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """Block ids ``[..., T]`` (int64) from ``mm_token_type_ids`` ``[..., T]``; ``-1`` outside blocks.

    A block is a maximal run of image/video tokens (type 1 or 2); blocks are numbered 0, 1, ...
    along the last dim. This is HF's ``get_block_sequence_ids_for_mask`` (models/gemma4): a run
    of images and videos with no other token between them is *one* block, and each video frame
    is its own block only because the prompt separates frames with ``<image|> mm:ss <|image>``.
    """
    t = mm_token_type_ids
    is_vis = torch.zeros_like(t, dtype=torch.bool)
    for v in VISION_TOKEN_TYPES:
        is_vis |= t == v
    prev = torch.zeros_like(is_vis)
    prev[..., 1:] = is_vis[..., :-1]
    starts = is_vis & ~prev
    ids = torch.cumsum(starts.long(), dim=-1) - 1
    return torch.where(is_vis, ids, torch.full_like(ids, -1))


def block_ids_from_ranges(length: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Block ids ``[length]`` (int64) from half-open token ranges ``[start, end)``, one block each.

    Ranges are numbered in order of ``start``; empty ranges are skipped. Equal to
    :func:`vision_block_ids` of the matching ``mm_token_type_ids`` whenever no two ranges touch
    (in a Gemma prompt ``<|image>``/``<image|>`` always separate them). Touching ranges stay two
    blocks here, whereas HF's type-id rule would merge them into one.
    """
    out = torch.full((length,), -1, dtype=torch.long)
    nonempty = sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a))
    for i, (a, b) in enumerate(nonempty):
        if a < 0 or b > length:
            raise ValueError(f"block_ids_from_ranges: range [{a}, {b}) is outside [0, {length})")
        if i and a < nonempty[i - 1][1]:
            raise ValueError(f"block_ids_from_ranges: ranges {nonempty[i - 1]} and {(a, b)} overlap")
        out[a:b] = i
    return out


def gemma4_layer_mask_args(
    layer_type: str, sliding_window: int, *, unified: bool = False, blocks: bool = True
) -> dict:
    """``window_left``, ``window_right``, ``unified`` and whether to pass block ids, for one text layer.

    ``layer_type`` is ``"sliding_attention"`` or ``"full_attention"``. ``blocks=False`` (decode
    steps, text-only prompts, ``use_bidirectional_attention != "vision"``) never uses blocks.
    """
    if layer_type not in ("sliding_attention", "full_attention"):
        raise ValueError(f"gemma4_layer_mask_args: unknown layer_type {layer_type!r}")
    sliding = layer_type == "sliding_attention"
    return {
        "window_left": sliding_window - 1 if sliding else None,
        "window_right": 0,
        "unified": unified,
        "use_blocks": blocks and (sliding or unified),
    }


def _check_cu(name: str, cu: torch.Tensor, total: int) -> list[int]:
    if cu.dim() != 1 or cu.numel() < 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attention_varlen: {name} must be a 1-D int32/int64 tensor [B+1], got {cu.dtype} {tuple(cu.shape)}")
    c = [int(x) for x in cu.tolist()]
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in pairwise(c)):
        raise ValueError(f"attention_varlen: {name} {c} must start at 0, never decrease and end at {total}")
    return c


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    *,
    window_left: int | None = None,
    window_right: int | None = 0,
    q_block: torch.Tensor | None = None,
    k_block: torch.Tensor | None = None,
    unified: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """Masked GQA attention over a packed batch; see the module docstring for the math.

    Args:
        q: ``[Nq, nH, d]``, the queries of all sequences concatenated.
        k, v: ``[Nk, nKV, d]`` with ``nH % nKV == 0`` (the keys/cache slots of all sequences).
        cu_seqlens_q: ``[B+1]`` int32/int64 offsets into ``q``: 0, ..., ``Nq``.
        cu_seqlens_k: ``[B+1]`` int32/int64 offsets into ``k``: 0, ..., ``Nk``.
        q_pos: ``[Nq]`` integer absolute positions, or None for ``Lk - Lq + i`` per sequence.
        k_pos: ``[Nk]`` integer absolute positions (``< 0`` = empty slot), or None for ``j``.
        window_left / window_right: keys allowed at ``q_pos - left <= k_pos <= q_pos + right``
            (None = unbounded). Causal ``(None, 0)``; sliding ``W`` is ``(W - 1, 0)``.
        q_block / k_block: ``[Nq]`` / ``[Nk]`` integer vision block ids (``-1`` = none), both or
            neither; ids are compared only inside one sequence.
        unified: block overlay ORed after the whole base mask (gemma4_unified) instead of
            relaxing only the right bound (Gemma4).
        scale: multiplies ``q.k`` (Gemma 4 uses 1.0).

    Returns:
        ``[Nq, nH, d]`` in ``q.dtype``.
    """
    if q.dim() != 3:
        raise ValueError(f"attention_varlen: q must be [Nq, nH, d], got {tuple(q.shape)}")
    Nq, nH, d = q.shape
    if k.dim() != 3 or k.shape[2] != d:
        raise ValueError(f"attention_varlen: k must be [Nk, nKV, {d}], got {tuple(k.shape)}")
    Nk, nKV, _ = k.shape
    if v.shape != k.shape:
        raise ValueError(f"attention_varlen: v must be {tuple(k.shape)} like k, got {tuple(v.shape)}")
    if nKV == 0 or nH % nKV:
        raise ValueError(f"attention_varlen: {nH} query heads (q) are not a multiple of {nKV} KV heads (k)")
    cq = _check_cu("cu_seqlens_q", cu_seqlens_q, Nq)
    ck = _check_cu("cu_seqlens_k", cu_seqlens_k, Nk)
    if len(cq) != len(ck):
        raise ValueError(f"attention_varlen: cu_seqlens_q has {len(cq) - 1} sequences, cu_seqlens_k {len(ck) - 1}")
    B = len(cq) - 1
    if q_pos is None:
        q_pos = torch.cat(
            [torch.arange(ck[b + 1] - ck[b] - (cq[b + 1] - cq[b]), ck[b + 1] - ck[b]) for b in range(B)]
            + [torch.zeros(0, dtype=torch.long)]
        ).to(q.device)
    if k_pos is None:
        k_pos = torch.cat([torch.arange(ck[b + 1] - ck[b]) for b in range(B)] + [torch.zeros(0, dtype=torch.long)]).to(
            k.device
        )
    for name, t, n in (("q_pos", q_pos, Nq), ("k_pos", k_pos, Nk), ("q_block", q_block, Nq), ("k_block", k_block, Nk)):
        if t is not None and (tuple(t.shape) != (n,) or t.is_floating_point()):
            raise ValueError(f"attention_varlen: {name} must be an integer tensor [{n}], got {t.dtype} {tuple(t.shape)}")
    if (q_block is None) != (k_block is None):
        raise ValueError("attention_varlen: give both q_block and k_block, or neither")

    g = nH // nKV
    out = torch.zeros(Nq, nH, d, dtype=torch.float32, device=q.device)
    for b in range(B):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue  # no queries, or no keys: zero rows
        allowed = attention_mask(
            q_pos[q0:q1],
            k_pos[k0:k1],
            window_left,
            window_right,
            None if q_block is None else q_block[q0:q1],
            None if k_block is None else k_block[k0:k1],
            unified=unified,
        )  # [Lq, Lk]
        qf = q[q0:q1].float().view(q1 - q0, nKV, g, d)
        scores = torch.einsum("qhgd,khd->hgqk", qf, k[k0:k1].float()) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # no allowed key -> zeros
        o = torch.einsum("hgqk,khd->qhgd", probs, v[k0:k1].float())
        out[q0:q1] = o.reshape(q1 - q0, nH, d)
    return out.to(q.dtype)

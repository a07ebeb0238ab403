"""Decode attention on the GPU, reading K/V in place from the per-slot KV cache.

``out[b, t, h] = sum_j softmax_j(scale * q[b,t,h] . K[s, j, h // g]) V[s, j, h // g]`` with
``s = slots[b]`` and ``g = nH / nKV``, over the cache rows ``j`` whose position ``k`` satisfies
``k <= q_pos[b, t]`` and, with a window, ``q_pos[b, t] - k <= window_left``. Full layers hold
position ``j`` at row ``j``; ring layers position ``ring_pos[s, j]`` (``-1`` = empty). fp32
softmax and accumulation; a query with no visible key gives zeros.

The kernel reads only the rows each sequence can see, from the positions on the device, so a
CUDA graph captured once serves every length. Pure-PyTorch twin with the same signature:
:func:`gemma4x.reference.attention_decode.attention_decode`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from gemma4x.ops._checks import _fmt_dtype, check_cuda
from gemma4x.ops._dtypes import dtype_code
from gemma4x.ops._launch import on_device
from gemma4x.ops._load import extension

OP = "attention_decode"
HEAD_DIMS = (64, 128, 256, 512)
MAX_TQ = 8
DTYPES = (torch.bfloat16, torch.float16)


def _check_index(name: str, t: Optional[torch.Tensor], shape: tuple, device: torch.device) -> None:
    if t is None:
        return
    if t.dtype != torch.int64:
        raise TypeError(f"{OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected int64")
    if tuple(t.shape) != shape:
        raise ValueError(f"{OP}: {name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.device != device:
        raise ValueError(f"{OP}: {name} is on {t.device}, expected {device} (as q)")


def _check(q, k_cache, v_cache, q_pos, slots, ring_pos, window_left, scale, max_kv_len) -> None:
    if q.dim() != 4:
        raise ValueError(f"{OP}: q must be [B, Tq, nH, d], got shape {list(q.shape)}")
    B, Tq, nH, d = q.shape
    if q.dtype not in DTYPES:
        raise TypeError(f"{OP}: q has dtype {_fmt_dtype(q.dtype)}, expected bfloat16 or float16")
    if not 1 <= Tq <= MAX_TQ:
        raise ValueError(f"{OP}: q has Tq={Tq} queries per sequence, expected 1..{MAX_TQ}")
    if B < 1:
        raise ValueError(f"{OP}: q has an empty batch")
    if d not in HEAD_DIMS:
        raise ValueError(f"{OP}: head_dim {d} is not supported (expected one of {HEAD_DIMS})")
    if k_cache.dim() != 4:
        raise ValueError(f"{OP}: k_cache must be [slots, rows, nKV, d], got shape {list(k_cache.shape)}")
    S, R, nKV, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"{OP}: k_cache has head_dim {dk}, expected {d} (as q)")
    if nKV < 1 or nH % nKV:
        raise ValueError(f"{OP}: q has {nH} heads, not a multiple of k_cache's {nKV} KV heads")
    if S < 1 or R < 1:
        raise ValueError(f"{OP}: k_cache {list(k_cache.shape)} is empty")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{OP}: v_cache has shape {list(v_cache.shape)}, expected {list(k_cache.shape)} (as k_cache)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected {_fmt_dtype(q.dtype)} (as q)")
        if t.device != q.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, expected {q.device} (as q)")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{OP}: {name} must be contiguous in its last dimension, got stride {t.stride(-1)}")
        if any(s % 8 for s in t.stride()[:-1]):
            raise ValueError(f"{OP}: {name} strides {list(t.stride())} must be multiples of 8 elements (16 bytes)")
    _check_index("q_pos", q_pos, (B, Tq), q.device)
    _check_index("slots", slots, (B,), q.device)
    _check_index("ring_pos", ring_pos, (S, R), q.device)
    if slots is None and B > S:
        raise ValueError(f"{OP}: batch {B} without slots needs slots 0..{B - 1}, but k_cache has {S}")
    if window_left is not None and (isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < 0):
        raise ValueError(f"{OP}: window_left must be None or an int >= 0, got {window_left!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be a finite float, got {scale!r}")
    if max_kv_len is not None and (isinstance(max_kv_len, bool) or not isinstance(max_kv_len, int) or max_kv_len < 1):
        raise ValueError(f"{OP}: max_kv_len must be None or an int >= 1, got {max_kv_len!r}")


@torch.library.custom_op("gemma4x::attention_decode", mutates_args=())
def _attention_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: Optional[torch.Tensor],
    ring_pos: Optional[torch.Tensor],
    window_left: Optional[int],
    scale: float,
    max_kv_len: Optional[int],
) -> torch.Tensor:
    _check(q, k_cache, v_cache, q_pos, slots, ring_pos, window_left, scale, max_kv_len)
    check_cuda(OP, "q", q)
    B, Tq, nH, d = q.shape
    S, R, nKV, _ = k_cache.shape
    if ring_pos is not None and ring_pos.stride(-1) != 1:
        ring_pos = ring_pos.contiguous()
    q_pos = q_pos.contiguous()
    slots = None if slots is None else slots.contiguous()
    code = dtype_code(q, f"{OP}: q", DTYPES)
    ext = extension().attention_decode
    rows = R if max_kv_len is None else min(R, max_kv_len)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with on_device(q) as stream:
        splits = ext.num_splits(B, Tq, nH, nKV, d, rows, code)
        o_part = lse = None
        if splits > 1:  # torch allocator: graph-capture safe
            o_part = torch.empty((splits, B, Tq, nH, d), dtype=torch.float32, device=q.device)
            lse = torch.empty((splits, B, Tq, nH), dtype=torch.float32, device=q.device)
        ext.decode(
            q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
            k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            q_pos.data_ptr(), 0 if slots is None else slots.data_ptr(),
            0 if ring_pos is None else ring_pos.data_ptr(), 0 if ring_pos is None else ring_pos.stride(0),
            out.data_ptr(), out.stride(0), out.stride(1), out.stride(2),
            0 if o_part is None else o_part.data_ptr(), 0 if lse is None else lse.data_ptr(),
            B, Tq, nH, nKV, d, S, R, splits, -1 if window_left is None else window_left, float(scale), code, stream,
        )  # fmt: skip
    return out


@_attention_decode_op.register_fake
def _(q, k_cache, v_cache, q_pos, slots, ring_pos, window_left, scale, max_kv_len):
    _check(q, k_cache, v_cache, q_pos, slots, ring_pos, window_left, scale, max_kv_len)
    return q.new_empty(q.shape)


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: Optional[torch.Tensor] = None,
    ring_pos: Optional[torch.Tensor] = None,
    *,
    window_left: Optional[int] = None,
    scale: float = 1.0,
    max_kv_len: Optional[int] = None,
) -> torch.Tensor:
    """Masked GQA decode attention over a KV cache, in place (see the module docstring).

    Args:
        q: ``[B, Tq, nH, d]`` bfloat16/float16 CUDA tensor, ``1 <= Tq <= 8`` (several queries
            per sequence are causal among themselves: speculative verification), ``d`` in
            64/128/256/512, last dim contiguous, other strides multiples of 8.
        k_cache, v_cache: ``[num_slots, R, nKV, d]``, same dtype and device; ``nH % nKV == 0``.
        q_pos: ``[B, Tq]`` int64 positions of the queries (on the device: read by the kernel,
            never synced to the host).
        slots: ``[B]`` int64 cache slot of each sequence, or None for slots ``0..B-1``.
        ring_pos: ``[num_slots, R]`` int64 position held by each row of a ring (sliding) layer,
            ``-1`` = empty; None for a full layer (row = position; rows past a sequence's last
            query position are never read).
        window_left: keys with ``q_pos - k_pos <= window_left`` (Gemma's window W: ``W - 1``);
            None = unbounded.
        scale: multiplies ``q . k`` (Gemma 4: 1.0).
        max_kv_len: host-side bound on ``max(q_pos) + 1``, only to size the split-KV launch
            (a captured graph passes the cache capacity); None = ``R``.

    Returns:
        ``[B, Tq, nH, d]`` in ``q.dtype``.
    """
    return _attention_decode_op(q, k_cache, v_cache, q_pos, slots, ring_pos, window_left, float(scale), max_kv_len)


def attention_decode_or_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: Optional[torch.Tensor] = None,
    ring_pos: Optional[torch.Tensor] = None,
    *,
    window_left: Optional[int] = None,
    scale: float = 1.0,
    max_kv_len: Optional[int] = None,
) -> torch.Tensor:
    """:func:`attention_decode` where the kernel applies (bf16/fp16, head dims 64..512, Tq <= 8),
    else SDPA over the cache's first ``max_kv_len`` rows (what the CUDA path ran before)."""
    if q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS and q.shape[1] <= MAX_TQ:
        return attention_decode(
            q, k_cache, v_cache, q_pos, slots, ring_pos, window_left=window_left, scale=scale, max_kv_len=max_kv_len
        )
    from gemma4x.reference.attention_decode import attention_decode_sdpa_single_query

    return attention_decode_sdpa_single_query(
        q, k_cache, v_cache, q_pos, slots, ring_pos, window_left=window_left, scale=scale, max_kv_len=max_kv_len
    )


# Bits of set_tuning's variant (kVariant* in csrc/ops/attention_decode/attention_decode.h): 0 is
# the shipped launch; each bit turns one session-3 change off or forces a path.
VARIANT_NO_EARLY_TRIGGER = 1  # the combine kernel does not let the next kernel launch early (PDL)
VARIANT_OLD_COMBINE = 2  # the one-CTA-per-row combine kernel at every size
VARIANT_SKIP_COMBINE = 4  # timing only: no combine launch, the output is left unwritten
VARIANT_NO_SPLIT_ROUNDING = 8  # keep splits that get no tile
VARIANT_WIDE_COMBINE = 16  # the wide combine kernel at every size
VARIANT_MAIN = 1 | 2 | 8  # the session-2 launch
NUM_VARIANTS = 32


def set_tuning(variant: int, splits: int = 0) -> tuple:
    """Benchmark knob: launch variant bitmask and split-count override (0 = heuristic).

    Process-wide and read at launch, so a CUDA graph keeps the setting it was captured with.
    Returns the previous ``(variant, splits)``.
    """
    for name, v, hi in (("variant", variant, NUM_VARIANTS), ("splits", splits, 1025)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
            raise ValueError(f"{OP}.set_tuning: {name} must be an int in [0, {hi}), got {v!r}")
    ext = extension().attention_decode
    prev = tuple(ext.get_tuning())
    ext.set_tuning(variant, splits)
    return prev

"""Prefill and vision attention over packed variable-length sequences (Hopper kernel).

For sequence ``b`` (queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, keys ``cu_seqlens_k[b]:...``),
query ``i`` at position ``p = Lk - Lq + i`` (the queries are the *last* ``Lq`` tokens of the
``Lk`` keys: a cached prefix or chunked prefill) and key ``j`` at position ``s = j``::

    out[t, h] = sum_j softmax_j(scale * q[t, h] . k[j, h // g]) v[j, h // g]      g = nH / nKV
    over the keys j of the same sequence with allowed(p, s)

    left_ok  = window_left  is None or p - s <= window_left
    right_ok = window_right is None or s - p <= window_right
    same     = q_block[t] == k_block[j] >= 0                     (only with block ids)
    allowed  = left_ok and (right_ok or same)                    unified=False (Gemma4)
    allowed  = (left_ok and right_ok) or same                    unified=True  (gemma4_unified)

fp32 scores, softmax and accumulation; P is rounded to the input dtype for P.V (as every flash
kernel does); a query with no allowed key gets zeros. This is
:func:`gemma4x.reference.attention_varlen.attention_varlen` with its default positions.
Causal full layers are ``(None, 0)``, sliding layers ``(W - 1, 0)`` with the image block ids, the
vision tower ``(None, None)`` (bidirectional, one sequence per image).

The kernel (``csrc/include/gemma4x/attention/attention_varlen_sm90.cuh``) is built for sm_90a
(H100/H200) only. :func:`attention_varlen` runs it when :func:`kernel_supported` says so and
otherwise falls back to torch SDPA per sequence with the explicit boolean mask (other GPUs,
builds without an sm_90 target), so every CUDA GPU gets the same contract.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from gemma4x.ops._checks import _fmt_dtype
from gemma4x.ops._dtypes import DTYPE_CODES
from gemma4x.ops._launch import device_capability, on_device
from gemma4x.ops._load import cuda_kernels_available, extension
from gemma4x.reference.attention import attention_mask

OP = "attention_varlen"
HEAD_DIMS = (64, 72, 256, 512)
KEY_TILE = 64  # keys per tile; the per-tile block-id summaries use this granularity
MAX_GRID_Y = 65535
_DTYPES = (torch.bfloat16, torch.float16)
# Kernel variants (csrc/ops/attention/attention_varlen_sm90.cu): bit 0 warpgroup MMAs (wgmma; head
# dim 72 always runs mma.sync), bit 1 64-row tiles with several CTAs per SM (head dims 256/64/72;
# head dim 512 always uses 64-row tiles and one CTA per SM). Bit 2 ("fa3"): the
# FlashAttention-3-structured kernels (TMA producer warpgroup, K/V stage ring, consumer
# warpgroups): attention_varlen_fa3_sm90.cuh at head dims 256/512, attention_varlen_fa3_small_sm90.cuh
# at 64/72 (128-key stages, d 72 zero-padded in shared memory by the TMA unit). "fa3_alt" is its
# other schedule: head dims 256/64/72 without the consumers' ping-pong turns, head dim 512 with Q
# read from shared memory only (not partly from registers). At head dims 64/72 only ("fa3" /
# "fa3_alt" at 256/512): "fa3_ovl" Q from shared memory with the softmax kept overlapping P.V,
# "fa3_m192" 192-row tiles (3 consumer warpgroups).
BACKENDS = {
    "wgmma": 1, "wgmma_m64": 3, "mma_sync": 0, "mma_sync_m64": 2, "fa3": 4, "fa3_alt": 6, "fa3_ovl": 5,
    "fa3_m192": 12,
}  # fmt: skip
SMALL_ONLY = ("fa3_ovl", "fa3_m192")  # the same kernels as "fa3" / "fa3_alt" at head dims 256/512
FA3 = 4


def block_m(d: int, variant: int) -> int:
    """Query rows per CTA of the kernel for head dim ``d`` (a GPU test compares with the extension)."""
    if variant & FA3:
        if d in (64, 72):
            return 192 if variant & 8 else 128
        return 128 if d == 256 else 64
    return 64 if d == 512 or variant & 2 else 128


# Default variant per head dim, from bench/RESULTS.md (H200, one run): "fa3" beats "wgmma" on 17 of
# the 18 text rows (8k causal: 603 vs 413 TFLOP/s at d 256, 334 vs 296 at d 512; the exception is
# d 512 window + images at 32k, 4% slower) and "fa3_alt" everywhere. Head dims 64/72 (vision):
# "fa3" (attention_varlen_fa3_small_sm90.cuh), see the vision section of bench/RESULTS.md.
DEFAULT_BACKENDS = {64: "fa3", 72: "fa3", 256: "fa3", 512: "fa3"}
DEFAULT_BACKEND = "wgmma"  # head dims not in DEFAULT_BACKENDS (none today)


def _default_backend(d: int) -> str:
    b = os.environ.get("GEMMA4X_ATTN_MMA", DEFAULT_BACKENDS.get(d, DEFAULT_BACKEND))
    if b not in BACKENDS:
        raise ValueError(f"GEMMA4X_ATTN_MMA must be one of {tuple(BACKENDS)}, got {b!r}")
    return b


def _window(name: str, w) -> int:
    if w is None:
        return -1
    if isinstance(w, bool) or not isinstance(w, int) or w < 0 or w >= 2**31:
        raise ValueError(f"{OP}: {name} must be None or an int in [0, 2^31), got {w!r}")
    return w


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, q_block, k_block, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{OP}: {name} must be 3-D ([tokens, heads, head_dim]), got shape {list(t.shape)}")
    Nq, nH, d = q.shape
    Nk, nKV, dk = k.shape
    if q.dtype not in _DTYPES:
        raise TypeError(f"{OP}: q has dtype {_fmt_dtype(q.dtype)}, expected bfloat16 or float16")
    if d not in HEAD_DIMS:
        raise ValueError(f"{OP}: head_dim must be one of {HEAD_DIMS}, got {d} (q shape {list(q.shape)})")
    if dk != d:
        raise ValueError(f"{OP}: k must have shape [Nk, nKV, {d}], got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{OP}: v must have shape {list(k.shape)} like k, got {list(v.shape)}")
    if nKV == 0 or nH % nKV != 0:
        raise ValueError(f"{OP}: q has {nH} heads, not a multiple of k's {nKV} KV heads")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected {_fmt_dtype(q.dtype)} (as q)")
        if t.device != q.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, expected {q.device} (as q)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 and t.shape[2] > 1:
            raise ValueError(f"{OP}: {name} must be contiguous in head_dim, got strides {list(t.stride())}")
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, Nq), ("cu_seqlens_k", cu_seqlens_k, Nk)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
            shape = list(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"{OP}: {name} must be a 1-D tensor [B+1] with B >= 1, got {shape}")
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OP}: {name} has dtype {_fmt_dtype(cu.dtype)}, expected int32 or int64")
        if cu.device != q.device:
            raise ValueError(f"{OP}: {name} is on {cu.device}, expected {q.device} (as q)")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{OP}: cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences, cu_seqlens_k {cu_seqlens_k.numel() - 1}"
        )
    if (q_block is None) != (k_block is None):
        raise ValueError(f"{OP}: give both q_block and k_block, or neither")
    for name, t, n in (("q_block", q_block, Nq), ("k_block", k_block, Nk)):
        if t is None:
            continue
        if list(t.shape) != [n]:
            raise ValueError(f"{OP}: {name} must have shape [{n}], got {list(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected int32 or int64")
        if t.device != q.device:
            raise ValueError(f"{OP}: {name} is on {t.device}, expected {q.device} (as q)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{OP}: scale must be a finite float > 0, got {scale!r}")
    B = cu_seqlens_q.numel() - 1
    tiles = -(-Nq // 64) + B  # the smallest tile: a bound for every variant
    if tiles > MAX_GRID_Y:
        raise ValueError(f"{OP}: {Nq} query tokens in {B} sequences need {tiles} tiles, over the limit {MAX_GRID_Y}")
    if max(Nq, Nk) >= 2**30:
        raise ValueError(f"{OP}: at most 2^30 tokens, got {Nq} queries and {Nk} keys")


def _check_cu_values(cu_seqlens_q, cu_seqlens_k, Nq, Nk) -> None:
    """Offsets must start at 0, never decrease and end at the token count (host sync; skipped in capture)."""
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, Nq), ("cu_seqlens_k", cu_seqlens_k, Nk)):
        c = cu.tolist()
        if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
            shown = c if len(c) <= 16 else c[:8] + ["..."] + c[-4:]
            raise ValueError(f"{OP}: {name} {shown} must start at 0, never decrease and end at {total}")


def kernel_supported(q: torch.Tensor) -> bool:
    """True when the sm_90a kernel can run for tensors like ``q`` (else :func:`attention_varlen` uses SDPA)."""
    if not q.is_cuda or q.dtype not in _DTYPES or q.dim() != 3 or q.shape[-1] not in HEAD_DIMS:
        return False
    if not cuda_kernels_available() or not getattr(extension().attention, "has_sm90", False):
        return False
    return device_capability(q.device) == (9, 0)


def _aligned(t: torch.Tensor, tma: bool = False) -> torch.Tensor:
    """``t`` if its base and token/head strides allow 16-byte loads, else a contiguous copy.

    ``tma``: the "fa3" kernel's tensor maps also need token stride >= head stride >= head dim
    (strides of size-1 dimensions do not count).
    """
    ok = t.data_ptr() % 16 == 0 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0
    if ok and tma:
        n, h, d = t.shape
        hs = t.stride(1) if h > 1 else d
        ok = hs >= d and (n <= 1 or t.stride(0) >= hs * h)
    return t if ok else t.contiguous()


def _kb_summary(k_block: torch.Tensor, Nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 64-key chunk of the packed keys: min block id >= 0 (INT32_MAX if none) and max (-1 if none)."""
    chunks = -(-Nk // KEY_TILE)
    kb = F.pad(k_block, (0, chunks * KEY_TILE - Nk), value=-1).view(chunks, KEY_TILE)
    big = torch.iinfo(torch.int32).max
    kb_min = torch.where(kb >= 0, kb, big).amin(dim=1).to(torch.int32)
    kb_max = kb.amax(dim=1).to(torch.int32)
    return kb_min.contiguous(), kb_max.contiguous()


@torch.library.custom_op("gemma4x::attention_varlen", mutates_args=())
def _attention_varlen_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_block: torch.Tensor | None,
    k_block: torch.Tensor | None,
    window_left: int,
    window_right: int,
    unified: bool,
    scale: float,
    variant: int,
) -> torch.Tensor:
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, q_block, k_block, scale)
    Nq, nH, d = q.shape
    Nk, nKV, _ = k.shape
    out = torch.empty(Nq, nH, d, dtype=q.dtype, device=q.device)
    if Nq == 0:
        return out
    B = cu_seqlens_q.numel() - 1
    bm = block_m(d, variant)
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    tiles = (cu_q[1:] - cu_q[:-1] + bm - 1) // bm
    tile_cum = F.pad(torch.cumsum(tiles, 0, dtype=torch.int32), (1, 0)).contiguous()
    tma = bool(variant & FA3)
    q, k, v = _aligned(q, tma), _aligned(k, tma), _aligned(v, tma)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    qb = kb = kb_min = kb_max = None
    if q_block is not None and Nk > 0:
        qb = q_block.to(torch.int32).contiguous()
        kb = k_block.to(torch.int32).contiguous()
        kb_min, kb_max = _kb_summary(kb, Nk)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    with on_device(q) as stream:
        extension().attention.attention_varlen(
            out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, cu_q.data_ptr(), cu_k.data_ptr(),
            tile_cum.data_ptr(), ptr(qb), ptr(kb), ptr(kb_min), ptr(kb_max),
            B, nH, nKV, d, Nq, Nk, -(-Nq // bm) + B, bm, window_left, window_right, unified,
            float(scale), variant, DTYPE_CODES[q.dtype], stream,
        )  # fmt: skip
    return out


@_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, q_block, k_block, window_left, window_right, unified, scale, variant):
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, q_block, k_block, scale)
    return q.new_empty(q.shape)


def _attention_varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, wl, wr, q_block, k_block, unified, scale):
    """Fallback: torch SDPA per sequence with the explicit mask (host sync on the offsets)."""
    nH, nKV = q.shape[1], k.shape[1]
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        Lq, Lk = q1 - q0, k1 - k0
        q_pos = torch.arange(Lk - Lq, Lk, device=q.device)
        k_pos = torch.arange(Lk, device=q.device)
        blocks = (None, None) if q_block is None else (q_block[q0:q1], k_block[k0:k1])
        mask = attention_mask(q_pos, k_pos, wl, wr, *blocks, unified=unified)
        o = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=nH != nKV,
        )  # fmt: skip
        out[q0:q1] = o.transpose(0, 1).masked_fill(~mask.any(-1)[:, None, None], 0.0)
    return out


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    window_left: int | None = None,
    window_right: int | None = 0,
    q_block: torch.Tensor | None = None,
    k_block: torch.Tensor | None = None,
    unified: bool = False,
    scale: float = 1.0,
    backend: str | None = None,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Masked GQA attention over a packed batch; the math is in the module docstring.

    Args:
        q: ``[Nq, nH, d]`` bfloat16/float16 CUDA tensor, head dim contiguous, ``d`` in 64/72/256/512.
        k, v: ``[Nk, nKV, d]``, dtype and device of ``q``, ``nH % nKV == 0``.
        cu_seqlens_q / cu_seqlens_k: ``[B+1]`` int32/int64 offsets (0, ..., Nq / Nk); a sequence may be
            empty, and may have more keys than queries (its queries are its last keys).
        window_left / window_right: ``None`` (unbounded) or an int ``>= 0``; causal ``(None, 0)``,
            sliding ``W`` ``(W - 1, 0)``, bidirectional ``(None, None)``.
        q_block / k_block: ``[Nq]`` / ``[Nk]`` int32/int64 image block ids (``-1`` = text), both or
            neither; compared only inside one sequence.
        unified: gemma4_unified's block overlay (see the module docstring).
        scale: multiplies ``q.k``, finite and ``> 0`` (Gemma 4 uses 1.0).
        backend: one of :data:`BACKENDS` (default: ``$GEMMA4X_ATTN_MMA`` or
            :data:`DEFAULT_BACKENDS` for the head dim): ``"wgmma"`` / ``"mma_sync"`` pick the MMA
            instructions of the cp.async kernel (head dim 72 always runs mma.sync), the ``_m64``
            forms 64-row tiles with several CTAs per SM; ``"fa3*"`` the warp-specialised TMA
            kernels (every head dim; ``"fa3_ovl"`` / ``"fa3_m192"`` differ from ``"fa3"`` at head
            dims 64/72 only).
        check_offsets: check the offsets' values on the host (one sync; skipped during CUDA-graph
            capture). Callers that build the offsets themselves pass False.

    Returns:
        ``[Nq, nH, d]`` in ``q.dtype``.
    """
    wl, wr = _window("window_left", window_left), _window("window_right", window_right)
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, q_block, k_block, scale)
    if not q.is_cuda:
        raise ValueError(f"{OP}: q must be a CUDA tensor, got device {q.device} (use gemma4x.reference on CPU)")
    backend = backend or _default_backend(q.shape[-1])
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    if check_offsets and not torch.cuda.is_current_stream_capturing():
        _check_cu_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    if not kernel_supported(q):
        return _attention_varlen_sdpa(
            q, k, v, cu_seqlens_q, cu_seqlens_k, window_left, window_right, q_block, k_block, unified, scale
        )
    return torch.ops.gemma4x.attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, q_block, k_block, wl, wr, bool(unified), float(scale),
        BACKENDS[backend],
    )  # fmt: skip

"""The decode step's KV-cache write on the GPU: K, V and the ring position in one launch.

Per layer and step the indexing path costs 3-4 small kernels (``pos % R``, two ``index_put`` s,
the ring positions); this op is one. Same contract as :func:`gemma4x.reference.kv_cache.kv_cache_write`:
out-of-range slots or rows are skipped, never written out of bounds, and nothing is read back to
the host, so it captures into the runtime's decode CUDA graphs.
"""

from __future__ import annotations

from typing import Optional

import torch

from gemma4x.ops._checks import _fmt_dtype, check_cuda
from gemma4x.ops._launch import on_device
from gemma4x.ops._load import extension

_OP = "kv_cache_write"


def _check(k_cache, v_cache, ring_pos, k, v, slots, positions) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"{_OP}: k_cache must be [slots, rows, nKV, d], got shape {list(k_cache.shape)}")
    S, R, nkv, d = k_cache.shape
    B = slots.shape[0] if slots.dim() == 1 else k.shape[0]  # the batch the slots name
    for name, t, shape in (
        ("v_cache", v_cache, [S, R, nkv, d]),
        ("k", k, [B, nkv, d]),
        ("v", v, [B, nkv, d]),
        ("slots", slots, [B]),
        ("positions", positions, [B]),
    ):
        if list(t.shape) != shape:
            raise ValueError(f"{_OP}: {name} has shape {list(t.shape)}, expected {shape}")
    for name, t in (("v_cache", v_cache), ("k", k), ("v", v)):
        if t.dtype != k_cache.dtype:
            raise TypeError(
                f"{_OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected {_fmt_dtype(k_cache.dtype)} (as k_cache)"
            )
    for name, t in (("slots", slots), ("positions", positions)):
        if t.dtype != torch.int64:
            raise TypeError(f"{_OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected int64")
    if ring_pos is not None and (
        list(ring_pos.shape) != [S, R] or ring_pos.dtype != torch.int64 or not ring_pos.is_contiguous()
    ):
        raise ValueError(
            f"{_OP}: ring_pos must be a contiguous int64 [{S}, {R}], got {_fmt_dtype(ring_pos.dtype)} "
            f"{list(ring_pos.shape)}"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be contiguous, got strides {list(t.stride())}")
    for name, t in (("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != d:
            raise ValueError(f"{_OP}: {name} must have contiguous [nKV, d] rows, got strides {list(t.stride())}")
    if not slots.is_contiguous():
        raise ValueError(f"{_OP}: slots must be contiguous")
    for name, t in (("v_cache", v_cache), ("ring_pos", ring_pos), ("k", k), ("v", v), ("slots", slots),
                    ("positions", positions)):  # fmt: skip
        if t is not None and t.device != k_cache.device:
            raise ValueError(f"{_OP}: {name} is on {t.device}, expected {k_cache.device} (as k_cache)")


def supported(k_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the kernel's 16-byte vector rows fit these tensors (else use the reference)."""
    es = k_cache.element_size()
    row_bytes = k_cache.shape[2] * k_cache.shape[3] * es
    return (
        k_cache.is_cuda
        and row_bytes % 16 == 0
        and (k.stride(0) * es) % 16 == 0
        and (v.stride(0) * es) % 16 == 0
        and all(t.data_ptr() % 16 == 0 for t in (k_cache, k, v))
    )


@torch.library.custom_op("gemma4x::kv_cache_write", mutates_args=("k_cache", "v_cache", "ring_pos"))
def _kv_cache_write_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ring_pos: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads the annotation)
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    _check(k_cache, v_cache, ring_pos, k, v, slots, positions)
    check_cuda(_OP, "k_cache", k_cache)
    S, R, nkv, d = k_cache.shape
    es = k_cache.element_size()
    with on_device(k_cache) as stream:
        extension().kv_cache.kv_cache_write(
            k_cache.data_ptr(), v_cache.data_ptr(), 0 if ring_pos is None else ring_pos.data_ptr(),
            k.data_ptr(), k.stride(0) * es, v.data_ptr(), v.stride(0) * es, slots.data_ptr(),
            positions.data_ptr(), positions.stride(0) if positions.numel() > 1 else 1, S, R, nkv * d * es,
            k.shape[0], stream,
        )  # fmt: skip


@_kv_cache_write_op.register_fake
def _(k_cache, v_cache, ring_pos, k, v, slots, positions):
    _check(k_cache, v_cache, ring_pos, k, v, slots, positions)


def kv_cache_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ring_pos: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write one token per sequence into the per-slot cache, in place (one kernel).

    Args:
        k_cache, v_cache: ``[slots, rows, nKV, d]`` contiguous; ``rows`` = max_seq_len (full
            layers) or the window (ring layers).
        ring_pos: int64 ``[slots, rows]`` for ring layers (row = pos % rows; records pos), else None
            (row = pos).
        k, v: ``[B, nKV, d]`` (rows may be strided: ``k[:, 0]`` of a ``[B, 1, nKV, d]`` tensor).
        slots: int64 ``[B]``, the cache slot of each sequence.
        positions: int64 ``[B]`` (may be strided), the position of each new token.
    """
    torch.ops.gemma4x.kv_cache_write(k_cache, v_cache, ring_pos, k, v, slots, positions)

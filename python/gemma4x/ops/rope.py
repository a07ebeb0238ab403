"""An attention layer's inputs on the GPU: per-head RMSNorm of q, k, v and RoPE of q, k, one launch.

Replaces the op chain ``rope(rms_norm(q))``, ``rope(rms_norm(k))``, ``rms_norm(v)`` (three norm
launches and about a dozen elementwise ones per layer at decode) with one kernel that rounds
wherever that chain materialises a tensor. The pure-PyTorch twin is
:func:`gemma4x.reference.rope.qkv_norm_rope`.

Inputs are ``[B, T, heads, d]`` whose heads are contiguous within a token, so q, k and v may be
column slices of one fused projection output; outputs are new contiguous tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from gemma4x.ops._checks import _fmt_dtype, check_cuda, check_float_scalar
from gemma4x.ops._dtypes import DTYPE_CODES
from gemma4x.ops._launch import on_device
from gemma4x.ops._load import extension
from gemma4x.reference import rope as _reference

HEAD_DIMS = (64, 128, 256, 512)
_OP = "qkv_norm_rope"


def _token_stride(name: str, t: torch.Tensor) -> int:
    """Elements between consecutive tokens of ``t [B, T, h, d]``, or -1 if B and T do not collapse."""
    B, T, h, d = t.shape
    if t.stride(3) != 1 or (h > 1 and t.stride(2) != d):
        raise ValueError(
            f"{_OP}: {name} must have contiguous heads (strides [..., {d}, 1]), got strides {list(t.stride())}"
        )
    if T == 1:
        return t.stride(0)
    if B == 1 or t.stride(0) == T * t.stride(1):
        return t.stride(1)
    return -1


def _check(q, k, v, q_weight, k_weight, cos, sin, eps) -> None:
    if q.dim() != 4:
        raise ValueError(f"{_OP}: q must be [B, T, heads, head_dim], got shape {list(q.shape)}")
    if q.dtype not in DTYPE_CODES:
        raise TypeError(f"{_OP}: q must be float32, float16 or bfloat16, got {_fmt_dtype(q.dtype)}")
    B, T, _, d = q.shape
    if d not in HEAD_DIMS:
        raise ValueError(f"{_OP}: head_dim must be one of {HEAD_DIMS}, got {d}")

    def same(name: str, t: torch.Tensor, shape: list[int]) -> None:
        if list(t.shape) != shape:
            raise ValueError(f"{_OP}: {name} must have shape {shape}, got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected {_fmt_dtype(q.dtype)} (as q)")
        if t.device != q.device:
            raise ValueError(f"{_OP}: {name} is on {t.device}, expected {q.device} (as q)")

    for name, t in (("k", k), ("v", v)):
        if t is not None:
            if t.dim() != 4:
                raise ValueError(f"{_OP}: {name} must be [B, T, heads, head_dim], got shape {list(t.shape)}")
            same(name, t, [B, T, t.shape[2], d])
    if k is not None and k_weight is None:
        raise ValueError(f"{_OP}: k is given, so k_weight is required")
    same("q_weight", q_weight, [d])
    if k_weight is not None:
        same("k_weight", k_weight, [d])
    same("cos", cos, [B, T, d])
    same("sin", sin, [B, T, d])
    check_float_scalar(_OP, "eps", eps)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None:
            _token_stride(name, t)  # raises for heads that are not contiguous


def _launch_args(name: str, t: Optional[torch.Tensor], weight, eps: float, rotate: bool, out):  # noqa: UP045
    if t is None:
        return (0, 0, 0, 0, 0.0, False, 0)
    stride = _token_stride(name, t)
    return (
        t.data_ptr(), stride, t.shape[2], 0 if weight is None else weight.data_ptr(), float(eps), rotate,
        out.data_ptr(),
    )  # fmt: skip


def _empty_like_rows(t: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:  # noqa: UP045
    return torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else ref.new_empty(0)


@torch.library.custom_op("gemma4x::qkv_norm_rope", mutates_args=())
def _qkv_norm_rope_op(
    q: torch.Tensor,
    k: Optional[torch.Tensor],  # noqa: UP045
    v: Optional[torch.Tensor],  # noqa: UP045
    q_weight: torch.Tensor,
    k_weight: Optional[torch.Tensor],  # noqa: UP045
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, v, q_weight, k_weight, cos, sin, eps)
    check_cuda(_OP, "q", q)
    # Rare layouts whose batch and token dimensions do not collapse into one stride are copied.
    q, k, v = (t if t is None or _token_stride(n, t) >= 0 else t.contiguous() for n, t in zip("qkv", (q, k, v)))
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out, v_out = _empty_like_rows(q, q), _empty_like_rows(k, q), _empty_like_rows(v, q)
    B, T, _, d = q.shape
    if B * T == 0:
        return q_out, k_out, v_out
    with on_device(q) as stream:
        extension().rope.qkv_norm_rope(
            _launch_args("q", q, q_weight, eps, True, q_out),
            _launch_args("k", k, k_weight, eps, True, k_out),
            _launch_args("v", v, None, eps, False, v_out),
            cos.data_ptr(), sin.data_ptr(), B * T, d, DTYPE_CODES[q.dtype], stream,
        )  # fmt: skip
    return q_out, k_out, v_out


@_qkv_norm_rope_op.register_fake
def _(q, k, v, q_weight, k_weight, cos, sin, eps):
    _check(q, k, v, q_weight, k_weight, cos, sin, eps)
    return _empty_like_rows(q, q), _empty_like_rows(k, q), _empty_like_rows(v, q)


def qkv_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``rope(rms_norm(q, q_weight))``, ``rope(rms_norm(k, k_weight))``, ``rms_norm(v)`` in one launch.

    Args:
        q: ``[B, T, Hq, d]``, ``d`` in 64/128/256/512, heads contiguous within a token.
        k, v: ``[B, T, Hkv, d]`` or None (a KV-shared layer); ``v`` may be the same tensor as ``k``.
        q_weight, k_weight: ``[d]`` RMSNorm scales (``v`` has none).
        cos, sin: ``[B, T, d]`` in the activation dtype.
        eps: the RMSNorm epsilon.

    Returns:
        ``(q, k, v)`` as new contiguous tensors, None where the input was None.
    """
    qo, ko, vo = torch.ops.gemma4x.qkv_norm_rope(q, k, v, q_weight, k_weight, cos, sin, eps)
    return qo, (ko if k is not None else None), (vo if v is not None else None)


def qkv_norm_rope_or_reference(q, k, v, q_weight, k_weight, cos, sin, eps):
    """The kernel where it applies (CUDA, a supported head_dim), the reference op chain otherwise."""
    if q.is_cuda and q.dim() == 4 and q.shape[-1] in HEAD_DIMS and q.dtype in DTYPE_CODES:
        return qkv_norm_rope(q, k, v, q_weight, k_weight, cos, sin, eps)
    return _reference.qkv_norm_rope(q, k, v, q_weight, k_weight, cos, sin, eps)

"""RMSNorm family on the GPU (Gemma 4 flavour).

Gemma 4 RMSNorm is ``y = x * (mean(x^2) + eps)^-0.5 * w`` computed in fp32 and rounded once
to the input dtype (plain ``w``, not ``1 + w``). The kernels round every intermediate that
the HF module graph materialises at the same point, so bf16 outputs match HF's.
Pure-PyTorch twins with the same signatures live in :mod:`gemma4x.reference.norm`.
"""

from __future__ import annotations

from typing import Optional

import torch

from gemma4x.ops._checks import (
    check_cuda,
    check_float_scalar,
    check_rows,
    check_same,
    check_same_shape,
    check_weight,
)
from gemma4x.ops._dtypes import dtype_code
from gemma4x.ops._launch import as_rows, on_device
from gemma4x.ops._load import extension


def _check_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> None:
    op = "rms_norm"
    dtype_code(x, f"{op}: x")
    check_rows(op, "x", x)
    if weight is not None:
        check_weight(op, "weight", weight, x)
    check_float_scalar(op, "eps", eps)


def _check_norm_with_residual(op: str, x: torch.Tensor, residual: torch.Tensor, weight, eps: float) -> None:
    dtype_code(x, f"{op}: x")
    check_rows(op, "x", x)
    check_same_shape(op, "residual", residual, x, "x")
    check_rows(op, "residual", residual)
    if weight is not None:
        check_weight(op, "weight", weight, x)
    check_float_scalar(op, "eps", eps)


def _check_fused_add(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> None:
    _check_norm_with_residual("fused_add_rms_norm", x, residual, weight, eps)


def _check_layer_scalar(op: str, scalar: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if scalar.numel() != 1:
        raise ValueError(f"{op}: scalar must have exactly 1 element, got shape {list(scalar.shape)}")
    check_same(op, "scalar", scalar, like, like_name)


def _check_moe_tail(x1, x2, residual, w1, w2, w3, scalar, eps1, eps2, eps3) -> None:
    op = "moe_tail_norm"
    dtype_code(x1, f"{op}: x1")
    check_rows(op, "x1", x1)
    for name, t in (("x2", x2), ("residual", residual)):
        check_same_shape(op, name, t, x1, "x1")
        check_rows(op, name, t)
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        check_weight(op, name, w, x1)
    _check_layer_scalar(op, scalar, x1, "x1")
    for name, eps in (("eps1", eps1), ("eps2", eps2), ("eps3", eps3)):
        check_float_scalar(op, name, eps)


def _check_residual(residual, x, weight, eps, scalar) -> None:
    op = "residual_rms_norm"
    _check_norm_with_residual(op, x, residual, weight, eps)
    if scalar is not None:
        _check_layer_scalar(op, scalar, x, "x")


@torch.library.custom_op("gemma4x::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    _check_rms_norm(x, weight, eps)
    check_cuda("rms_norm", "x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_rows, x_stride = as_rows(x, "x", "rms_norm")
    with on_device(x) as stream:
        extension().norm.rms_norm(
            out.data_ptr(), x.shape[-1], x_rows.data_ptr(), x_stride,
            0 if weight is None else weight.data_ptr(),
            x_rows.shape[0], x.shape[-1], float(eps), dtype_code(x, "x"), stream,
        )  # fmt: skip
    return out


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check_rms_norm(x, weight, eps)
    return x.new_empty(x.shape)


@torch.library.custom_op("gemma4x::fused_add_rms_norm", mutates_args=("residual",))
def _fused_add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    _check_fused_add(x, residual, weight, eps)
    check_cuda("fused_add_rms_norm", "x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_rows, x_stride = as_rows(x, "x", "fused_add_rms_norm")
    r_rows, r_stride = as_rows(residual, "residual", "fused_add_rms_norm", writable=True)
    with on_device(x) as stream:
        extension().norm.fused_add_rms_norm(
            out.data_ptr(), x.shape[-1], x_rows.data_ptr(), x_stride, r_rows.data_ptr(), r_stride,
            0 if weight is None else weight.data_ptr(),
            x_rows.shape[0], x.shape[-1], float(eps), dtype_code(x, "x"), stream,
        )  # fmt: skip
    return out


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    _check_fused_add(x, residual, weight, eps)
    return x.new_empty(x.shape)


@torch.library.custom_op("gemma4x::moe_tail_norm", mutates_args=())
def _moe_tail_norm_op(
    x1: torch.Tensor,
    x2: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    scalar: torch.Tensor,
    eps1: float,
    eps2: float,
    eps3: float,
) -> torch.Tensor:
    _check_moe_tail(x1, x2, residual, w1, w2, w3, scalar, eps1, eps2, eps3)
    check_cuda("moe_tail_norm", "x1", x1)
    out = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
    a, a_stride = as_rows(x1, "x1", "moe_tail_norm")
    b, b_stride = as_rows(x2, "x2", "moe_tail_norm")
    r, r_stride = as_rows(residual, "residual", "moe_tail_norm")
    with on_device(x1) as stream:
        extension().norm.moe_tail_norm(
            out.data_ptr(), x1.shape[-1], a.data_ptr(), a_stride, b.data_ptr(), b_stride, r.data_ptr(), r_stride,
            w1.data_ptr(), w2.data_ptr(), w3.data_ptr(), scalar.data_ptr(),
            a.shape[0], x1.shape[-1], float(eps1), float(eps2), float(eps3), dtype_code(x1, "x1"), stream,
        )  # fmt: skip
    return out


@_moe_tail_norm_op.register_fake
def _(x1, x2, residual, w1, w2, w3, scalar, eps1, eps2, eps3):
    _check_moe_tail(x1, x2, residual, w1, w2, w3, scalar, eps1, eps2, eps3)
    return x1.new_empty(x1.shape)


@torch.library.custom_op("gemma4x::residual_rms_norm", mutates_args=())
def _residual_rms_norm_op(
    residual: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, scalar: Optional[torch.Tensor]
) -> torch.Tensor:
    _check_residual(residual, x, weight, eps, scalar)
    check_cuda("residual_rms_norm", "x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_rows, x_stride = as_rows(x, "x", "residual_rms_norm")
    r_rows, r_stride = as_rows(residual, "residual", "residual_rms_norm")
    with on_device(x) as stream:
        extension().norm.residual_rms_norm(
            out.data_ptr(), x.shape[-1], x_rows.data_ptr(), x_stride, r_rows.data_ptr(), r_stride,
            0 if weight is None else weight.data_ptr(), 0 if scalar is None else scalar.data_ptr(),
            x_rows.shape[0], x.shape[-1], float(eps), dtype_code(x, "x"), stream,
        )  # fmt: skip
    return out


@_residual_rms_norm_op.register_fake
def _(residual, x, weight, eps, scalar):
    _check_residual(residual, x, weight, eps, scalar)
    return x.new_empty(x.shape)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``y = x * (mean(x^2, -1) + eps)^-0.5 [* weight]`` in fp32, rounded to ``x.dtype``.

    Args:
        x: ``[..., hidden]`` float32/float16/bfloat16 CUDA tensor, last dim contiguous
            (rows may be strided).
        weight: ``[hidden]``, same dtype and device as ``x``, or ``None`` for a scale-free norm.
        eps: added to the mean square.
    Returns:
        New contiguous tensor shaped like ``x``.
    """
    return torch.ops.gemma4x.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """``residual <- residual + x`` (rounded to the dtype, in place); returns ``rms_norm(residual, weight, eps)``.

    Args:
        x: ``[..., hidden]`` CUDA tensor, last dim contiguous.
        residual: same shape, dtype and device as ``x``; updated in place, so it must be
            viewable as ``[rows, hidden]`` rows of one stride.
        weight: ``[hidden]`` or ``None``.
        eps: added to the mean square.
    """
    return torch.ops.gemma4x.fused_add_rms_norm(x, residual, weight, eps)


def moe_tail_norm(
    x1: torch.Tensor,
    x2: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    scalar: torch.Tensor,
    eps1: float,
    eps2: float,
    eps3: float,
) -> torch.Tensor:
    """Gemma 4 MoE-block tail: ``(rms_w3(rms_w1(x1) + rms_w2(x2)) + residual) * scalar``.

    Each norm, the sum, the residual add and the scalar product round to the dtype, as the HF
    decoder layer does. One kernel, one pass over the three inputs.

    Args:
        x1: ``[..., hidden]`` dense-MLP output (post_feedforward_layernorm_1 input).
        x2: same shape; routed-experts output (post_feedforward_layernorm_2 input).
        residual: same shape; the residual stream entering the FFN block.
        w1, w2, w3: ``[hidden]`` norm weights; same dtype/device as ``x1``.
        scalar: one-element tensor (the layer's ``layer_scalar``), same dtype as ``x1``.
        eps1, eps2, eps3: per-norm epsilons.
    """
    return torch.ops.gemma4x.moe_tail_norm(x1, x2, residual, w1, w2, w3, scalar, eps1, eps2, eps3)


def residual_rms_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    scalar: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out = T(residual + rms_norm(x, weight, eps))``, then ``T(out * scalar)`` when ``scalar`` is given.

    The dense Gemma 4 layer tail (``h1 + post_feedforward_layernorm(m)``, times ``layer_scalar``;
    the PLE branch's ``h + post_per_layer_input_norm(g)``) in one launch instead of two or three.
    Bit-identical to ``residual + rms_norm(x, weight, eps)`` (then ``* scalar``) with this
    package's ``rms_norm`` and PyTorch's add / mul on the GPU: the norm runs ``rms_norm``'s
    reduction in the same order and every step rounds to the dtype where those ops do. Out of
    place: ``residual`` is not written (callers keep using it).

    Args:
        residual: ``[..., hidden]`` CUDA tensor, last dim contiguous, rows may be strided.
        x: same shape, dtype and device; the tensor to normalise.
        weight: ``[hidden]`` or ``None`` for a scale-free norm.
        eps: added to the mean square.
        scalar: one-element tensor of the same dtype/device (the layer's ``layer_scalar``), or None.
    Returns:
        New contiguous tensor shaped like ``x``.
    """
    return torch.ops.gemma4x.residual_rms_norm(residual, x, weight, eps, scalar)

"""Argument checks shared by the ops' real and fake implementations.

Every failure names the argument and gives expected vs actual, so a wrong call fails the
same way in eager mode, under torch.compile tracing, and before a CUDA-graph capture.
"""

from __future__ import annotations

import math

import torch


def _fmt_dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def check_float_scalar(op: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{op}: {name} must be a finite float >= 0, got {value!r}")


def check_same(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {_fmt_dtype(t.dtype)}, expected {_fmt_dtype(ref.dtype)} (as {ref_name})")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {ref.device} (as {ref_name})")


def check_rows(op: str, name: str, t: torch.Tensor, *, hidden: int | None = None) -> None:
    """A [..., hidden] tensor whose last dimension is contiguous."""
    if t.dim() < 1:
        raise ValueError(f"{op}: {name} must have at least 1 dimension, got a 0-d tensor")
    if hidden is not None and t.shape[-1] != hidden:
        raise ValueError(f"{op}: {name} has last dimension {t.shape[-1]}, expected {hidden}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must be contiguous in its last dimension, got stride {t.stride(-1)}")


def check_weight(op: str, name: str, w: torch.Tensor, x: torch.Tensor) -> None:
    hidden = x.shape[-1]
    if w.dim() != 1 or w.shape[0] != hidden:
        raise ValueError(f"{op}: {name} must have shape [{hidden}], got {list(w.shape)}")
    if hidden > 1 and w.stride(0) != 1:
        raise ValueError(f"{op}: {name} must be contiguous, got stride {w.stride(0)}")
    check_same(op, name, w, x, "x")


def check_same_shape(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected {list(ref.shape)} (as {ref_name})")
    check_same(op, name, t, ref, ref_name)


def check_cuda(op: str, name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{op}: {name} must be a CUDA tensor, got device {t.device} (use gemma4x.reference on CPU)")


def check_tensor(op: str, name: str, t: torch.Tensor, shape, dtype, device, *, contiguous: bool = True) -> None:
    """Shape, dtype (one, a tuple of allowed ones, or None for any), device and contiguity of ``t``."""
    if list(t.shape) != list(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            names = " or ".join(_fmt_dtype(d) for d in allowed)
            raise TypeError(f"{op}: {name} has dtype {_fmt_dtype(t.dtype)}, expected {names}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {list(t.stride())}")

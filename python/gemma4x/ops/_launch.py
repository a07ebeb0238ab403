"""Small helpers the op wrappers share: row views, device guard and the current stream."""

from __future__ import annotations

import contextlib
import functools

import torch


def as_rows(t: torch.Tensor, name: str, op: str, *, writable: bool = False) -> tuple[torch.Tensor, int]:
    """View ``t`` as ``[rows, hidden]`` and return it with its row stride (in elements).

    Read-only inputs whose leading dimensions cannot be collapsed into one stride are copied;
    a written tensor must be viewable as rows, since a copy would lose the write.
    """
    hidden = t.shape[-1]
    try:
        rows = t.view(-1, hidden)
    except RuntimeError:
        if writable:
            raise ValueError(
                f"{op}: {name} with shape {list(t.shape)} and strides {list(t.stride())} cannot be viewed as "
                f"[rows, {hidden}] rows of one stride; it is written in place, so it cannot be copied"
            ) from None
        rows = t.reshape(-1, hidden)
    stride = rows.stride(0) if rows.shape[0] > 1 else hidden
    return rows, stride


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device; cached, since dispatch asks on every call.

    The one place the ops and layers read it, so every arch decision (sm_90a kernels on 9.0,
    sm_100a on 10.0) sees the same answer.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)


@contextlib.contextmanager
def on_device(t: torch.Tensor):
    """Make ``t``'s GPU current (kernels launch on the current device) and yield its stream handle."""
    if t.device.index is not None and t.device.index != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            yield torch.cuda.current_stream().cuda_stream
    else:
        yield torch.cuda.current_stream().cuda_stream

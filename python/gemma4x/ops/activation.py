"""Activation family on the GPU: GeGLU rounded as PyTorch's two ops round it.

``geglu(gate, up) = T(T(gelu_tanh(gate)) * up)``: ``F.gelu(gate, approximate="tanh")`` in fp32,
rounded to the dtype, times ``up`` in fp32, rounded again; bit-identical to those two PyTorch
ops on the GPU, in one launch instead of two. The pure-PyTorch twin is
:func:`gemma4x.reference.activation.geglu`.
"""

from __future__ import annotations

import torch

from gemma4x.ops._checks import check_cuda, check_rows, check_same_shape
from gemma4x.ops._dtypes import dtype_code
from gemma4x.ops._launch import as_rows, on_device
from gemma4x.ops._load import extension


def _check_geglu(gate: torch.Tensor, up: torch.Tensor) -> None:
    op = "geglu"
    dtype_code(gate, f"{op}: gate")
    check_rows(op, "gate", gate)
    check_same_shape(op, "up", up, gate, "gate")
    check_rows(op, "up", up)


@torch.library.custom_op("gemma4x::geglu", mutates_args=())
def _geglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_geglu(gate, up)
    check_cuda("geglu", "gate", gate)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g, g_stride = as_rows(gate, "gate", "geglu")
    u, u_stride = as_rows(up, "up", "geglu")
    cols = gate.shape[-1]
    with on_device(gate) as stream:
        extension().activation.geglu(
            out.data_ptr(), cols, g.data_ptr(), g_stride, u.data_ptr(), u_stride,
            g.shape[0], cols, dtype_code(gate, "gate"), stream,
        )  # fmt: skip
    return out


@_geglu_op.register_fake
def _(gate, up):
    _check_geglu(gate, up)
    return gate.new_empty(gate.shape)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``T(T(gelu_tanh(gate)) * up)``, ``gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` in fp32.

    Equal bit for bit to ``F.gelu(gate, approximate="tanh") * up`` on the GPU.

    Args:
        gate: ``[..., cols]`` float32/float16/bfloat16 CUDA tensor, last dim contiguous; rows
            may be strided, e.g. the first half of a fused ``[..., 2 * cols]`` gate/up output.
        up: same shape, dtype and device (no broadcasting), last dim contiguous, rows may be strided.
    Returns:
        New contiguous tensor shaped like ``gate``.
    """
    return torch.ops.gemma4x.geglu(gate, up)

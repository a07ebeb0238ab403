"""Triton baseline of the peer design for the Gemma 4 MoE-block tail.

The peer (a Triton "gemma4 fused ops" kernel) runs one program per row with the whole row in
one block: three RMSNorms, the residual add and the layer scalar, fp32 math. This is our own
re-implementation of that design, used only as a benchmark baseline; rounding points follow
the HF graph so its output is comparable with ours.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_tail_row(
    x1_ptr, x2_ptr, res_ptr, w1_ptr, w2_ptr, w3_ptr, scalar_ptr, out_ptr,
    stride_x1, stride_x2, stride_res, stride_out,
    hidden, eps1, eps2, eps3,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x1 = tl.load(x1_ptr + row * stride_x1 + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x2_ptr + row * stride_x2 + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
    w1 = tl.load(w1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w3 = tl.load(w3_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty

    r1 = 1.0 / tl.sqrt(tl.sum(x1 * x1, axis=0) / hidden + eps1)
    r2 = 1.0 / tl.sqrt(tl.sum(x2 * x2, axis=0) / hidden + eps2)
    n1 = (x1 * r1 * w1).to(dt).to(tl.float32)
    n2 = (x2 * r2 * w2).to(dt).to(tl.float32)
    s = (n1 + n2).to(dt).to(tl.float32)
    r3 = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / hidden + eps3)
    n3 = (s * r3 * w3).to(dt).to(tl.float32)
    scalar = tl.load(scalar_ptr).to(tl.float32)
    out = (n3 + res).to(dt).to(tl.float32) * scalar
    tl.store(out_ptr + row * stride_out + cols, out.to(dt), mask=mask)


def moe_tail_norm_triton(x1, x2, residual, w1, w2, w3, scalar, eps1, eps2, eps3):
    rows, hidden = x1.shape
    out = torch.empty_like(x1)
    block = triton.next_power_of_2(hidden)
    # The peer sizes warps by row length; 8 warps for rows of 4K+ elements.
    num_warps = 4 if block <= 2048 else 8
    _moe_tail_row[(rows,)](
        x1, x2, residual, w1, w2, w3, scalar, out,
        x1.stride(0), x2.stride(0), residual.stride(0), out.stride(0),
        hidden, eps1, eps2, eps3,
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return out

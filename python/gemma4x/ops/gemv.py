"""Decode-size linear layers on the GPU: ``y = x @ W^T (+ b)`` for at most 16 tokens.

At decode a linear layer reads its whole weight for one to a few tokens: pure memory traffic.
cuBLAS serves these shapes with split-K kernels plus a separate reduction, far from the memory
bandwidth on the few-MB weights of a Gemma 4 layer (bench/RESULTS.md). ``skinny_gemm`` streams
the weight once with 16-byte loads, feeds bf16/fp16 ``mma.sync`` from registers and reduces the
K split inside each block: one launch per layer. :func:`linear` picks it where it applies and
falls back to ``F.linear`` otherwise. The reference is :func:`gemma4x.reference.linear.linear`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from gemma4x.ops._checks import _fmt_dtype, check_cuda, check_tensor
from gemma4x.ops._dtypes import DTYPE_CODES
from gemma4x.ops._launch import on_device
from gemma4x.ops._load import extension

MAX_TOKENS = 16  # csrc/ops/gemv/gemv.h kMaxTokens (a GPU test compares)
# linear() takes the kernel up to this many tokens. H200, bench_skinny_gemm: at 1-8 tokens it
# ties or beats cuBLAS on most Gemma 4 decode shapes (26B o / gate-up 1.16-1.28x, q/k/v 0.89x);
# at 16 tokens cuBLAS wins on most (0.57-0.98x), so 9-16 tokens stay with cuBLAS.
DISPATCH_MAX_TOKENS = 8
ROWS = 16  # N must be a multiple of this (rows per block)
STEP_K = 32  # K must be a multiple of this (columns per warp step)
_OP = "skinny_gemm"


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[int, int, int]:  # noqa: UP045
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{_OP}: x must be bfloat16 or float16, got {_fmt_dtype(x.dtype)}")
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must be [..., K], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be [N, K], got shape {list(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{_OP}: x has K = {x.shape[-1]}, weight expects {K} (weight shape {list(weight.shape)})")
    M = x.numel() // K if K else 0
    if M > MAX_TOKENS:
        raise ValueError(f"{_OP}: at most {MAX_TOKENS} tokens (rows of x), got {M}; use F.linear")
    if N % ROWS or K % STEP_K or N == 0:
        raise ValueError(f"{_OP}: N must be a positive multiple of {ROWS} and K of {STEP_K}, got N={N}, K={K}")
    check_tensor(_OP, "weight", weight, [N, K], x.dtype, x.device)
    if bias is not None:
        check_tensor(_OP, "bias", bias, [N], x.dtype, x.device)
    return M, N, K


def supported(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:  # noqa: UP045
    """Whether :func:`linear` runs this call on :func:`skinny_gemm` (device, dtype, sizes, layout)."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2 and x.dim() >= 1):
        return False
    N, K = weight.shape
    return (
        x.shape[-1] == K
        and 0 < x.numel() // max(K, 1) <= DISPATCH_MAX_TOKENS
        and N % ROWS == 0
        and K % STEP_K == 0
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and weight.device == x.device
        and weight.data_ptr() % 16 == 0
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.device == x.device))
    )


@torch.library.custom_op("gemma4x::skinny_gemm", mutates_args=())
def _skinny_gemm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    M, N, K = _check(x, weight, bias)
    check_cuda(_OP, "x", x)
    rows = x.reshape(M, K)
    if rows.stride(-1) != 1 or (M > 1 and rows.stride(0) % 8) or rows.data_ptr() % 16:
        rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    with on_device(x) as stream:
        extension().gemv.skinny_gemm(
            out.data_ptr(), N, rows.data_ptr(), rows.stride(0) if M > 1 else K, weight.data_ptr(),
            0 if bias is None else bias.data_ptr(), M, N, K, DTYPE_CODES[x.dtype], stream,
        )  # fmt: skip
    return out


@_skinny_gemm_op.register_fake
def _(x, weight, bias):
    _, N, _ = _check(x, weight, bias)
    return x.new_empty(*x.shape[:-1], N)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias)`` for at most 16 rows of ``x``; bf16/fp16, fp32 accumulation.

    Needs ``N % 16 == 0``, ``K % 32 == 0``, a contiguous weight. Every Gemma 4 linear qualifies.
    """
    return torch.ops.gemma4x.skinny_gemm(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the skinny GEMM for decode sizes on the GPU."""
    if supported(x, weight, bias):
        return skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)

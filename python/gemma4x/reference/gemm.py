"""Reference NVFP4 W4A4 GEMM, the pure-PyTorch twin of :func:`gemma4x.ops.gemm.nvfp4_gemm`.

    out[m, n] = bf16( alpha * sum_k e2m1(a[m, k]) * sfa[m, k//16] * e2m1(b[n, k]) * sfb[n, k//16] )

with the block scales in CUTLASS's SM100 order (:func:`gemma4x.reference.quant.nvfp4_swizzle_scales`)
and ``alpha = input_scale * weight_scale_2``. Every product of two e2m1 values and two e4m3
scales is exact in fp32; the sum is fp32, the output one bf16 rounding.
"""

from __future__ import annotations

import torch

from gemma4x.reference.quant import (
    NVFP4_BLOCK,
    nvfp4_dequantize,
    nvfp4_unswizzle_scales,
    nvfp4_unswizzle_scales_grouped,
)


def nvfp4_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """``bf16(alpha * dequant(a) @ dequant(b)^T)``; same arguments as the op (swizzled scales)."""
    M, N, K = a.shape[0], b.shape[0], a.shape[1] * 2
    kb = K // NVFP4_BLOCK
    return nvfp4_gemm_dequantized(
        a, nvfp4_unswizzle_scales(a_scale, M, kb), b, nvfp4_unswizzle_scales(b_scale, N, kb), alpha
    )


def nvfp4_grouped_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    row_offsets: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """Per expert ``e``: ``out[rows_e] = bf16(alpha[e] * dequant(a[rows_e]) @ dequant(b[e])^T)``.

    Same arguments as :func:`gemma4x.ops.gemm.nvfp4_grouped_gemm`: ``a`` rows sorted by expert with
    ``row_offsets [E+1]``, ``a_scale`` swizzled per group (:func:`nvfp4_swizzle_scales_grouped`).
    """
    E, N, half_k = b.shape
    K = 2 * half_k
    kb = K // NVFP4_BLOCK
    rows = [int(v) for v in row_offsets.tolist()]
    sfa = nvfp4_unswizzle_scales_grouped(a_scale, rows, kb)
    out = torch.empty(a.shape[0], N, dtype=torch.bfloat16, device=a.device)
    for e in range(E):
        lo, hi = rows[e], rows[e + 1]
        if hi > lo:
            sfb = nvfp4_unswizzle_scales(b_scale[e], N, kb)
            out[lo:hi] = nvfp4_gemm_dequantized(a[lo:hi], sfa[lo:hi], b[e], sfb, alpha[e])
    return out


def nvfp4_gemm_dequantized(a, sfa, b, sfb, alpha) -> torch.Tensor:
    """``bf16(alpha * dequant(a) @ dequant(b)^T)`` with row-major (unswizzled) block scales."""
    a_deq = nvfp4_dequantize(a, sfa, 1.0)
    b_deq = nvfp4_dequantize(b, sfb, 1.0)
    return ((a_deq @ b_deq.T) * alpha.float().reshape(())).to(torch.bfloat16)

"""NVFP4 W4A16 at prefill sizes on SM90: TMA + warp-specialised RS WGMMA, weights dequantised in registers.

Same math and packed weights as the decode kernels of :mod:`gemma4x.ops.nvfp4` (no second copy)::

    out[m, n] = bf16( g * sum_k x[m, k] * e2m1[n, k] * s[n, k // 16] )          fp32 accumulation

Kernel: ``csrc/include/gemma4x/nvfp4/w4a16_wgmma_sm90.cuh``. Weights are the wgmma M side (128
or 256 rows per tile, two consumer warpgroups), tokens the N side (128 or 256 per tile), one TMA
box of packed units and one of activations per 64-column stage, ``g`` applied once in the epilogue.

* :func:`w4a16_gemm_sm90`: dense ``x [M, K] @ W^T`` (``NVFP4Linear`` beyond the decode sizes).
* :func:`w4a16_moe_experts_prefill`: routed GeGLU experts; the bf16 prefill path's device-side
  routing (count, scan, gather) and finalize around two grouped W4A16 GEMMs, GeGLU fused into
  GEMM1's epilogue (gate/up rows interleaved by 8 in the packed weight).

``tile`` (weight rows x tokens per CTA tile): 0 = auto, 1 = 128x128, 2 = 128x256, 3 = 256x128.
Auto: dense takes the variant with the fewest waves x measured tile time; experts take 256x128.
"""

from __future__ import annotations

import torch

from gemma4x.ops._checks import _fmt_dtype, check_cuda
from gemma4x.ops._launch import on_device
from gemma4x.ops._load import extension
from gemma4x.ops.nvfp4 import _check_gemm, _check_moe

MOE_PREFILL_MAX_EXPERTS = 256
MOE_PREFILL_MAX_TOP_K = 32

__all__ = ["MOE_PREFILL_MAX_EXPERTS", "MOE_PREFILL_MAX_TOP_K", "w4a16_gemm_sm90", "w4a16_moe_experts_prefill"]


def _check_tile(op: str, tile: int) -> None:
    if tile not in (0, 1, 2, 3):
        raise ValueError(f"{op}: tile must be 0 (auto), 1 (128x128), 2 (128x256) or 3 (256x128), got {tile!r}")


def _check_bf16(op: str, x: torch.Tensor) -> None:
    if x.dtype != torch.bfloat16:
        raise TypeError(f"{op}: x has dtype {_fmt_dtype(x.dtype)}, expected bfloat16")


# --- dense --------------------------------------------------------------------------------------


def _check_gemm_sm90(x: torch.Tensor, packed: torch.Tensor, global_scale: torch.Tensor, tile: int) -> tuple[int, int]:
    op = "w4a16_gemm_sm90"
    N, K = _check_gemm(x, packed, global_scale)
    _check_bf16(op, x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [M, K], got shape {list(x.shape)}")
    _check_tile(op, tile)
    return N, K


@torch.library.custom_op("gemma4x::nvfp4_w4a16_gemm_sm90", mutates_args=())
def _gemm_op(x: torch.Tensor, packed: torch.Tensor, global_scale: torch.Tensor, tile: int) -> torch.Tensor:
    N, K = _check_gemm_sm90(x, packed, global_scale, tile)
    M = x.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
    if M == 0:
        return out
    if x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16 or x.stride(0) < K:
        x = x.contiguous()
    with on_device(x) as stream:
        extension().nvfp4.w4a16_gemm_sm90(
            out.data_ptr(), N, x.data_ptr(), x.stride(0) if M > 1 else K, packed.data_ptr(),
            global_scale.data_ptr(), M, N, K, tile, stream,
        )  # fmt: skip
    return out


@_gemm_op.register_fake
def _(x, packed, global_scale, tile):
    N, _ = _check_gemm_sm90(x, packed, global_scale, tile)
    return x.new_empty((x.shape[0], N), dtype=torch.bfloat16)


def w4a16_gemm_sm90(x: torch.Tensor, packed: torch.Tensor, global_scale: torch.Tensor, tile: int = 0) -> torch.Tensor:
    """``out = x @ W^T`` (bf16) with ``W = e2m1 * s * g`` packed, on the W4A16 WGMMA kernel.

    Args:
        x: ``[..., K]`` bfloat16 CUDA tensor (compute capability 9.0, sm_90a build).
        packed: ``[N/16, K/64, 576]`` uint8 from :func:`gemma4x.ops.nvfp4.w4a16_pack`.
        global_scale: one-element float32 ``weight_scale_2``.
        tile: 0 auto, 1 = 128x128, 2 = 128x256, 3 = 256x128 (weight rows x tokens).
    Returns:
        ``[..., N]`` bfloat16.
    """
    check_cuda("w4a16_gemm_sm90", "x", x)
    N, K = _check_gemm(x, packed, global_scale)
    rows = x.reshape(-1, K)
    out = torch.ops.gemma4x.nvfp4_w4a16_gemm_sm90(rows, packed, global_scale.reshape(1), tile)
    return out.reshape(*x.shape[:-1], N)


# --- routed experts -----------------------------------------------------------------------------


def _check_moe_prefill(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2, tile):
    op = "w4a16_moe_experts_prefill"
    T, H, k, E, I = _check_moe(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2)
    _check_bf16(op, x)
    if E > MOE_PREFILL_MAX_EXPERTS:
        raise ValueError(f"{op}: at most {MOE_PREFILL_MAX_EXPERTS} experts, got E = {E}")
    if k > MOE_PREFILL_MAX_TOP_K:
        raise ValueError(f"{op}: top_k must be <= {MOE_PREFILL_MAX_TOP_K}, got {k}")
    _check_tile(op, tile)
    return T, H, k, E, I


@torch.library.custom_op("gemma4x::nvfp4_moe_experts_prefill", mutates_args=())
def _moe_op(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale_2: torch.Tensor,
    down: torch.Tensor,
    down_scale_2: torch.Tensor,
    tile: int,
) -> torch.Tensor:
    T, H, k, E, I = _check_moe_prefill(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2, tile)
    if T == 0:
        return torch.empty(0, H, dtype=x.dtype, device=x.device)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if x.stride(0) % 8 or x.data_ptr() % 16 or x.stride(0) < H:
        x = x.contiguous()
    idx, weights = idx.contiguous(), weights.contiguous()
    mod = extension().nvfp4
    ws_bytes = mod.moe_prefill_workspace_size(T, k, E, H, I)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device)
    with on_device(x) as stream:
        mod.moe_prefill(
            out.data_ptr(), H, x.data_ptr(), x.stride(0) if T > 1 else H, idx.data_ptr(), weights.data_ptr(),
            gate_up.data_ptr(), gate_up_scale_2.data_ptr(), down.data_ptr(), down_scale_2.data_ptr(),
            workspace.data_ptr(), ws_bytes, T, k, E, H, I, tile, stream,
        )  # fmt: skip
    return out


@_moe_op.register_fake
def _(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2, tile):
    _check_moe_prefill(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2, tile)
    return x.new_empty(x.shape)


def w4a16_moe_experts_prefill(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale_2: torch.Tensor,
    down: torch.Tensor,
    down_scale_2: torch.Tensor,
    tile: int = 0,
) -> torch.Tensor:
    """``out[t] = sum_j w[t,j] * (gelu_tanh(x_t G_e^T) * (x_t U_e^T)) D_e^T``, NVFP4 experts, W4A16 grouped GEMMs.

    Roundings as the bf16 expert op (gate, up, GeGLU and each expert output in bf16, the k-sum in
    fp32); ``g`` is applied to the fp32 accumulators. Expert ids outside ``[0, E)`` contribute
    nothing. No host sync: the group sizes stay on the device (CUDA-graph safe).

    Args:
        x: ``[T, H]`` bfloat16 CUDA; idx ``[T, k]`` int64; weights ``[T, k]`` float32.
        gate_up: ``[E, 2I/16, H/64, 576]`` uint8 (``w4a16_pack(..., interleave_gate_up=True)``).
        gate_up_scale_2: ``[E, 2]`` float32; down ``[E, H/16, I/64, 576]`` uint8; down_scale_2 ``[E]``.
        tile: 0 auto, 1 = 128x128, 2 = 128x256, 3 = 256x128 (weight rows x tokens).
    Returns:
        ``[T, H]`` bfloat16.
    """
    check_cuda("w4a16_moe_experts_prefill", "x", x)
    return torch.ops.gemma4x.nvfp4_moe_experts_prefill(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2, tile)

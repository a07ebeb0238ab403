"""The routed GeGLU experts as NVFP4 W4A4 on SM100: two grouped block-scaled GEMMs.

::

    rows   = (token, slot) pairs sorted by expert;  row_offsets [E+1] int32
    a1     = nvfp4(x[rows]  under s_in_gate_up)                # per 16 values: e2m1 + e4m3 scale
    gu     = grouped_gemm(a1, W_gate_up[e]) * s_in * s_w2      # bf16 [R, 2I]
    act    = gelu_tanh(gu[:, :I]) * gu[:, I:]                  # bf16, HF's rounding
    a2     = nvfp4(act under s_in_down)
    y      = grouped_gemm(a2, W_down[e]) * s_in * s_w2         # bf16 [R, H]
    out[t] = bf16( sum_j fp32(y[t, j]) * w[t, j] )

This is what an NVFP4 checkpoint means on Blackwell (ModelOpt's W4A4 deployment: activations
quantized with the checkpoint's static ``input_scale``); checkpoints without input scales
(``quantize="nvfp4"`` at load) get a dynamic per-tensor scale, ``amax / (6 * 448)``, computed
on the device. It differs from the dequantised-weight reference by the activation rounding.

The grouped GEMM is :func:`gemma4x.ops.gemm.nvfp4_grouped_gemm` (sm_100a, **compiled, not run**:
no Blackwell GPU has executed this path). Everything around it is PyTorch and is tested on the
CPU with the reference grouped GEMM in its place (``grouped_gemm=`` argument).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemma4x.ops.nvfp4 import nvfp4_quantize as nvfp4_quantize_cuda
from gemma4x.reference.activation import gelu_tanh
from gemma4x.reference.quant import (
    NVFP4_BLOCK,
    nvfp4_global_scale,
    nvfp4_grouped_scale_capacity,
    nvfp4_quantize,
    nvfp4_swizzle_scales,
    nvfp4_swizzle_scales_grouped,
)

GroupedGemm = Callable[..., torch.Tensor]


@dataclass
class Nvfp4Sm100Experts:
    """Expert weights in the grouped GEMM's layout: block scales swizzled once, per-expert alphas."""

    gate_up: torch.Tensor  # uint8 [E, 2I, H/2]
    gate_up_scale: torch.Tensor  # e4m3 [E, swizzled(2I, H/16)]
    gate_up_scale_2: torch.Tensor  # fp32 [E] (gate and up share it)
    down: torch.Tensor  # uint8 [E, H, I/2]
    down_scale: torch.Tensor  # e4m3 [E, swizzled(H, I/16)]
    down_scale_2: torch.Tensor  # fp32 [E]
    gate_up_input_scale: torch.Tensor | None  # fp32 0-d, or None: dynamic
    down_input_scale: torch.Tensor | None


def _one_input_scale(s: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if s is None:
        return None
    if not torch.all(s == s.reshape(-1)[0]):
        raise ValueError(f"{what}: the SM100 W4A4 path needs one input_scale for all experts, got several")
    return s.reshape(-1)[0].float().clone()


def prepare_sm100_experts(
    gate_up_weight: torch.Tensor,
    gate_up_weight_scale: torch.Tensor,
    gate_up_weight_scale_2: torch.Tensor,
    down_weight: torch.Tensor,
    down_weight_scale: torch.Tensor,
    down_weight_scale_2: torch.Tensor,
    gate_up_input_scale: torch.Tensor | None = None,
    down_input_scale: torch.Tensor | None = None,
) -> Nvfp4Sm100Experts:
    """Repack :class:`~gemma4x.layers.moe.NVFP4Experts` tensors once, at load.

    Raises ValueError when the layout cannot feed one GEMM per projection: gate and up with
    different ``weight_scale_2`` (they share one alpha per expert), or per-expert input scales.
    """
    if gate_up_weight_scale_2.dim() != 2 or not torch.equal(gate_up_weight_scale_2[:, 0], gate_up_weight_scale_2[:, 1]):
        raise ValueError(
            "prepare_sm100_experts: gate and up need one weight_scale_2 per expert (ModelOpt exports share it); "
            "got different ones"
        )
    return Nvfp4Sm100Experts(
        gate_up=gate_up_weight.contiguous(),
        gate_up_scale=nvfp4_swizzle_scales(gate_up_weight_scale).contiguous(),
        gate_up_scale_2=gate_up_weight_scale_2[:, 0].float().contiguous(),
        down=down_weight.contiguous(),
        down_scale=nvfp4_swizzle_scales(down_weight_scale).contiguous(),
        down_scale_2=down_weight_scale_2.float().contiguous(),
        gate_up_input_scale=_one_input_scale(gate_up_input_scale, "gate_up_input_scale"),
        down_input_scale=_one_input_scale(down_input_scale, "down_input_scale"),
    )


def _quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None, row_offsets: list[int], groups: int):
    """NVFP4 activations in the grouped GEMM's layout: (codes, grouped swizzled scales, input scale)."""
    s = nvfp4_global_scale(x.float().abs().amax()) if input_scale is None else input_scale.to(x.device)
    # One CUDA kernel on the GPU (bit-identical to the reference quantizer used elsewhere).
    quantize = nvfp4_quantize_cuda if x.is_cuda else nvfp4_quantize
    codes, scale, _ = quantize(x, s.reshape(()))
    size = nvfp4_grouped_scale_capacity(x.shape[0], groups, x.shape[1] // NVFP4_BLOCK)
    return codes, nvfp4_swizzle_scales_grouped(scale, row_offsets, size=size), s.reshape(())


def nvfp4_moe_w4a4(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    w: Nvfp4Sm100Experts,
    grouped_gemm: GroupedGemm | None = None,
) -> torch.Tensor:
    """``x [T, H]`` bf16, routing ``idx/weights [T, k]`` -> ``[T, H]`` bf16 through two grouped W4A4 GEMMs.

    ``grouped_gemm`` defaults to the SM100 kernel; the reference
    (:func:`gemma4x.reference.gemm.nvfp4_grouped_gemm`) runs the same pipeline anywhere.
    Reads the per-expert row counts back to the host once (prefill only: decode steps use the
    weight-streaming kernels).
    """
    if grouped_gemm is None:
        from gemma4x.ops.gemm import nvfp4_grouped_gemm as grouped_gemm
    T, k = idx.shape
    E = w.gate_up.shape[0]
    I = w.down.shape[2] * 2
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    row_offsets = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    row_offsets[1:] = torch.cumsum(counts, 0)
    rows = row_offsets.tolist()

    a, a_sf, s_in = _quantize_rows(x[order // k], w.gate_up_input_scale, rows, E)
    gu = grouped_gemm(a, a_sf, row_offsets, w.gate_up, w.gate_up_scale, (s_in * w.gate_up_scale_2).float())
    act = gelu_tanh(gu[:, :I]) * gu[:, I:]
    a, a_sf, s_in = _quantize_rows(act, w.down_input_scale, rows, E)
    ys = grouped_gemm(a, a_sf, row_offsets, w.down, w.down_scale, (s_in * w.down_scale_2).float())

    ys = ys.float() * weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.empty_like(ys)
    out[order] = ys
    return out.view(T, k, -1).sum(dim=1).to(x.dtype)

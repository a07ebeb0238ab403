"""Reference Gemma 4 MoE: router and routed GeGLU experts, rounded as HF 5.23 does.

Router (``Gemma4TextRouter``, spec §2.8), with ``h`` the residual stream entering the FFN::

    r   = rms_norm(h, None) * scale * H^-0.5          # each product rounds to h.dtype
    p   = softmax(r @ W_router^T, fp32)
    w,i = topk(p, k);  w = w / sum(w);  w = w * per_expert_scale[i]     # fp32

Experts, HF's default ``grouped_mm`` implementation (the one transformers picks on CPU and
CUDA when ``torch.nn.functional.grouped_mm`` exists)::

    y[t,j] = (gelu_tanh(x_t G_e^T) * (x_t U_e^T)) D_e^T      e = i[t,j]; G = first I rows of gate_up
    out[t] = bf16/fp32( sum_j fp32(y[t,j]) * w[t,j] )          # fp32 sum over the k slots, one cast

(HF's ``eager`` experts accumulate with ``index_add_`` in the activation dtype instead.)

``gate_up_interleaved=True`` reads ``gate_up_proj`` with its rows interleaved in blocks of 8
(:func:`interleave_gate_up`, the layout the model layer keeps for the GPU kernels): the GEMM's
output columns are permuted back, so the result is the same bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemma4x.reference.activation import gelu_tanh
from gemma4x.reference.norm import rms_norm


def moe_router(
    h: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights ``[T, k]`` fp32 and expert ids ``[T, k]`` int64 for ``h`` ``[T, H]``."""
    r = rms_norm(h, None, eps)
    r = r * scale * (h.shape[-1] ** -0.5)
    logits = F.linear(r, proj_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = torch.topk(probs, k=top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[idx], idx


GATE_UP_BLOCK = 8  # rows per gate / up block of the interleaved layout


def _check_interleavable(gate_up_proj: torch.Tensor, what: str) -> int:
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[1] % (2 * GATE_UP_BLOCK) != 0:
        raise ValueError(
            f"{what}: gate_up_proj must be [E, 2I, H] with I a multiple of {GATE_UP_BLOCK}, "
            f"got shape {list(gate_up_proj.shape)}"
        )
    return gate_up_proj.shape[1] // 2


def interleave_gate_up(gate_up_proj: torch.Tensor) -> torch.Tensor:
    """``[E, 2I, H]`` HF layout (gate rows, then up rows) -> rows interleaved in blocks of 8.

    Row ``16b + r`` is gate row ``8b + r`` and row ``16b + 8 + r`` up row ``8b + r`` (r < 8): in
    the SM90 GEMM's accumulator fragment a thread then holds matching gate and up columns, so
    GEMM1's epilogue computes the GeGLU in registers. A new contiguous tensor; I % 8 == 0.
    """
    I = _check_interleavable(gate_up_proj, "interleave_gate_up")
    E, _, H = gate_up_proj.shape
    g = GATE_UP_BLOCK
    return gate_up_proj.reshape(E, 2, I // g, g, H).transpose(1, 2).reshape(E, 2 * I, H)


def deinterleave_gate_up(gate_up_proj: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave_gate_up`: back to HF's ``[E, 2I, H]`` (gate rows first)."""
    I = _check_interleavable(gate_up_proj, "deinterleave_gate_up")
    E, _, H = gate_up_proj.shape
    g = GATE_UP_BLOCK
    return gate_up_proj.reshape(E, I // g, 2, g, H).transpose(1, 2).reshape(E, 2 * I, H)


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``y[r] = x[r] @ w[e_r]^T`` for rows sorted by expert, ``counts[e]`` rows per expert."""
    if hasattr(F, "grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):  # one host sync, then a plain loop
        if n:
            out[start : start + n] = F.linear(x[start : start + n], w[e])
            start += n
    return out


def moe_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_interleaved: bool = False,
) -> torch.Tensor:
    """Weighted sum of the routed experts' GeGLU MLPs.

    Args:
        x: ``[T, H]`` expert input (``pre_feedforward_layernorm_2`` output).
        idx: ``[T, k]`` expert ids; weights: ``[T, k]`` fp32 routing weights.
        gate_up_proj: ``[E, 2I, H]`` (gate rows first, then up rows; or interleaved in blocks of 8
            when ``gate_up_interleaved``, see :func:`interleave_gate_up`); down_proj: ``[E, H, I]``.

    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    T, k = idx.shape
    E = gate_up_proj.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat)  # group the T*k (token, slot) rows by expert
    # Rows per expert; scatter_add (unlike bincount) needs no host sync to size its output.
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    xs = x[order // k]
    h = _grouped_linear(xs, gate_up_proj, counts)
    if gate_up_interleaved:  # columns [g0..g7 u0..u7 g8..g15 u8..u15 ...] back to [gate | up]
        I = _check_interleavable(gate_up_proj, "moe_experts")
        h = h.reshape(h.shape[0], I // GATE_UP_BLOCK, 2, GATE_UP_BLOCK).transpose(1, 2).reshape(h.shape[0], 2 * I)
    gate, up = h.chunk(2, dim=-1)
    ys = _grouped_linear(gelu_tanh(gate) * up, down_proj, counts)
    ys = ys * weights.reshape(-1)[order].unsqueeze(-1)  # fp32 from here on
    out = torch.empty_like(ys)
    out[order] = ys
    return out.view(T, k, -1).sum(dim=1).to(x.dtype)

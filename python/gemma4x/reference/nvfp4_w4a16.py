"""The W4A16 packed NVFP4 layout of the SM90 kernels, and pure-PyTorch twins of the W4A16 ops.

A weight ``[..., N, K]`` stored as ModelOpt NVFP4 (``weight`` uint8 ``[..., N, K/2]``, low nibble
= even k; ``weight_scale`` float8_e4m3fn ``[..., N, K/16]``) is repacked once at load into
``[..., N/16, K/64, 576]`` uint8: one 576-byte unit per 16 rows x 64 columns, 512 bytes of codes
then the unit's 64 block scales — 0.5625 bytes per weight, as the checkpoint.

Inside a unit, lane ``l = 4g + t`` of a warp reads bytes ``16l .. 16l+15``: four 32-bit words
``(row g, word 0), (row g, word 1), (row g+8, word 0), (row g+8, word 1)``, word ``w`` holding the
codes of columns ``16t + 8w + 2p + h`` (``p`` = 0..3, ``h`` = 0/1) at bits ``12 - 4p + 16h``
(so ``word << 4p`` brings the pair ``(2p, 2p+1)`` to bits 12..15 and 28..31, where the kernel turns
it into a bf16 pair); the scales follow as bytes ``512 + 2l`` (row g) and ``512 + 2l + 1`` (row g+8)
of block ``t``. ``interleave_gate_up=True`` reorders the rows of a fused ``[2I, K]`` gate/up
weight so that 16-row block ``b`` holds gate rows ``8b..8b+7`` then up rows ``I+8b..I+8b+7``
(GeGLU then happens inside one mma tile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemma4x.reference.moe import moe_experts as _moe_experts_ref
from gemma4x.reference.quant import (
    NVFP4_BLOCK,
    nvfp4_dequantize,
    pack_nibbles,
    unpack_nibbles,
)

UNIT_ROWS = 16
UNIT_K = 64
UNIT_BYTES = 576
CODE_BYTES = 512

__all__ = [
    "UNIT_BYTES",
    "UNIT_K",
    "UNIT_ROWS",
    "gate_up_row_order",
    "w4a16_dequantize",
    "w4a16_gemm",
    "w4a16_moe_experts",
    "w4a16_pack",
    "w4a16_unpack",
]


def gate_up_row_order(rows: int, device=None) -> torch.Tensor:
    """Checkpoint row of each packed row when gate/up are interleaved by 8 (``rows = 2I``, ``I % 8 == 0``)."""
    half = rows // 2
    b = torch.arange(half // 8, device=device)
    g = torch.arange(8, device=device)
    gate = 8 * b[:, None] + g[None, :]
    return torch.stack((gate, gate + half), dim=1).reshape(-1)  # [blocks, 2, 8] -> rows


def _check_pack_args(weight: torch.Tensor, weight_scale: torch.Tensor, interleave_gate_up: bool) -> tuple[int, int]:
    op = "w4a16_pack"
    if weight.dtype != torch.uint8:
        raise TypeError(f"{op}: weight must be uint8 (packed e2m1), got {weight.dtype}")
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{op}: weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    if weight.dim() < 2:
        raise ValueError(f"{op}: weight must be [..., N, K/2], got shape {list(weight.shape)}")
    N, K = weight.shape[-2], 2 * weight.shape[-1]
    if N == 0 or N % UNIT_ROWS:
        raise ValueError(f"{op}: N = {N} must be a positive multiple of {UNIT_ROWS}")
    if K == 0 or K % UNIT_K:
        raise ValueError(f"{op}: K = {K} must be a positive multiple of {UNIT_K}")
    want = [*weight.shape[:-1], K // NVFP4_BLOCK]
    if list(weight_scale.shape) != want:
        raise ValueError(f"{op}: weight_scale must have shape {want} for weight {list(weight.shape)}, got {list(weight_scale.shape)}")
    if weight_scale.device != weight.device:
        raise ValueError(f"{op}: weight_scale is on {weight_scale.device}, expected {weight.device} (as weight)")
    if interleave_gate_up and N % 16:
        raise ValueError(f"{op}: interleaving gate/up needs 2I a multiple of 16, got {N}")
    return N, K


@torch.no_grad()
def w4a16_pack(weight: torch.Tensor, weight_scale: torch.Tensor, *, interleave_gate_up: bool = False) -> torch.Tensor:
    """ModelOpt NVFP4 ``(weight [..., N, K/2], weight_scale [..., N, K/16])`` -> packed ``[..., N/16, K/64, 576]`` uint8."""
    N, K = _check_pack_args(weight, weight_scale, interleave_gate_up)
    lead = list(weight.shape[:-2])
    if interleave_gate_up:
        order = gate_up_row_order(N, weight.device)
        weight, weight_scale = weight[..., order, :], weight_scale[..., order, :]
    nl = len(lead)
    R, U = N // UNIT_ROWS, K // UNIT_K
    # codes [..., rb, half, g, u, t, w, p, h] (row = 16rb + 8half + g, column = 64u + 16t + 8w + 2p + h)
    c = unpack_nibbles(weight).reshape(*lead, R, 2, 8, U, 4, 2, 4, 2)
    lo, hi = c[..., 0], c[..., 1]  # [..., p]
    # word bytes: (lo3 | lo2<<4), (lo1 | lo0<<4), (hi3 | hi2<<4), (hi1 | hi0<<4)
    words = torch.stack(
        (
            lo[..., 3] | (lo[..., 2] << 4),
            lo[..., 1] | (lo[..., 0] << 4),
            hi[..., 3] | (hi[..., 2] << 4),
            hi[..., 1] | (hi[..., 0] << 4),
        ),
        dim=-1,
    )  # [..., rb, half, g, u, t, w, 4 bytes]
    b = list(range(nl))
    codes = words.permute(*b, nl, nl + 3, nl + 2, nl + 4, nl + 1, nl + 5, nl + 6)  # rb, u, g, t, half, w, bytes
    codes = codes.reshape(*lead, R, U, CODE_BYTES)
    s = weight_scale.view(torch.uint8).reshape(*lead, R, 2, 8, U, 4)
    scales = s.permute(*b, nl, nl + 3, nl + 2, nl + 4, nl + 1).reshape(*lead, R, U, 64)  # rb, u, g, t, half
    return torch.cat((codes, scales), dim=-1).contiguous()


@torch.no_grad()
def w4a16_unpack(packed: torch.Tensor, *, interleave_gate_up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`w4a16_pack`: ``[..., N/16, K/64, 576]`` -> ``(weight [..., N, K/2], weight_scale [..., N, K/16])``."""
    if packed.dtype != torch.uint8 or packed.dim() < 3 or packed.shape[-1] != UNIT_BYTES:
        raise ValueError(f"w4a16_unpack: expected uint8 [..., N/16, K/64, {UNIT_BYTES}], got {packed.dtype} {list(packed.shape)}")
    *lead, R, U, _ = packed.shape
    nl = len(lead)
    b = list(range(nl))
    words = packed[..., :CODE_BYTES].reshape(*lead, R, U, 8, 4, 2, 2, 4)  # rb, u, g, t, half, w, bytes
    words = words.permute(*b, nl, nl + 4, nl + 2, nl + 1, nl + 3, nl + 5, nl + 6)  # rb, half, g, u, t, w, bytes
    lo = torch.stack((words[..., 1] >> 4, words[..., 1] & 15, words[..., 0] >> 4, words[..., 0] & 15), dim=-1)
    hi = torch.stack((words[..., 3] >> 4, words[..., 3] & 15, words[..., 2] >> 4, words[..., 2] & 15), dim=-1)
    codes = torch.stack((lo, hi), dim=-1).reshape(*lead, R * 16, U * UNIT_K)
    s = packed[..., CODE_BYTES:].reshape(*lead, R, U, 8, 4, 2).permute(*b, nl, nl + 4, nl + 2, nl + 1, nl + 3)
    scale = s.reshape(*lead, R * 16, U * 4).contiguous().view(torch.float8_e4m3fn)
    weight = pack_nibbles(codes)
    if interleave_gate_up:
        inverse = torch.argsort(gate_up_row_order(R * 16, packed.device))
        weight, scale = weight[..., inverse, :].contiguous(), scale[..., inverse, :].contiguous()
    return weight, scale


def w4a16_dequantize(
    packed: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    interleave_gate_up: bool = False,
) -> torch.Tensor:
    """``[..., N, K]`` in ``dtype``: ``e2m1 * fp32(scale) * global_scale`` (global_scale as for nvfp4_dequantize;
    for interleaved gate/up ``[E, 2]`` (gate, up))."""
    weight, scale = w4a16_unpack(packed, interleave_gate_up=interleave_gate_up)
    g = global_scale
    if interleave_gate_up:
        g = global_scale.float().repeat_interleave(weight.shape[-2] // 2, dim=-1)
    return nvfp4_dequantize(weight, scale, g, dtype)


def w4a16_gemm(x: torch.Tensor, packed: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ W^T`` with W dequantised in fp32, computed in fp32, returned in ``x.dtype``."""
    w = w4a16_dequantize(packed, global_scale, torch.float32)
    return F.linear(x.float(), w).to(x.dtype)


def w4a16_moe_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale_2: torch.Tensor,
    down: torch.Tensor,
    down_scale_2: torch.Tensor,
) -> torch.Tensor:
    """The BF16 expert op (reference.moe.moe_experts) on the dequantised packed expert weights."""
    gu = w4a16_dequantize(gate_up, gate_up_scale_2, x.dtype, interleave_gate_up=True)
    dn = w4a16_dequantize(down, down_scale_2, x.dtype)
    return _moe_experts_ref(x, idx, weights, gu, dn)


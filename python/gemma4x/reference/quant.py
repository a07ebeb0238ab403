"""Reference NVFP4 quantizer and dequantizer (NVIDIA ModelOpt's format and rounding), pure PyTorch.

NVFP4 stores a weight ``W [..., N, K]`` as e2m1 codes in blocks of 16 along ``K``::

    value[n, k] = e2m1(code[n, k]) * fp32(weight_scale[n, k // 16]) * weight_scale_2

* ``weight`` uint8 ``[..., N, K/2]``: two 4-bit codes per byte, the **low** nibble holds the
  even ``k``. A code is sign (bit 3) + magnitude index into ``(0, .5, 1, 1.5, 2, 3, 4, 6)``.
* ``weight_scale`` float8_e4m3fn ``[..., N, K/16]``: one scale per block, row-major.
* ``weight_scale_2`` fp32 (a scalar per tensor in checkpoints): the global scale.

Quantization follows ModelOpt 0.47 ``NVFP4QTensor`` (``modelopt/torch/quantization/qtensor/
nvfp4_tensor.py``) bit for bit:

    weight_scale_2 = amax(|W|) / (6 * 448)                            # fp32
    s_b   = e4m3( clamp(amax_b(|W|) / (6 * weight_scale_2), 2^-9, 448) )   # an all-zero block: 1.0
    code  = e2m1_round( fp32(W) / (fp32(s_b) * weight_scale_2) )

``e2m1_round`` rounds to the nearest e2m1 value, ties to the even code (0.25 -> 0, 0.75 -> 1,
1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4) and saturates at 6; negative numbers set the
sign bit even when they round to zero (code 8, "-0"), exactly as ModelOpt's searchsorted.

Export groups: ModelOpt gives linears that read the same input one shared
``weight_scale_2`` (the max of their amaxes): an expert's gate and up, the MLP's gate and
up, attention q/k/v. Pass ``global_scale`` to quantize with a shared one
(:func:`nvfp4_global_scale` of the group's amax).

This is the reference used on any device (quantize-at-load runs it on the GPU too); a CUDA
quantization kernel is a later step of issue 5.

Activations (W4A4 exports) are quantized the same way with the checkpoint's static
``input_scale`` as the global scale (:func:`nvfp4_quantize_activation`). The SM100 block-scaled
GEMM reads block scales in CUTLASS's tiled order, produced at load by
:func:`nvfp4_swizzle_scales`.
"""

from __future__ import annotations

import itertools

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
# ModelOpt clamps block scales into e4m3's normal range before the cast: no underflow to 0.
_SCALE_MIN = 2.0**-9

# Magnitudes of codes 0..7; codes 8..15 are their negatives.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes; a tie on an odd-indexed one rounds up (to the even code).
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_ODD_BOUNDS = (0.75, 1.75, 3.5)

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "NVFP4_BLOCK",
    "e2m1_decode",
    "e2m1_encode",
    "nvfp4_block_scales",
    "nvfp4_dequantize",
    "nvfp4_global_scale",
    "nvfp4_quantize",
    "nvfp4_quantize_activation",
    "nvfp4_swizzle_scales",
    "nvfp4_swizzled_size",
    "nvfp4_unswizzle_scales",
    "pack_nibbles",
    "unpack_nibbles",
]


# Lookup tables, built once per device: no host-to-device copy per call (CUDA graph capture
# must not see one; the runtime's warm-up runs before capture builds them).
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (name, torch.device(device))
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _TABLES[key]


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (uint8 in [0, 16)) of each element of ``x`` (already divided by its scales)."""
    x = x.float()
    mag = x.abs()
    bounds = _table("bounds", _E2M1_BOUNDS, x.device)
    code = torch.searchsorted(bounds, mag.contiguous(), right=False).to(torch.uint8)  # bounds strictly below
    tie_up = torch.zeros_like(mag, dtype=torch.bool)
    for b in _ODD_BOUNDS:
        tie_up |= mag == b
    code = code + tie_up.to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of e2m1 codes (uint8 in [0, 16))."""
    return _table("values", E2M1_VALUES + tuple(-v for v in E2M1_VALUES), codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` 4-bit codes -> ``[..., K/2]`` uint8, even ``k`` in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last dimension must be even, got shape {list(codes.shape)}")
    codes = codes.to(torch.uint8)
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., K/2]`` uint8 -> ``[..., K]`` codes (uint8), inverse of :func:`pack_nibbles`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_nibbles: expected uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """``weight_scale_2 = amax / (6 * 448)`` in fp32 (an all-zero tensor gets 1.0, see below)."""
    amax = torch.as_tensor(amax).float()
    # ModelOpt divides by a zero global scale here and writes NaN scales; 1.0 keeps zeros zero.
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def _blocks(x: torch.Tensor, block_size: int, what: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] % block_size:
        raise ValueError(f"{what}: last dimension must be a multiple of {block_size}, got shape {list(x.shape)}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def _expand_global(global_scale: torch.Tensor, lead: int, device) -> torch.Tensor:
    """A scalar, or one value per leading index (``[E]`` for ``[E, N, K]``), shaped to broadcast over ``[..., N, nb]``."""
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=device)
    if g.numel() == 1:
        return g.reshape(())
    return g.reshape(*g.shape, *([1] * (lead - g.dim())))


def nvfp4_block_scales(w: torch.Tensor, global_scale: torch.Tensor, block_size: int = NVFP4_BLOCK) -> torch.Tensor:
    """Per-block e4m3 scales ``[..., N, K/16]`` of ``w [..., N, K]`` under ``global_scale``."""
    amax = _blocks(w, block_size, "nvfp4_block_scales").abs().amax(dim=-1).float()
    g = _expand_global(global_scale, amax.dim(), w.device)
    s = amax / (E2M1_MAX * g)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s.clamp(min=_SCALE_MIN, max=E4M3_MAX).to(torch.float8_e4m3fn)


@torch.no_grad()
def nvfp4_quantize(
    w: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    block_size: int = NVFP4_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., N, K]`` (any float dtype) to NVFP4.

    Args:
        w: the weight; ``K`` a multiple of ``block_size``.
        global_scale: ``weight_scale_2``; a scalar, or one per leading index (``[E]`` for
            ``[E, N, K]``). Default: ``amax(|w|) / (6*448)`` over the whole tensor.
        block_size: 16 for NVFP4.

    Returns:
        ``(weight uint8 [..., N, K/2], weight_scale float8_e4m3fn [..., N, K/16],
        weight_scale_2 fp32)`` — ``weight_scale_2`` shaped as given (a 0-d tensor by default).
    """
    if not w.is_floating_point():
        raise ValueError(f"nvfp4_quantize: expected a floating-point weight, got {w.dtype}")
    if global_scale is None:
        global_scale = nvfp4_global_scale(w.abs().amax())
    global_scale = torch.as_tensor(global_scale, dtype=torch.float32, device=w.device)
    scale = nvfp4_block_scales(w, global_scale, block_size)
    g = _expand_global(global_scale, scale.dim(), w.device)
    blocks = _blocks(w, block_size, "nvfp4_quantize").float()
    codes = e2m1_encode(blocks / (scale.float() * g).unsqueeze(-1)).reshape(w.shape)
    return pack_nibbles(codes), scale, global_scale


def nvfp4_dequantize(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
    block_size: int = NVFP4_BLOCK,
) -> torch.Tensor:
    """``e2m1(weight) * fp32(weight_scale) * weight_scale_2`` as ``[..., N, K]`` in ``dtype``.

    Args:
        weight: uint8 ``[..., N, K/2]`` packed codes.
        weight_scale: float8_e4m3fn ``[..., N, K/16]``.
        weight_scale_2: fp32 scalar, or one per leading index (``[E]`` for ``[E, N, K/2]``).

    The product is formed in fp32 (``e2m1 * (scale * global)``, as ModelOpt does) and cast once.
    """
    if weight.dtype != torch.uint8:
        raise ValueError(f"nvfp4_dequantize: weight must be uint8 (packed e2m1), got {weight.dtype}")
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"nvfp4_dequantize: weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    K = weight.shape[-1] * 2
    if tuple(weight_scale.shape) != (*weight.shape[:-1], K // block_size) or K % block_size:
        raise ValueError(
            f"nvfp4_dequantize: weight {list(weight.shape)} (K={K}) needs weight_scale "
            f"{[*weight.shape[:-1], K // block_size]}, got {list(weight_scale.shape)}"
        )
    values = _blocks(e2m1_decode(unpack_nibbles(weight)), block_size, "nvfp4_dequantize")
    scale = weight_scale.float()
    g = _expand_global(weight_scale_2, scale.dim(), weight.device)
    out = values * (scale * g).unsqueeze(-1)
    return out.reshape(*weight.shape[:-1], K).to(dtype)


@torch.no_grad()
def nvfp4_quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``x [..., K]`` to NVFP4 under the checkpoint's static ``input_scale``.

    ModelOpt's W4A4 input quantizer is the weight quantizer with ``input_scale`` (calibrated
    ``amax / (6*448)``) as the global scale::

        s_b  = e4m3( clamp(amax_b(|x|) / (6 * input_scale), 2^-9, 448) )   # an all-zero block: 1.0
        code = e2m1_round( fp32(x) / (fp32(s_b) * input_scale) )            # saturates at 6

    An activation above the calibrated range saturates (its block scale clamps at 448, its
    codes at 6), as on the serving path. The GEMM then scales by ``input_scale * weight_scale_2``.

    Returns:
        ``(codes uint8 [..., K/2], scales float8_e4m3fn [..., K/16])`` in the row-major layout of
        :func:`nvfp4_quantize`; swizzle the scales for the SM100 GEMM.
    """
    if not x.is_floating_point():
        raise ValueError(f"nvfp4_quantize_activation: expected floating-point activations, got {x.dtype}")
    g = torch.as_tensor(input_scale, dtype=torch.float32, device=x.device)
    if g.numel() != 1:
        raise ValueError(f"nvfp4_quantize_activation: input_scale must be a scalar, got shape {list(g.shape)}")
    if not bool(torch.isfinite(g).all()) or float(g) <= 0:
        raise ValueError(f"nvfp4_quantize_activation: input_scale must be finite and > 0, got {float(g)}")
    codes, scale, _ = nvfp4_quantize(x, g.reshape(()))
    return codes, scale


# --- SM100 block-scale layout -------------------------------------------------------------------
#
# CUTLASS's SM100 block-scaled MMA (cutlass/detail/sm100_blockscaled_layout.hpp,
# Sm1xxBlockScaledConfig<16>, K-major) reads the scale factors of A and B through the CuTe layout
#
#     SfKMajorAtom = ((32, 4), (16, 4)) : ((16, 4), (0, 1))        # (rows, K elements) -> offset
#
# tiled over (rows, K, L) with K tiles before row tiles (Step<_2,_1,_3>). One atom covers 128 rows
# by 4 scale blocks (64 K elements) in 512 contiguous bytes: row ``r = 32*r1 + r0`` and block
# ``kb = 4*kt + kk`` of row tile ``mt`` sit at
#
#     ((mt * KT + kt) * 32 + r0) * 16 + r1 * 4 + kk,       KT = ceil(K/16 / 4)
#
# so each 16-byte line holds the 4 scales of rows r0, r0+32, r0+64, r0+96 (what one TMEM lane
# needs). Rows pad to 128 and blocks to 4; the padding holds zero scales (padding rows or K
# blocks then contribute nothing, whatever the padded codes hold).

_SF_ROWS = 128  # rows per atom (Blk_MN)
_SF_COLS = 4  # scale blocks per atom (Blk_SF)


def _ceil_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def nvfp4_swizzled_size(rows: int, k_blocks: int) -> int:
    """Bytes of one swizzled scale matrix: rows padded to 128 times scale blocks padded to 4."""
    return _ceil_to(rows, _SF_ROWS) * _ceil_to(k_blocks, _SF_COLS)


def nvfp4_swizzle_scales(scale: torch.Tensor) -> torch.Tensor:
    """Row-major block scales ``[..., rows, K/16]`` -> CUTLASS SM100 order ``[..., nvfp4_swizzled_size(rows, K/16)]``.

    Leading dimensions are batches (one expert each, CUTLASS's ``L``): batch ``l`` occupies
    the ``l``-th contiguous slice. Works on any dtype (float8_e4m3fn in practice) and device.
    """
    if scale.dim() < 2:
        raise ValueError(f"nvfp4_swizzle_scales: expected [..., rows, K/16], got shape {list(scale.shape)}")
    *lead, rows, kb = scale.shape
    rp, kp = _ceil_to(rows, _SF_ROWS), _ceil_to(kb, _SF_COLS)
    # Pad through a uint8 view: float8 tensors have no pad kernel on every backend.
    raw = scale.view(torch.uint8) if scale.element_size() == 1 else scale
    padded = raw.new_zeros((*lead, rp, kp))
    padded[..., :rows, :kb] = raw
    n = len(lead)
    # rows -> (mt, r1, r0), blocks -> (kt, kk); memory order (mt, kt, r0, r1, kk).
    t = padded.reshape(*lead, rp // _SF_ROWS, 4, 32, kp // _SF_COLS, _SF_COLS)
    t = t.permute(*range(n), n + 0, n + 3, n + 2, n + 1, n + 4).contiguous()
    out = t.reshape(*lead, rp * kp)
    return out.view(scale.dtype) if scale.element_size() == 1 else out


def nvfp4_unswizzle_scales(swizzled: torch.Tensor, rows: int, k_blocks: int) -> torch.Tensor:
    """Inverse of :func:`nvfp4_swizzle_scales`: ``[..., size]`` -> row-major ``[..., rows, k_blocks]``."""
    rp, kp = _ceil_to(rows, _SF_ROWS), _ceil_to(k_blocks, _SF_COLS)
    if swizzled.dim() < 1 or swizzled.shape[-1] != rp * kp:
        raise ValueError(
            f"nvfp4_unswizzle_scales: rows={rows}, k_blocks={k_blocks} need a last dimension of "
            f"{rp * kp}, got shape {list(swizzled.shape)}"
        )
    *lead, _ = swizzled.shape
    n = len(lead)
    raw = swizzled.view(torch.uint8) if swizzled.element_size() == 1 else swizzled
    t = raw.reshape(*lead, rp // _SF_ROWS, kp // _SF_COLS, 32, 4, _SF_COLS)
    # (mt, kt, r0, r1, kk) -> (mt, r1, r0, kt, kk)
    t = t.permute(*range(n), n + 0, n + 3, n + 2, n + 1, n + 4).reshape(*lead, rp, kp)
    out = t[..., :rows, :k_blocks].contiguous()
    return out.view(swizzled.dtype) if swizzled.element_size() == 1 else out


# --- Grouped (per-expert) scale layout ----------------------------------------------------------
#
# The grouped SM100 GEMM swizzles each expert's activation scales on their own (the tile atoms of
# one expert never straddle another's rows) and concatenates them in expert order. Group ``e`` of
# ``M_e`` rows starts at ``sum_{j<e} nvfp4_swizzled_size(M_j, K/16)`` bytes; the kernel computes the
# same offsets on the device from the row offsets (csrc/include/gemma4x/gemm/params.h,
# grouped_scale_bytes).


def nvfp4_grouped_scale_offsets(row_offsets: torch.Tensor | list[int], k_blocks: int) -> list[int]:
    """Byte offset of each group's swizzled scales (``groups + 1`` entries, the last = total)."""
    rows = [int(v) for v in (row_offsets.tolist() if isinstance(row_offsets, torch.Tensor) else row_offsets)]
    out = [0]
    for lo, hi in itertools.pairwise(rows):
        if hi < lo:
            raise ValueError(f"nvfp4_grouped_scale_offsets: row_offsets must be non-decreasing, got {rows}")
        out.append(out[-1] + nvfp4_swizzled_size(hi - lo, k_blocks))
    return out


def nvfp4_grouped_scale_capacity(total_rows: int, groups: int, k_blocks: int) -> int:
    """Bytes that hold the grouped scales of ``total_rows`` rows split any way over ``groups`` groups.

    Each group pads to 128 rows, so the groups together need at most ``total_rows + 127 * groups``
    rows, rounded down to a multiple of 128: a fixed size the host knows without reading routing.
    """
    return (total_rows + 127 * groups) // _SF_ROWS * _SF_ROWS * _ceil_to(k_blocks, _SF_COLS)


def nvfp4_swizzle_scales_grouped(
    scale: torch.Tensor, row_offsets: torch.Tensor | list[int], size: int | None = None
) -> torch.Tensor:
    """Row-major scales ``[M_total, K/16]`` of expert-sorted rows -> each group swizzled, concatenated.

    ``size`` pads the result with zeros to that many bytes (e.g. :func:`nvfp4_grouped_scale_capacity`,
    the buffer size the grouped GEMM op asks for).
    """
    if scale.dim() != 2:
        raise ValueError(f"nvfp4_swizzle_scales_grouped: expected [M_total, K/16], got shape {list(scale.shape)}")
    rows = [int(v) for v in (row_offsets.tolist() if isinstance(row_offsets, torch.Tensor) else row_offsets)]
    if rows[0] != 0 or rows[-1] != scale.shape[0]:
        raise ValueError(
            f"nvfp4_swizzle_scales_grouped: row_offsets must run from 0 to {scale.shape[0]} rows, got {rows}"
        )
    raw = scale.view(torch.uint8) if scale.element_size() == 1 else scale  # cat through uint8: float8-safe
    parts = [nvfp4_swizzle_scales(raw[lo:hi]) for lo, hi in itertools.pairwise(rows)]
    used = sum(p.numel() for p in parts)
    if size is not None:
        if size < used:
            raise ValueError(f"nvfp4_swizzle_scales_grouped: size {size} is below the {used} bytes the groups need")
        parts.append(raw.new_zeros((size - used,)))
    out = torch.cat(parts) if parts else raw.new_empty((0,))
    return out.view(scale.dtype) if scale.element_size() == 1 else out


def nvfp4_unswizzle_scales_grouped(
    swizzled: torch.Tensor, row_offsets: torch.Tensor | list[int], k_blocks: int
) -> torch.Tensor:
    """Inverse of :func:`nvfp4_swizzle_scales_grouped`: -> row-major ``[M_total, k_blocks]``."""
    rows = [int(v) for v in (row_offsets.tolist() if isinstance(row_offsets, torch.Tensor) else row_offsets)]
    offs = nvfp4_grouped_scale_offsets(rows, k_blocks)
    if swizzled.dim() != 1 or swizzled.numel() < offs[-1]:
        raise ValueError(
            f"nvfp4_unswizzle_scales_grouped: row_offsets {rows} with K/16={k_blocks} need at least "
            f"[{offs[-1]}] scales, got shape {list(swizzled.shape)}"
        )
    raw = swizzled.view(torch.uint8) if swizzled.element_size() == 1 else swizzled
    parts = [
        nvfp4_unswizzle_scales(raw[o0:o1], hi - lo, k_blocks)
        for lo, hi, o0, o1 in zip(rows[:-1], rows[1:], offs[:-1], offs[1:])
    ]
    out = torch.cat(parts) if parts else raw.new_empty((0, k_blocks))
    return out.view(swizzled.dtype) if swizzled.element_size() == 1 else out

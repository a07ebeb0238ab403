"""NVFP4 on the GPU: the quantizer (any arch) and the SM90 W4A16 path (NVFP4 weights, bf16 activations).

Quantizer, ModelOpt's rounding bit for bit (:func:`gemma4x.reference.quant.nvfp4_quantize`)::

    s_b  = e4m3( clamp(amax_b(|W|) / (6 * g), 2^-9, 448) )      code = e2m1_round( W / (s_b * g) )

W4A16 (Hopper has no FP4 tensor cores), weights in the packed layout of
:mod:`gemma4x.reference.nvfp4_w4a16` (repacked once at load, 0.5625 bytes per weight)::

    out = bf16( g * sum_k x[m, k] * e2m1[n, k] * s[n, k // 16] )          fp32 accumulation

Dispatch by compute capability:

* 9.0 (H100/H200), bf16 activations: ``M <= 64`` tokens (dense) or ``T*k <= 64`` pairs (experts)
  run the W4A16 decode kernels: dequantisation in registers, bf16 ``mma.sync``, split-K over a
  thread-block cluster; experts up to ``MOE_CHUNKED_MAX_PAIRS`` pairs run them over token chunks.
  Larger batches (prefill): experts run the W4A16 WGMMA grouped GEMMs of
  :mod:`gemma4x.ops.nvfp4_prefill` (TMA loads of the packed weights, dequantisation in
  registers, RS wgmma, GeGLU fused); dense layers run the WGMMA GEMM where it measured faster
  (:func:`dense_prefill_wgmma`), else dequantise into a bf16 scratch with the CUDA dequantizer
  and run cuBLAS. ``PREFILL_WGMMA = False`` (and non-bf16 activations) keeps the dequantise path.
* any other GPU: the dequantize + bf16 path (10.0 keeps the W4A4 ``ops.nvfp4_gemm`` for
  checkpoints with an ``input_scale``; the layers decide).

The decode kernels apply ``g`` once to the fp32 accumulator (the reference rounds each weight
``e2m1 * s * g`` to bf16 first), so they are closer to the exact product than the bf16 path on
dequantised weights; every other rounding (bf16 gate/up outputs, GeGLU, the fp32 sum over the
k slots) is the bf16 expert op's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemma4x.ops._checks import _fmt_dtype, check_cuda, check_tensor
from gemma4x.ops._dtypes import DTYPE_CODES, dtype_code
from gemma4x.ops._launch import device_capability, on_device
from gemma4x.ops._load import ExtensionUnavailableError, extension
from gemma4x.reference.nvfp4_w4a16 import (
    UNIT_BYTES,
    UNIT_K,
    UNIT_ROWS,
    w4a16_pack,
    w4a16_unpack,
)
from gemma4x.reference.quant import NVFP4_BLOCK, nvfp4_global_scale

# Limits of the SM90 kernels (csrc/ops/nvfp4/w4a16_sm90.cu holds the same numbers; a GPU test compares).
GEMV_MAX_TOKENS = 64
MOE_MAX_PAIRS = 64
MOE_MAX_EXPERTS = 256
# Up to this many (token, slot) pairs the experts run the decode kernels on chunks of
# MOE_MAX_PAIRS // k tokens (tokens are independent) instead of dequantising every expert into
# bf16: H200, 26B-A4B shape, one 8-token chunk measured 81.6 us, the dequantise path 1353.6 us at
# 64 tokens (bench/RESULTS.md), so 8 chunks stay well under it. Beyond, the dequantise path.
MOE_CHUNKED_MAX_PAIRS = 512
# Beyond the decode sizes, bf16 activations on a 9.0 GPU take the W4A16 WGMMA kernels of
# :mod:`gemma4x.ops.nvfp4_prefill` where they measured faster than dequantising into bf16
# (H200, bench_nvfp4 prefill section, bench/RESULTS.md): routed experts at every T*k >
# MOE_CHUNKED_MAX_PAIRS (512 tokens 476 us vs 1200 us, 4096 tokens 1217 us vs 1690 us); dense
# only for wide layers at a few hundred tokens (31B gate|up at 512 tokens 219 us vs 276 us; the
# 26B shapes and 4096 tokens stay on dequantise + cuBLAS, 0.5-0.9x there). False: the dequantise
# path everywhere (the benchmark compares both).
PREFILL_WGMMA = True
DENSE_WGMMA_MAX_TOKENS = 1024
DENSE_WGMMA_MIN_N = 16384


def dense_prefill_wgmma(m: int, n: int, k: int) -> bool:
    """True when ``w4a16_gemm`` of ``M`` bf16 rows runs the WGMMA kernel rather than dequantise + cuBLAS."""
    return PREFILL_WGMMA and GEMV_MAX_TOKENS < m <= DENSE_WGMMA_MAX_TOKENS and n >= DENSE_WGMMA_MIN_N

__all__ = [
    "GEMV_MAX_TOKENS",
    "MOE_MAX_PAIRS",
    "dense_prefill_wgmma",
    "nvfp4_quantize",
    "sm90_available",
    "w4a16_dequantize",
    "w4a16_gemm",
    "w4a16_moe_experts",
    "w4a16_pack",
    "w4a16_unpack",
]


def _packed_shape(op: str, name: str, packed: torch.Tensor, lead: int) -> tuple[int, int]:
    """(rows, K) of a packed weight with ``lead`` leading dimensions."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"{op}: {name} has dtype {_fmt_dtype(packed.dtype)}, expected uint8 (w4a16_pack output)")
    if packed.dim() != lead + 3 or packed.shape[-1] != UNIT_BYTES:
        raise ValueError(
            f"{op}: {name} must be the packed [{'E, ' * lead}N/16, K/64, {UNIT_BYTES}] uint8 of w4a16_pack, "
            f"got shape {list(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    return packed.shape[-3] * UNIT_ROWS, packed.shape[-2] * UNIT_K


def sm90_available(device: torch.device) -> bool:
    """True when the W4A16 decode kernels can run on ``device``: a 9.0 GPU and an sm_90a build."""
    if device.type != "cuda":
        return False
    try:
        mod = extension()
    except ExtensionUnavailableError:
        return False
    return bool(getattr(mod.nvfp4, "has_sm90", False)) and device_capability(device) == (9, 0)


# --- quantizer ---------------------------------------------------------------------------------


def _check_quantize(w: torch.Tensor, g: torch.Tensor) -> int:
    """Validates; returns rows_per_scale."""
    op = "nvfp4_quantize"
    dtype_code(w, f"{op}: w")
    if w.dim() < 2:
        raise ValueError(f"{op}: w must be [..., N, K], got shape {list(w.shape)}")
    K = w.shape[-1]
    if K == 0 or K % NVFP4_BLOCK:
        raise ValueError(f"{op}: K = {K} must be a positive multiple of {NVFP4_BLOCK}")
    if not w.is_contiguous():
        raise ValueError(f"{op}: w must be contiguous, got strides {list(w.stride())}")
    if g.dtype != torch.float32 or g.device != w.device:
        raise TypeError(f"{op}: global_scale must be float32 on {w.device}, got {_fmt_dtype(g.dtype)} on {g.device}")
    rows = w.numel() // K
    if g.numel() == 1:
        return max(rows, 1)
    lead = list(w.shape[: g.dim()])
    if g.dim() > w.dim() - 2 or list(g.shape) != lead:
        raise ValueError(
            f"{op}: global_scale must be a scalar or one per leading index {list(w.shape[:-2])}, got shape {list(g.shape)}"
        )
    per = 1
    for d in w.shape[g.dim() : -1]:
        per *= d
    return max(per, 1)


@torch.library.custom_op("gemma4x::nvfp4_quantize", mutates_args=())
def _nvfp4_quantize_op(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows_per_scale = _check_quantize(w, global_scale)
    check_cuda("nvfp4_quantize", "w", w)
    K = w.shape[-1]
    codes = torch.empty(*w.shape[:-1], K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*w.shape[:-1], K // NVFP4_BLOCK, dtype=torch.uint8, device=w.device)
    g = global_scale.contiguous()
    with on_device(w) as stream:
        extension().nvfp4.quantize(
            codes.data_ptr(), scales.data_ptr(), w.data_ptr(), g.data_ptr(), w.numel() // K, rows_per_scale, K,
            DTYPE_CODES[w.dtype], stream,
        )  # fmt: skip
    return codes, scales.view(torch.float8_e4m3fn)


@_nvfp4_quantize_op.register_fake
def _(w, global_scale):
    _check_quantize(w, global_scale)
    K = w.shape[-1]
    return (
        w.new_empty((*w.shape[:-1], K // 2), dtype=torch.uint8),
        w.new_empty((*w.shape[:-1], K // NVFP4_BLOCK), dtype=torch.float8_e4m3fn),
    )


@torch.no_grad()
def nvfp4_quantize(
    w: torch.Tensor, global_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 of ``w [..., N, K]`` on the GPU, bit-identical to :func:`gemma4x.reference.quant.nvfp4_quantize`.

    Args:
        w: CUDA float32/float16/bfloat16 ``[..., N, K]``, ``K`` a multiple of 16 (made contiguous).
        global_scale: ``weight_scale_2``: a scalar, or one per leading index (``[E]`` for ``[E, N, K]``).
            Default ``amax(|w|) / (6 * 448)`` (computed on the device, no host sync).
    Returns:
        ``(weight uint8 [..., N, K/2], weight_scale float8_e4m3fn [..., N, K/16], weight_scale_2 fp32)``.
    """
    check_cuda("nvfp4_quantize", "w", w)
    w = w.contiguous()
    if global_scale is None:
        global_scale = nvfp4_global_scale(w.abs().amax())
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=w.device)
    codes, scales = torch.ops.gemma4x.nvfp4_quantize(w, g)
    return codes, scales, g


# --- dequantizer (packed layout) ------------------------------------------------------------------


def _check_dequantize(packed, global_scale, dtype, interleave_gate_up) -> tuple[int, int, int, int]:
    op = "w4a16_dequantize"
    lead = packed.dim() - 3
    if lead not in (0, 1):
        raise ValueError(f"{op}: packed must be [N/16, K/64, 576] or [E, N/16, K/64, 576], got {list(packed.shape)}")
    rows, K = _packed_shape(op, "packed", packed, lead)
    batches = packed.shape[0] if lead else 1
    if dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    want = [batches, 2] if interleave_gate_up else ([batches] if lead else [])
    if interleave_gate_up and not lead:
        want = [2]
    g_ok = list(global_scale.shape) == want or (not interleave_gate_up and global_scale.numel() == 1)
    if not g_ok:
        raise ValueError(f"{op}: global_scale must have shape {want}, got {list(global_scale.shape)}")
    check_tensor(op, "global_scale", global_scale, list(global_scale.shape), torch.float32, packed.device)
    g_stride = 0 if global_scale.numel() == 1 else (2 if interleave_gate_up else 1)
    return batches, rows, K, g_stride


@torch.library.custom_op("gemma4x::nvfp4_w4a16_dequantize", mutates_args=())
def _w4a16_dequantize_op(
    packed: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype, interleave_gate_up: bool
) -> torch.Tensor:
    batches, rows, K, g_stride = _check_dequantize(packed, global_scale, dtype, interleave_gate_up)
    check_cuda("w4a16_dequantize", "packed", packed)
    out = torch.empty(*packed.shape[:-3], rows, K, dtype=dtype, device=packed.device)
    with on_device(packed) as stream:
        extension().nvfp4.dequantize(
            out.data_ptr(), packed.data_ptr(), global_scale.data_ptr(), batches, rows, K, g_stride,
            interleave_gate_up, DTYPE_CODES[dtype], stream,
        )  # fmt: skip
    return out


@_w4a16_dequantize_op.register_fake
def _(packed, global_scale, dtype, interleave_gate_up):
    _, rows, K, _ = _check_dequantize(packed, global_scale, dtype, interleave_gate_up)
    return packed.new_empty((*packed.shape[:-3], rows, K), dtype=dtype)


def w4a16_dequantize(
    packed: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    interleave_gate_up: bool = False,
) -> torch.Tensor:
    """``dtype(e2m1 * fp32(s) * g)`` ``[(E,) N, K]`` from a packed weight (the prefill path's scratch).

    Bit-identical to :func:`gemma4x.reference.nvfp4_w4a16.w4a16_dequantize`.

    Args:
        packed: ``[N/16, K/64, 576]`` or ``[E, N/16, K/64, 576]`` uint8 (:func:`w4a16_pack`), CUDA.
        global_scale: fp32: one element, ``[E]``, or ``[E, 2]`` (gate, up) with ``interleave_gate_up``.
        interleave_gate_up: the weight was packed with ``interleave_gate_up=True``; rows come back
            in checkpoint order (gate rows, then up rows).
    """
    return torch.ops.gemma4x.nvfp4_w4a16_dequantize(packed, global_scale, dtype, interleave_gate_up)


# --- dense W4A16 ---------------------------------------------------------------------------------


def _check_gemm(x: torch.Tensor, packed: torch.Tensor, global_scale: torch.Tensor) -> tuple[int, int]:
    op = "w4a16_gemm"
    N, K = _packed_shape(op, "packed", packed, 0)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must be [..., K={K}], got shape {list(x.shape)}")
    if x.device != packed.device:
        raise ValueError(f"{op}: x is on {x.device}, expected {packed.device} (as packed)")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: x has dtype {_fmt_dtype(x.dtype)}, expected float32, float16 or bfloat16")
    if global_scale.numel() != 1 or global_scale.dtype != torch.float32 or global_scale.device != x.device:
        raise ValueError(
            f"{op}: global_scale must be a one-element float32 tensor on {x.device}, got "
            f"{_fmt_dtype(global_scale.dtype)} {list(global_scale.shape)} on {global_scale.device}"
        )
    return N, K


@torch.library.custom_op("gemma4x::nvfp4_w4a16_gemv", mutates_args=())
def _w4a16_gemv_op(x: torch.Tensor, packed: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    N, K = _check_gemm(x, packed, global_scale)
    M = x.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
    if M == 0:
        return out
    if x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    with on_device(x) as stream:
        extension().nvfp4.w4a16_gemv(
            out.data_ptr(), N, x.data_ptr(), x.stride(0) if M > 1 else K, packed.data_ptr(),
            global_scale.data_ptr(), M, N, K, stream,
        )  # fmt: skip
    return out


@_w4a16_gemv_op.register_fake
def _(x, packed, global_scale):
    N, _ = _check_gemm(x, packed, global_scale)
    return x.new_empty((x.shape[0], N), dtype=torch.bfloat16)


def w4a16_gemm(x: torch.Tensor, packed: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``out = x @ W^T`` with ``W = e2m1 * s * g`` held packed (NVFP4 weights, activations in ``x.dtype``).

    On a compute capability 9.0 GPU with bf16 ``x`` and at most 64 rows: the W4A16 decode kernel
    (fp32 accumulation, ``g`` applied once). Otherwise: the CUDA dequantizer into a ``x.dtype``
    scratch ``[N, K]``, then ``F.linear`` (cuBLAS).

    Args:
        x: ``[..., K]`` CUDA float tensor.
        packed: ``[N/16, K/64, 576]`` uint8 from :func:`w4a16_pack` (``N % 16 == 0``, ``K % 64 == 0``).
        global_scale: one-element float32 ``weight_scale_2`` on the same device.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    N, K = _check_gemm(x, packed, global_scale)
    check_cuda("w4a16_gemm", "x", x)
    rows = x.reshape(-1, K)
    if x.dtype == torch.bfloat16 and rows.shape[0] <= GEMV_MAX_TOKENS and sm90_available(x.device):
        out = torch.ops.gemma4x.nvfp4_w4a16_gemv(rows, packed, global_scale.reshape(1))
    elif x.dtype == torch.bfloat16 and dense_prefill_wgmma(rows.shape[0], N, K) and sm90_available(x.device):
        from gemma4x.ops import nvfp4_prefill  # noqa: F401  (registers the op)

        out = torch.ops.gemma4x.nvfp4_w4a16_gemm_sm90(rows, packed, global_scale.reshape(1), 0)
    else:
        w = w4a16_dequantize(packed, global_scale.reshape(()), x.dtype)
        out = F.linear(rows, w)
    return out.reshape(*x.shape[:-1], N)


# --- routed experts ------------------------------------------------------------------------------


def _check_moe(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2) -> tuple[int, int, int, int, int]:
    op = "w4a16_moe_experts"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, H], got shape {list(x.shape)}")
    T, H = x.shape
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{op}: x has dtype {_fmt_dtype(x.dtype)}, expected float32, float16 or bfloat16")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{op}: x must be contiguous in its last dimension")
    if idx.dim() != 2 or idx.shape[0] != T:
        raise ValueError(f"{op}: idx must be [T={T}, k], got shape {list(idx.shape)}")
    k = idx.shape[1]
    check_tensor(op, "idx", idx, [T, k], torch.int64, x.device, contiguous=False)
    check_tensor(op, "weights", weights, [T, k], torch.float32, x.device, contiguous=False)
    if gate_up.dim() != 4:
        raise ValueError(f"{op}: gate_up must be the packed [E, 2I/16, H/64, 576] uint8, got shape {list(gate_up.shape)}")
    I2, Hg = _packed_shape(op, "gate_up", gate_up, 1)
    E = gate_up.shape[0]
    if Hg != H:
        raise ValueError(f"{op}: gate_up packs K = {Hg} columns, expected H = {H} (x)")
    I = I2 // 2
    if I % UNIT_K:
        raise ValueError(f"{op}: intermediate size I = {I} must be a multiple of {UNIT_K}")
    if down.dim() != 4:
        raise ValueError(f"{op}: down must be the packed [E, H/16, I/64, 576] uint8, got shape {list(down.shape)}")
    Hd, Id = _packed_shape(op, "down", down, 1)
    if down.shape[0] != E or Hd != H or Id != I:
        raise ValueError(
            f"{op}: down must pack [E={E}, H={H}, I={I}], got [E={down.shape[0]}, {Hd}, {Id}] (shape {list(down.shape)})"
        )
    for name, t in (("gate_up", gate_up), ("down", down)):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {x.device}")
    check_tensor(op, "gate_up_scale_2", gate_up_scale_2, [E, 2], torch.float32, x.device)
    check_tensor(op, "down_scale_2", down_scale_2, [E], torch.float32, x.device)
    return T, H, k, E, I


def _moe_decode_supported(x, idx, E, max_pairs: int = MOE_MAX_PAIRS) -> bool:
    return (
        x.dtype == torch.bfloat16
        and x.shape[0] * idx.shape[1] <= max_pairs
        and idx.shape[1] <= MOE_MAX_PAIRS
        and E <= MOE_MAX_EXPERTS
        and sm90_available(x.device)
    )


def token_chunks(fn, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, max_pairs: int) -> torch.Tensor:
    """``fn(x, idx, weights)`` over chunks of ``max_pairs // k`` tokens, concatenated (one call if it fits)."""
    T, k = idx.shape
    step = max(1, max_pairs // max(k, 1))
    if T <= step:
        return fn(x, idx, weights)
    return torch.cat([fn(x[i : i + step], idx[i : i + step], weights[i : i + step]) for i in range(0, T, step)])


@torch.library.custom_op("gemma4x::nvfp4_moe_experts_decode", mutates_args=())
def _moe_decode_op(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale_2: torch.Tensor,
    down: torch.Tensor,
    down_scale_2: torch.Tensor,
) -> torch.Tensor:
    T, H, k, E, I = _check_moe(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2)
    if T * k > MOE_MAX_PAIRS or E > MOE_MAX_EXPERTS or x.dtype != torch.bfloat16:
        raise ValueError(
            f"nvfp4_moe_experts_decode: needs bfloat16 x, T*k <= {MOE_MAX_PAIRS} and E <= {MOE_MAX_EXPERTS}, "
            f"got {_fmt_dtype(x.dtype)}, T={T}, k={k}, E={E}"
        )
    if T == 0 or k == 0:
        return torch.zeros(T, H, dtype=x.dtype, device=x.device)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    act = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
    if x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
    idx, weights = idx.contiguous(), weights.contiguous()
    with on_device(x) as stream:
        extension().nvfp4.moe_decode(
            out.data_ptr(), H, x.data_ptr(), x.stride(0) if T > 1 else H, idx.data_ptr(), weights.data_ptr(),
            gate_up.data_ptr(), gate_up_scale_2.data_ptr(), down.data_ptr(), down_scale_2.data_ptr(), act.data_ptr(),
            T, k, E, H, I, True, stream,
        )  # fmt: skip
    return out


@_moe_decode_op.register_fake
def _(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2):
    _check_moe(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2)
    return x.new_empty(x.shape)


def w4a16_moe_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale_2: torch.Tensor,
    down: torch.Tensor,
    down_scale_2: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_j w[t,j] * (gelu_tanh(x_t G_e^T) * (x_t U_e^T)) D_e^T`` with NVFP4 expert weights.

    On a compute capability 9.0 GPU with bf16 ``x`` and ``T*k <= 64``: two W4A16 decode kernels
    (gate/up + GeGLU, down + routing-weighted combine; each chosen expert's weights read once);
    up to ``MOE_CHUNKED_MAX_PAIRS`` pairs, the same kernels over chunks of ``64 // k`` tokens.
    Otherwise: the CUDA dequantizer writes bf16 ``[E, 2I, H]`` and ``[E, H, I]`` scratch copies
    and :func:`gemma4x.ops.moe.moe_experts` runs on them (the interim prefill path).
    Expert ids outside ``[0, E)`` contribute nothing on the decode path.

    Args:
        x: ``[T, H]`` CUDA; idx ``[T, k]`` int64; weights ``[T, k]`` float32.
        gate_up: ``[E, 2I/16, H/64, 576]`` uint8, ``w4a16_pack(..., interleave_gate_up=True)`` of
            the ``[E, 2I, H]`` gate/up weight (gate rows first).
        gate_up_scale_2: ``[E, 2]`` float32 (gate, up) global scales.
        down: ``[E, H/16, I/64, 576]`` uint8; down_scale_2: ``[E]`` float32.
    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    E = _check_moe(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2)[3]
    check_cuda("w4a16_moe_experts", "x", x)
    if _moe_decode_supported(x, idx, E, MOE_CHUNKED_MAX_PAIRS):
        return token_chunks(
            lambda xc, ic, wc: torch.ops.gemma4x.nvfp4_moe_experts_decode(
                xc, ic, wc, gate_up, gate_up_scale_2, down, down_scale_2
            ),
            x, idx, weights, MOE_MAX_PAIRS,
        )  # fmt: skip
    if x.dtype == torch.bfloat16 and PREFILL_WGMMA and E <= 256 and idx.shape[1] <= 32 and sm90_available(x.device):
        from gemma4x.ops import nvfp4_prefill  # noqa: F401  (registers the op)

        return torch.ops.gemma4x.nvfp4_moe_experts_prefill(x, idx, weights, gate_up, gate_up_scale_2, down, down_scale_2, 0)
    from gemma4x.ops.moe import moe_experts

    gu = w4a16_dequantize(gate_up, gate_up_scale_2, x.dtype, interleave_gate_up=True)
    dn = w4a16_dequantize(down, down_scale_2, x.dtype)
    return moe_experts(x, idx, weights, gu, dn)

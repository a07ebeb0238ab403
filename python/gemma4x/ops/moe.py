"""Gemma 4 routed GeGLU experts on the GPU (spec §2.8).

Router, one launch for any T::

    r      = bf16( bf16( rms_norm(h) * scale ) * H^-0.5 )
    p      = softmax_fp32( bf16(r @ W_router^T) )
    w, idx = topk(p, k);  w = w / sum(w) * per_expert_scale[idx]          # fp32

Experts::

    out[t] = bf16( sum_j w[t,j] * bf16( (gelu_tanh(x_t G_e^T) * (x_t U_e^T)) D_e^T ) )   e = idx[t,j]

with every intermediate rounded where HF's ``grouped_mm`` path rounds it. Decode batches
(``T*k <= 64``) read each chosen expert once, by default with two weight-streaming kernels
(gate/up + GeGLU, then down + combine); ``DECODE_KERNEL = "stream"`` selects the experimental
one-launch kernel (a bulk-copy pipeline on every SM, gate/up, a grid barrier, down + combine),
which streams the weights faster but computes slower, so it is not the default yet (see
bench/RESULTS.md). Larger bf16 batches on SM90 run the prefill path (:func:`prefill_supported`):
a device-side permute (one fused launch up to ``FUSED_PREP_AUTO_PAIRS`` pairs, else count, scan and
gather), two CUTLASS grouped GEMMs and a weighted combine. With ``gate_up_interleaved=True`` (gate/up
rows interleaved in blocks of 8, :func:`interleave_gate_up`, the layout the model layer keeps)
GEMM1's epilogue computes the GeGLU, so a block is router + prep + GEMM1 + GEMM2 + finalize = 5
launches; the HF layout adds a GeGLU kernel. Anything else (other archs, other dtypes) takes the
reference ``F.grouped_mm`` path. An SM100 build of
the prefill path exists but has not run on a B200: it is used only with
``GEMMA4X_MOE_PREFILL_SM100=1`` (:func:`prefill_device_ok`). Pure-PyTorch twins with the same
signatures live in :mod:`gemma4x.reference.moe`.
"""

from __future__ import annotations

import os

import torch

from gemma4x.ops._checks import _fmt_dtype, check_cuda, check_float_scalar, check_rows, check_tensor, check_weight
from gemma4x.ops._dtypes import DTYPE_CODES, dtype_code
from gemma4x.ops._launch import as_rows, device_capability, on_device
from gemma4x.ops._load import ExtensionUnavailableError, extension
from gemma4x.reference import moe as _ref
from gemma4x.reference.moe import deinterleave_gate_up, interleave_gate_up  # noqa: F401  (re-exported)

# Limits of the kernels (csrc/ops/moe/moe.cu holds the same numbers; a GPU test compares them).
ROUTER_MAX_EXPERTS = 256
ROUTER_MAX_TOP_K = 32
ROUTER_MAX_HIDDEN = 6144
# Beyond this many tokens the router is a real GEMM: cuBLAS (moe_router_many: rows kernel, cuBLAS,
# top-k kernel) beats one block per token re-reading the 720 KB router matrix from L2. H200,
# 26B-A4B shape, CUDA graphs, one run (bench/RESULTS.md): fused 8.9 / 13.7 / 17.9 / 16.8 / 22.2 /
# 25.4 / 39.0 / 74.9 us against many-token 19.1 / 18.4 / 18.6 / 18.8 / 18.2 / 18.3 / 18.5 / 18.5 us
# at 8 / 16 / 32 / 48 / 64 / 128 / 256 / 512 tokens: the crossover lies between 48 and 64 tokens.
# 64 keeps the MoE block at 5 launches up to 64 tokens (the many-token router is three) for at
# most ~4 us there.
ROUTER_FUSED_MAX_TOKENS = 64
DECODE_MAX_PAIRS = 64
DECODE_MAX_EXPERTS = 256
DECODE_MAX_HIDDEN = 3072
DECODE_MAX_INTER = 1024
_DECODE_DTYPES = (torch.bfloat16, torch.float16)
# Which decode kernels moe_experts_decode runs: "auto" (the two-kernel split path, unless
# GEMMA4X_MOE_DECODE=stream), "split" or "stream" (the one-launch kernel; split where the device
# cannot run it). Tests and benchmarks set it to compare the two.
DECODE_KERNEL = "auto"
_DECODE_KERNEL_CODES = {"auto": 0, "split": 1, "stream": 2}
PREFILL_MAX_EXPERTS = 256
PREFILL_MAX_TOP_K = 32
# Grouped-GEMM tile of the prefill path (PrefillTile in csrc/include/gemma4x/moe/prefill_params.h):
# 0 picks per GEMM by rows per expert; 1 = the large tile for both GEMMs (SM90: cooperative
# 128x256), 2 = the small one (SM90: ping-pong 64x256).
PREFILL_TILES = (0, 1, 2)
# How the prefill path permutes (PrefillPrep in prefill_params.h): 0 picks (the fused launch up to
# FUSED_PREP_AUTO_PAIRS pairs T*k, measured on H200), 1 = one fused launch (at most
# FUSED_PREP_MAX_PAIRS pairs), 2 = count + scan + gather.
PREFILL_PREPS = (0, 1, 2)
FUSED_PREP_MAX_PAIRS = 4096
FUSED_PREP_AUTO_PAIRS = 1024


def _check_router(h, proj_weight, scale, per_expert_scale, top_k, eps) -> None:
    op = "moe_router"
    dtype_code(h, f"{op}: h")
    check_rows(op, "h", h)
    H = h.shape[-1]
    if proj_weight.dim() != 2:
        raise ValueError(f"{op}: proj_weight must be [E, H={H}], got shape {list(proj_weight.shape)}")
    E = proj_weight.shape[0]
    check_tensor(op, "proj_weight", proj_weight, [E, H], h.dtype, h.device, contiguous=True)
    if not 1 <= E <= ROUTER_MAX_EXPERTS:
        raise ValueError(f"{op}: experts E must be in [1, {ROUTER_MAX_EXPERTS}], got {E}")
    vec = 16 // h.element_size()
    if H % vec != 0 or H > ROUTER_MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size H must be a multiple of {vec} and <= {ROUTER_MAX_HIDDEN}, got {H}")
    check_weight(op, "scale", scale, h)
    check_tensor(op, "per_expert_scale", per_expert_scale, [E], (h.dtype, torch.float32), h.device, contiguous=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= min(ROUTER_MAX_TOP_K, E):
        raise ValueError(f"{op}: top_k must be an int in [1, min({ROUTER_MAX_TOP_K}, E={E})], got {top_k!r}")
    check_float_scalar(op, "eps", eps)


def _check_interleaved(op, gate_up_interleaved, gate_up_proj) -> None:
    if not isinstance(gate_up_interleaved, bool):
        raise TypeError(f"{op}: gate_up_interleaved must be a bool, got {gate_up_interleaved!r}")
    if gate_up_interleaved and gate_up_proj.shape[1] % 16 != 0:
        raise ValueError(
            f"{op}: gate_up_interleaved needs I a multiple of 8 (rows interleaved in blocks of 8), "
            f"got gate_up_proj shape {list(gate_up_proj.shape)}"
        )


def _check_experts(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved=False) -> None:
    op = "moe_experts"
    dtype_code(x, f"{op}: x")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, H], got shape {list(x.shape)}")
    check_rows(op, "x", x)
    T, H = x.shape
    if idx.dim() != 2 or idx.shape[0] != T:
        raise ValueError(f"{op}: idx must be [T={T}, k], got shape {list(idx.shape)}")
    k = idx.shape[1]
    check_tensor(op, "idx", idx, [T, k], torch.int64, x.device, contiguous=False)
    check_tensor(op, "weights", weights, [T, k], torch.float32, x.device, contiguous=False)
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != H or gate_up_proj.shape[1] % 2 != 0:
        raise ValueError(f"{op}: gate_up_proj must be [E, 2I, H={H}], got shape {list(gate_up_proj.shape)}")
    E, I = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    check_tensor(op, "gate_up_proj", gate_up_proj, [E, 2 * I, H], x.dtype, x.device, contiguous=False)
    check_tensor(op, "down_proj", down_proj, [E, H, I], x.dtype, x.device, contiguous=False)
    _check_interleaved(op, gate_up_interleaved, gate_up_proj)


def decode_supported(x: torch.Tensor, idx: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """True when :func:`moe_experts` runs the decode kernels for these arguments (else grouped_mm)."""
    T, H = x.shape
    k = idx.shape[1]
    E, I2, _ = gate_up_proj.shape
    return (
        x.dtype in _DECODE_DTYPES
        and T * k <= DECODE_MAX_PAIRS
        and E <= DECODE_MAX_EXPERTS
        and H % 8 == 0
        and H <= DECODE_MAX_HIDDEN
        and (I2 // 2) % 8 == 0
        and I2 // 2 <= DECODE_MAX_INTER
        and gate_up_proj.is_contiguous()
        and down_proj.is_contiguous()
    )  # no data_ptr() here: fake tensors have none (the launcher checks 16-byte alignment)


def _rows(h) -> int:
    """Tokens in ``h`` for the path choice (0 for anything malformed: the op's checks report it)."""
    if not isinstance(h, torch.Tensor) or h.dim() == 0 or h.shape[-1] == 0:
        return 0
    return h.numel() // h.shape[-1]


def _kernel_candidate(x, idx, gate_up_proj, down_proj) -> bool:
    """Tensors on CUDA with the ranks the kernel paths read shapes from; anything else goes to the
    reference path, whose checks then name the problem."""
    tensors = (x, idx, gate_up_proj, down_proj)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    return x.is_cuda and x.dim() == 2 and idx.dim() == 2 and gate_up_proj.dim() == 3


def _aligned_rows(t: torch.Tensor, name: str, op: str, vec: int) -> tuple[torch.Tensor, int]:
    """``[rows, hidden]`` view whose base and row stride allow 16-byte loads (copied if not)."""
    rows, stride = as_rows(t, name, op)
    if rows.data_ptr() % 16 != 0 or stride % vec != 0:
        rows = rows.clone(memory_format=torch.contiguous_format)
        stride = rows.shape[-1]
    return rows, stride


@torch.library.custom_op("gemma4x::moe_router", mutates_args=())
def _moe_router_op(
    h: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_router(h, proj_weight, scale, per_expert_scale, top_k, eps)
    check_cuda("moe_router", "h", h)
    out_shape = (*h.shape[:-1], top_k)
    weights = torch.empty(out_shape, dtype=torch.float32, device=h.device)
    idx = torch.empty(out_shape, dtype=torch.int64, device=h.device)
    rows, stride = _aligned_rows(h, "h", "moe_router", 16 // h.element_size())
    with on_device(h) as stream:
        extension().moe.moe_router(
            weights.data_ptr(), idx.data_ptr(), rows.data_ptr(), stride, proj_weight.data_ptr(), scale.data_ptr(),
            per_expert_scale.data_ptr(), per_expert_scale.dtype == torch.float32,
            rows.shape[0], h.shape[-1], proj_weight.shape[0], top_k, float(eps), DTYPE_CODES[h.dtype], stream,
        )  # fmt: skip
    return weights, idx


@_moe_router_op.register_fake
def _(h, proj_weight, scale, per_expert_scale, top_k, eps):
    _check_router(h, proj_weight, scale, per_expert_scale, top_k, eps)
    out_shape = (*h.shape[:-1], top_k)
    return h.new_empty(out_shape, dtype=torch.float32), h.new_empty(out_shape, dtype=torch.int64)


def _check_decode(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved=False) -> None:
    _check_experts(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved)
    if not decode_supported(x, idx, gate_up_proj, down_proj):
        T, H = x.shape
        E, I2, _ = gate_up_proj.shape
        raise ValueError(
            f"moe_experts_decode: unsupported arguments (dtype {_fmt_dtype(x.dtype)}, T={T}, k={idx.shape[1]}, E={E}, "
            f"H={H}, I={I2 // 2}); needs bfloat16/float16, T*k <= {DECODE_MAX_PAIRS}, E <= {DECODE_MAX_EXPERTS}, "
            f"H and I multiples of 8, H <= {DECODE_MAX_HIDDEN}, I <= {DECODE_MAX_INTER}, contiguous "
            "weights; moe_experts picks the grouped_mm path for anything else"
        )


@torch.library.custom_op("gemma4x::moe_experts_decode", mutates_args=())
def _moe_experts_decode_op(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_interleaved: bool = False,
) -> torch.Tensor:
    _check_decode(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved)
    check_cuda("moe_experts_decode", "x", x)
    T, H = x.shape
    k = idx.shape[1]
    E, I = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    act = torch.empty(T * k, I, dtype=x.dtype, device=x.device)
    rows, stride = _aligned_rows(x, "x", "moe_experts_decode", 8)
    idx, weights = idx.contiguous(), weights.contiguous()
    kernel = _DECODE_KERNEL_CODES[DECODE_KERNEL]
    with on_device(x) as stream:
        extension().moe.moe_experts_decode(
            out.data_ptr(), H, rows.data_ptr(), stride, idx.data_ptr(), weights.data_ptr(),
            gate_up_proj.data_ptr(), down_proj.data_ptr(), act.data_ptr(),
            T, k, E, H, I, DTYPE_CODES[x.dtype], stream, kernel, gate_up_interleaved,
        )  # fmt: skip
    return out


@_moe_experts_decode_op.register_fake
def _(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved=False):
    _check_decode(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved)
    return x.new_empty(x.shape)


def prefill_supported(x: torch.Tensor, idx: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """True when the arguments fit the SM90 prefill kernels (bf16, contiguous weights, H and I
    multiples of 8, E <= 256, k <= 32). Says nothing about the GPU: see :func:`prefill_device_ok`."""
    H = x.shape[1]
    k = idx.shape[1]
    E, I2, _ = gate_up_proj.shape
    return (
        x.dtype == torch.bfloat16
        and E <= PREFILL_MAX_EXPERTS
        and k <= PREFILL_MAX_TOP_K
        and H % 8 == 0
        and (I2 // 2) % 8 == 0
        and I2 > 0
        and gate_up_proj.is_contiguous()
        and down_proj.is_contiguous()
    )


_prefill_device_cache: dict[int, bool] = {}


def prefill_device_ok(device: torch.device) -> bool:
    """True when ``device`` can run the grouped-GEMM prefill kernels of this build.

    - compute capability 9.0 (H100/H200) with an sm_90a build: yes (measured, bench/RESULTS.md);
    - 10.0 (B200) with an sm_100a build: only when ``GEMMA4X_MOE_PREFILL_SM100=1``, since that
      path is compiled but has not run on a B200 yet;
    - anything else: no. :func:`moe_experts` then takes the reference ``F.grouped_mm`` path.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _prefill_device_cache.get(index)
    if ok is None:
        ok = False
        cc = device_capability(device)
        try:
            mod = extension().moe_prefill
            if cc == (9, 0):
                ok = bool(mod.has_sm90)
            elif cc == (10, 0):
                ok = bool(mod.has_sm100) and os.environ.get("GEMMA4X_MOE_PREFILL_SM100", "0") == "1"
        except (ExtensionUnavailableError, AttributeError):  # no extension: the reference path
            ok = False
        _prefill_device_cache[index] = ok
    return ok


def _check_prefill(x, idx, weights, gate_up_proj, down_proj, tile, gate_up_interleaved=False, prep=0) -> None:
    _check_experts(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved)
    if not prefill_supported(x, idx, gate_up_proj, down_proj):
        T, H = x.shape
        E, I2, _ = gate_up_proj.shape
        raise ValueError(
            f"moe_experts_prefill: unsupported arguments (dtype {_fmt_dtype(x.dtype)}, T={T}, k={idx.shape[1]}, "
            f"E={E}, H={H}, I={I2 // 2}); needs bfloat16, E <= {PREFILL_MAX_EXPERTS}, k <= {PREFILL_MAX_TOP_K}, "
            "H and I multiples of 8, contiguous weights; moe_experts picks the grouped_mm path for anything else"
        )
    if isinstance(tile, bool) or tile not in PREFILL_TILES:
        raise ValueError(f"moe_experts_prefill: tile must be one of {PREFILL_TILES}, got {tile!r}")
    if isinstance(prep, bool) or prep not in PREFILL_PREPS:
        raise ValueError(f"moe_experts_prefill: prep must be one of {PREFILL_PREPS}, got {prep!r}")
    pairs = x.shape[0] * idx.shape[1]
    if prep == 1 and pairs > FUSED_PREP_MAX_PAIRS:
        raise ValueError(
            f"moe_experts_prefill: prep=1 (fused) takes at most T*k = {FUSED_PREP_MAX_PAIRS} pairs, got {pairs}"
        )


@torch.library.custom_op("gemma4x::moe_experts_prefill", mutates_args=())
def _moe_experts_prefill_op(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    tile: int = 0,
    gate_up_interleaved: bool = False,
    prep: int = 0,
) -> torch.Tensor:
    _check_prefill(x, idx, weights, gate_up_proj, down_proj, tile, gate_up_interleaved, prep)
    check_cuda("moe_experts_prefill", "x", x)
    T, H = x.shape
    k = idx.shape[1]
    E, I = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    mod = extension().moe_prefill
    rows, stride = _aligned_rows(x, "x", "moe_experts_prefill", 8)
    idx, weights = idx.contiguous(), weights.contiguous()
    with on_device(x) as stream:
        # Permuted x, GEMM outputs and per-expert GEMM arguments (sized for x's GPU), from the
        # torch allocator: graph-safe.
        nbytes = mod.moe_prefill_workspace_size(T, k, E, H, I, gate_up_interleaved)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        mod.moe_experts_prefill(
            out.data_ptr(), H, rows.data_ptr(), stride, idx.data_ptr(), weights.data_ptr(),
            gate_up_proj.data_ptr(), down_proj.data_ptr(), workspace.data_ptr(), nbytes,
            T, k, E, H, I, int(tile), stream, gate_up_interleaved, int(prep),
        )  # fmt: skip
    return out


@_moe_experts_prefill_op.register_fake
def _(x, idx, weights, gate_up_proj, down_proj, tile=0, gate_up_interleaved=False, prep=0):
    _check_prefill(x, idx, weights, gate_up_proj, down_proj, tile, gate_up_interleaved, prep)
    return x.new_empty(x.shape)


@torch.library.custom_op("gemma4x::moe_router_many", mutates_args=())
def _moe_router_many_op(
    h: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_router(h, proj_weight, scale, per_expert_scale, top_k, eps)
    check_cuda("moe_router", "h", h)
    out_shape = (*h.shape[:-1], top_k)
    weights = torch.empty(out_shape, dtype=torch.float32, device=h.device)
    idx = torch.empty(out_shape, dtype=torch.int64, device=h.device)
    rows, stride = _aligned_rows(h, "h", "moe_router", 16 // h.element_size())
    T, H = rows.shape
    if T == 0:
        return weights, idx
    mod = extension().moe_prefill
    r = torch.empty(T, H, dtype=h.dtype, device=h.device)
    with on_device(h) as stream:
        mod.moe_router_rows(r.data_ptr(), rows.data_ptr(), stride, scale.data_ptr(), T, H, float(eps),
                            DTYPE_CODES[h.dtype], stream)
        logits = torch.nn.functional.linear(r, proj_weight)  # cuBLAS on the same stream, rounded to h.dtype
        mod.moe_router_topk(
            weights.data_ptr(), idx.data_ptr(), logits.data_ptr(), per_expert_scale.data_ptr(),
            per_expert_scale.dtype == torch.float32, T, proj_weight.shape[0], top_k, DTYPE_CODES[h.dtype], stream,
        )  # fmt: skip
    return weights, idx


@_moe_router_many_op.register_fake
def _(h, proj_weight, scale, per_expert_scale, top_k, eps):
    _check_router(h, proj_weight, scale, per_expert_scale, top_k, eps)
    out_shape = (*h.shape[:-1], top_k)
    return h.new_empty(out_shape, dtype=torch.float32), h.new_empty(out_shape, dtype=torch.int64)


def moe_router(
    h: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w, idx = topk(softmax_fp32(bf16(bf16(rms(h) * scale) * H^-0.5) @ W^T), k)``; ``w / sum(w) * s[idx]``.

    One fused launch up to ``ROUTER_FUSED_MAX_TOKENS`` tokens; beyond, a normalised-rows kernel,
    the router GEMM through cuBLAS and a softmax/top-k kernel (three launches). Ties between equal
    probabilities go to the lower expert id on both paths.

    Args:
        h: ``[..., H]`` float32/float16/bfloat16 CUDA tensor, the residual stream entering the
            FFN block; last dim contiguous. ``H`` a multiple of 16 bytes, at most 6144.
        proj_weight: ``[E, H]`` router matrix, contiguous, dtype of ``h``; ``E <= 256``.
        scale: ``[H]``, dtype of ``h``.
        per_expert_scale: ``[E]``, dtype of ``h`` or float32.
        top_k: experts per token, ``1 <= k <= min(32, E)``.
        eps: RMSNorm epsilon.
    Returns:
        (weights ``[..., k]`` float32, idx ``[..., k]`` int64), sorted by descending probability.
    """
    # Validated once, by whichever path runs: each custom op checks its arguments itself.
    if _rows(h) <= ROUTER_FUSED_MAX_TOKENS:
        return torch.ops.gemma4x.moe_router(h, proj_weight, scale, per_expert_scale, top_k, eps)
    return torch.ops.gemma4x.moe_router_many(h, proj_weight, scale, per_expert_scale, top_k, eps)


def moe_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_interleaved: bool = False,
) -> torch.Tensor:
    """``out[t] = sum_j weights[t,j] * (gelu_tanh(x_t G_e^T) * (x_t U_e^T)) D_e^T``, ``e = idx[t,j]``.

    fp32 sum over the k slots, rounded once to ``x.dtype``. Decode batches (``T*k <= 64``, see
    :func:`decode_supported`) run the two decode kernels; larger bf16 batches on an SM90 GPU the
    grouped-GEMM prefill path (:func:`prefill_supported`, :func:`prefill_device_ok`); anything
    else the reference ``F.grouped_mm`` path, so every size is correct. Expert ids outside
    ``[0, E)`` contribute nothing on the decode and prefill paths.

    Args:
        x: ``[T, H]`` expert input (``pre_feedforward_layernorm_2`` output), CUDA.
        idx: ``[T, k]`` int64 expert ids; weights: ``[T, k]`` float32 routing weights.
        gate_up_proj: ``[E, 2I, H]`` (gate rows first, then up rows), dtype of ``x``; with
            ``gate_up_interleaved=True`` rows interleaved in blocks of 8 (:func:`interleave_gate_up`),
            which lets the SM90 prefill path compute the GeGLU in GEMM1's epilogue.
        down_proj: ``[E, H, I]``, dtype of ``x``.
        gate_up_interleaved: the layout of ``gate_up_proj`` (every path reads both).
    Returns:
        ``[T, H]`` in ``x.dtype``.
    """
    # Validated once, by whichever path runs: the decode and prefill ops check their arguments
    # themselves, and anything else goes to the checks below.
    if _kernel_candidate(x, idx, gate_up_proj, down_proj):
        if decode_supported(x, idx, gate_up_proj, down_proj):
            return torch.ops.gemma4x.moe_experts_decode(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved)
        if prefill_supported(x, idx, gate_up_proj, down_proj) and prefill_device_ok(x.device):
            return torch.ops.gemma4x.moe_experts_prefill(
                x, idx, weights, gate_up_proj, down_proj, 0, gate_up_interleaved
            )
    _check_experts(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved)
    check_cuda("moe_experts", "x", x)
    return _ref.moe_experts(x, idx, weights, gate_up_proj, down_proj, gate_up_interleaved)

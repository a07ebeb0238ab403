"""NVFP4 W4A4 GEMM on SM100 (Blackwell) tensor cores.

    out[m, n] = bf16( alpha * sum_k e2m1(a[m, k]) * sfa[m, k//16] * e2m1(b[n, k]) * sfb[n, k//16] )

``a`` holds activations quantized with the checkpoint's ``input_scale``
(:func:`gemma4x.reference.quant.nvfp4_quantize_activation`), ``b`` the NVFP4 weight, and
``alpha = input_scale * weight_scale_2``. Both block-scale matrices are in CUTLASS's SM100 order,
swizzled once at load (:func:`gemma4x.reference.quant.nvfp4_swizzle_scales`). One CUTLASS
block-scaled kernel (tcgen05, 128x128x256 tiles), compiled for ``sm_100a`` only: it runs on
compute capability 10.0 GPUs (B200/GB200) and nowhere else. The pure-PyTorch twin is
:func:`gemma4x.reference.gemm.nvfp4_gemm`.
"""

from __future__ import annotations

import torch

from gemma4x.ops._checks import _fmt_dtype, check_cuda
from gemma4x.ops._launch import device_capability, on_device
from gemma4x.ops._load import ExtensionUnavailableError, extension
from gemma4x.reference.quant import NVFP4_BLOCK, nvfp4_grouped_scale_capacity, nvfp4_swizzled_size

# Shape rules of the kernel (csrc/include/gemma4x/gemm/params.h holds the same numbers).
K_MULTIPLE = 64
N_MULTIPLE = 8

_OP = "nvfp4_gemm"


def _check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, shape: list, what: str, op: str = _OP) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {_fmt_dtype(t.dtype)}, expected {_fmt_dtype(dtype)}")
    if list(t.shape) != shape:
        raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected {what}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {list(t.stride())}")


def _check_devices(op: str, a: torch.Tensor, named: dict[str, torch.Tensor]) -> None:
    for name, t in named.items():
        if t.device != a.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {a.device} (as a)")


def _check(a, a_scale, b, b_scale, alpha) -> tuple[int, int, int]:
    """Validate every argument; returns (M, N, K)."""
    if a.dim() != 2:
        raise ValueError(f"{_OP}: a must be 2-D [M, K/2] packed e2m1, got shape {list(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"{_OP}: b must be 2-D [N, K/2] packed e2m1, got shape {list(b.shape)}")
    M, half_k = a.shape
    N = b.shape[0]
    K = 2 * half_k
    _check_tensor("a", a, torch.uint8, [M, half_k], f"[M, K/2] = [{M}, {half_k}]")
    _check_tensor("b", b, torch.uint8, [N, half_k], f"[N, {half_k}] (K/2 = {half_k} as a)")
    if K == 0 or K % K_MULTIPLE:
        raise ValueError(f"{_OP}: K = {K} must be a positive multiple of {K_MULTIPLE}")
    if N == 0 or N % N_MULTIPLE:
        raise ValueError(f"{_OP}: N = {N} must be a multiple of {N_MULTIPLE} (16-byte bf16 output rows)")
    kb = K // NVFP4_BLOCK
    for name, t, rows, rows_name in (
        ("a_scale", a_scale, M, "M"),
        ("b_scale", b_scale, N, "N"),
    ):
        size = nvfp4_swizzled_size(rows, kb)
        what = (
            f"the swizzled [{size}] float8_e4m3fn block scales of {rows_name}={rows}, K/16={kb} "
            "(gemma4x.reference.quant.nvfp4_swizzle_scales)"
        )
        if t.dtype != torch.float8_e4m3fn:
            raise TypeError(f"{_OP}: {name} has dtype {_fmt_dtype(t.dtype)}, expected float8_e4m3fn")
        if list(t.shape) != [size]:
            raise ValueError(f"{_OP}: {name} must be {what}, got shape {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be contiguous, got strides {list(t.stride())}")
    if alpha.dtype != torch.float32 or alpha.numel() != 1:
        raise ValueError(
            f"{_OP}: alpha must be a one-element float32 tensor (input_scale * weight_scale_2), "
            f"got {_fmt_dtype(alpha.dtype)} {list(alpha.shape)}"
        )
    _check_devices(_OP, a, {"b": b, "a_scale": a_scale, "b_scale": b_scale, "alpha": alpha})
    return M, N, K


def _gemm_module():
    """The extension's gemm submodule, or a clear error when this build or this GPU cannot run it."""
    mod = extension()
    if not getattr(mod.gemm, "has_sm100", False):
        raise ExtensionUnavailableError(
            f"{_OP}: gemma4x._C was built without an sm_100 target. Rebuild with an SM100 arch, e.g. "
            "`pip install . -C cmake.define.GEMMA4X_CUDA_ARCHS='90a;100a'` (the default)."
        )
    return mod.gemm


def _check_gpu(t: torch.Tensor, op: str = _OP) -> None:
    cc = device_capability(t.device)
    if cc != (10, 0):
        raise RuntimeError(
            f"{op}: the NVFP4 block-scaled GEMM is compiled for sm_100a and needs a compute capability 10.0 GPU "
            f"(B200/GB200); {t.device} is {cc[0]}.{cc[1]} (use gemma4x.reference.gemm.{op} there)"
        )


@torch.library.custom_op("gemma4x::nvfp4_gemm", mutates_args=())
def _nvfp4_gemm_op(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    M, N, K = _check(a, a_scale, b, b_scale, alpha)
    check_cuda(_OP, "a", a)
    gemm = _gemm_module()
    _check_gpu(a)
    out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    if M == 0:
        return out
    with on_device(a) as stream:
        ws_bytes = gemm.nvfp4_gemm_workspace_size(M, N, K)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=a.device)
        gemm.nvfp4_gemm(
            out.data_ptr(), a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(), alpha.data_ptr(),
            ws.data_ptr(), ws_bytes, M, N, K, stream,
        )  # fmt: skip
    return out


@_nvfp4_gemm_op.register_fake
def _(a, a_scale, b, b_scale, alpha):
    M, N, _ = _check(a, a_scale, b, b_scale, alpha)
    return a.new_empty((M, N), dtype=torch.bfloat16)


def nvfp4_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """``bf16(alpha * (e2m1(a) * sfa) @ (e2m1(b) * sfb)^T)``, NVFP4 x NVFP4 on SM100 tensor cores.

    Args:
        a: uint8 ``[M, K/2]`` packed e2m1 activations (even ``k`` in the low nibble), contiguous;
            ``K`` a multiple of 64.
        a_scale: float8_e4m3fn ``[nvfp4_swizzled_size(M, K/16)]``, the activation block scales swizzled.
        b: uint8 ``[N, K/2]`` packed e2m1 weight (the checkpoint's ``weight``); ``N`` a multiple of 8.
        b_scale: float8_e4m3fn ``[nvfp4_swizzled_size(N, K/16)]``, ``weight_scale`` swizzled at load.
        alpha: float32 one-element tensor on the device, ``input_scale * weight_scale_2``.
    Returns:
        bf16 ``[M, N]``.
    Raises:
        ExtensionUnavailableError when ``gemma4x._C`` lacks the sm_100 kernel; RuntimeError on a GPU
        other than compute capability 10.0.
    """
    return torch.ops.gemma4x.nvfp4_gemm(a, a_scale, b, b_scale, alpha)


# --- Grouped over experts ------------------------------------------------------------------------

_GOP = "nvfp4_grouped_gemm"


def _check_grouped(a, a_scale, row_offsets, b, b_scale, alpha) -> tuple[int, int, int, int]:
    """Validate every argument; returns (M_total, groups, N, K)."""
    if a.dim() != 2:
        raise ValueError(f"{_GOP}: a must be 2-D [M_total, K/2] packed e2m1, got shape {list(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"{_GOP}: b must be 3-D [groups, N, K/2] packed e2m1, got shape {list(b.shape)}")
    M, half_k = a.shape
    E, N = b.shape[0], b.shape[1]
    K = 2 * half_k
    for name, t, dtype, shape, what in (
        ("a", a, torch.uint8, [M, half_k], f"[M_total, K/2] = [{M}, {half_k}]"),
        ("b", b, torch.uint8, [E, N, half_k], f"[groups, N, {half_k}] (K/2 = {half_k} as a)"),
        ("row_offsets", row_offsets, torch.int32, [E + 1], f"[groups + 1] = [{E + 1}]"),
        ("alpha", alpha, torch.float32, [E], f"[groups] = [{E}] (input_scale * weight_scale_2 per expert)"),
    ):
        _check_tensor(name, t, dtype, shape, what, _GOP)
    if E == 0:
        raise ValueError(f"{_GOP}: b has no groups (experts)")
    if K == 0 or K % K_MULTIPLE:
        raise ValueError(f"{_GOP}: K = {K} must be a positive multiple of {K_MULTIPLE}")
    if N == 0 or N % N_MULTIPLE:
        raise ValueError(f"{_GOP}: N = {N} must be a multiple of {N_MULTIPLE} (16-byte bf16 output rows)")
    kb = K // NVFP4_BLOCK
    for name, t, shape, what in (
        ("a_scale", a_scale, [nvfp4_grouped_scale_capacity(M, E, kb)],
         (f"nvfp4_grouped_scale_capacity(M_total={M}, groups={E}, K/16={kb}) swizzled scales "
          "(gemma4x.reference.quant.nvfp4_swizzle_scales_grouped(..., size=...))")),
        ("b_scale", b_scale, [E, nvfp4_swizzled_size(N, kb)], f"[groups, nvfp4_swizzled_size(N={N}, K/16={kb})]"),
    ):  # fmt: skip
        _check_tensor(name, t, torch.float8_e4m3fn, shape, f"{shape}: {what}", _GOP)
    _check_devices(
        _GOP, a, {"a_scale": a_scale, "row_offsets": row_offsets, "b": b, "b_scale": b_scale, "alpha": alpha}
    )
    return M, E, N, K


@torch.library.custom_op("gemma4x::nvfp4_grouped_gemm", mutates_args=())
def _nvfp4_grouped_gemm_op(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    row_offsets: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    M, E, N, K = _check_grouped(a, a_scale, row_offsets, b, b_scale, alpha)
    check_cuda(_GOP, "a", a)
    gemm = _gemm_module()
    _check_gpu(a, _GOP)
    out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    if M == 0:
        return out
    with on_device(a) as stream:
        ws_bytes = gemm.nvfp4_grouped_gemm_workspace_size(E, N, K)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=a.device)
        gemm.nvfp4_grouped_gemm(
            out.data_ptr(), a.data_ptr(), a_scale.data_ptr(), row_offsets.data_ptr(), b.data_ptr(),
            b_scale.data_ptr(), alpha.data_ptr(), ws.data_ptr(), ws_bytes, E, N, K, stream,
        )  # fmt: skip
    return out


@_nvfp4_grouped_gemm_op.register_fake
def _(a, a_scale, row_offsets, b, b_scale, alpha):
    M, _, N, _ = _check_grouped(a, a_scale, row_offsets, b, b_scale, alpha)
    return a.new_empty((M, N), dtype=torch.bfloat16)


def nvfp4_grouped_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    row_offsets: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    alpha: torch.Tensor,
) -> torch.Tensor:
    """Per expert ``e``: ``out[rows_e] = bf16(alpha[e] * (e2m1(a) * sfa)[rows_e] @ (e2m1(b[e]) * sfb[e])^T)``.

    One CUTLASS ptr-array block-scaled kernel (tcgen05, 128x256x256 tiles) over all experts; a
    small kernel first builds the per-expert problem shapes, pointers and scale layouts on the
    device from ``row_offsets``, so routing is never read back and the call is graph-capturable.
    Compiled for ``sm_100a`` only (compute capability 10.0); **compiled, not run**: no Blackwell
    GPU has executed it yet. The pure-PyTorch twin is :func:`gemma4x.reference.gemm.nvfp4_grouped_gemm`.

    Args:
        a: uint8 ``[M_total, K/2]`` packed e2m1 activations, rows sorted by expert.
        a_scale: float8_e4m3fn ``[nvfp4_grouped_scale_capacity(M_total, E, K/16)]``: each expert's
            activation block scales swizzled on their own and concatenated
            (:func:`gemma4x.reference.quant.nvfp4_swizzle_scales_grouped` with that ``size``).
        row_offsets: int32 ``[E + 1]`` on the device: expert ``e`` owns rows ``[row_offsets[e], row_offsets[e+1])``.
        b: uint8 ``[E, N, K/2]`` packed e2m1 expert weights; ``K`` a multiple of 64, ``N`` of 8.
        b_scale: float8_e4m3fn ``[E, nvfp4_swizzled_size(N, K/16)]``, each expert's ``weight_scale`` swizzled.
        alpha: float32 ``[E]``, ``input_scale * weight_scale_2`` per expert.
    Returns:
        bf16 ``[M_total, N]``.
    """
    return torch.ops.gemma4x.nvfp4_grouped_gemm(a, a_scale, row_offsets, b, b_scale, alpha)

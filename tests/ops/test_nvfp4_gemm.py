"""NVFP4 W4A4 GEMM (SM100): block-scale swizzle, activation quantization, wrapper validation.

No Blackwell GPU is available to CI, so the CPU tests pin down everything host-side: the scale
swizzle is compared element by element with CuTe's own layout (a host-only C++ probe compiled
against the CUTLASS headers), and the wrapper's argument checks run before any kernel. The
`cuda` test runs only on an SM100 GPU.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest
import torch
from gemma4x import ops
from gemma4x.reference import gemm as ref_gemm
from gemma4x.reference import quant

_PROBE_SRC = os.path.join(os.path.dirname(__file__), "cpp", "sm100_sf_layout_probe.cpp")
# (rows, K, batches): one atom, partial atoms in both directions, several tiles, batches (experts).
_PROBE_SHAPES = [
    (1, 16, 1),
    (3, 64, 1),
    (128, 64, 1),
    (130, 80, 1),
    (200, 272, 1),
    (257, 48, 2),
    (64, 512, 3),
]


def _cutlass_include() -> str | None:
    import importlib.util

    env = os.environ.get("CUTLASS_DIR")
    if env:
        return os.path.join(env, "include") if os.path.isdir(os.path.join(env, "include")) else env
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "source", "include")
    return path if os.path.exists(os.path.join(path, "cute", "layout.hpp")) else None


@functools.lru_cache(maxsize=1)
def _probe_offsets(tmp_dir: str) -> dict[tuple[int, int, int], torch.Tensor]:
    """{(rows, K, L): int64 [L, rows, K/16] offsets} from CuTe's Sm1xxBlockScaledConfig<16> layout."""
    exe = os.path.join(tmp_dir, "sm100_sf_layout_probe")
    subprocess.run(
        ["nvcc", "-std=c++17", "-O1", f"-I{_cutlass_include()}", _PROBE_SRC, "-o", exe],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    args = [str(v) for shape in _PROBE_SHAPES for v in shape]
    lines = subprocess.run([exe, *args], check=True, capture_output=True, text=True).stdout.splitlines()
    out, i = {}, 0
    while i < len(lines):
        rows, k, batches, size = map(int, lines[i].split())
        body = [list(map(int, line.split())) for line in lines[i + 1 : i + 1 + rows * batches]]
        out[(rows, k, batches)] = (
            torch.tensor(body).reshape(batches, rows, k // 16),
            size,
        )
        i += 1 + rows * batches
    return out


@pytest.fixture(scope="module")
def cute_offsets(tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the CuTe layout probe cannot be compiled")
    if _cutlass_include() is None:
        pytest.skip("CUTLASS headers not found (install nvidia-cutlass or set CUTLASS_DIR)")
    return _probe_offsets(str(tmp_path_factory.mktemp("cute_probe")))


@pytest.mark.parametrize("shape", _PROBE_SHAPES)
def test_swizzle_matches_cute_layout(cute_offsets, shape):
    rows, k, batches = shape
    offsets, size = cute_offsets[shape]
    kb = k // 16
    assert size == batches * quant.nvfp4_swizzled_size(rows, kb)
    # Distinct scale values: put each (l, r, b) at its own index and read where the swizzle put it.
    ids = torch.arange(batches * rows * kb, dtype=torch.int64).reshape(batches, rows, kb)
    sw = quant.nvfp4_swizzle_scales(ids).reshape(-1)  # batches are contiguous slices
    assert sw.numel() == size
    torch.testing.assert_close(sw[offsets.reshape(-1)], ids.reshape(-1), rtol=0, atol=0)
    # Every slot no coordinate maps to is padding, and padding is zero.
    hit = torch.zeros(size, dtype=torch.bool)
    hit[offsets.reshape(-1)] = True
    assert int(hit.sum()) == ids.numel()
    assert torch.all(sw[~hit] == 0)


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("rows,kb", [(1, 1), (7, 5), (128, 4), (129, 8), (769, 21)])
def test_swizzle_round_trip_e4m3(lead, rows, kb):
    g = torch.Generator().manual_seed(rows * 31 + kb)
    s = (torch.rand(*lead, rows, kb, generator=g) * 400 + 2**-9).to(torch.float8_e4m3fn)
    sw = quant.nvfp4_swizzle_scales(s)
    assert sw.dtype == torch.float8_e4m3fn
    assert tuple(sw.shape) == (*lead, quant.nvfp4_swizzled_size(rows, kb))
    back = quant.nvfp4_unswizzle_scales(sw, rows, kb)
    assert torch.equal(back.view(torch.uint8), s.view(torch.uint8))


def test_swizzle_places_rows_r_and_r_plus_32_in_one_line():
    # The 16-byte line of row r0 holds rows r0, r0+32, r0+64, r0+96, 4 blocks each.
    s = torch.arange(128 * 4, dtype=torch.int64).reshape(128, 4)
    line = quant.nvfp4_swizzle_scales(s)[16 * 5 : 16 * 6]
    assert line.tolist() == [s[r, b].item() for r in (5, 37, 69, 101) for b in range(4)]


def test_unswizzle_rejects_wrong_size():
    with pytest.raises(
        ValueError,
        match=r"rows=7, k_blocks=5 need a last dimension of 1024, got shape \[512\]",
    ):
        quant.nvfp4_unswizzle_scales(torch.zeros(512, dtype=torch.uint8), 7, 5)


# --- activation quantization ---------------------------------------------------------------------


def test_activation_quant_is_the_weight_quantizer_under_input_scale():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 96, generator=g) * 3).to(torch.bfloat16)
    input_scale = torch.tensor(x.float().abs().amax().item() / (6 * 448))
    codes, scale = quant.nvfp4_quantize_activation(x, input_scale)
    w_codes, w_scale, _ = quant.nvfp4_quantize(x, input_scale)
    assert torch.equal(codes, w_codes)
    assert torch.equal(scale.view(torch.uint8), w_scale.view(torch.uint8))
    # Per-element error of NVFP4 is at most half an e2m1 step (1 at the top, |x| <= 6 s_b g) of the block.
    deq = quant.nvfp4_dequantize(codes, scale, input_scale)
    bound = (scale.float() * input_scale).repeat_interleave(16, dim=-1)
    assert torch.all((deq - x.float()).abs() <= bound * 1.0 + 1e-12)


def test_activation_quant_matches_formula_bit_for_bit():
    # Hand-made block: amax 6 * input_scale * 2 -> s_b = 2; values divide exactly.
    g = 0.01
    x = torch.tensor([[0.0, 0.01, -0.02, 0.03, 0.04, 0.06, 0.08, 0.12] * 2], dtype=torch.float32)
    codes, scale = quant.nvfp4_quantize_activation(x, g)
    assert scale.float().tolist() == [[2.0]]
    # x / (2 * 0.01) = 0, .5, -1, 1.5, 2, 3, 4, 6 -> codes 0, 1, 8|2, 3, 4, 5, 6, 7
    assert quant.unpack_nibbles(codes)[0, :8].tolist() == [0, 1, 10, 3, 4, 5, 6, 7]


def test_activation_quant_saturates_above_calibration():
    x = torch.full((1, 16), 1000.0)
    codes, scale = quant.nvfp4_quantize_activation(x, 0.01)  # 1000 / (6 * 0.01) far above 448
    assert scale.float().tolist() == [[448.0]]
    assert torch.all(quant.unpack_nibbles(codes) == 7)  # +6


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_activation_quant_rejects_bad_input_scale(bad):
    with pytest.raises(ValueError, match="input_scale must be finite and > 0"):
        quant.nvfp4_quantize_activation(torch.ones(1, 16), bad)


# --- reference GEMM ------------------------------------------------------------------------------


def _problem(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    input_scale = torch.tensor(x.float().abs().amax().item() / (6 * 448))
    a, a_sf = quant.nvfp4_quantize_activation(x, input_scale)
    b, b_sf, w_scale_2 = quant.nvfp4_quantize(w)
    alpha = (input_scale * w_scale_2).reshape(1)
    return (
        x,
        w,
        a,
        quant.nvfp4_swizzle_scales(a_sf),
        b,
        quant.nvfp4_swizzle_scales(b_sf),
        alpha,
    )


@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (7, 33, 128), (130, 200, 96)])
def test_reference_gemm_is_dequantize_then_matmul(M, N, K):
    x, w, a, a_sf, b, b_sf, alpha = _problem(M, N, K)
    out = ref_gemm.nvfp4_gemm(a, a_sf, b, b_sf, alpha)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (M, N)
    a_rm = quant.nvfp4_unswizzle_scales(a_sf, M, K // 16)
    b_rm = quant.nvfp4_unswizzle_scales(b_sf, N, K // 16)
    want = quant.nvfp4_dequantize(a, a_rm, 1.0) @ quant.nvfp4_dequantize(b, b_rm, 1.0).T * alpha
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)
    # And it approximates the bf16 product to NVFP4 accuracy (two 4-bit operands: a few percent).
    exact = x.float() @ w.float().T
    rel = (out.float() - exact).norm() / exact.norm()
    assert rel < 0.15, rel


# --- wrapper validation (CPU: the checks run before any kernel) ------------------------------------


def _args(M=4, N=32, K=64):
    _, _, a, a_sf, b, b_sf, alpha = _problem(M, N, K)
    return a, a_sf, b, b_sf, alpha


def test_gemm_rejects_non_uint8_a():
    a, a_sf, b, b_sf, alpha = _args()
    with pytest.raises(TypeError, match="nvfp4_gemm: a has dtype int8, expected uint8"):
        ops.nvfp4_gemm(a.view(torch.int8), a_sf, b, b_sf, alpha)


def test_gemm_rejects_k_mismatch():
    a, a_sf, b, b_sf, alpha = _args()
    with pytest.raises(
        ValueError,
        match=r"nvfp4_gemm: b has shape \[32, 16\], expected \[N, 32\] \(K/2 = 32 as a\)",
    ):
        ops.nvfp4_gemm(a, a_sf, b[:, :16], b_sf, alpha)


def test_gemm_rejects_k_not_multiple_of_64():
    a, a_sf, b, b_sf, alpha = _args(K=96)
    with pytest.raises(ValueError, match="nvfp4_gemm: K = 96 must be a positive multiple of 64"):
        ops.nvfp4_gemm(a, a_sf, b, b_sf, alpha)


def test_gemm_rejects_row_major_scales():
    a, _, b, b_sf, alpha = _args(K=128)
    a_rm = torch.ones(4, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(
        ValueError,
        match=r"nvfp4_gemm: a_scale must be the swizzled \[1024\] float8_e4m3fn.*got shape \[4, 8\]",
    ):
        ops.nvfp4_gemm(a, a_rm, b, b_sf, alpha)


def test_gemm_rejects_wrong_scale_dtype():
    a, a_sf, b, b_sf, alpha = _args(K=128)
    with pytest.raises(TypeError, match="nvfp4_gemm: b_scale has dtype uint8, expected float8_e4m3fn"):
        ops.nvfp4_gemm(a, a_sf, b, b_sf.view(torch.uint8), alpha)


def test_gemm_rejects_bad_alpha():
    a, a_sf, b, b_sf, _ = _args(K=128)
    with pytest.raises(
        ValueError,
        match=r"nvfp4_gemm: alpha must be a one-element float32 tensor .*got float64 \[2\]",
    ):
        ops.nvfp4_gemm(a, a_sf, b, b_sf, torch.ones(2, dtype=torch.float64))


def test_gemm_rejects_odd_n():
    a, a_sf, _, _, alpha = _args(K=128)
    b = torch.zeros(33, 64, dtype=torch.uint8)
    b_sf = quant.nvfp4_swizzle_scales(torch.ones(33, 8, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="nvfp4_gemm: N = 33 must be a multiple of 8"):
        ops.nvfp4_gemm(a, a_sf, b, b_sf, alpha)


def test_gemm_rejects_cpu_tensors_with_a_pointer_to_the_reference():
    a, a_sf, b, b_sf, alpha = _args(K=128)
    with pytest.raises(
        ValueError,
        match="nvfp4_gemm: a must be a CUDA tensor, got device cpu.*gemma4x.reference",
    ):
        ops.nvfp4_gemm(a, a_sf, b, b_sf, alpha)


def test_gemm_fake_impl_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, a_sf, b, b_sf, alpha = _args(M=5, N=32, K=128)
    with FakeTensorMode() as mode:
        fa, fa_sf, fb, fb_sf, fal = (mode.from_tensor(t) for t in (a, a_sf, b, b_sf, alpha))
        out = torch.ops.gemma4x.nvfp4_gemm(fa, fa_sf, fb, fb_sf, fal)
    assert tuple(out.shape) == (5, 32) and out.dtype == torch.bfloat16


def test_wrapper_says_when_the_extension_lacks_sm100(monkeypatch):
    import types

    from gemma4x.ops import gemm as gemm_mod

    fake = types.SimpleNamespace(gemm=types.SimpleNamespace(has_sm100=False))
    monkeypatch.setattr(gemm_mod, "extension", lambda: fake)
    with pytest.raises(
        ops.ExtensionUnavailableError,
        match="built without an sm_100 target.*GEMMA4X_CUDA_ARCHS",
    ):
        gemm_mod._gemm_module()


@pytest.mark.parametrize("cc", [(9, 0), (10, 3), (12, 0)])
def test_wrapper_refuses_other_gpus(monkeypatch, cc):
    from gemma4x.ops import gemm as gemm_mod

    monkeypatch.setattr(gemm_mod, "device_capability", lambda device: cc)
    with pytest.raises(
        RuntimeError,
        match=rf"needs a compute capability 10.0 GPU .*is {cc[0]}\.{cc[1]}",
    ):
        gemm_mod._check_gpu(torch.empty(0))


# --- the compiled binding's own checks (host-side C++, no GPU needed) --------------------------------


def _sm100_binding():
    from gemma4x.ops import _load

    if not _load.cuda_kernels_available():
        pytest.skip("gemma4x._C with CUDA kernels is not importable here")
    gemm = _load.extension().gemm
    if not gemm.has_sm100:
        pytest.skip("gemma4x._C was built without an sm_100 target")
    return gemm


def test_binding_rejects_bad_k_before_touching_the_gpu():
    gemm = _sm100_binding()
    with pytest.raises(ValueError, match="nvfp4_gemm: K = 96 must be a multiple of 64"):
        gemm.nvfp4_gemm(0, 0, 0, 0, 0, 0, 0, 0, 4, 32, 96, 0)


def test_binding_rejects_null_and_misaligned_pointers():
    gemm = _sm100_binding()
    with pytest.raises(ValueError, match="nvfp4_gemm: a is a null pointer"):
        gemm.nvfp4_gemm(4096, 0, 4096, 4096, 4096, 4096, 0, 0, 4, 32, 128, 0)
    with pytest.raises(ValueError, match="nvfp4_gemm: b_scale must be 16-byte aligned"):
        gemm.nvfp4_gemm(4096, 4096, 4096, 4096, 4100, 4096, 0, 0, 4, 32, 128, 0)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() == (10, 0),
    reason="an SM100 GPU",
)
def test_binding_refuses_anything_but_sm100():
    gemm = _sm100_binding()
    # Valid-looking arguments reach the device check: "needs a compute capability 10.0 GPU" on a
    # GPU of another kind, a CUDA error where there is no GPU at all.
    with pytest.raises(RuntimeError, match="compute capability 10.0|cudaGetDevice"):
        gemm.nvfp4_gemm(*([4096] * 6), 0, 0, 4, 32, 128, 0)


# --- GPU (SM100 only; compiled, not run, where no Blackwell GPU exists) -------------------------------


def _is_sm100() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 10


@pytest.mark.cuda
@pytest.mark.skipif(not _is_sm100(), reason="the NVFP4 block-scaled GEMM needs an SM100 (Blackwell) GPU")
@pytest.mark.parametrize("M,N,K", [(1, 256, 256), (7, 1024, 512), (129, 384, 2816), (512, 2048, 1536)])
def test_gemm_matches_reference_on_sm100(M, N, K):
    _, _, a, a_sf, b, b_sf, alpha = _problem(M, N, K)
    args = [t.cuda() for t in (a, a_sf, b, b_sf, alpha)]
    out = ops.nvfp4_gemm(*args)
    want = ref_gemm.nvfp4_gemm(*args)
    # Same products of exact e2m1*e4m3 values; only fp32 summation order differs, then one bf16 rounding.
    torch.testing.assert_close(out, want, rtol=2**-7, atol=1e-3)

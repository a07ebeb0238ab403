"""Grouped (per-expert) NVFP4 W4A4 GEMM for SM100: scale layout, reference, wrapper checks.

The kernel is compiled for sm_100a and no Blackwell GPU exists here, so CPU tests pin down what
the host and the device argument builder agree on: the per-group scale offsets (the C++ rule in
params.h, compiled on the host and compared with the Python one), the grouped swizzle, the
reference, and the wrapper's validation. The `cuda` test runs only on an SM100 GPU.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest
import torch
from gemma4x import ops
from gemma4x.reference import gemm as ref_gemm
from gemma4x.reference import quant

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (K, rows per group): empty groups, groups of one row, groups straddling 128-row atoms.
_LAYOUTS = [(64, [0, 1, 0]), (128, [3, 128, 0, 129]), (2816, [7, 0, 300, 1]), (704, [255, 256, 257])]


def _offsets(counts: list[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


@pytest.mark.parametrize("K,counts", _LAYOUTS)
def test_scale_offsets_follow_per_group_padding(K, counts):
    offs = quant.nvfp4_grouped_scale_offsets(_offsets(counts), K // 16)
    want = [0]
    for c in counts:
        want.append(want[-1] + quant.nvfp4_swizzled_size(c, K // 16))
    assert offs == want
    # The op's fixed buffer holds any split of the same rows over the same groups.
    assert offs[-1] <= quant.nvfp4_grouped_scale_capacity(sum(counts), len(counts), K // 16)


def test_capacity_is_tight_for_the_worst_split():
    # 129 rows over 2 groups: 128 + 1 pads to 256 rows; 129 + 0 pads to 256 too; capacity 256 rows.
    kb = 4
    cap = quant.nvfp4_grouped_scale_capacity(129, 2, kb)
    assert cap == 256 * kb
    worst = max(quant.nvfp4_grouped_scale_offsets([0, n, 129], kb)[-1] for n in range(130))
    assert worst == cap


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_device_offset_rule_equals_python(tmp_path):
    # params.h's grouped_scale_bytes is what fill_group_arrays sums on the device.
    src = tmp_path / "probe.cpp"
    src.write_text(
        '#include <cstdio>\n#include <cstdlib>\n#include "gemma4x/gemm/params.h"\n'
        "int main(int c, char** v) { int K = atoi(v[1]); for (int i = 2; i < c; ++i)"
        ' printf("%lld\\n", (long long)gemma4x::gemm::grouped_scale_bytes(atoll(v[i]), K)); }\n'
    )
    exe = tmp_path / "probe"
    subprocess.run(
        ["nvcc", "-std=c++17", f"-I{os.path.join(_REPO, 'csrc', 'include')}", str(src), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    for K, counts in _LAYOUTS:
        got = subprocess.run([str(exe), str(K), *map(str, counts)], check=True, capture_output=True, text=True)
        assert [int(v) for v in got.stdout.split()] == [quant.nvfp4_swizzled_size(c, K // 16) for c in counts]


@pytest.mark.parametrize("K,counts", _LAYOUTS)
def test_grouped_swizzle_round_trips_and_pads(K, counts):
    kb = K // 16
    rows = _offsets(counts)
    g = torch.Generator().manual_seed(K)
    s = (torch.rand(rows[-1], kb, generator=g) * 400 + 2**-9).to(torch.float8_e4m3fn)
    cap = quant.nvfp4_grouped_scale_capacity(rows[-1], len(counts), kb)
    sw = quant.nvfp4_swizzle_scales_grouped(s, rows, size=cap)
    assert sw.dtype == torch.float8_e4m3fn and tuple(sw.shape) == (cap,)
    offs = quant.nvfp4_grouped_scale_offsets(rows, kb)
    for e, (lo, hi) in enumerate(itertools.pairwise(rows)):
        # Each group is exactly the ungrouped swizzle of its own rows, at its offset.
        alone = quant.nvfp4_swizzle_scales(s[lo:hi])
        assert torch.equal(sw[offs[e] : offs[e + 1]].view(torch.uint8), alone.view(torch.uint8))
    assert torch.all(sw[offs[-1] :].view(torch.uint8) == 0)
    back = quant.nvfp4_unswizzle_scales_grouped(sw, rows, kb)
    assert torch.equal(back.view(torch.uint8), s.view(torch.uint8))


def test_grouped_swizzle_rejects_short_size():
    with pytest.raises(ValueError, match="size 100 is below the 512 bytes the groups need"):
        quant.nvfp4_swizzle_scales_grouped(torch.ones(3, 4, dtype=torch.float8_e4m3fn), [0, 3], size=100)


def _grouped_problem(counts, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    rows = _offsets(counts)
    x = torch.randn(rows[-1], K, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, N, K, generator=g) * 0.05).to(torch.bfloat16)
    input_scale = torch.tensor(max(x.float().abs().amax().item(), 1.0) / (6 * 448))
    a, a_sf = quant.nvfp4_quantize_activation(x, input_scale)
    b, b_sf, w_scale_2 = quant.nvfp4_quantize(w, quant.nvfp4_global_scale(w.float().abs().amax(dim=(1, 2))))
    cap = quant.nvfp4_grouped_scale_capacity(rows[-1], E, K // 16)
    return (
        x, w, a, quant.nvfp4_swizzle_scales_grouped(a_sf, rows, size=cap), torch.tensor(rows, dtype=torch.int32),
        b, quant.nvfp4_swizzle_scales(b_sf), (input_scale * w_scale_2.reshape(E)).float(),
    )  # fmt: skip


def test_reference_grouped_gemm_is_one_gemm_per_expert():
    counts, N, K = [3, 0, 130, 1], 64, 128
    x, w, a, a_sf, rows, b, b_sf, alpha = _grouped_problem(counts, N, K)
    out = ref_gemm.nvfp4_grouped_gemm(a, a_sf, rows, b, b_sf, alpha)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (sum(counts), N)
    r = rows.tolist()
    a_rm = quant.nvfp4_unswizzle_scales_grouped(a_sf, r, K // 16)
    for e in range(len(counts)):
        lo, hi = r[e], r[e + 1]
        if hi == lo:
            continue
        single = ref_gemm.nvfp4_gemm(a[lo:hi], quant.nvfp4_swizzle_scales(a_rm[lo:hi]), b[e], b_sf[e], alpha[e : e + 1])
        assert torch.equal(out[lo:hi], single)
        exact = x[lo:hi].float() @ w[e].float().T
        assert (out[lo:hi].float() - exact).norm() / exact.norm() < 0.15


# --- wrapper validation ------------------------------------------------------------------------------


def _gargs(counts=(2, 0, 3), N=32, K=128):
    _, _, a, a_sf, rows, b, b_sf, alpha = _grouped_problem(list(counts), N, K)
    return a, a_sf, rows, b, b_sf, alpha


def test_grouped_rejects_int64_row_offsets():
    a, a_sf, rows, b, b_sf, alpha = _gargs()
    with pytest.raises(TypeError, match="nvfp4_grouped_gemm: row_offsets has dtype int64, expected int32"):
        ops.nvfp4_grouped_gemm(a, a_sf, rows.long(), b, b_sf, alpha)


def test_grouped_rejects_wrong_group_count():
    a, a_sf, rows, b, b_sf, alpha = _gargs()
    with pytest.raises(ValueError, match=r"nvfp4_grouped_gemm: alpha has shape \[2\], expected \[groups\] = \[3\]"):
        ops.nvfp4_grouped_gemm(a, a_sf, rows, b, b_sf, alpha[:2])


def test_grouped_rejects_unpadded_activation_scales():
    a, _, rows, b, b_sf, alpha = _gargs()
    exact = quant.nvfp4_swizzle_scales_grouped(torch.ones(5, 8, dtype=torch.float8_e4m3fn), rows)
    with pytest.raises(
        ValueError, match=r"a_scale has shape \[2048\], expected \[3072\]: nvfp4_grouped_scale_capacity"
    ):
        ops.nvfp4_grouped_gemm(a, exact, rows, b, b_sf, alpha)


def test_grouped_rejects_k_mismatch():
    a, a_sf, rows, b, b_sf, alpha = _gargs()
    with pytest.raises(ValueError, match=r"b has shape \[3, 32, 32\], expected \[groups, N, 64\]"):
        ops.nvfp4_grouped_gemm(a, a_sf, rows, b[:, :, :32].contiguous(), b_sf, alpha)


def test_grouped_rejects_cpu_tensors():
    a, a_sf, rows, b, b_sf, alpha = _gargs()
    with pytest.raises(ValueError, match="nvfp4_grouped_gemm: a must be a CUDA tensor"):
        ops.nvfp4_grouped_gemm(a, a_sf, rows, b, b_sf, alpha)


def test_grouped_fake_impl_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _gargs()
    with FakeTensorMode() as mode:
        out = torch.ops.gemma4x.nvfp4_grouped_gemm(*(mode.from_tensor(t) for t in args))
    assert tuple(out.shape) == (5, 32) and out.dtype == torch.bfloat16


def test_grouped_binding_rejects_bad_shapes_before_touching_the_gpu():
    from gemma4x.ops import _load

    if not _load.cuda_kernels_available() or not _load.extension().gemm.has_sm100:
        pytest.skip("gemma4x._C with the sm_100 kernels is not importable here")
    gemm = _load.extension().gemm
    with pytest.raises(ValueError, match="nvfp4_grouped_gemm: K = 96 must be a positive multiple of 64"):
        gemm.nvfp4_grouped_gemm(*([4096] * 7), 0, 1 << 20, 4, 32, 96, 0)
    with pytest.raises(ValueError, match="nvfp4_grouped_gemm: b_scale must be 16-byte aligned"):
        gemm.nvfp4_grouped_gemm(4096, 4096, 4096, 4096, 4096, 4100, 4096, 4096, 1 << 20, 4, 32, 128, 0)


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (10, 0)),
    reason="the grouped NVFP4 GEMM needs an SM100 (Blackwell) GPU",
)
@pytest.mark.parametrize("counts", [[1, 0, 7, 2], [0] * 7 + [300], [129, 1, 64, 0, 256]])
def test_grouped_gemm_matches_reference_on_sm100(counts):
    _, _, *args = _grouped_problem(counts, 1408, 2816)
    args = [t.cuda() for t in args]
    out = ops.nvfp4_grouped_gemm(*args)
    want = ref_gemm.nvfp4_grouped_gemm(*args)
    torch.testing.assert_close(out, want, rtol=2**-7, atol=1e-3)

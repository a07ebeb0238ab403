"""GPU tests of ops.skinny_gemm (decode-size linear layers) against an fp64 reference.

The kernel accumulates in fp32 in its own order and rounds once, as cuBLAS does; its error
against fp64 must stay within 2x the error of torch's own bf16/fp16 ``F.linear`` on the same inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from gemma4x import ops
from gemma4x.ops import gemv

pytestmark = pytest.mark.cuda

# (N, K): Gemma 4 decode linears (26B-A4B q/k/v fused, o, gate/up fused, down; 31B; E2B) and small ones.
SHAPES = [(8192, 2816), (2816, 4096), (4224, 2816), (2816, 2112), (16384, 5376), (5376, 21504), (16, 32), (48, 96)]


def _err(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 16])
def test_matches_fp64(dtype, N, K, M):
    g = torch.Generator(device="cuda").manual_seed(N + K + M)
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    w = (torch.randn(N, K, generator=g, device="cuda") / K**0.5).to(dtype)
    exact = F.linear(x.double(), w.double())
    y = ops.skinny_gemm(x, w)
    assert y.shape == (M, N) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _err(y, exact) <= 2 * _err(F.linear(x, w), exact) + 1e-6


def test_bias_leading_dims_and_strided_rows():
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(2, 3, 4096 + 64, generator=g, device="cuda").to(torch.bfloat16)
    x = base[..., :4096]  # [2, 3, K] rows 4160 apart: read in place
    w = (torch.randn(2816, 4096, generator=g, device="cuda") / 64).to(torch.bfloat16)
    b = torch.randn(2816, generator=g, device="cuda").to(torch.bfloat16)
    exact = F.linear(x.double(), w.double(), b.double())
    y = ops.skinny_gemm(x, w, b)
    assert y.shape == (2, 3, 2816)
    assert _err(y, exact) <= 2 * _err(F.linear(x, w, b), exact) + 1e-6


def test_max_tokens_matches_the_extension():
    from gemma4x.ops._load import extension

    assert gemv.MAX_TOKENS == extension().gemv.max_tokens


def test_dispatch_falls_back_beyond_decode_sizes():
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    assert gemv.supported(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16), w)
    for x in (torch.randn(9, 64, device="cuda", dtype=torch.bfloat16), torch.randn(4, 64, device="cuda")):
        assert not gemv.supported(x, w.to(x.dtype))
        torch.testing.assert_close(gemv.linear(x, w.to(x.dtype)), F.linear(x, w.to(x.dtype)))
    assert not gemv.supported(torch.randn(1, 40, device="cuda", dtype=torch.bfloat16), w[:, :40])  # K % 32


def test_empty_and_cuda_graph():
    w = torch.randn(2816, 2816, device="cuda", dtype=torch.bfloat16) / 53
    assert ops.skinny_gemm(torch.empty(0, 2816, device="cuda", dtype=torch.bfloat16), w).shape == (0, 2816)
    x = torch.randn(4, 2816, device="cuda", dtype=torch.bfloat16)
    ops.skinny_gemm(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.skinny_gemm(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    exact = F.linear(x.double(), w.double())
    assert _err(y, exact) <= 2 * _err(F.linear(x, w), exact) + 1e-6


def test_opcheck():
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.gemma4x.skinny_gemm.default, (x, w, None))
    torch.library.opcheck(torch.ops.gemma4x.skinny_gemm.default, (x, w, torch.randn(64, device="cuda").bfloat16()))

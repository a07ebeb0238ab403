"""CPU tests of ops.skinny_gemm's argument checks and of the CPU dispatch of ops.gemv.linear."""

import pytest
import torch
import torch.nn.functional as F

from gemma4x.ops import gemv


@pytest.mark.parametrize(
    "x,w,b,err,match",
    [
        (torch.randn(1, 64), torch.randn(16, 64), None, TypeError, "x must be bfloat16 or float16"),
        (
            torch.randn(1, 64).bfloat16(),
            torch.randn(16, 64, 1).bfloat16(),
            None,
            ValueError,
            "weight must be \\[N, K\\]",
        ),
        (
            torch.randn(1, 64).bfloat16(),
            torch.randn(16, 32).bfloat16(),
            None,
            ValueError,
            "x has K = 64, weight expects 32",
        ),
        (torch.randn(17, 64).bfloat16(), torch.randn(16, 64).bfloat16(), None, ValueError, "at most 16 tokens"),
        (
            torch.randn(1, 64).bfloat16(),
            torch.randn(24, 64).bfloat16(),
            None,
            ValueError,
            "N must be a positive multiple of 16",
        ),
        (torch.randn(1, 48).bfloat16(), torch.randn(16, 48).bfloat16(), None, ValueError, "K of 32"),
        (torch.randn(1, 64).bfloat16(), torch.randn(16, 64).half(), None, TypeError, "weight"),
        (torch.randn(1, 64).bfloat16(), torch.randn(16, 64).bfloat16(), torch.randn(8).bfloat16(), ValueError, "bias"),
    ],
)
def test_bad_arguments_name_the_tensor(x, w, b, err, match):
    with pytest.raises(err, match=match):
        gemv.skinny_gemm(x, w, b)


def test_cpu_tensors_are_refused_and_linear_falls_back():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        gemv.skinny_gemm(x, w)
    assert not gemv.supported(x, w)
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))

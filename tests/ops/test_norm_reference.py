"""CPU tests of the pure-PyTorch RMSNorm family: against the formula in float64 and against
HF transformers' Gemma4RMSNorm composed the way the Gemma 4 decoder layer composes it."""

import pytest
import torch

from gemma4x.reference import norm as ref

transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [1, 7, 111, 769, 2816]


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the dtype's representable numbers at each element of ``t``."""
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[t.dtype]
    tiny = torch.finfo(t.dtype).tiny
    mag = t.double().abs().clamp_min(tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - mant)


def _formula(x, w, eps):
    xd = x.double()
    y = xd * (xd.pow(2).mean(-1, keepdim=True) + eps) ** -0.5
    return y if w is None else y * w.double()


def _hf_norm(w, eps, dtype):
    m = Gemma4RMSNorm(w.shape[0], eps=eps, with_scale=w is not None)
    if w is not None:
        m.weight.data = w.clone()
    return m.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_formula(dtype, hidden, with_weight):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(13, hidden, generator=g) * 3).to(dtype)
    w = (torch.randn(hidden, generator=g) + 1).to(dtype) if with_weight else None
    out = ref.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    exact = _formula(x, w, 1e-6)
    # fp32 math then one rounding: within one ulp of a 16-bit output; an fp32 output also carries
    # the fp32 reduction's own error (a few ulps over thousands of terms).
    max_ulps = 16 if dtype == torch.float32 else 1
    err = (out.double() - exact).abs()
    assert torch.all(err <= max_ulps * _ulp(exact.to(dtype)) * 1.01 + 1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_hf_gemma4_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 769, generator=g).to(dtype)
    w = torch.randn(769, generator=g).to(dtype)
    for weight in (w, None):
        hf = _hf_norm(weight if weight is not None else torch.ones(769), 1e-5, dtype)
        if weight is None:
            hf = Gemma4RMSNorm(769, eps=1e-5, with_scale=False)
        torch.testing.assert_close(ref.rms_norm(x, weight, 1e-5), hf(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_updates_residual(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 111, generator=g).to(dtype)
    residual = torch.randn(5, 111, generator=g).to(dtype)
    w = torch.randn(111, generator=g).to(dtype)
    expected_residual = residual + x
    hf = _hf_norm(w, 1e-6, dtype)
    expected = hf(expected_residual)
    out = ref.fused_add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [7, 769, 2816])
def test_moe_tail_norm_is_the_hf_decoder_tail(dtype, hidden):
    """Same graph as Gemma4TextDecoderLayer: post_ffn_norm_1(m) + post_ffn_norm_2(e) -> post_ffn_norm
    -> + residual -> *= layer_scalar, each module rounding to the dtype."""
    g = torch.Generator().manual_seed(hidden)
    x1, x2, residual = (torch.randn(6, hidden, generator=g).to(dtype) * s for s in (2.0, 0.5, 4.0))
    w1, w2, w3 = (torch.randn(hidden, generator=g).to(dtype) for _ in range(3))
    scalar = torch.tensor([0.73], dtype=dtype)
    n1, n2, n3 = _hf_norm(w1, 1e-6, dtype), _hf_norm(w2, 2e-6, dtype), _hf_norm(w3, 3e-6, dtype)
    expected = residual + n3(n1(x1) + n2(x2))
    expected *= scalar
    out = ref.moe_tail_norm(x1, x2, residual, w1, w2, w3, scalar, 1e-6, 2e-6, 3e-6)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

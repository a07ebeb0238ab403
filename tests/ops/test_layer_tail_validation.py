"""CPU tests of the layer-tail ops (``geglu``, ``residual_rms_norm``): argument validation, the
references against the formulas they stand for, and the dispatch entries the model uses.

The checks run before any kernel, so a bad argument fails here on the CPU the same way it would
on the GPU: the message names the argument with expected vs actual.
"""

import pytest
import torch
import torch.nn.functional as F

from gemma4x import ops
from gemma4x.layers import dispatch
from gemma4x.reference import activation as ref_act
from gemma4x.reference import norm as ref_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _t(*shape, dtype=torch.bfloat16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- geglu validation --------------------------------------------------------------------


def test_geglu_rejects_shape_mismatch_naming_up():
    with pytest.raises(ValueError, match=r"geglu: up has shape \[3, 32\], expected \[3, 64\] \(as gate\)"):
        ops.geglu(_t(3, 64), _t(3, 32))


def test_geglu_rejects_dtype_mismatch():
    with pytest.raises(TypeError, match="geglu: up has dtype float32, expected bfloat16"):
        ops.geglu(_t(3, 64), _t(3, 64, dtype=torch.float32))


def test_geglu_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="geglu: gate: dtype float64 is not supported"):
        ops.geglu(_t(3, 64, dtype=torch.float64), _t(3, 64, dtype=torch.float64))


@pytest.mark.parametrize("bad", ["gate", "up"])
def test_geglu_rejects_non_contiguous_last_dim(bad):
    args = {"gate": _t(3, 64), "up": _t(3, 64)}
    args[bad] = _t(64, 3).t()
    with pytest.raises(ValueError, match=f"geglu: {bad} must be contiguous in its last dimension, got stride 3"):
        ops.geglu(args["gate"], args["up"])


def test_geglu_rejects_0d_and_cpu_tensors():
    with pytest.raises(ValueError, match="geglu: gate must have at least 1 dimension"):
        ops.geglu(torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="geglu: gate must be a CUDA tensor, got device cpu.*gemma4x.reference"):
        ops.geglu(_t(3, 64), _t(3, 64))


def test_geglu_fake_impl_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        buf = torch.empty(2, 5, 2 * 96, dtype=torch.bfloat16)
        out = torch.ops.gemma4x.geglu(buf[..., :96], buf[..., 96:])
    assert out.shape == (2, 5, 96) and out.dtype == torch.bfloat16


# ---- residual_rms_norm validation --------------------------------------------------------


def test_residual_rms_norm_rejects_residual_shape_mismatch():
    x = _t(3, 64)
    with pytest.raises(ValueError, match=r"residual_rms_norm: residual has shape \[3, 32\], expected \[3, 64\]"):
        ops.residual_rms_norm(_t(3, 32), x, torch.ones(64, dtype=x.dtype), 1e-6)


def test_residual_rms_norm_rejects_weight_and_scalar_dtypes():
    x, r = _t(3, 64), _t(3, 64, seed=1)
    with pytest.raises(TypeError, match="residual_rms_norm: weight has dtype float32, expected bfloat16"):
        ops.residual_rms_norm(r, x, torch.ones(64), 1e-6)
    with pytest.raises(TypeError, match="residual_rms_norm: scalar has dtype float32, expected bfloat16"):
        ops.residual_rms_norm(r, x, None, 1e-6, torch.ones(1))


def test_residual_rms_norm_rejects_bad_scalar_shape_weight_shape_and_eps():
    x, r = _t(3, 64), _t(3, 64, seed=1)
    with pytest.raises(ValueError, match=r"residual_rms_norm: scalar must have exactly 1 element, got shape \[2\]"):
        ops.residual_rms_norm(r, x, None, 1e-6, torch.ones(2, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"residual_rms_norm: weight must have shape \[64\], got \[63\]"):
        ops.residual_rms_norm(r, x, torch.ones(63, dtype=x.dtype), 1e-6)
    with pytest.raises(ValueError, match="residual_rms_norm: eps must be a finite float >= 0"):
        ops.residual_rms_norm(r, x, None, float("nan"))


def test_residual_rms_norm_rejects_cpu_tensors():
    x, r = _t(3, 64), _t(3, 64, seed=1)
    with pytest.raises(ValueError, match="residual_rms_norm: x must be a CUDA tensor, got device cpu"):
        ops.residual_rms_norm(r, x, None, 1e-6)


# ---- references ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_reference_is_the_two_pytorch_ops(dtype):
    gate, up = _t(5, 769, dtype=dtype) * 3, _t(5, 769, dtype=dtype, seed=1)
    want = F.gelu(gate, approximate="tanh") * up
    assert torch.equal(ref_act.geglu(gate, up), want)
    # ... and close to the formula in float64: two roundings, plus the absolute error of
    # 1 + tanh(.) where it cancels (negative gate), which scales with |gate * up|.
    g, u = gate.double(), up.double()
    exact = 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3))) * u
    eps = torch.finfo(dtype).eps
    assert ((want.double() - exact).abs() <= 2 * eps * exact.abs() + eps * (g * u).abs() + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scalar", [False, True])
def test_residual_rms_norm_reference_is_the_unfused_sequence(dtype, with_scalar):
    x, r, w = _t(4, 7, 111, dtype=dtype), _t(4, 7, 111, dtype=dtype, seed=1), _t(111, dtype=dtype, seed=2)
    s = torch.tensor([0.37], dtype=dtype) if with_scalar else None
    want = r + ref_norm.rms_norm(x, w, 1e-6)
    if with_scalar:
        want = want * s
    r0 = r.clone()
    got = ref_norm.residual_rms_norm(r, x, w, 1e-6, s)
    assert torch.equal(got, want) and got.dtype == dtype
    assert torch.equal(r, r0)  # out of place


def test_dispatch_has_the_tail_ops_and_unfused_tail_composes_them():
    ref = dispatch.REFERENCE
    assert ref.geglu is ref_act.geglu and ref.residual_rms_norm is ref_norm.residual_rms_norm
    un = dispatch.unfused_tail(ref)
    assert un.rms_norm is ref.rms_norm and un.geglu is not ref.geglu
    gate, up = _t(3, 96), _t(3, 96, seed=1)
    assert torch.equal(un.geglu(gate, up), ref.geglu(gate, up))
    x, r, w, s = _t(3, 64), _t(3, 64, seed=1), _t(64, seed=2), torch.tensor([0.5], dtype=torch.bfloat16)
    assert torch.equal(un.residual_rms_norm(r, x, w, 1e-6, s), ref.residual_rms_norm(r, x, w, 1e-6, s))
    assert torch.equal(un.residual_rms_norm(r, x, w, 1e-6), ref.residual_rms_norm(r, x, w, 1e-6))

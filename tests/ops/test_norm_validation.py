"""Argument validation of the norm ops. The checks run before any kernel, so they are tested on
the CPU: each bad argument must raise an exception naming it, with expected vs actual."""

import pytest
import torch

from gemma4x import ops
from gemma4x.ops import _load


def _args(hidden=64, rows=3, dtype=torch.bfloat16):
    x = torch.randn(rows, hidden).to(dtype)
    return x, torch.randn(rows, hidden).to(dtype), torch.ones(hidden, dtype=dtype)


def test_rms_norm_rejects_wrong_weight_shape():
    x, _, _ = _args()
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \[64\], got \[63\]"):
        ops.rms_norm(x, torch.ones(63, dtype=x.dtype), 1e-6)


def test_rms_norm_rejects_weight_dtype_mismatch():
    x, _, _ = _args()
    with pytest.raises(TypeError, match="rms_norm: weight has dtype float32, expected bfloat16"):
        ops.rms_norm(x, torch.ones(64), 1e-6)


def test_rms_norm_rejects_integer_input():
    with pytest.raises(TypeError, match="rms_norm: x: dtype int32 is not supported"):
        ops.rms_norm(torch.ones(2, 8, dtype=torch.int32), None, 1e-6)


def test_rms_norm_rejects_non_contiguous_last_dim():
    x = torch.randn(64, 4, dtype=torch.bfloat16).t()
    with pytest.raises(ValueError, match="rms_norm: x must be contiguous in its last dimension, got stride 4"):
        ops.rms_norm(x, None, 1e-6)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_rms_norm_rejects_bad_eps(eps):
    x, _, w = _args()
    with pytest.raises(ValueError, match="rms_norm: eps must be a finite float >= 0"):
        ops.rms_norm(x, w, eps)


def test_rms_norm_rejects_cpu_tensors_with_a_pointer_to_the_reference():
    x, _, w = _args()
    with pytest.raises(ValueError, match="rms_norm: x must be a CUDA tensor, got device cpu.*gemma4x.reference"):
        ops.rms_norm(x, w, 1e-6)


def test_fused_add_rejects_residual_shape_mismatch():
    x, _, w = _args()
    with pytest.raises(ValueError, match=r"fused_add_rms_norm: residual has shape \[3, 32\], expected \[3, 64\]"):
        ops.fused_add_rms_norm(x, torch.zeros(3, 32, dtype=x.dtype), w, 1e-6)


def test_fused_add_rejects_residual_dtype_mismatch():
    x, r, w = _args()
    with pytest.raises(TypeError, match="fused_add_rms_norm: residual has dtype float32, expected bfloat16"):
        ops.fused_add_rms_norm(x, r.float(), w, 1e-6)


@pytest.mark.parametrize("bad", ["x2", "residual"])
def test_moe_tail_names_every_mismatched_input(bad):
    x, r, w = _args()
    args = {"x1": x, "x2": x.clone(), "residual": r}
    args[bad] = torch.zeros(3, 65, dtype=x.dtype)
    with pytest.raises(ValueError, match=rf"moe_tail_norm: {bad} has shape \[3, 65\], expected \[3, 64\]"):
        ops.moe_tail_norm(args["x1"], args["x2"], args["residual"], w, w, w, torch.ones(1, dtype=x.dtype),
                          1e-6, 1e-6, 1e-6)


@pytest.mark.parametrize("bad", ["w1", "w2", "w3"])
def test_moe_tail_names_every_weight(bad):
    x, r, w = _args()
    ws = {"w1": w, "w2": w, "w3": w}
    ws[bad] = torch.ones(64, dtype=torch.float16)
    with pytest.raises(TypeError, match=f"moe_tail_norm: {bad} has dtype float16, expected bfloat16"):
        ops.moe_tail_norm(x, x, r, ws["w1"], ws["w2"], ws["w3"], torch.ones(1, dtype=x.dtype), 1e-6, 1e-6, 1e-6)


def test_moe_tail_rejects_non_scalar_scalar():
    x, r, w = _args()
    with pytest.raises(ValueError, match=r"moe_tail_norm: scalar must have exactly 1 element, got shape \[2\]"):
        ops.moe_tail_norm(x, x, r, w, w, w, torch.ones(2, dtype=x.dtype), 1e-6, 1e-6, 1e-6)


def test_moe_tail_rejects_bad_eps_by_name():
    x, r, w = _args()
    with pytest.raises(ValueError, match="moe_tail_norm: eps3 must be a finite float >= 0"):
        ops.moe_tail_norm(x, x, r, w, w, w, torch.ones(1, dtype=x.dtype), 1e-6, 1e-6, -1.0)


def test_missing_extension_is_one_clear_error(monkeypatch):
    def fail(name):
        raise ImportError("No module named 'gemma4x._C'")

    _load._try_import.cache_clear()
    monkeypatch.setattr(_load.importlib, "import_module", fail)
    try:
        with pytest.raises(_load.ExtensionUnavailableError, match=r"gemma4x\._C could not be imported.*pip install"):
            _load.extension()
        assert not ops.cuda_kernels_available()
    finally:
        _load._try_import.cache_clear()

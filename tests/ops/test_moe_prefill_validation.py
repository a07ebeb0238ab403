"""CPU tests of the MoE prefill op's argument checks and path selection (no GPU needed: the checks
run before any kernel, and the selection reads only shapes, dtypes and layouts)."""

import pytest
import torch

from gemma4x.ops import moe as moe_ops

T, E, H, I, K = 70, 16, 64, 32, 4


def _args(dtype=torch.bfloat16, device="cpu"):
    return (
        torch.randn(T, H).to(dtype).to(device),
        torch.randint(0, E, (T, K)).to(device),
        torch.rand(T, K).to(device),
        torch.randn(E, 2 * I, H).to(dtype).to(device),
        torch.randn(E, H, I).to(dtype).to(device),
    )


def _meta(T_, k, dtype, H_, I_, E_=128):
    return (
        torch.empty(T_, H_, dtype=dtype, device="meta"),
        torch.empty(T_, k, dtype=torch.int64, device="meta"),
        torch.empty(E_, 2 * I_, H_, dtype=dtype, device="meta"),
        torch.empty(E_, H_, I_, dtype=dtype, device="meta"),
    )


@pytest.mark.parametrize(
    "T_,k,dtype,H_,I_,E_,expected",
    [
        (9, 8, torch.bfloat16, 2816, 704, 128, True),  # T*k = 72: first prefill size
        (16384, 8, torch.bfloat16, 2816, 704, 128, True),
        (9, 8, torch.float16, 2816, 704, 128, False),  # bf16 only (one CUTLASS instance per tile)
        (9, 8, torch.float32, 2816, 704, 128, False),
        (9, 8, torch.bfloat16, 2820, 704, 128, False),  # H not a multiple of 8 (16-byte TMA rows)
        (9, 8, torch.bfloat16, 2816, 700, 128, False),  # I not a multiple of 8
        (9, 8, torch.bfloat16, 2816, 704, 300, False),  # E > 256
        (9, 33, torch.bfloat16, 2816, 704, 128, False),  # k > 32
        (100, 8, torch.bfloat16, 5376, 2112, 256, True),  # larger configs still fit
    ],
)
def test_prefill_path_selection(T_, k, dtype, H_, I_, E_, expected):
    assert moe_ops.prefill_supported(*_meta(T_, k, dtype, H_, I_, E_)) == expected


def test_prefill_needs_contiguous_weights():
    x, idx, gu, down = _meta(9, 8, torch.bfloat16, 2816, 704)
    assert not moe_ops.prefill_supported(x, idx, gu.transpose(1, 2).contiguous().transpose(1, 2), down)
    assert not moe_ops.prefill_supported(x, idx, gu, down.transpose(1, 2).contiguous().transpose(1, 2))


def test_prefill_op_rejects_unsupported_with_its_limits():
    x, idx, w, gu, down = _args(torch.float16)
    with pytest.raises(ValueError, match=r"moe_experts_prefill: unsupported arguments \(dtype float16, T=70, k=4.*bfloat16"):
        torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gu, down)


@pytest.mark.parametrize("tile", [-1, 3, 1.0])
def test_prefill_op_rejects_bad_tile(tile):
    with pytest.raises((ValueError, TypeError, RuntimeError), match="tile"):
        torch.ops.gemma4x.moe_experts_prefill(*_args(), tile)


@pytest.mark.parametrize(
    "i,value,exc,match",
    [
        (1, torch.randint(0, E, (T, K)).int(), TypeError, "moe_experts: idx has dtype int32, expected int64"),
        (2, torch.rand(T, K).double(), TypeError, "moe_experts: weights has dtype float64, expected float32"),
        (3, torch.randn(E, 2 * I, H + 8).to(torch.bfloat16), ValueError, r"moe_experts: gate_up_proj must be \[E, 2I, H=64\]"),
        (4, torch.randn(E, H, I + 8).to(torch.bfloat16), ValueError, r"moe_experts: down_proj must have shape \[16, 64, 32\]"),
    ],
)
def test_prefill_op_rejects_bad_arguments(i, value, exc, match):
    args = list(_args())
    args[i] = value
    with pytest.raises(exc, match=match):
        torch.ops.gemma4x.moe_experts_prefill(*args)


def test_prefill_op_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="moe_experts_prefill: x must be a CUDA tensor, got device cpu"):
        torch.ops.gemma4x.moe_experts_prefill(*_args())


def test_prefill_fake_impl_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, idx, w, gu, down = _args()
        out = torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gu, down)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16




@pytest.mark.parametrize(
    "cc,env,sm90,sm100,expected",
    [
        ((9, 0), "0", True, False, True),  # H100/H200 with an sm_90a build
        ((9, 0), "0", False, True, False),  # built without sm_90a
        ((10, 0), "0", True, True, False),  # B200: compiled, not run -> off unless asked for
        ((10, 0), "1", True, True, True),
        ((10, 0), "1", True, False, False),
        ((8, 0), "1", True, True, False),
        ((12, 0), "1", True, True, False),
    ],
)
def test_prefill_device_ok_by_arch(monkeypatch, cc, env, sm90, sm100, expected):
    """Archs without prefill kernels take the grouped_mm reference path."""
    import types

    fake = types.SimpleNamespace(moe_prefill=types.SimpleNamespace(has_sm90=sm90, has_sm100=sm100))
    monkeypatch.setattr(moe_ops, "extension", lambda: fake)
    monkeypatch.setattr(moe_ops, "device_capability", lambda device: cc)
    monkeypatch.setattr(moe_ops, "_prefill_device_cache", {})
    monkeypatch.setenv("GEMMA4X_MOE_PREFILL_SM100", env)
    assert moe_ops.prefill_device_ok(torch.device("cuda", 0)) == expected

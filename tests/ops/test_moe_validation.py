"""Argument validation of the MoE ops. The checks run before any kernel, so they are tested on the
CPU: each bad argument must raise an exception naming it, with expected vs actual."""

import pytest
import torch

from gemma4x import ops
from gemma4x.ops import moe as moe_ops

T, E, H, I, K = 3, 16, 64, 32, 4


def _router_args(dtype=torch.bfloat16):
    return (
        torch.randn(T, H).to(dtype),
        torch.randn(E, H).to(dtype),
        torch.ones(H, dtype=dtype),
        torch.ones(E, dtype=dtype),
        K,
        1e-6,
    )


def _experts_args(dtype=torch.bfloat16):
    return (
        torch.randn(T, H).to(dtype),
        torch.randint(0, E, (T, K)),
        torch.rand(T, K),
        torch.randn(E, 2 * I, H).to(dtype),
        torch.randn(E, H, I).to(dtype),
    )


def _with(args, i, value):
    args = list(args)
    args[i] = value
    return args


@pytest.mark.parametrize(
    "i,value,exc,match",
    [
        (0, torch.ones(T, H, dtype=torch.int32), TypeError, "moe_router: h: dtype int32 is not supported"),
        (0, torch.randn(H, 4).to(torch.bfloat16).t(), ValueError, "moe_router: h must be contiguous in its last"),
        (1, torch.randn(E, H + 8).to(torch.bfloat16), ValueError, r"moe_router: proj_weight must have shape \[16, 64\]"),
        (1, torch.randn(E, H), TypeError, "moe_router: proj_weight has dtype float32, expected bfloat16"),
        (1, torch.randn(H, E).to(torch.bfloat16).t(), ValueError, "moe_router: proj_weight must be contiguous"),
        (1, torch.randn(E * H).to(torch.bfloat16), ValueError, r"moe_router: proj_weight must be \[E, H=64\]"),
        (1, torch.randn(300, H).to(torch.bfloat16), ValueError, r"moe_router: experts E must be in \[1, 256\], got 300"),
        (2, torch.ones(H - 1, dtype=torch.bfloat16), ValueError, r"moe_router: scale must have shape \[64\], got \[63\]"),
        (2, torch.ones(H), TypeError, "moe_router: scale has dtype float32, expected bfloat16"),
        (3, torch.ones(E + 1, dtype=torch.bfloat16), ValueError, r"moe_router: per_expert_scale must have shape \[16\]"),
        (3, torch.ones(E, dtype=torch.float16), TypeError,
         "moe_router: per_expert_scale has dtype float16, expected bfloat16 or float32"),
        (4, 0, ValueError, r"moe_router: top_k must be an int in \[1, min\(32, E=16\)\], got 0"),
        (4, 17, ValueError, "moe_router: top_k must be an int in"),
        (5, -1.0, ValueError, "moe_router: eps must be a finite float >= 0"),
    ],
)
def test_router_rejects(i, value, exc, match):
    with pytest.raises(exc, match=match):
        ops.moe_router(*_with(_router_args(), i, value))


def test_router_rejects_hidden_not_a_multiple_of_16_bytes():
    h, proj, scale, pes, k, eps = _router_args()
    h = torch.randn(T, 60).to(torch.bfloat16)
    with pytest.raises(ValueError, match="moe_router: hidden size H must be a multiple of 8 and <= 6144, got 60"):
        ops.moe_router(h, proj[:, :60].contiguous(), scale[:60], pes, k, eps)


def test_router_accepts_fp32_per_expert_scale_up_to_the_device_check():
    args = _with(_router_args(), 3, torch.ones(E))
    with pytest.raises(ValueError, match="moe_router: h must be a CUDA tensor, got device cpu.*gemma4x.reference"):
        ops.moe_router(*args)


@pytest.mark.parametrize(
    "i,value,exc,match",
    [
        (0, torch.randn(T, H).to(torch.bfloat16)[None], ValueError, r"moe_experts: x must be \[T, H\], got shape \[1, 3, 64\]"),
        (0, torch.ones(T, H, dtype=torch.int64), TypeError, "moe_experts: x: dtype int64 is not supported"),
        (1, torch.randint(0, E, (T + 1, K)), ValueError, r"moe_experts: idx must be \[T=3, k\], got shape \[4, 4\]"),
        (1, torch.randint(0, E, (T, K), dtype=torch.int32), TypeError,
         "moe_experts: idx has dtype int32, expected int64"),
        (2, torch.rand(T, K + 1), ValueError, r"moe_experts: weights must have shape \[3, 4\], got \[3, 5\]"),
        (2, torch.rand(T, K).to(torch.bfloat16), TypeError, "moe_experts: weights has dtype bfloat16, expected float32"),
        (3, torch.randn(E, 2 * I, H + 8).to(torch.bfloat16), ValueError,
         r"moe_experts: gate_up_proj must be \[E, 2I, H=64\], got shape \[16, 64, 72\]"),
        (3, torch.randn(E, 2 * I + 1, H).to(torch.bfloat16), ValueError, "moe_experts: gate_up_proj must be"),
        (3, torch.randn(E, 2 * I, H), TypeError, "moe_experts: gate_up_proj has dtype float32, expected bfloat16"),
        (4, torch.randn(E, H, I + 8).to(torch.bfloat16), ValueError,
         r"moe_experts: down_proj must have shape \[16, 64, 32\], got \[16, 64, 40\]"),
        (4, torch.randn(E + 1, H, I).to(torch.bfloat16), ValueError, r"moe_experts: down_proj must have shape \[16, 64, 32\]"),
        (4, torch.randn(E, H, I).to(torch.float16), TypeError, "moe_experts: down_proj has dtype float16, expected bfloat16"),
    ],
)
def test_experts_rejects(i, value, exc, match):
    with pytest.raises(exc, match=match):
        ops.moe_experts(*_with(_experts_args(), i, value))


def test_experts_rejects_cpu_tensors_with_a_pointer_to_the_reference():
    with pytest.raises(ValueError, match="moe_experts: x must be a CUDA tensor, got device cpu.*gemma4x.reference"):
        ops.moe_experts(*_experts_args())


def test_decode_op_names_its_limits():
    x, idx, w, gu, down = _experts_args()
    idx = torch.randint(0, E, (T, 32))
    with pytest.raises(ValueError, match=r"moe_experts_decode: unsupported arguments .*T=3, k=32.*T\*k <= 64"):
        torch.ops.gemma4x.moe_experts_decode(x, idx, torch.rand(T, 32), gu, down)


@pytest.mark.parametrize(
    "T_,k,dtype,H_,I_,expected",
    [
        (1, 8, torch.bfloat16, 2816, 704, True),
        (8, 8, torch.bfloat16, 2816, 704, True),
        (9, 8, torch.bfloat16, 2816, 704, False),  # T*k = 72 > 64: grouped_mm
        (1, 8, torch.float16, 2816, 704, True),
        (1, 8, torch.float32, 2816, 704, False),
        (1, 8, torch.bfloat16, 4096, 704, False),  # H > 3072
        (1, 8, torch.bfloat16, 2816, 1032, False),  # I > 1024
        (1, 8, torch.bfloat16, 2820, 704, False),  # H not a multiple of 8
    ],
)
def test_decode_path_selection(T_, k, dtype, H_, I_, expected):
    x = torch.empty(T_, H_, dtype=dtype, device="meta")
    idx = torch.empty(T_, k, dtype=torch.int64, device="meta")
    gu = torch.empty(4, 2 * I_, H_, dtype=dtype, device="meta")
    down = torch.empty(4, H_, I_, dtype=dtype, device="meta")
    assert moe_ops.decode_supported(x, idx, gu, down) == expected


def test_public_ops_validate_once(monkeypatch):
    """ops.moe_router / ops.moe_experts hand well-formed decode arguments to the custom op, which
    checks them; the wrapper does not check them a second time."""
    calls = []
    for name in ("_check_router", "_check_experts"):
        real = getattr(moe_ops, name)
        monkeypatch.setattr(moe_ops, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    with pytest.raises(ValueError, match="CUDA tensor"):
        ops.moe_router(*_router_args())
    assert calls == ["_check_router"]
    calls.clear()
    with pytest.raises(ValueError, match="CUDA tensor"):
        ops.moe_experts(*_experts_args())
    assert calls == ["_check_experts"]

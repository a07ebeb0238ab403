"""CPU tests of ops.qkv_norm_rope's argument checks (they run before any kernel) and of its
reference against HF's Gemma 4 norm + rotary code."""

import pytest
import torch
from gemma4x.ops import rope as rope_op
from gemma4x.reference import rope as ref


def _args(B=2, T=3, hq=4, hkv=2, d=64, dtype=torch.bfloat16):
    q = torch.randn(B, T, hq, d, dtype=dtype)
    k = torch.randn(B, T, hkv, d, dtype=dtype)
    v = torch.randn(B, T, hkv, d, dtype=dtype)
    w = torch.ones(d, dtype=dtype)
    cos = torch.ones(B, T, d, dtype=dtype)
    sin = torch.zeros(B, T, d, dtype=dtype)
    return [q, k, v, w, w.clone(), cos, sin, 1e-6]


@pytest.mark.parametrize(
    "index,value,err,match",
    [
        (0, torch.randn(2, 3, 64), ValueError, "q must be \\[B, T, heads, head_dim\\]"),
        (0, torch.randn(2, 3, 4, 48, dtype=torch.bfloat16), ValueError, "head_dim must be one of"),
        (0, torch.randn(2, 3, 4, 64, dtype=torch.float64), TypeError, "q must be float32, float16 or bfloat16"),
        (1, torch.randn(2, 3, 2, 64, dtype=torch.float16), TypeError, "k has dtype float16, expected bfloat16"),
        (1, torch.randn(2, 4, 2, 64, dtype=torch.bfloat16), ValueError, "k must have shape \\[2, 3, 2, 64\\]"),
        (2, torch.randn(2, 3, 64, dtype=torch.bfloat16), ValueError, "v must be \\[B, T, heads, head_dim\\]"),
        (3, torch.ones(32, dtype=torch.bfloat16), ValueError, "q_weight must have shape \\[64\\]"),
        (4, None, ValueError, "k_weight is required"),
        (5, torch.ones(2, 3, 32, dtype=torch.bfloat16), ValueError, "cos must have shape \\[2, 3, 64\\]"),
        (6, torch.ones(2, 3, 64, dtype=torch.float32), TypeError, "sin has dtype float32, expected bfloat16"),
        (7, -1.0, ValueError, "eps must be a finite float >= 0"),
    ],
)
def test_bad_arguments_name_the_tensor(index, value, err, match):
    args = _args()
    args[index] = value
    with pytest.raises(err, match=match):
        rope_op.qkv_norm_rope(*args)


def test_strided_heads_are_refused():
    args = _args()
    args[0] = torch.randn(2, 3, 64, 4, dtype=torch.bfloat16).transpose(-1, -2)
    with pytest.raises(ValueError, match="q must have contiguous heads"):
        rope_op.qkv_norm_rope(*args)


def test_cpu_tensors_are_refused():
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        rope_op.qkv_norm_rope(*_args())


def test_dispatch_falls_back_to_the_reference_on_cpu():
    args = _args()
    out = rope_op.qkv_norm_rope_or_reference(*args)
    for o, r in zip(out, ref.qkv_norm_rope(*args)):
        assert torch.equal(o, r)


def test_reference_matches_hf_norm_and_rotary():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    q, k, v, _, _, _, _, eps = _args(d=64)
    qn, kn, vn = Gemma4RMSNorm(64, eps=eps), Gemma4RMSNorm(64, eps=eps), Gemma4RMSNorm(64, eps=eps, with_scale=False)
    with torch.no_grad():
        qn.weight.copy_(torch.randn(64))
        kn.weight.copy_(torch.randn(64))
    qn, kn = qn.to(torch.bfloat16), kn.to(torch.bfloat16)
    pos = torch.arange(3)[None].expand(2, 3)
    cos, sin = ref.rope_cos_sin(pos, ref.rope_inv_freq(64, 1e4), torch.bfloat16)
    with torch.no_grad():
        # HF applies the norm, then the rotary embedding on [B, heads, T, d] with unsqueeze_dim=1.
        hq = apply_rotary_pos_emb(qn(q).transpose(1, 2), cos, sin, unsqueeze_dim=1).transpose(1, 2)
        hk = apply_rotary_pos_emb(kn(k).transpose(1, 2), cos, sin, unsqueeze_dim=1).transpose(1, 2)
        hv = vn(v)
        ours = ref.qkv_norm_rope(q, k, v, qn.weight, kn.weight, cos, sin, eps)
    for o, h in zip(ours, (hq, hk, hv)):
        assert torch.equal(o, h)

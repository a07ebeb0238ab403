"""CPU tests of the interleaved gate/up layout (rows in blocks of 8) that lets the SM90 prefill path
compute the GeGLU in GEMM1's epilogue: the repacking helpers, the reference reading that layout,
the prefill op's new arguments, and the model layer (loader repacks once, state dicts stay HF)."""

import pytest
import torch

from gemma4x.layers.moe import Experts, NVFP4Experts, _load_gate_up_interleaved
from gemma4x.ops import moe as moe_ops
from gemma4x.reference import moe as ref

E, H, I, K, T = 6, 32, 24, 2, 11


def _weights(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(E, 2 * I, H, generator=g) * 0.2).to(dtype)
    dn = (torch.randn(E, H, I, generator=g) * 0.2).to(dtype)
    return gu, dn


def _inputs(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x, idx, w


def test_interleave_row_mapping_and_inverse():
    gu, _ = _weights()
    il = ref.interleave_gate_up(gu)
    assert il.shape == gu.shape and il.is_contiguous()
    for j in range(I):
        b, r = divmod(j, 8)
        assert torch.equal(il[:, 16 * b + r], gu[:, j])  # gate row j
        assert torch.equal(il[:, 16 * b + 8 + r], gu[:, I + j])  # up row j
    assert torch.equal(ref.deinterleave_gate_up(il), gu)
    assert torch.equal(moe_ops.interleave_gate_up(gu), il)  # re-exported by the op module


@pytest.mark.parametrize("bad", [(E, 2 * 12, H), (E, 2 * 20, H), (2 * I, H)])
def test_interleave_needs_i_multiple_of_8(bad):
    with pytest.raises(ValueError, match="I a multiple of 8"):
        ref.interleave_gate_up(torch.zeros(bad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_reads_the_interleaved_layout_bit_for_bit(dtype):
    gu, dn = _weights(dtype)
    x, idx, w = _inputs(dtype)
    want = ref.moe_experts(x, idx, w, gu, dn)
    got = ref.moe_experts(x, idx, w, ref.interleave_gate_up(gu), dn, gate_up_interleaved=True)
    assert torch.equal(got, want)


def test_op_checks_the_flag_on_cpu():
    gu, dn = _weights()
    x, idx, w = _inputs()
    with pytest.raises(TypeError, match="gate_up_interleaved must be a bool"):
        moe_ops.moe_experts(x, idx, w, gu, dn, gate_up_interleaved=1)
    gu_odd = torch.zeros(E, 2 * 12, H)
    with pytest.raises(ValueError, match="gate_up_interleaved needs I a multiple of 8"):
        moe_ops.moe_experts(x, idx, w, gu_odd, torch.zeros(E, H, 12), gate_up_interleaved=True)


def _prefill_args():
    x, idx, w = _inputs(torch.bfloat16)
    gu, dn = _weights(torch.bfloat16)
    return x, idx, w, gu, dn


@pytest.mark.parametrize("prep", [-1, 3])
def test_prefill_op_rejects_bad_prep(prep):
    with pytest.raises(ValueError, match="prep must be one of"):
        torch.ops.gemma4x.moe_experts_prefill(*_prefill_args(), 0, False, prep)


def test_prefill_op_rejects_fused_prep_beyond_its_limit():
    x = torch.zeros(moe_ops.FUSED_PREP_MAX_PAIRS // 8 + 1, H, dtype=torch.bfloat16)
    idx = torch.zeros(x.shape[0], 8, dtype=torch.int64)
    w = torch.zeros(x.shape[0], 8)
    gu, dn = _weights(torch.bfloat16)
    with pytest.raises(ValueError, match="prep=1 \\(fused\\) takes at most T\\*k = 4096 pairs, got 4104"):
        torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gu, dn, 0, True, 1)


def test_prefill_and_decode_fake_impls_take_the_new_arguments():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, idx, w, gu, dn = _prefill_args()
        out = torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gu, dn, 2, True, 1)
        assert out.shape == (T, H)
        out = torch.ops.gemma4x.moe_experts_decode(x[:2], idx[:2], w[:2], gu, dn, True)
        assert out.shape == (2, H)


# ---------------------------------------------------------------------------- model layer


def _loaded_experts(gu, dn):
    """An Experts filled as the checkpoint loader fills it (weight_loader for gate_up_proj)."""
    ex = Experts(E, H, I)
    with torch.no_grad():
        ex.gate_up_proj.weight_loader(ex.gate_up_proj, gu)
        ex.down_proj.copy_(dn)
    return ex


def test_loader_repacks_gate_up_once_and_forward_matches_hf_layout():
    gu, dn = _weights()
    x, idx, w = _inputs()
    ex = _loaded_experts(gu, dn)
    assert ex.gate_up_proj.weight_loader is _load_gate_up_interleaved
    assert ex.gate_up_interleaved
    assert torch.equal(ex.gate_up_proj.data, ref.interleave_gate_up(gu))
    assert torch.equal(ex.gate_up_hf(), gu)
    plain = Experts(E, H, I)
    with torch.no_grad():
        plain.gate_up_proj.copy_(gu)
        plain.down_proj.copy_(dn)
    assert not plain.gate_up_interleaved
    want = plain.forward_native(x, w, idx)
    assert torch.equal(ex.forward_native(x, w, idx), want)
    assert torch.equal(ex(x, w, idx), want)  # CPU: the reference too


def test_state_dict_stays_hf_layout_both_ways():
    gu, dn = _weights()
    ex = _loaded_experts(gu, dn)
    sd = ex.state_dict()
    assert torch.equal(sd["gate_up_proj"], gu)
    assert ex.gate_up_interleaved  # saving does not change the module
    other = _loaded_experts(*_weights(seed=5))
    other.load_state_dict(sd)
    assert not other.gate_up_interleaved and torch.equal(other.gate_up_proj.data, gu)
    x, idx, w = _inputs()
    assert torch.equal(other.forward_native(x, w, idx), ex.forward_native(x, w, idx))


def test_loader_keeps_hf_layout_when_i_is_not_a_multiple_of_8():
    ex = Experts(E, H, 12)
    gu = torch.randn(E, 24, H)
    with torch.no_grad():
        ex.gate_up_proj.weight_loader(ex.gate_up_proj, gu)
    assert not ex.gate_up_interleaved and torch.equal(ex.gate_up_proj.data, gu)


def test_nvfp4_from_experts_reads_hf_layout():
    g = torch.Generator().manual_seed(3)
    gu, dn = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 16, generator=g)  # I = 16
    loaded, plain = Experts(4, 32, 16), Experts(4, 32, 16)
    with torch.no_grad():
        loaded.gate_up_proj.weight_loader(loaded.gate_up_proj, gu)
        plain.gate_up_proj.copy_(gu)
        loaded.down_proj.copy_(dn)
        plain.down_proj.copy_(dn)
    assert loaded.gate_up_interleaved
    a, b = NVFP4Experts.from_experts(loaded), NVFP4Experts.from_experts(plain)
    assert torch.equal(a.gate_up_weight, b.gate_up_weight)
    assert torch.equal(a.gate_up_weight_scale.float(), b.gate_up_weight_scale.float())

"""The SM100 W4A4 MoE pipeline around the grouped GEMM, run on the CPU with the reference GEMM.

The grouped GEMM itself is compiled for sm_100a and not run here; these tests pin down the
permutation, the per-group scale layout, the activation quantization and the combine.
"""

from __future__ import annotations

import pytest
import torch
from gemma4x.layers.moe import Experts, NVFP4Experts
from gemma4x.ops.nvfp4_moe_sm100 import nvfp4_moe_w4a4, prepare_sm100_experts
from gemma4x.reference import gemm as ref_gemm
from gemma4x.reference import moe as ref_moe
from gemma4x.reference import quant
from gemma4x.reference.activation import gelu_tanh

E, H, I, K_TOP = 6, 128, 64, 2


def _experts(seed=0, input_scale=True):
    g = torch.Generator().manual_seed(seed)
    bf = Experts(E, H, I)
    bf.gate_up_proj.data = (torch.randn(E, 2 * I, H, generator=g) * 0.05).to(torch.bfloat16)
    bf.down_proj.data = (torch.randn(E, H, I, generator=g) * 0.05).to(torch.bfloat16)
    q = NVFP4Experts.from_experts(bf)
    gu_in = torch.full((E, 2), 2.0 / (6 * 448)) if input_scale else None
    dn_in = torch.full((E,), 0.5 / (6 * 448)) if input_scale else None
    return q, prepare_sm100_experts(
        q.gate_up_weight, q.gate_up_weight_scale, q.gate_up_weight_scale_2,
        q.down_weight, q.down_weight_scale, q.down_weight_scale_2, gu_in, dn_in,
    )  # fmt: skip


def _routing(T, seed=1, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    if skew:  # most tokens to expert 3, expert 5 never
        idx = torch.stack([torch.full((T,), 3), torch.randint(0, 5, (T,), generator=g)], 1)
        idx[:, 1] = torch.where(idx[:, 1] == 3, 0, idx[:, 1])
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K_TOP] for _ in range(T)])
    w = torch.rand(T, K_TOP, generator=g)
    return x, idx, w / w.sum(-1, keepdim=True)


def _loop(x, idx, weights, q: NVFP4Experts, pw):
    """One (token, slot) at a time with the single-matrix reference GEMM."""
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            a, sf = quant.nvfp4_quantize_activation(x[t : t + 1], pw.gate_up_input_scale)
            gu = ref_gemm.nvfp4_gemm(
                a, quant.nvfp4_swizzle_scales(sf), q.gate_up_weight[e], pw.gate_up_scale[e],
                (pw.gate_up_input_scale * pw.gate_up_scale_2[e]).reshape(1),
            )  # fmt: skip
            act = gelu_tanh(gu[:, :I]) * gu[:, I:]
            a, sf = quant.nvfp4_quantize_activation(act, pw.down_input_scale)
            y = ref_gemm.nvfp4_gemm(
                a, quant.nvfp4_swizzle_scales(sf), q.down_weight[e], pw.down_scale[e],
                (pw.down_input_scale * pw.down_scale_2[e]).reshape(1),
            )  # fmt: skip
            out[t] += y[0].float() * weights[t, j]
    return out.to(torch.bfloat16)


@pytest.mark.parametrize("T,skew", [(1, False), (5, False), (40, True)])
def test_pipeline_equals_per_pair_loop(T, skew):
    q, pw = _experts()
    x, idx, w = _routing(T, skew=skew)
    got = nvfp4_moe_w4a4(x, idx, w, pw, grouped_gemm=ref_gemm.nvfp4_grouped_gemm)
    want = _loop(x, idx, w, q, pw)
    # Same quantized operands and products; only the fp32 order of the k-sum and of matmul blocks differ.
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2e-3)


def test_w4a4_stays_close_to_the_dequantized_weight_reference():
    q, pw = _experts(input_scale=False)  # dynamic activation scale
    x, idx, w = _routing(64)
    got = nvfp4_moe_w4a4(x, idx, w, pw, grouped_gemm=ref_gemm.nvfp4_grouped_gemm).float()
    gu, dn = q.dequantized_weights(torch.float32)
    want = ref_moe.moe_experts(x.float(), idx, w, gu, dn)
    rel = (got - want).norm() / want.norm()
    assert rel < 0.2, rel  # 4-bit activations on top of 4-bit weights: percent-level, not garbage
    assert rel > 0  # and it is a different computation from the W4A16 reference


def test_prepare_refuses_split_gate_up_scales():
    q, _ = _experts()
    s2 = q.gate_up_weight_scale_2.clone()
    s2[0, 1] *= 2
    with pytest.raises(ValueError, match="gate and up need one weight_scale_2 per expert"):
        prepare_sm100_experts(
            q.gate_up_weight, q.gate_up_weight_scale, s2, q.down_weight, q.down_weight_scale, q.down_weight_scale_2
        )


def test_prepare_refuses_per_expert_input_scales():
    q, _ = _experts()
    with pytest.raises(ValueError, match="one input_scale for all experts"):
        prepare_sm100_experts(
            q.gate_up_weight, q.gate_up_weight_scale, q.gate_up_weight_scale_2,
            q.down_weight, q.down_weight_scale, q.down_weight_scale_2, torch.arange(1.0, 2 * E + 1).reshape(E, 2),
        )  # fmt: skip


def test_layer_takes_the_w4a4_path_beyond_decode_size(monkeypatch):
    """NVFP4Experts on an SM100 GPU: > 64 (token, slot) pairs go through the grouped W4A4 pipeline."""
    import gemma4x.ops.gemm as gemm_ops

    q, _ = _experts()
    calls = []

    def fake_grouped(*args):
        calls.append(args[2].tolist())
        return ref_gemm.nvfp4_grouped_gemm(*args)

    monkeypatch.setattr(NVFP4Experts, "w4a4_sm100_supported", lambda self, x: True)
    monkeypatch.setattr(gemm_ops, "nvfp4_grouped_gemm", fake_grouped)
    x, idx, w = _routing(40)  # 80 pairs
    got = q(x, w, idx)
    assert len(calls) == 2  # gate/up, then down
    want = nvfp4_moe_w4a4(x, idx, w, q.w4a4_sm100_packed(), grouped_gemm=ref_gemm.nvfp4_grouped_gemm)
    assert torch.equal(got, want)
    # Decode sizes keep the other paths; forward_native always dequantizes.
    calls.clear()
    q(x[:8], w[:8], idx[:8])
    q.forward_native(x, w, idx)
    assert calls == []

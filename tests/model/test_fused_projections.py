"""Fused q/k/v and gate/up projections (``FusedLinear``, ``Gemma4TextModel.fuse_projections_``).

CPU: fusing keeps every parameter (now views of one storage), the checkpoint view and the native
forward bit for bit; the fused GEMM equals the separate ones; a replaced or moved layer is no
longer served by the fused weight. GPU: the CUDA forward of fused models with head dims the
qkv_norm_rope kernel serves stays within 2x HF's bf16 error.
"""

from __future__ import annotations

import copy

import gemma4_tiny as gt
import pytest
import torch
from gemma4x.config import load_config, nvfp4_quant_config
from gemma4x.layers.linear import FusedLinear, Linear, NVFP4Linear
from test_text_model import build as _build
from test_text_model import our_logits as _logits

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused_moe")
    gt.make_checkpoint(gt.CONFIGS["moe_kv_eq"], path, seed=3)
    return path


def test_fusing_keeps_parameters_and_native_forward(moe_ckpt):
    model = _build(moe_ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids, native=True)
    # 4 layers: q/k/v (sliding) or q/k (full, attention_k_eq_v) and gate/up each.
    assert model.fuse_projections_() == 8
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    attn0, attn1 = model.layers[0].self_attn, model.layers[1].self_attn
    assert attn0.fused_qkv.names == ("q_proj", "k_proj", "v_proj") and attn1.fused_qkv.names == ("q_proj", "k_proj")
    fused = attn0.fused_qkv.weight
    assert attn0.q_proj.weight.data_ptr() == fused.data_ptr()
    assert attn0.k_proj.weight.data_ptr() == fused[attn0.q_proj.out_features].data_ptr()
    assert torch.equal(_logits(model, ids, native=True), want)  # the native path ignores the fusion


def test_fused_gemm_equals_separate_gemms():
    torch.manual_seed(0)
    owner = torch.nn.Module()
    owner.a, owner.b = Linear(32, 48, bias=True), Linear(32, 16, bias=True)
    for m in (owner.a, owner.b):
        torch.nn.init.normal_(m.weight)
        torch.nn.init.normal_(m.bias)
    x = torch.randn(5, 32, dtype=torch.float64)
    owner.double()
    want = [owner.a(x), owner.b(x)]
    fused = FusedLinear.fuse(owner, ("a", "b"))
    assert fused is not None and fused.valid()
    for got, w in zip(fused(x), want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


def test_fusion_is_refused_or_dropped_when_layers_change(moe_ckpt):
    model = _build(moe_ckpt)
    model.fuse_projections_()
    attn = model.layers[0].self_attn
    assert attn.fused_qkv.valid()
    model.to(torch.float64)  # moves every weight: the fused storage is stale, so it is not used
    assert not attn.fused_qkv.valid()

    model = _build(moe_ckpt)
    model.quantize_(nvfp4_quant_config(load_config(moe_ckpt), "all"))
    assert isinstance(model.layers[0].self_attn.q_proj, NVFP4Linear)
    assert model.fuse_projections_() == 0  # NVFP4 projections stay separate

    model = _build(moe_ckpt)
    model.fuse_projections_()
    q = copy.deepcopy(model.layers[0].self_attn.q_proj)
    model.layers[0].self_attn.q_proj = q  # a replaced layer: fall back to the layers
    assert not model.layers[0].self_attn.fused_qkv.valid()


# ---- GPU (run on the device machine: pytest -m cuda) ----------------------------------


def _wide_heads(cfg: dict) -> dict:
    """The same model with head dims the qkv_norm_rope kernel serves (64 sliding, 128 full)."""
    cfg = copy.deepcopy(cfg)
    text = cfg.get("text_config", cfg)
    text.update(head_dim=64, global_head_dim=128)
    return cfg


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["moe_kv_eq", "e2b_like", "pattern"])
def test_cuda_fused_model_matches_hf(tmp_path, monkeypatch, name):
    from gemma4x.ops import rope as rope_op

    cfg = _wide_heads(gt.CONFIGS[name])
    hf32 = gt.make_checkpoint(cfg, tmp_path, seed=5)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16).cuda()
    model = _build(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert model.fuse_projections_() > 0
    calls = []
    kernel = rope_op.qkv_norm_rope
    monkeypatch.setattr(rope_op, "qkv_norm_rope", lambda *a: calls.append(1) or kernel(*a))
    ids = torch.randint(3, 250, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf32(input_ids=ids).logits
        hf_err = (hf16(input_ids=ids.cuda()).logits.cpu().float() - ref).abs().max() / ref.abs().max()
    ours = _logits(model, ids.cuda()).cpu().float()
    err = (ours - ref).abs().max() / ref.abs().max()
    assert len(calls) == len(model.layers)  # every layer prepared q/k/v with the kernel
    assert err <= 2 * hf_err + 1e-3, (err.item(), hf_err.item())

"""Our Gemma 4 text model against transformers 5.23 on tiny random checkpoints.

Each checkpoint is written by HF's ``save_pretrained`` and loaded through our loader, so
names, shapes, config parsing and numerics are all checked end to end. fp32 logits must
agree within 1e-4 of the max |logit|; prompts run longer than the sliding window.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma4_tiny as gt  # noqa: E402

from gemma4x.config import load_config  # noqa: E402
from gemma4x.layers.attention import LayerCacheSpec  # noqa: E402
from gemma4x.loader import load_checkpoint  # noqa: E402
from gemma4x.models.text import Gemma4TextModel  # noqa: E402

pytest.importorskip("transformers")

FP32_RTOL = 1e-4
LENGTHS = (1, 5, 23)  # 23 > every sliding window used (6, 8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, fp32 HF model that wrote it)."""
    out = {}
    for name, cfg in gt.CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        # The dense checkpoint keeps the older JSON form (global_head_dim, no per_layer_config).
        out[name] = (path, gt.make_checkpoint(cfg, path, seed=1, legacy_json=name == "dense"))
    return out


def build(path, device="cpu", dtype=torch.float32) -> Gemma4TextModel:
    mc = load_config(path)
    with torch.device("meta"):
        model = Gemma4TextModel(mc.text, mc.mm_placeholder_token_ids)
    ignore = model.ignored_checkpoint_keys(mc.weight_prefix)
    load_checkpoint(model, path, prefix=mc.weight_prefix, device=device, dtype=dtype, ignore_patterns=ignore)
    return model.eval()


def our_logits(model, ids: torch.Tensor, native: bool = False) -> torch.Tensor:
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    fwd = model.forward_native if native else model.forward
    with torch.inference_mode():
        return model.compute_logits(fwd(ids, pos))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("name", sorted(gt.CONFIGS))
def test_fp32_logits_match_hf(checkpoints, name):
    path, hf = checkpoints[name]
    model = build(path)
    g = torch.Generator().manual_seed(7)
    for T in LENGTHS:
        ids = torch.randint(3, 256, (1, T), generator=g)
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
        assert rel_err(our_logits(model, ids), ref) < FP32_RTOL, (name, T)
        assert torch.equal(our_logits(model, ids, native=True), our_logits(model, ids)), (name, T)


def test_batched_rows_are_independent(checkpoints):
    """Two equal-length prompts in one batch give each prompt's own logits."""
    path, hf = checkpoints["e2b_like"]
    model = build(path)
    ids = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    both = our_logits(model, ids)
    for b in range(2):
        with torch.no_grad():
            ref = hf(input_ids=ids[b : b + 1]).logits[0]
        assert rel_err(both[b], ref) < FP32_RTOL


def test_last_only_equals_full_forward(checkpoints):
    """The prefill shortcut (only the last position through the KV-shared layers) changes nothing.

    Not bitwise: a [1, H] GEMM may block its reduction differently from a [T, H] one.
    """
    path, _ = checkpoints["e2b_like"]
    model = build(path)
    ids = torch.randint(3, 256, (1, 17), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(17)[None]
    with torch.inference_mode():
        full = model.compute_logits(model(ids, pos))[:, -1]
        last = model.compute_logits(model(ids, pos, last_only=True))[:, -1]
    assert rel_err(last, full) < 1e-6


def test_multimodal_placeholders_map_to_pad(checkpoints):
    """gemma4 checkpoints: image/video/audio placeholder ids embed (and PLE) as pad, as HF does."""
    path, hf = checkpoints["e2b_like"]
    model = build(path)
    ids = torch.tensor([[2, 17, 250, 250, 251, 99, 252, 30]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert rel_err(our_logits(model, ids), ref) < FP32_RTOL


def test_bidirectional_all(tmp_path):
    """use_bidirectional_attention="all": sdpa semantics (|q-k| <= W//2+1 on sliding layers)."""
    cfg = {**gt.DENSE, "use_bidirectional_attention": "all", "sliding_window": 9}
    hf = gt.make_checkpoint(cfg, tmp_path, seed=2)
    model = build(tmp_path)
    ids = torch.randint(3, 256, (1, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert rel_err(our_logits(model, ids), ref) < FP32_RTOL


@pytest.mark.parametrize("name", sorted(gt.CONFIGS))
def test_cpu_logits_bitwise_equal_to_hf(checkpoints, name):
    """On CPU we run HF's ops with HF's rounding points (sdpa attention, grouped_mm experts,
    bf16 soft-cap), so fp32 and bf16 logits come out bit for bit equal to HF's forward."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    path, hf32 = checkpoints[name]
    cls = Gemma4ForCausalLM if gt.CONFIGS[name]["model_type"] == "gemma4_text" else Gemma4ForConditionalGeneration
    hf16 = cls.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours32, ours16 = build(path), build(path, dtype=torch.bfloat16)
    ids = torch.randint(3, 256, (1, 23), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref32, ref16 = hf32(input_ids=ids).logits, hf16(input_ids=ids).logits
    assert ref16.dtype == torch.bfloat16
    assert torch.equal(our_logits(ours32, ids), ref32)
    out16 = our_logits(ours16, ids)
    assert out16.dtype == torch.float32
    assert torch.equal(out16, ref16.float())


def test_kv_cache_spec_and_ignored_keys(checkpoints):
    path, _ = checkpoints["e2b_like"]
    mc = load_config(path)
    with torch.device("meta"):
        model = Gemma4TextModel(mc.text, mc.mm_placeholder_token_ids)
    # [S, S, F, S, S, F], last 3 reuse: sliding producer 1, full producer 2.
    assert model.kv_cache_spec() == [
        LayerCacheSpec("sliding", 1, 16, 8, 0),
        LayerCacheSpec("sliding", 1, 16, 8, 1),
        LayerCacheSpec("full", 1, 32, None, 2),
        LayerCacheSpec("none", 1, 16, None, 1),
        LayerCacheSpec("none", 1, 16, None, 1),
        LayerCacheSpec("none", 1, 32, None, 2),
    ]
    ignored = model.ignored_checkpoint_keys(mc.weight_prefix)
    import re

    hit = lambda k: any(re.search(p, k) for p in ignored)  # noqa: E731
    assert hit("model.language_model.layers.4.self_attn.k_proj.weight")
    assert hit("lm_head.weight")
    assert hit("model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight")
    assert not hit("model.language_model.layers.1.self_attn.k_proj.weight")
    assert not hit("model.language_model.layers.4.self_attn.q_proj.weight")
    names = dict(model.named_parameters())
    assert "layers.4.self_attn.k_proj.weight" not in names
    assert names["layers.4.mlp.gate_proj.weight"].shape == (192, 64)  # double-wide on reuse layers
    assert names["layers.1.mlp.gate_proj.weight"].shape == (96, 64)
    assert "layers.0.layer_scalar" in dict(model.named_buffers())


def test_moe_parameter_names(checkpoints):
    path, _ = checkpoints["moe_kv_eq"]
    mc = load_config(path)
    with torch.device("meta"):
        model = Gemma4TextModel(mc.text)
    names = dict(model.named_parameters())
    assert names["layers.1.experts.gate_up_proj"].shape == (8, 64, 64)
    assert names["layers.1.experts.down_proj"].shape == (8, 64, 32)
    assert names["layers.1.router.per_expert_scale"].shape == (8,)
    assert "layers.1.self_attn.v_proj.weight" not in names  # full layer, attention_k_eq_v
    assert "layers.0.self_attn.v_proj.weight" in names


# ---- GPU (run on the device machine: pytest -m cuda) ----------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(gt.CONFIGS))
def test_cuda_bf16_logits(checkpoints, name):
    """CUDA bf16 (our ops): error vs HF fp32 at most 2x HF CUDA bf16's; forward ~= forward_native."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    path, hf32 = checkpoints[name]
    cls = Gemma4ForCausalLM if gt.CONFIGS[name]["model_type"] == "gemma4_text" else Gemma4ForConditionalGeneration
    hf16 = cls.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    model = build(path, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, 256, (1, 23), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf32(input_ids=ids).logits
        hf_err = rel_err(hf16(input_ids=ids.cuda()).logits.cpu(), ref)
    ours = our_logits(model, ids.cuda()).cpu()
    native = our_logits(model, ids.cuda(), native=True).cpu()
    assert rel_err(ours, ref) <= 2 * hf_err + 1e-3, (rel_err(ours, ref), hf_err)
    assert rel_err(native, ref) <= 2 * hf_err + 1e-3, (rel_err(native, ref), hf_err)

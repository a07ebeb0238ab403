"""gemma4x.config against transformers' own Gemma4 config objects and module shapes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma4_tiny as gt  # noqa: E402

from gemma4x.config import FULL, SLIDING, load_config  # noqa: E402

transformers = pytest.importorskip("transformers")

S, F = SLIDING, FULL

# JSON forms worth covering: defaults, every-6th pattern, k_eq_v gating of the global KV
# heads, global_head_dim absent (512 default), KV sharing with double-wide MLP, MoE.
CASES = {
    "defaults_small": {"model_type": "gemma4_text", "num_hidden_layers": 7},
    "k_eq_v_global_kv": {
        "model_type": "gemma4_text", "num_hidden_layers": 6, "attention_k_eq_v": True,
        "num_key_value_heads": 4, "num_global_key_value_heads": 2, "global_head_dim": 64, "head_dim": 32,
    },
    "global_kv_without_k_eq_v": {  # the kv-head override is gated by attention_k_eq_v
        "model_type": "gemma4_text", "num_hidden_layers": 6, "num_key_value_heads": 4,
        "num_global_key_value_heads": 2, "global_head_dim": 64, "head_dim": 32,
    },
    "no_global_head_dim": {"model_type": "gemma4_text", "num_hidden_layers": 3, "head_dim": 32},
    "last_forced_full": {"model_type": "gemma4_text", "num_hidden_layers": 4, "layer_types": [S, F, S, S]},
    "e2b_like": {**gt.E2B_TEXT},
    "moe": {**gt.MOE_TEXT},
    "kv_shared_full_first": {
        "model_type": "gemma4_text", "num_hidden_layers": 6, "layer_types": [F, S, S, S, F, S],
        "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
    },
}  # fmt: skip


def _hf_meta_model(cfg: dict):
    hcfg = gt.hf_config(cfg)
    with torch.device("meta"):
        return transformers.Gemma4ForCausalLM(hcfg), hcfg


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_hf(name):
    raw = CASES[name]
    cfg = load_config(raw).text
    model, hcfg = _hf_meta_model(raw)
    assert cfg.layer_types == tuple(hcfg.layer_types)
    assert cfg.kv_sharing == tuple(hcfg.kv_sharing_modes)
    for i, layer in enumerate(model.model.layers):
        att = layer.self_attn
        assert cfg.head_dims[i] == att.head_dim, i
        assert cfg.intermediate_sizes[i] == layer.mlp.intermediate_size, i
        if att.is_kv_shared_layer:
            assert not hasattr(att, "k_proj") and cfg.kv_sharing[i] == "reuse"
            assert cfg.layer_types[cfg.kv_source_layer[i]] == cfg.layer_types[i]
            assert cfg.kv_sharing[cfg.kv_source_layer[i]] == "store"
        else:
            assert cfg.num_kv_heads[i] == att.k_proj.out_features // att.head_dim, i
            assert cfg.has_v_proj[i] == (att.v_proj is not None), i
            assert cfg.kv_source_layer[i] == i
        window = cfg.attention_window(i)
        assert window == ((cfg.sliding_window - 1, 0) if att.is_sliding else (None, 0))
    assert cfg.has_ple == bool(hcfg.hidden_size_per_layer_input)


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_json_round_trip(name):
    """HF writes `per_layer_config` (zero-padded keys); both JSON forms normalise identically."""
    raw = CASES[name]
    saved = gt.hf_config(raw).to_dict()
    assert "per_layer_config" in saved
    assert load_config({**saved, "model_type": "gemma4_text"}).text == load_config(raw).text


def test_heterogeneous_within_a_type_is_rejected_like_hf():
    """HF raises when layers of one type get different overrides; so do we (see test_invalid_configs)."""
    raw = _with(gt.DENSE, per_layer_config={"1": {"num_key_value_heads": 1}})
    model_type = raw.pop("model_type")
    assert model_type == "gemma4_text"
    with pytest.raises(ValueError, match="not homogeneous"):
        with torch.device("meta"):
            transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**raw))


def test_explicit_per_layer_config_is_used_as_is():
    """With per_layer_config present, global_head_dim does not apply (here: full layers keep 16)."""
    raw = _with(gt.DENSE, per_layer_config={})
    cfg = load_config(raw).text
    assert set(cfg.head_dims) == {16}
    hcfg = gt.hf_config(raw)
    assert hcfg.per_layer_config[4].head_dim == 16


def test_global_head_dim_defaults_to_512():
    cfg = load_config({"model_type": "gemma4_text", "num_hidden_layers": 6, "head_dim": 32}).text
    assert cfg.head_dims == (32,) * 5 + (512,)


def test_gemma4_nested_layout():
    raw = gt.multimodal(gt.E2B_TEXT)
    mc = load_config(raw)
    assert mc.model_type == "gemma4" and mc.weight_prefix == "model.language_model."
    assert mc.mm_placeholder_token_ids == (250, 251, 252)
    assert mc.text == load_config(gt.E2B_TEXT).text
    assert load_config(gt.DENSE).weight_prefix == "model."
    assert load_config(gt.DENSE).mm_placeholder_token_ids == ()


def test_load_from_directory(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(gt.DENSE))
    assert load_config(tmp_path).text == load_config(gt.DENSE).text
    assert load_config(tmp_path / "config.json").raw["model_type"] == "gemma4_text"
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path / "nowhere")


def test_rope_parameters():
    cfg = load_config(gt.PATTERN).text
    assert cfg.rope[FULL].rope_type == "proportional"
    assert (cfg.rope[FULL].partial_rotary_factor, cfg.rope[FULL].factor, cfg.rope[FULL].theta) == (0.5, 2.0, 1e6)
    assert cfg.rope[SLIDING].rope_type == "default" and cfg.rope[SLIDING].theta == 1e4
    default = load_config({"model_type": "gemma4_text", "num_hidden_layers": 2}).text
    assert default.rope[FULL].partial_rotary_factor == 0.25 and default.rope[FULL].factor == 1.0


def test_bidirectional_all_window():
    cfg = load_config({**gt.DENSE, "use_bidirectional_attention": "all", "sliding_window": 9}).text
    hcfg = gt.hf_config({**gt.DENSE, "use_bidirectional_attention": "all", "sliding_window": 9})
    w = hcfg.sliding_window  # HF stores W//2 + 1
    assert w == 5
    assert cfg.attention_window(0) == (w, w)  # sdpa: |q-k| <= W'
    assert cfg.attention_window(cfg.num_hidden_layers - 1) == (None, None)
    assert not cfg.is_causal


def _with(base: dict, **kw) -> dict:
    d = copy.deepcopy(base)
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"model_type": "gemma3_text"}, r"unsupported model_type 'gemma3_text'; supported: gemma4, gemma4_text"),
        ({}, r"unsupported model_type None"),
        (_with(gt.DENSE, layer_types=[S, "chunked", S, S, F]), r"'layer_types'.*unknown layer type"),
        (_with(gt.DENSE, layer_types=[S, F]), r"'layer_types'.*2 entries but num_hidden_layers is 5"),
        (_with(gt.DENSE, num_kv_shared_layers=4), r"'num_kv_shared_layers'.*every layer type needs"),
        (_with(gt.DENSE, num_kv_shared_layers=9), r"'num_kv_shared_layers'.*exceeds num_hidden_layers=5"),
        (_with(gt.DENSE, num_key_value_heads=3), r"'num_key_value_heads'.*3 KV heads do not divide 4"),
        (_with(gt.DENSE, per_layer_config={"07": {"head_dim": 8}}), r"'per_layer_config'.*layer index 7"),
        (_with(gt.DENSE, per_layer_config={"1": {"skip": ["mlp"]}}), r"unsupported override\(s\) \['skip'\]"),
        (_with(gt.DENSE, per_layer_config={"1": {"intermediate_size": 8}}), r"unsupported override\(s\) \['intermediate_size'\]"),
        (_with(gt.DENSE, per_layer_config={"1": {"num_key_value_heads": 1}}),
         r"layers of type 'sliding_attention' must share head_dim and num_key_value_heads.*\(16, 1\), \(16, 2\)"),
        (_with(gt.DENSE, rope_parameters={S: {"rope_type": "default", "rope_theta": 1e4}}), r"no entry for layer type"),
        (
            _with(gt.DENSE, rope_parameters={S: {"rope_type": "yarn", "rope_theta": 1.0}, F: {"rope_theta": 1.0}}),
            r"unsupported RoPE type 'yarn'",
        ),
        (_with(gt.DENSE, hidden_activation="silu"), r"'hidden_activation'.*'silu'"),
        (_with(gt.DENSE, tie_word_embeddings=False), r"'tie_word_embeddings'"),
        (_with(gt.DENSE, hidden_size=0), r"'hidden_size': must be >= 1, got 0"),
        (_with(gt.DENSE, sliding_window="8"), r"'sliding_window': must be an integer"),
        (_with(gt.DENSE, enable_moe_block=True, num_experts=4, top_k_experts=8, moe_intermediate_size=8),
         r"'top_k_experts': 8 exceeds num_experts=4"),
        (_with(gt.DENSE, enable_moe_block=True), r"'num_experts': is required"),
        (_with(gt.DENSE, use_bidirectional_attention="text"), r"'use_bidirectional_attention'"),
        ({"model_type": "gemma4", "text_config": 3}, r"'text_config': must be an object"),
    ],
)  # fmt: skip
def test_invalid_configs(raw, match):
    with pytest.raises(ValueError, match=match):
        load_config(raw)

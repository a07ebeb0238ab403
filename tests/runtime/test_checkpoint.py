"""The random-checkpoint writer against HF transformers 5.23's own save/load (spec §9.1)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from gemma4x import checkpoint, presets
from gemma4x.loader import scan_checkpoint


def _transformers():
    """HF transformers (the oracle), or skip: the writer itself never needs it."""
    return pytest.importorskip("transformers")


_S, _F = "sliding_attention", "full_attention"

# Three text decoders covering every optional tensor group: plain dense with biases,
# MoE with k_eq_v full layers (26B-A4B-like), PLE + KV sharing + double-wide (E2B-like).
_BASE = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "global_head_dim": 16,
    "sliding_window": 4,
    "max_position_embeddings": 256,
    "hidden_size_per_layer_input": 0,
}
TEXT_CONFIGS = {
    "dense": {**_BASE, "num_hidden_layers": 3, "layer_types": [_S, _F, _F], "attention_bias": True},
    "moe_k_eq_v": {
        **_BASE,
        "num_hidden_layers": 4,
        "layer_types": [_S, _S, _F, _F],
        "num_key_value_heads": 2,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 8,
    },
    "ple_kv_shared": {
        **_BASE,
        "num_hidden_layers": 6,
        "layer_types": [_S, _S, _F, _S, _S, _F],
        "hidden_size_per_layer_input": 4,
        "vocab_size_per_layer_input": 96,
        "num_kv_shared_layers": 2,
        "use_double_wide_mlp": True,
        "final_logit_softcapping": 30.0,
    },
}


def _as_model_type(text: dict, model_type: str) -> dict:
    text = copy.deepcopy(text)
    if model_type == "gemma4_text":
        return {"model_type": "gemma4_text", **text}
    return {"model_type": "gemma4", "text_config": text, "vision_config": None, "audio_config": None}


def _hf_model(config_dict: dict):
    transformers = _transformers()
    if config_dict["model_type"] == "gemma4":
        cfg = transformers.Gemma4Config(**{k: v for k, v in config_dict.items() if k != "model_type"})
        return transformers.Gemma4ForConditionalGeneration(cfg)
    cfg = transformers.Gemma4TextConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})
    return transformers.Gemma4ForCausalLM(cfg)


def _shapes(ckpt_dir) -> dict[str, tuple[int, ...]]:
    return {k: e.shape for k, e in scan_checkpoint(ckpt_dir).items()}


@pytest.mark.parametrize("model_type", ["gemma4", "gemma4_text"])
@pytest.mark.parametrize("name", list(TEXT_CONFIGS))
def test_keys_and_shapes_match_hf_save_pretrained(tmp_path, name, model_type):
    config = _as_model_type(TEXT_CONFIGS[name], model_type)
    torch.manual_seed(0)
    _hf_model(config).save_pretrained(tmp_path / "hf")
    checkpoint.write_random_checkpoint(tmp_path / "ours", config, dtype=torch.float32)

    hf, ours = _shapes(tmp_path / "hf"), _shapes(tmp_path / "ours")
    assert sorted(set(hf) - set(ours)) == [], "tensors HF writes that we do not"
    assert sorted(set(ours) - set(hf)) == [], "tensors we write that HF does not"
    bad = {k: (ours[k], hf[k]) for k in hf if ours[k] != hf[k]}
    assert bad == {}


@pytest.mark.parametrize("model_type", ["gemma4", "gemma4_text"])
@pytest.mark.parametrize("name", list(TEXT_CONFIGS))
def test_hf_loads_our_checkpoint_without_missing_or_unexpected_keys(tmp_path, name, model_type):
    config = _as_model_type(TEXT_CONFIGS[name], model_type)
    out = checkpoint.write_random_checkpoint(tmp_path, config, seed=3, max_shard_bytes=20_000)
    assert (out / checkpoint.INDEX_FILE).is_file()
    transformers = _transformers()
    cls = transformers.Gemma4ForConditionalGeneration if model_type == "gemma4" else transformers.Gemma4ForCausalLM
    model, info = cls.from_pretrained(out, output_loading_info=True, dtype=torch.bfloat16)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]

    # Values arrive intact, and random weights give finite, non-degenerate logits.
    prefix = "model.language_model." if model_type == "gemma4" else "model."
    key = prefix + "layers.0.self_attn.q_proj.weight"
    with safe_open(str(out / json.loads((out / checkpoint.INDEX_FILE).read_text())["weight_map"][key]), "pt") as f:
        expected = f.get_tensor(key)
    assert torch.equal(model.state_dict()[key], expected)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 5, 17, 42, 7, 9]])).logits.float()
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 30.0


def test_sharding_does_not_change_values_and_respects_the_limit(tmp_path):
    config = presets.preset("tiny-moe")
    single = checkpoint.write_random_checkpoint(tmp_path / "one", config, seed=7)
    limit = 150_000
    sharded = checkpoint.write_random_checkpoint(tmp_path / "many", config, seed=7, max_shard_bytes=limit)
    index = json.loads((sharded / checkpoint.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (sharded / checkpoint.SINGLE_FILE).exists()
    entries = scan_checkpoint(sharded)
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in entries.values())
    for f in files:
        in_file = [e for e in entries.values() if e.file.name == f]
        assert sum(e.nbytes for e in in_file) <= limit or len(in_file) == 1
    with safe_open(str(single / checkpoint.SINGLE_FILE), "pt") as a:
        for k, e in entries.items():
            with safe_open(str(e.file), "pt") as b:
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    # Rewriting unsharded into the same directory removes the old shards and index.
    checkpoint.write_random_checkpoint(tmp_path / "many", config, seed=7)
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == [checkpoint.SINGLE_FILE]
    assert not (sharded / checkpoint.INDEX_FILE).exists()


def test_values_follow_the_documented_distributions(tmp_path):
    out = checkpoint.write_random_checkpoint(tmp_path, presets.preset("tiny-moe"), seed=1, dtype=torch.float32)
    p = "model.language_model."
    with safe_open(str(out / checkpoint.SINGLE_FILE), "pt") as f:
        emb = f.get_tensor(p + "embed_tokens.weight")
        norm = f.get_tensor(p + "layers.1.input_layernorm.weight")
        scalar = f.get_tensor(p + "layers.1.layer_scalar")
        down = f.get_tensor(p + "layers.1.experts.down_proj")
    assert abs(emb.std().item() - 64**-0.5) < 0.01 and abs(emb.mean().item()) < 0.01
    assert abs(norm.mean().item() - 1.0) < 0.05 and 0.05 < norm.std().item() < 0.2
    assert scalar.shape == (1,) and 0.5 < scalar.item() < 1.5
    assert abs(down.std().item() - 32**-0.5) < 0.02
    # Different seeds give different weights; the same seed the same ones.
    def embedding(seed):
        d = checkpoint.write_random_checkpoint(tmp_path / f"s{seed}", presets.preset("tiny-moe"), seed=seed, dtype=torch.float32)
        with safe_open(str(d / checkpoint.SINGLE_FILE), "pt") as f:
            return f.get_tensor(p + "embed_tokens.weight")

    assert torch.equal(embedding(1), emb)
    assert not torch.equal(embedding(2), emb)


def test_config_and_generation_config_files(tmp_path):
    config = presets.preset("tiny-moe")
    out = checkpoint.write_random_checkpoint(tmp_path, config)
    written = json.loads((out / "config.json").read_text())
    assert written["text_config"] == config["text_config"]
    assert written["dtype"] == "bfloat16" and written["architectures"] == ["Gemma4ForConditionalGeneration"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    # HF reads our config.json back to the same text config.
    hf = _transformers().AutoConfig.from_pretrained(out)
    assert hf.text_config.num_experts == 8 and hf.text_config.layer_types == config["text_config"]["layer_types"]


def test_rejects_towers_and_bad_configs(tmp_path):
    config = presets.preset("tiny-moe")
    config["vision_config"] = {"hidden_size": 32}
    with pytest.raises(ValueError, match="vision_config"):
        checkpoint.write_random_checkpoint(tmp_path, config)
    config = presets.preset("tiny-moe")
    config["text_config"]["top_k_experts"] = 99
    with pytest.raises(ValueError, match="top_k_experts"):
        checkpoint.write_random_checkpoint(tmp_path, config)
    with pytest.raises(ValueError, match="model_type"):
        checkpoint.write_random_checkpoint(tmp_path, {"model_type": "llama"})


@pytest.mark.parametrize("name", ["e2b", "e4b", "26b-a4b", "31b"])
def test_real_size_presets_have_the_published_parameter_counts(name):
    # Counted from the specs without allocating anything; HF builds the same shapes on meta.
    from gemma4x.config import load_config

    config = presets.preset(name)
    specs = checkpoint.text_tensor_specs(load_config(config))
    ours = {s.name: s.shape for s in specs}
    with torch.device("meta"):
        hf = _hf_model(config)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert ours == hf_shapes
    billions = sum(s.numel for s in specs) / 1e9
    # Published totals (text decoder incl. embeddings): E2B ~5.1B with PLE, E4B ~8B,
    # 26B-A4B ~25.2B, 31B ~30.7B. Loose bounds: these guard gross shape errors.
    expected = {"e2b": (4.0, 5.5), "e4b": (6.5, 8.5), "26b-a4b": (24.0, 26.5), "31b": (29.5, 31.5)}[name]
    assert expected[0] < billions < expected[1], billions


def test_tiny_tokenizer_roundtrip(tmp_path):
    pytest.importorskip("tokenizers")
    from gemma4x.tokenizer import load_tokenizer

    checkpoint.write_tiny_tokenizer(tmp_path, 512)
    tok = load_tokenizer(tmp_path)
    assert 260 <= tok.vocab_size <= 512
    assert [tok.token_id(t) for t in checkpoint.TINY_SPECIAL_TOKENS] == [0, 1, 2, 3]
    text = "The quick brown fox says héllo, 42!"
    ids = tok.encode(text)
    assert ids[0] == 2 and ids.count(2) == 1
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=False) == ids[1:]
    with pytest.raises(ValueError, match="too small"):
        checkpoint.write_tiny_tokenizer(tmp_path, 100)

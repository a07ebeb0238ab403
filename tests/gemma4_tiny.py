"""Tiny Gemma 4 configs and HF-made checkpoints shared by the model and runtime tests.

Every checkpoint is written by transformers' own ``save_pretrained`` from a model built
with a fixed seed whose parameters and buffers are all re-drawn (norm weights, layer
scalars and router scales away from 1), so a wrong rounding point, a missing norm or a
``1 + w`` slip changes the logits visibly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

S, F = "sliding_attention", "full_attention"

_COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "sliding_window": 8,
    "final_logit_softcapping": 30.0,
    "hidden_size_per_layer_input": 0,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": [1, 106 % 256],
}

# Dense, default layer pattern (5 layers: last one forced to full), older JSON form.
DENSE = {**_COMMON, "model_type": "gemma4_text", "num_hidden_layers": 5}

# MoE + attention_k_eq_v (full layers: no v_proj, 1 global KV head), multimodal layout.
MOE_TEXT = {
    **_COMMON,
    "model_type": "gemma4_text",
    "num_hidden_layers": 4,
    "layer_types": [S, F, S, F],
    "attention_k_eq_v": True,
    "num_global_key_value_heads": 1,
    "enable_moe_block": True,
    "num_experts": 8,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
    "intermediate_size": 64,
    "use_bidirectional_attention": "vision",
}

# E2B-like: PLE, KV sharing (last 3 layers reuse), double-wide MLP on the reuse layers.
E2B_TEXT = {
    **_COMMON,
    "model_type": "gemma4_text",
    "num_hidden_layers": 6,
    "layer_types": [S, S, F, S, S, F],
    "num_key_value_heads": 1,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": 256,
    "num_kv_shared_layers": 3,
    "use_double_wide_mlp": True,
}

# Non-default pattern (full first), partial RoPE 0.5 with factor 2, no soft-cap, window 6,
# attention biases.
PATTERN = {
    **_COMMON,
    "model_type": "gemma4_text",
    "num_hidden_layers": 6,
    "attention_bias": True,
    "layer_types": [F, S, S, F, S, S],  # last forced to full
    "sliding_window": 6,
    "final_logit_softcapping": None,
    "rope_parameters": {
        S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1000000.0, "factor": 2.0},
    },
}


def multimodal(text_cfg: dict) -> dict:
    """Wrap a text config as a ``gemma4`` (Gemma4ForConditionalGeneration) config without towers."""
    t = {k: v for k, v in text_cfg.items() if k != "model_type"}
    # Placeholder ids inside the tiny vocabulary, so the "placeholder -> pad" rule is exercised.
    return {
        "model_type": "gemma4",
        "text_config": t,
        "vision_config": None,
        "audio_config": None,
        "image_token_id": 250,
        "video_token_id": 251,
        "audio_token_id": 252,
    }


CONFIGS = {
    "dense": DENSE,
    "moe_kv_eq": multimodal(MOE_TEXT),
    "e2b_like": multimodal(E2B_TEXT),
    "pattern": PATTERN,
}


def hf_config(cfg: dict):
    """The transformers config object for one of our config dicts."""
    from transformers import Gemma4Config, Gemma4TextConfig

    d = copy.deepcopy(cfg)
    mt = d.pop("model_type")
    if mt == "gemma4_text":
        return Gemma4TextConfig(**d)
    return Gemma4Config(**d)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter and persistent buffer (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or "inv_freq" in name or name.endswith("embed_scale") or t.dim() == 0:
            continue  # derived buffers and tower scalars (clip bounds, soft-caps) keep their values
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name or leaf in ("scale", "per_expert_scale"):
            val = 1.0 + 0.3 * torch.randn(t.shape, generator=g)
        elif leaf == "layer_scalar":
            val = 0.5 + torch.rand(t.shape, generator=g)
        elif "embed_tokens" in name:
            val = 0.5 * torch.randn(t.shape, generator=g)
        else:
            fan_in = t.shape[-1]
            val = torch.randn(t.shape, generator=g) * (1.5 / fan_in**0.5)
        t.copy_(val.to(t.dtype))


def hf_model(cfg: dict, seed: int = 0, dtype=torch.float32):
    """A randomised HF model (CausalLM for gemma4_text, ConditionalGeneration for gemma4), eval mode."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    hcfg = hf_config(cfg)
    torch.manual_seed(seed)
    cls = Gemma4ForCausalLM if cfg["model_type"] == "gemma4_text" else Gemma4ForConditionalGeneration
    model = cls(hcfg)
    randomize(model, seed)
    return model.to(dtype).eval()


def make_checkpoint(cfg: dict, path: Path, seed: int = 0, *, legacy_json: bool = False, generation: dict | None = None):
    """``save_pretrained`` a randomised HF model to ``path``; returns the fp32 HF model.

    ``legacy_json`` rewrites config.json in the older hub form (``global_head_dim`` /
    ``num_global_key_value_heads`` instead of ``per_layer_config``).
    """
    model = hf_model(cfg, seed)
    model.save_pretrained(path)
    if legacy_json:
        cfg_path = Path(path) / "config.json"
        saved = json.loads(cfg_path.read_text())
        text = saved["text_config"] if saved["model_type"] == "gemma4" else saved
        text.pop("per_layer_config", None)
        src = cfg.get("text_config", cfg)
        for key in ("global_head_dim", "num_global_key_value_heads"):
            if key in src:
                text[key] = src[key]
        cfg_path.write_text(json.dumps(saved, indent=2))
    if generation is not None:
        gen_path = Path(path) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        gen.update(generation)
        gen_path.write_text(json.dumps(gen, indent=2))
    return model


# --------------------------------------------------------------------------------------
# NVFP4 (NVIDIA ModelOpt) checkpoints


def modelopt_export(cfg: dict, path: Path, algo: str | tuple[str, ...], seed: int = 0):
    """Quantize a randomised HF model with NVIDIA ModelOpt (``mtq.<algo>``, e.g. ``NVFP4_DEFAULT_CFG``;
    several presets have their ``quant_cfg`` lists concatenated, e.g. ``+ FP8_KV_CFG``) and write it with ModelOpt's ``export_hf_checkpoint``; returns the fp32 HF model *before*
    quantization (a copy). Needs ``nvidia-modelopt``; runs on the CPU.

    Two settings make ModelOpt 0.47 work on a model built from a config: the experts must
    run HF's ``eager`` implementation (ModelOpt intercepts ``F.linear`` per expert; the default
    ``grouped_mm`` bypasses it and leaves the expert quantizers uncalibrated), and
    ``config.architectures`` must be set (its export reads it to detect multimodal models).
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = hf_model(cfg, seed)
    original = copy.deepcopy(model)
    model.set_experts_implementation("eager")
    model.config.architectures = [type(model).__name__]
    vocab = model.config.get_text_config().vocab_size

    def calibrate(m):
        g = torch.Generator().manual_seed(seed)
        for _ in range(2):
            m(torch.randint(3, vocab, (2, 12), generator=g))

    presets = [getattr(mtq, a) for a in ((algo,) if isinstance(algo, str) else algo)]
    qcfg = copy.deepcopy(presets[0])
    qcfg["quant_cfg"] = [c for p in presets for c in p["quant_cfg"]]
    with torch.no_grad():
        mtq.quantize(model, qcfg, calibrate)
        export_hf_checkpoint(model, export_dir=str(path))
    return original


def nvfp4_oracle(cfg: dict, path: Path, dequantize) -> torch.nn.Module:
    """An fp32 HF model holding the dequantised weights of the NVFP4 checkpoint at ``path``.

    ``dequantize(weight, weight_scale, weight_scale_2) -> fp32 [N, K]``. Per-expert tensors
    are stacked back into ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj``.
    """
    import re

    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    out, experts = {}, {}
    for k, v in sd.items():
        if k.endswith((".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")):
            continue  # scales (FP8 KV-cache ones included) are not HF parameters
        if k.endswith(".weight") and k[: -len("weight")] + "weight_scale" in sd:
            b = k[: -len("weight")]
            v = dequantize(v, sd[b + "weight_scale"], sd[b + "weight_scale_2"]).float()
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", k)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
        else:
            out[k] = v.float()
    for base, d in experts.items():
        n = 1 + max(e for e, _ in d)
        out[base + ".gate_up_proj"] = torch.stack([torch.cat([d[(e, "gate")], d[(e, "up")]]) for e in range(n)])
        out[base + ".down_proj"] = torch.stack([d[(e, "down")] for e in range(n)])
    model = hf_model(cfg, seed=12345)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing
    return model.eval()

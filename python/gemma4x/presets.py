"""Config presets: the released Gemma 4 text decoders' shapes, and tiny ones for demos and tests.

Each preset is a plain dict in HF ``config.json`` form (``model_type: gemma4`` with a
``text_config``, towers set to null), so a checkpoint written from it goes through the
same config path as a downloaded one. Real-shape values follow /work/shared/gemma4-shapes.md
and spec §1.7; a real checkpoint's own ``config.json`` always wins over these.

Use them for random-weight benchmarks at real shapes::

    from gemma4x import checkpoint, presets
    checkpoint.write_random_checkpoint("/tmp/g26b", presets.preset("26b-a4b"), device="cuda")
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "preset", "preset_names"]

_S, _F = "sliding_attention", "full_attention"

# Shared by every released text decoder (gemma4-shapes.md, "Common to all text models").
_ROPE = {
    _S: {"rope_type": "default", "rope_theta": 10000.0},
    _F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}
_COMMON_TEXT: dict[str, Any] = {
    "model_type": "gemma4_text",
    "vocab_size": 262144,
    "head_dim": 256,
    "global_head_dim": 512,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "tie_word_embeddings": True,
    "rope_parameters": _ROPE,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "final_logit_softcapping": 30.0,
    "vocab_size_per_layer_input": 262144,
    "hidden_size_per_layer_input": 0,
    "attention_k_eq_v": False,
    "num_global_key_value_heads": None,
    "num_kv_shared_layers": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
    "use_bidirectional_attention": None,
}


def _pattern(num_layers: int, full_every: int) -> list[str]:
    """``full_every - 1`` sliding layers then one full layer, repeated (last layer is full)."""
    return [_F if (i + 1) % full_every == 0 else _S for i in range(num_layers)]


def _wrap(text: dict[str, Any]) -> dict[str, Any]:
    """A text-only ``gemma4`` (Gemma4ForConditionalGeneration) config around ``text``."""
    full = {**_COMMON_TEXT, **text}
    full["layer_types"] = _pattern(full.pop("num_hidden_layers"), full.pop("_full_every"))
    full["num_hidden_layers"] = len(full["layer_types"])
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": full,
        "vision_config": None,
        "audio_config": None,
        "boi_token_id": 255999,
        "eoi_token_id": 258882,
        "image_token_id": 258880,
        "video_token_id": 258884,
        "boa_token_id": 256000,
        "eoa_token_index": 258883,
        "audio_token_id": 258881,
        "tie_word_embeddings": True,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # E2B: PLE, the last 20 layers reuse KV, double-wide MLP on those layers; full every 5th.
    "e2b": _wrap(
        {
            "hidden_size": 1536,
            "intermediate_size": 6144,
            "num_hidden_layers": 35,
            "_full_every": 5,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "sliding_window": 512,
            "max_position_embeddings": 131072,
            "hidden_size_per_layer_input": 256,
            "num_kv_shared_layers": 20,
            "use_double_wide_mlp": True,
        }
    ),
    # E4B: PLE, the last 18 layers reuse KV; full every 6th.
    "e4b": _wrap(
        {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 42,
            "_full_every": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "sliding_window": 512,
            "max_position_embeddings": 131072,
            "hidden_size_per_layer_input": 256,
            "num_kv_shared_layers": 18,
        }
    ),
    # 26B-A4B: dense MLP beside 128 experts (top-8); full layers share K and V (k_eq_v).
    "26b-a4b": _wrap(
        {
            "hidden_size": 2816,
            "intermediate_size": 2112,
            "num_hidden_layers": 30,
            "_full_every": 6,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "num_global_key_value_heads": 2,
            "attention_k_eq_v": True,
            "sliding_window": 1024,
            "max_position_embeddings": 262144,
            "enable_moe_block": True,
            "num_experts": 128,
            "top_k_experts": 8,
            "moe_intermediate_size": 704,
            "use_bidirectional_attention": "vision",
        }
    ),
    # 31B dense.
    "31b": _wrap(
        {
            "hidden_size": 5376,
            "intermediate_size": 21504,
            "num_hidden_layers": 60,
            "_full_every": 6,
            "num_attention_heads": 32,
            "num_key_value_heads": 16,
            "num_global_key_value_heads": 4,
            "attention_k_eq_v": True,
            "sliding_window": 1024,
            "max_position_embeddings": 262144,
            "use_bidirectional_attention": "vision",
        }
    ),
    # Tiny 26B-A4B look-alike (~1 MB in bf16) for the demo and CPU tests: MoE beside the
    # dense MLP, k_eq_v full layers with their own head dim and KV heads, a window short
    # enough that a demo prompt crosses it.
    "tiny-moe": _wrap(
        {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 6,
            "_full_every": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "sliding_window": 16,
            "max_position_embeddings": 4096,
            "enable_moe_block": True,
            "num_experts": 8,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
            "eos_token_id": 1,
        }
    ),
    # Tiny E2B look-alike: PLE, KV sharing (last 2 layers) and the double-wide MLP.
    "tiny-ple": _wrap(
        {
            "vocab_size": 512,
            "vocab_size_per_layer_input": 512,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 6,
            "_full_every": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "global_head_dim": 32,
            "sliding_window": 16,
            "max_position_embeddings": 4096,
            "hidden_size_per_layer_input": 16,
            "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "eos_token_id": 1,
        }
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str) -> dict[str, Any]:
    """A fresh copy of preset ``name`` (callers may edit it)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])

"""Gemma 4 configuration, normalised once from HF ``config.json``; all validation lives here.

The HF ``Gemma4TextConfig`` derives a lot at construction time (``__post_init__``) and
per layer (``per_layer_config``, ``kv_sharing_modes``). This module reproduces that
derivation exactly (transformers 5.23, spec §1.1-1.3) and flattens the result into
per-layer tuples, so model code reads ``cfg.head_dims[l]`` instead of re-deriving it
and the runtime never needs to know a Gemma quirk.

Public names:

- ``SUPPORTED_MODEL_TYPES``: the ``model_type`` values accepted (``gemma4``, ``gemma4_text``).
- ``RopeConfig``: RoPE parameters of one layer type (``rope_type``, ``theta``,
  ``partial_rotary_factor``, ``factor``).
- ``TextConfig``: the text decoder. Scalars as in HF plus per-layer tuples ``layer_types``,
  ``head_dims``, ``num_kv_heads``, ``intermediate_sizes`` (double-wide applied),
  ``kv_sharing`` (None/"store"/"reuse"), ``kv_source_layer``, ``has_v_proj``; ``rope``
  (layer type -> RopeConfig) and the attention-window semantics ``attention_window(l)``.
- ``ModelConfig``: ``model_type``, ``text`` (a TextConfig), ``weight_prefix`` of the text
  weights in the checkpoint, multimodal placeholder ids, ``quantization`` (a QuantConfig
  or None) and the ``raw`` JSON dict.
- ``QuantConfig``: an NVFP4 checkpoint's quantization (ModelOpt ``hf_quant_config.json`` or
  ``config.json: quantization_config``): ``quant_algo``, ``group_size``, the
  ``exclude_modules`` globs, and ``modules``, the text-decoder modules stored in NVFP4
  (names relative to the weight prefix; also in ``TextConfig.nvfp4_modules``).
- ``nvfp4_quant_config(cfg, scope)``: the QuantConfig of quantizing a BF16 checkpoint at
  load (``scope`` ``"experts"`` or ``"all"``), with ModelOpt's exclude list for that choice.
- ``load_config(path_or_dict)``: a checkpoint directory, a ``config.json`` path or an
  already parsed dict -> ``ModelConfig``. Raises ``ValueError`` naming the bad field.
- ``parse_text_config(dict)``: the text part alone -> ``TextConfig``.
- ``SLIDING``, ``FULL``: the two layer-type strings.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("gemma4", "gemma4_text")

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# Where the text decoder's tensors live in each checkpoint layout (spec §9).
_WEIGHT_PREFIX = {"gemma4": "model.language_model.", "gemma4_text": "model."}

# HF Gemma4TextConfig defaults (spec §1.1). Keys absent from the JSON take these values.
_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "rope_parameters": None,
    "attention_bias": False,
    "sliding_window": 512,
    "layer_types": None,
    "final_logit_softcapping": None,
    "use_bidirectional_attention": None,
    "vocab_size_per_layer_input": 262144,
    "hidden_size_per_layer_input": 256,
    "attention_k_eq_v": False,
    "num_kv_shared_layers": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
}

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}

# gemma4 (multimodal) top-level placeholder ids; text-only prompts map them to pad (spec §3).
_MM_TOKEN_DEFAULTS = {"image_token_id": 258880, "video_token_id": 258884, "audio_token_id": 258881}

# Activations HF maps to `gelu(x, approximate="tanh")`; the only one Gemma 4 uses.
_GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_python_tanh")

# Attributes a `per_layer_config` entry may override. HF 5.23 builds the MLP from the global
# intermediate_size (a per-layer one makes it raise), so only attention shapes vary.
_PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE of one layer type.

    ``default``: ``inv_freq[i] = theta^(-2i/d)`` for all ``d/2`` pairs.
    ``proportional``: the first ``int(partial_rotary_factor*d//2)`` pairs as default (the
    exponent still divides by the full ``d``), the rest 0; everything divided by ``factor``.
    """

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    """Normalised Gemma 4 text-decoder config (one value or one tuple entry per layer)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # the JSON value; per-layer widths are in intermediate_sizes
    hidden_activation: str
    rms_norm_eps: float
    max_position_embeddings: int
    pad_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int  # W as written in config.json
    final_logit_softcapping: float | None
    use_bidirectional_attention: str | None  # None | "vision" | "all"
    vocab_size_per_layer_input: int
    hidden_size_per_layer_input: int  # P; 0 = no per-layer embeddings
    attention_k_eq_v: bool
    num_kv_shared_layers: int
    enable_moe_block: bool
    use_double_wide_mlp: bool
    num_experts: int | None
    top_k_experts: int | None
    moe_intermediate_size: int | None
    # Per-layer, length num_hidden_layers.
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    intermediate_sizes: tuple[int, ...]
    kv_sharing: tuple[str | None, ...]
    kv_source_layer: tuple[int, ...]
    has_v_proj: tuple[bool, ...]
    rope: Mapping[str, RopeConfig] = field(default_factory=dict)
    # Modules stored in NVFP4 (names as in the model: "layers.3.experts", "layers.0.self_attn.q_proj");
    # filled from ModelConfig.quantization, empty for BF16 checkpoints.
    nvfp4_modules: frozenset[str] = frozenset()
    nvfp4_group_size: int = 16
    nvfp4_input_scales: bool = True  # W4A4 exports carry input_scale; W4A16 ones do not
    # The export's KV-cache quantization ("FP8": k_proj.k_scale / v_proj.v_scale tensors). Our
    # KV cache stays in the model dtype, so those scales are read past (ignored), not used.
    kv_cache_quant_algo: str | None = None

    def is_nvfp4(self, module: str) -> bool:
        return module in self.nvfp4_modules

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    @property
    def first_kv_shared_layer(self) -> int:
        """Index of the first ``reuse`` layer (== num_hidden_layers when there is none)."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def is_causal(self) -> bool:
        return self.use_bidirectional_attention != "all"

    def attention_window(self, layer: int) -> tuple[int | None, int | None]:
        """Keys visible to query position q in ``layer``: ``q - left <= k <= q + right``.

        ``None`` means unbounded. Causal: full layers ``(None, 0)``; sliding layers
        ``(W-1, 0)``, i.e. ``q-W < k <= q`` (spec §2.11.2). ``"vision"`` only changes masks
        around image/video tokens (spec §2.11.3), so text-only prompts stay causal.

        With ``use_bidirectional_attention == "all"`` HF's config stores ``W' = W//2 + 1``
        and its sdpa/eager masks allow ``|q-k| <= W'`` on sliding layers and every key on
        full layers; we follow sdpa (flash-attn would allow ``|q-k| <= W'-1``, spec
        §2.11.5). Generation then caches ``W'`` past keys per sliding layer and applies the
        same rule to each new token (HF's own generate caches only ``W'-1``; no released
        checkpoint generates in this mode).
        """
        sliding = self.layer_types[layer] == SLIDING
        if self.is_causal:
            return (self.sliding_window - 1, 0) if sliding else (None, 0)
        if sliding:
            w = self.sliding_window // 2 + 1
            return (w, w)
        return (None, None)


@dataclass(frozen=True)
class ModelConfig:
    """A checkpoint's config: which architecture, its text decoder and where its weights live."""

    model_type: str
    text: TextConfig
    weight_prefix: str  # prefix of the text decoder's tensor names in the checkpoint
    mm_placeholder_token_ids: tuple[int, ...]  # ids the text model maps to pad (gemma4 only)
    raw: Mapping[str, Any] = field(default_factory=dict)
    quantization: QuantConfig | None = None


# --------------------------------------------------------------------------------------
# Quantization (NVIDIA ModelOpt NVFP4 exports)

HF_QUANT_CONFIG = "hf_quant_config.json"
# quant_algo -> whether its linears carry an activation `input_scale` (W4A4) or not (W4A16).
_NVFP4_ALGOS = {"NVFP4": True, "W4A16_NVFP4": False}
QUANT_SCOPES = ("experts", "all")


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linears are quantized (ModelOpt NVFP4).

    ``exclude_modules`` are ModelOpt's ``fnmatch`` globs on full HF module names
    (``model.layers.0.self_attn*``, ``lm_head``); a quantizable module is NVFP4 unless one
    matches. ``modules`` is the resolved result, relative to the text weight prefix.
    Quantizable: attention q/k/v/o, MLP gate/up/down, the routed experts (one module per
    layer), the per-layer-embedding linears. Router, embeddings and the tied LM head are
    always BF16.
    """

    quant_algo: str  # "NVFP4" (W4A4: with input_scale) or "W4A16_NVFP4"
    group_size: int
    exclude_modules: tuple[str, ...]
    modules: frozenset[str]
    source: str  # where it came from: "hf_quant_config.json", "config.json", "quantized at load (experts)"
    # "FP8" when the export also calibrated an FP8 KV cache (its k_scale / v_scale are ignored).
    kv_cache_quant_algo: str | None = None

    @property
    def has_input_scales(self) -> bool:
        return _NVFP4_ALGOS[self.quant_algo]

    def quantization_config(self) -> dict[str, Any]:
        """The ``config.json: quantization_config`` entry ModelOpt 0.47 writes for this quantization."""
        fmt = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": self.group_size}
        group: dict[str, Any] = {"weights": dict(fmt), "targets": ["Linear"]}
        if self.has_input_scales:
            group = {"input_activations": dict(fmt), **group}
        doc: dict[str, Any] = {
            "config_groups": {"group_0": group},
            "ignore": list(self.exclude_modules),
            "quant_algo": self.quant_algo,
            "producer": {"name": "gemma4x", "version": "0"},
            "quant_method": "modelopt",
        }
        if self.kv_cache_quant_algo == "FP8":
            doc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        return doc

    def hf_quant_config(self) -> dict[str, Any]:
        """The ``hf_quant_config.json`` document ModelOpt writes for this quantization."""
        return {
            "producer": {"name": "gemma4x", "version": "0"},
            "quantization": {
                "quant_algo": self.quant_algo,
                "kv_cache_quant_algo": self.kv_cache_quant_algo,
                "group_size": self.group_size,
                "exclude_modules": list(self.exclude_modules),
            },
        }


def _quantizable(text: TextConfig) -> dict[str, dict[str, int]]:
    """Module name -> its reduction widths (``K`` of each GEMM, by config field), in module order."""
    H, P = text.hidden_size, text.hidden_size_per_layer_input
    out: dict[str, dict[str, int]] = {}
    for i in range(text.num_hidden_layers):
        q = f"layers.{i}."
        projs = ["q_proj"]
        if text.kv_sharing[i] != "reuse":
            projs.append("k_proj")
            if text.has_v_proj[i]:
                projs.append("v_proj")
        for p in projs:
            out[f"{q}self_attn.{p}"] = {"hidden_size": H}
        out[f"{q}self_attn.o_proj"] = {"num_attention_heads*head_dim": text.num_attention_heads * text.head_dims[i]}
        out[f"{q}mlp.gate_proj"] = out[f"{q}mlp.up_proj"] = {"hidden_size": H}
        out[f"{q}mlp.down_proj"] = {"intermediate_size": text.intermediate_sizes[i]}
        if text.has_ple:
            out[f"{q}per_layer_input_gate"] = {"hidden_size": H}
            out[f"{q}per_layer_projection"] = {"hidden_size_per_layer_input": P}
        if text.enable_moe_block:
            out[f"{q}experts"] = {"hidden_size": H, "moe_intermediate_size": text.moe_intermediate_size}
    if text.has_ple:
        out["per_layer_model_projection"] = {"hidden_size": H}
    return out


def quantizable_modules(text: TextConfig) -> list[str]:
    """Every module of the text decoder that an NVFP4 checkpoint may store quantized, in order."""
    return list(_quantizable(text))


def _resolve_quant(text: TextConfig, prefix: str, algo: str, group: int, exclude, source: str) -> QuantConfig:
    modules = []
    for m, widths in _quantizable(text).items():
        if any(fnmatch.fnmatchcase(prefix + m, g) for g in exclude):
            continue
        modules.append(m)
        for what, k in widths.items():  # NVFP4 packs K in blocks of group_size
            if k % group:
                raise _err("quantization", f"module {prefix + m!r}: {what}={k} is not a multiple of group_size {group}")
    return QuantConfig(algo, group, tuple(exclude), frozenset(modules), source)


def parse_quant_config(doc: Mapping[str, Any], text: TextConfig, prefix: str, source: str) -> QuantConfig:
    """A ModelOpt quantization description -> QuantConfig.

    ``doc`` is either ``hf_quant_config.json`` (``{"quantization": {quant_algo, group_size,
    exclude_modules, kv_cache_quant_algo}}``) or ``config.json``'s ``quantization_config``
    (``quant_method: modelopt``; ``exclude_modules`` or ``ignore``; ``group_size`` or
    ``config_groups.*.weights.group_size``).
    """
    name = "quantization" if source == HF_QUANT_CONFIG else "quantization_config"
    q = doc.get("quantization", doc) if source == HF_QUANT_CONFIG else doc
    if not isinstance(q, Mapping):
        raise _err(name, f"must be an object, got {q!r}")
    method = q.get("quant_method", "modelopt")
    if method != "modelopt":
        raise _err(f"{name}.quant_method", f"unsupported {method!r}; only NVIDIA ModelOpt NVFP4 exports load")
    algo = q.get("quant_algo")
    if algo not in _NVFP4_ALGOS:
        raise _err(f"{name}.quant_algo", f"unsupported {algo!r}; supported: {sorted(_NVFP4_ALGOS)}")
    kv = q.get("kv_cache_quant_algo")
    scheme = q.get("kv_cache_scheme")  # config.json form: {"num_bits": 8, "type": "float", ...}
    if kv is None and isinstance(scheme, Mapping) and (scheme.get("type"), scheme.get("num_bits")) == ("float", 8):
        kv = "FP8"
    if kv not in (None, "FP8"):
        raise _err(f"{name}.kv_cache_quant_algo", f"unsupported KV-cache quantization {kv!r} (supported: FP8, null)")
    group = q.get("group_size")
    if group is None:
        groups = [g.get("weights", {}).get("group_size") for g in (q.get("config_groups") or {}).values()
                  if isinstance(g, Mapping)]  # fmt: skip
        group = groups[0] if groups else None
    if group != 16:
        raise _err(f"{name}.group_size", f"NVFP4 uses blocks of 16, got {group!r}")
    exclude = q.get("exclude_modules", q.get("ignore")) or []
    if not isinstance(exclude, (list, tuple)) or not all(isinstance(g, str) for g in exclude):
        raise _err(f"{name}.exclude_modules", f"must be a list of glob strings, got {exclude!r}")
    return dataclasses.replace(_resolve_quant(text, prefix, algo, group, exclude, source), kv_cache_quant_algo=kv)


def nvfp4_quant_config(cfg: ModelConfig, scope: str) -> QuantConfig:
    """Quantizing a BF16 checkpoint at load: ``"experts"`` (the routed experts, like the
    released 26B-A4B NVFP4) or ``"all"`` (every quantizable linear). The exclude list is the
    one a ModelOpt export of that choice writes; activations are not calibrated, so the
    modules carry no ``input_scale`` (weight-only, ``W4A16_NVFP4``)."""
    if scope not in QUANT_SCOPES:
        raise ValueError(f"NVFP4 scope must be one of {QUANT_SCOPES}, got {scope!r}")
    text, p = cfg.text, cfg.weight_prefix
    if scope == "experts" and not text.enable_moe_block:
        raise ValueError("quantizing the experts needs an MoE model (enable_moe_block); use the 'all' scope")
    # ModelOpt lists every non-quantized module group of each layer, sorted as strings.
    groups = ("mlp", "router", "self_attn") + (("per_layer",) if text.has_ple else ())
    if scope == "all":
        groups = ("router",)
    exclude = ["lm_head"] + [f"{p}layers.{i}.{m}*" for i in range(text.num_hidden_layers) for m in groups]
    if scope == "experts" and text.has_ple:
        exclude.append(f"{p}per_layer_model_projection*")
    return _resolve_quant(text, p, "W4A16_NVFP4", 16, sorted(exclude), f"quantized at load ({scope})")


def with_quantization(cfg: ModelConfig, quant: QuantConfig | None) -> ModelConfig:
    """``cfg`` with ``quant`` applied (the model then builds NVFP4 modules for ``quant.modules``)."""
    text = cfg.text
    if quant is not None:
        text = dataclasses.replace(
            text,
            nvfp4_modules=quant.modules,
            nvfp4_group_size=quant.group_size,
            nvfp4_input_scales=quant.has_input_scales,
            kv_cache_quant_algo=quant.kv_cache_quant_algo,
        )
    else:
        text = dataclasses.replace(text, nvfp4_modules=frozenset())
    return dataclasses.replace(cfg, text=text, quantization=quant)


# --------------------------------------------------------------------------------------
# Parsing helpers


def _err(field_name: str, msg: str) -> ValueError:
    return ValueError(f"config field {field_name!r}: {msg}")


def _int(d: Mapping[str, Any], key: str, *, minimum: int | None = None, allow_none: bool = False, name: str = ""):
    name = name or key
    v = d.get(key)
    if v is None:
        if allow_none:
            return None
        raise _err(name, "is required (got null)")
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(name, f"must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise _err(name, f"must be >= {minimum}, got {v}")
    return v


def _float(d: Mapping[str, Any], key: str, *, positive: bool = False, allow_none: bool = False, name: str = ""):
    name = name or key
    v = d.get(key)
    if v is None:
        if allow_none:
            return None
        raise _err(name, "is required (got null)")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(name, f"must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise _err(name, f"must be > 0, got {v}")
    return float(v)


def _bool(d: Mapping[str, Any], key: str) -> bool:
    v = d.get(key)
    if not isinstance(v, bool):
        raise _err(key, f"must be true or false, got {v!r}")
    return v


def _eos_ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    ids = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise _err("eos_token_id", f"must be an int or a list of ints, got {v!r}")
    return tuple(ids)


def _rope_config(layer_type: str, params: Any) -> RopeConfig:
    name = f"rope_parameters.{layer_type}"
    if not isinstance(params, Mapping):
        raise _err(name, f"must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "proportional"):
        raise _err(f"{name}.rope_type", f"unsupported RoPE type {rope_type!r} (supported: 'default', 'proportional')")
    theta = _float(params, "rope_theta", positive=True, name=f"{name}.rope_theta")
    if rope_type == "default":
        # HF's default init ignores partial_rotary_factor and factor.
        return RopeConfig("default", theta)
    prf = params.get("partial_rotary_factor", 1.0)
    prf = 1.0 if prf is None else prf
    if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0.0 <= prf <= 1.0:
        raise _err(f"{name}.partial_rotary_factor", f"must be in [0, 1], got {prf!r}")
    factor = params.get("factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise _err(f"{name}.factor", f"must be a positive number, got {factor!r}")
    return RopeConfig("proportional", theta, float(prf), float(factor))


def _rope_parameters(raw: Any, layer_types: tuple[str, ...]) -> dict[str, RopeConfig]:
    if raw is None:
        raw = _DEFAULT_ROPE
    if not isinstance(raw, Mapping):
        raise _err("rope_parameters", f"must be an object keyed by layer type, got {raw!r}")
    out = {}
    for t in sorted(set(layer_types)):
        if t not in raw or raw[t] is None:
            raise _err("rope_parameters", f"has no entry for layer type {t!r} (keys: {sorted(raw)})")
        out[t] = _rope_config(t, raw[t])
    return out


def _layer_types(d: Mapping[str, Any], num_layers: int) -> tuple[str, ...]:
    raw = d.get("layer_types")
    if raw is None:
        # HF default pattern: every 6th layer is full attention (post_init step 2).
        types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)]
    else:
        if not isinstance(raw, (list, tuple)):
            raise _err("layer_types", f"must be a list, got {raw!r}")
        if len(raw) != num_layers:
            raise _err("layer_types", f"has {len(raw)} entries but num_hidden_layers is {num_layers}")
        bad = [t for t in raw if t not in LAYER_TYPES]
        if bad:
            raise _err("layer_types", f"unknown layer type(s) {sorted(set(map(str, bad)))}; expected {LAYER_TYPES}")
        types = list(raw)
    if types and types[-1] != FULL:
        # HF forces (with a warning) the last layer to full attention (post_init step 3).
        types[-1] = FULL
    return tuple(types)


def _per_layer_overrides(d: Mapping[str, Any], layer_types: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    """Layer index -> attribute overrides (spec §1.2), from either JSON form."""
    num_layers = len(layer_types)
    if "per_layer_config" in d and d["per_layer_config"] is not None:
        raw = d["per_layer_config"]
        if not isinstance(raw, Mapping):
            raise _err("per_layer_config", f"must be an object keyed by layer index, got {raw!r}")
        out: dict[int, dict[str, Any]] = {}
        for key, overrides in raw.items():
            try:
                idx = int(key)  # written zero-padded ("04") by save_pretrained
            except (TypeError, ValueError):
                raise _err("per_layer_config", f"key {key!r} is not a layer index") from None
            if not 0 <= idx < num_layers:
                raise _err("per_layer_config", f"layer index {idx} is outside [0, {num_layers})")
            if not isinstance(overrides, Mapping):
                raise _err(f"per_layer_config.{key}", f"must be an object, got {overrides!r}")
            unknown = sorted(set(overrides) - set(_PER_LAYER_KEYS))
            if unknown:
                raise _err(
                    f"per_layer_config.{key}", f"unsupported override(s) {unknown}; supported: {_PER_LAYER_KEYS}"
                )
            out[idx] = dict(overrides)
        return out
    # Older hub form: global_head_dim (default 512!) and num_global_key_value_heads for
    # full layers; the kv-head override applies only with attention_k_eq_v.
    global_head_dim = d.get("global_head_dim", 512)
    overrides: dict[str, Any] = {"head_dim": global_head_dim}
    n_global_kv = d.get("num_global_key_value_heads")
    if d.get("attention_k_eq_v", True) and n_global_kv is not None:
        overrides["num_key_value_heads"] = n_global_kv
    return {i: dict(overrides) for i, t in enumerate(layer_types) if t == FULL}


def _kv_sharing(layer_types: tuple[str, ...], num_shared: int) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """HF ``kv_sharing_modes`` (spec §1.3) and, per layer, the layer whose K/V it attends over."""
    n = len(layer_types)
    if num_shared == 0:
        return (None,) * n, tuple(range(n))
    first = n - num_shared
    producer_types = layer_types[:first]
    if set(producer_types) != set(layer_types):
        raise _err(
            "num_kv_shared_layers",
            f"{num_shared} shared layers leave producer layer types {sorted(set(producer_types))} but the model "
            f"uses {sorted(set(layer_types))}: every layer type needs a non-shared layer to store its KV",
        )
    modes: list[str | None] = [None] * first + ["reuse"] * num_shared
    store = {t: max(j for j in range(first) if layer_types[j] == t) for t in set(layer_types)}
    for j in store.values():
        modes[j] = "store"
    source = tuple(store[layer_types[i]] if modes[i] == "reuse" else i for i in range(n))
    return tuple(modes), source


def _positive_per_layer(name: str, values: list[Any]) -> tuple[int, ...]:
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _err(name, f"layer {i}: must be a positive integer, got {v!r}")
    return tuple(values)


def parse_text_config(text: Mapping[str, Any]) -> TextConfig:
    """Normalise a ``gemma4_text`` config dict (the JSON, or ``text_config`` of ``gemma4``)."""
    d = dict(_TEXT_DEFAULTS)
    d.update(text)

    n = _int(d, "num_hidden_layers", minimum=1)
    hidden = _int(d, "hidden_size", minimum=1)
    n_heads = _int(d, "num_attention_heads", minimum=1)
    vocab = _int(d, "vocab_size", minimum=1)
    eps = _float(d, "rms_norm_eps", positive=True)
    window = _int(d, "sliding_window", minimum=1)
    act = d.get("hidden_activation")
    if act not in _GELU_TANH_NAMES:
        raise _err("hidden_activation", f"unsupported activation {act!r}; Gemma 4 uses one of {_GELU_TANH_NAMES}")
    bidir = d.get("use_bidirectional_attention")
    if bidir not in (None, "vision", "all"):
        raise _err("use_bidirectional_attention", f"must be null, 'vision' or 'all', got {bidir!r}")
    softcap = _float(d, "final_logit_softcapping", positive=True, allow_none=True)
    pad = _int(d, "pad_token_id", minimum=0, allow_none=True)
    pad = 0 if pad is None else pad
    if pad >= vocab:
        raise _err("pad_token_id", f"{pad} is outside the vocabulary (vocab_size={vocab})")

    if not _bool(d, "tie_word_embeddings"):
        # Every Gemma 4 checkpoint ties lm_head to embed_tokens; an untied head would live
        # outside the text weight prefix and is not implemented.
        raise _err("tie_word_embeddings", "false is not supported (Gemma 4 ties the LM head to embed_tokens)")

    layer_types = _layer_types(d, n)
    rope = _rope_parameters(d.get("rope_parameters"), layer_types)
    overrides = _per_layer_overrides(d, layer_types)

    k_eq_v = _bool(d, "attention_k_eq_v")
    num_shared = _int(d, "num_kv_shared_layers", minimum=0)
    if num_shared > n:
        raise _err("num_kv_shared_layers", f"{num_shared} exceeds num_hidden_layers={n}")
    modes, source = _kv_sharing(layer_types, num_shared)
    double_wide = _bool(d, "use_double_wide_mlp")

    def per_layer(key: str) -> list[Any]:
        return [overrides.get(i, {}).get(key, d.get(key)) for i in range(n)]

    head_dims = _positive_per_layer("head_dim", per_layer("head_dim"))
    kv_heads = _positive_per_layer("num_key_value_heads", per_layer("num_key_value_heads"))
    for i, nkv in enumerate(kv_heads):
        if n_heads % nkv:
            raise _err("num_key_value_heads", f"layer {i}: {nkv} KV heads do not divide {n_heads} attention heads")
    for i, hd in enumerate(head_dims):
        if hd % 2:
            raise _err("head_dim", f"layer {i}: RoPE needs an even head_dim, got {hd}")
    for t in set(layer_types):
        # HF builds one rotary table per layer type from that type's config and raises when
        # layers of one type disagree; so do we.
        shapes = {(head_dims[i], kv_heads[i]) for i in range(n) if layer_types[i] == t}
        if len(shapes) > 1:
            raise _err(
                "per_layer_config",
                f"layers of type {t!r} must share head_dim and num_key_value_heads, got (head_dim, kv heads) "
                f"{sorted(shapes)}",
            )
    base = _int(d, "intermediate_size", minimum=1)
    inter = tuple(base * 2 if double_wide and modes[i] == "reuse" else base for i in range(n))

    enable_moe = _bool(d, "enable_moe_block")
    n_exp = top_k = moe_inter = None
    if enable_moe:
        n_exp = _int(d, "num_experts", minimum=1)
        top_k = _int(d, "top_k_experts", minimum=1)
        moe_inter = _int(d, "moe_intermediate_size", minimum=1)
        if top_k > n_exp:
            raise _err("top_k_experts", f"{top_k} exceeds num_experts={n_exp}")

    ple = _int(d, "hidden_size_per_layer_input", minimum=0, allow_none=True) or 0
    # The PLE vocabulary only matters (and is only checked) when PLE is on.
    ple_vocab = _int(d, "vocab_size_per_layer_input", minimum=1) if ple else 0

    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=n,
        num_attention_heads=n_heads,
        intermediate_size=base,
        hidden_activation=act,
        rms_norm_eps=eps,
        max_position_embeddings=_int(d, "max_position_embeddings", minimum=1),
        pad_token_id=pad,
        bos_token_id=_int(d, "bos_token_id", minimum=0, allow_none=True),
        eos_token_ids=_eos_ids(d.get("eos_token_id")),
        tie_word_embeddings=_bool(d, "tie_word_embeddings"),
        attention_bias=_bool(d, "attention_bias"),
        sliding_window=window,
        final_logit_softcapping=softcap,
        use_bidirectional_attention=bidir,
        vocab_size_per_layer_input=ple_vocab,
        hidden_size_per_layer_input=ple,
        attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=num_shared,
        enable_moe_block=enable_moe,
        use_double_wide_mlp=double_wide,
        num_experts=n_exp,
        top_k_experts=top_k,
        moe_intermediate_size=moe_inter,
        layer_types=layer_types,
        head_dims=head_dims,
        num_kv_heads=kv_heads,
        intermediate_sizes=inter,
        kv_sharing=modes,
        kv_source_layer=source,
        # attention_k_eq_v drops v_proj on full layers only (V = raw K projection).
        has_v_proj=tuple(modes[i] != "reuse" and not (k_eq_v and t == FULL) for i, t in enumerate(layer_types)),
        rope=rope,
    )


def load_config(path_or_dict: str | Path | Mapping[str, Any]) -> ModelConfig:
    """Read a checkpoint directory, a ``config.json`` path, or a parsed dict into a ModelConfig."""
    quant_doc: dict | None = None  # hf_quant_config.json wins over config.json (as in vLLM)
    if isinstance(path_or_dict, Mapping):
        raw = copy.deepcopy(dict(path_or_dict))
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        hf_quant = path.parent / HF_QUANT_CONFIG
        if hf_quant.is_file():
            with open(hf_quant, encoding="utf-8") as f:
                quant_doc = json.load(f)
            if not isinstance(quant_doc, dict):
                raise ValueError(f"{hf_quant}: expected a JSON object, got {type(quant_doc).__name__}")

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

    if model_type == "gemma4":
        text_raw = raw.get("text_config") or {}
        if not isinstance(text_raw, Mapping):
            raise _err("text_config", f"must be an object, got {text_raw!r}")
        mm_ids = []
        for key, default in _MM_TOKEN_DEFAULTS.items():
            v = raw.get(key, default)
            if v is not None:
                mm_ids.append(_int({key: v}, key, minimum=0))
        mm = tuple(mm_ids)
    else:
        text_raw = raw
        mm = ()
    text = parse_text_config(text_raw)
    cfg = ModelConfig(
        model_type=model_type,
        text=text,
        weight_prefix=_WEIGHT_PREFIX[model_type],
        mm_placeholder_token_ids=mm,
        raw=raw,
    )
    quant = None
    if quant_doc is not None:
        quant = parse_quant_config(quant_doc, text, cfg.weight_prefix, HF_QUANT_CONFIG)
    elif raw.get("quantization_config") is not None:
        qc = raw["quantization_config"]
        if not isinstance(qc, Mapping):
            raise _err("quantization_config", f"must be an object, got {qc!r}")
        quant = parse_quant_config(qc, text, cfg.weight_prefix, "config.json")
    return with_quantization(cfg, quant) if quant is not None else cfg

"""Write random-weight Gemma 4 text checkpoints in the HF layout, without transformers.

:func:`write_random_checkpoint` writes ``config.json``, ``generation_config.json`` and the
weights (``model.safetensors``, or shards plus ``model.safetensors.index.json``) with
exactly the tensor names and shapes that transformers 5.23's ``save_pretrained`` writes
for ``Gemma4ForConditionalGeneration`` (``model_type`` gemma4, text under
``model.language_model.``) or ``Gemma4ForCausalLM`` (gemma4_text, under ``model.``);
spec §9.1. Shapes come from :mod:`gemma4x.config`, so the checkpoint exercises the same
normalisation the model is built from. Towers (vision, audio) are not written: the config
must have them null.

Real sizes (26B-A4B is 50.5 GB = 47 GiB in bf16) are practical: each tensor is drawn on
``device`` (pass ``"cuda"``) in row blocks of 32M elements from its own seeded generator
and streamed to disk block by block, so memory stays at one block (128 MB of fp32 scratch
on the device, 64 MB of bf16 on the host) whatever the model size, and no shard is ever
held in memory. Measured on an H200 machine: 26B-A4B written in 45 s (1 GiB/s, bounded by
the host copy and the disk), and loaded back onto the GPU by gemma4x.loader in 7 s from
the page cache. Mind the disk: the GPU machines have 64 GiB free.

Values are deterministic for a given (seed, device, tensor name), whatever the sharding;
CPU and CUDA generators give different values.

:func:`write_nvfp4_checkpoint` turns a BF16 checkpoint into an NVFP4 one in NVIDIA ModelOpt's
export layout (``hf_quant_config.json``, ``config.json: quantization_config``, per-expert
``experts.<e>.{gate,up,down}_proj.{weight,weight_scale,weight_scale_2}``), quantized by the
reference quantizer exactly as ``Gemma4Runtime.from_pretrained(quantize=...)`` does: for
tests and benchmarks without ModelOpt installed.

:func:`write_tiny_tokenizer` writes a small byte-level BPE ``tokenizer.json`` (``<pad>``=0,
``<eos>``=1, ``<bos>``=2, ``<unk>``=3) so tiny demo checkpoints can take text prompts.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma4x.chat import CHAT_TOKENS
from gemma4x.config import ModelConfig, load_config

__all__ = [
    "TensorSpec",
    "nvfp4_state_dict",
    "text_tensor_specs",
    "write_nvfp4_checkpoint",
    "write_random_checkpoint",
    "write_safetensors",
    "write_tiny_tokenizer",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ARCHITECTURES = {"gemma4": "Gemma4ForConditionalGeneration", "gemma4_text": "Gemma4ForCausalLM"}
_ST_CODE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
# Rows drawn per block: bounds device scratch (fp32) and host staging while streaming.
_BLOCK_ELEMS = 1 << 25
# Spread of the "around 1" tensors (norm weights, layer scalars, router scales): far enough
# from 1 that a model ignoring one of them, or using (1 + w), visibly changes its output.
_NEAR_ONE_STD = 0.1


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: full key, shape and how to draw it.

    ``init`` is ``"normal"`` (mean 0, ``std``) or ``"near_one"`` (1 + N(0, 0.1)).
    """

    name: str
    shape: tuple[int, ...]
    init: str
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _linear(name: str, out_f: int, in_f: int) -> TensorSpec:
    # std = fan_in^-0.5 keeps activations O(1) through the stack (≈0.02 at real widths).
    return TensorSpec(name, (out_f, in_f), "normal", in_f**-0.5)


def _ones(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, tuple(shape), "near_one")


def text_tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor HF's ``save_pretrained`` writes for this text decoder, in module order."""
    t = cfg.text
    p = cfg.weight_prefix
    H, V, P, L = t.hidden_size, t.vocab_size, t.hidden_size_per_layer_input, t.num_hidden_layers
    nH = t.num_attention_heads
    # Embedding rows have std H^-0.5, so tied logits (unit-RMS hidden · row) have std ~1.
    specs = [TensorSpec(p + "embed_tokens.weight", (V, H), "normal", H**-0.5)]

    def linear_with_bias(name: str, out_f: int, in_f: int) -> list[TensorSpec]:
        out = [_linear(name + ".weight", out_f, in_f)]
        if t.attention_bias:
            out.append(TensorSpec(name + ".bias", (out_f,), "normal", 0.02))
        return out

    for i in range(L):
        q = f"{p}layers.{i}."
        d, nkv, inter = t.head_dims[i], t.num_kv_heads[i], t.intermediate_sizes[i]
        specs += linear_with_bias(q + "self_attn.q_proj", nH * d, H)
        specs.append(_ones(q + "self_attn.q_norm.weight", d))
        if t.kv_sharing[i] != "reuse":  # reuse layers attend over their producer's K/V
            specs.append(_ones(q + "self_attn.k_norm.weight", d))
            specs += linear_with_bias(q + "self_attn.k_proj", nkv * d, H)
            if t.has_v_proj[i]:
                specs += linear_with_bias(q + "self_attn.v_proj", nkv * d, H)
        specs += linear_with_bias(q + "self_attn.o_proj", H, nH * d)
        specs += [
            _linear(q + "mlp.gate_proj.weight", inter, H),
            _linear(q + "mlp.up_proj.weight", inter, H),
            _linear(q + "mlp.down_proj.weight", H, inter),
        ]
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            specs.append(_ones(f"{q}{norm}.weight", H))
        specs.append(_ones(q + "layer_scalar", 1))
        if P:
            specs += [
                _linear(q + "per_layer_input_gate.weight", P, H),
                _linear(q + "per_layer_projection.weight", H, P),
                _ones(q + "post_per_layer_input_norm.weight", H),
            ]
        if t.enable_moe_block:
            E, I = t.num_experts, t.moe_intermediate_size
            specs += [
                _linear(q + "router.proj.weight", E, H),
                _ones(q + "router.scale", H),
                _ones(q + "router.per_expert_scale", E),
                TensorSpec(q + "experts.gate_up_proj", (E, 2 * I, H), "normal", H**-0.5),
                TensorSpec(q + "experts.down_proj", (E, H, I), "normal", I**-0.5),
                _ones(q + "post_feedforward_layernorm_1.weight", H),
                _ones(q + "post_feedforward_layernorm_2.weight", H),
                _ones(q + "pre_feedforward_layernorm_2.weight", H),
            ]
    specs.append(_ones(p + "norm.weight", H))
    if P:
        # Rows scaled by sqrt(P) in the model, so std P^-0.5 gives O(1) per-layer inputs.
        specs += [
            TensorSpec(p + "embed_tokens_per_layer.weight", (t.vocab_size_per_layer_input, L * P), "normal", P**-0.5),
            _linear(p + "per_layer_model_projection.weight", L * P, H),
            _ones(p + "per_layer_projection_norm.weight", P),
        ]
    # lm_head.weight is tied to embed_tokens and not written (config.py rejects untied heads).
    return specs


# --------------------------------------------------------------------------------------
# Drawing values
# --------------------------------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor seeds make values independent of tensor order and of the sharding.
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def _random_blocks(spec: TensorSpec, seed: int, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The tensor's values as row blocks (along dim 0), drawn on ``device`` in fp32, cast to ``dtype``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_tensor_seed(seed, spec.name))
    shape = spec.shape if spec.shape else (1,)
    row = math.prod(shape[1:])
    rows_per_block = max(1, _BLOCK_ELEMS // max(row, 1))
    for start in range(0, shape[0], rows_per_block):
        n = min(rows_per_block, shape[0] - start)
        x = torch.randn((n, *shape[1:]), generator=gen, device=device, dtype=torch.float32)
        if spec.init == "normal":
            x.mul_(spec.std)
        elif spec.init == "near_one":
            x.mul_(_NEAR_ONE_STD).add_(1.0)
        else:
            raise ValueError(f"tensor {spec.name}: unknown init {spec.init!r}")
        yield x.to(dtype)


# --------------------------------------------------------------------------------------
# Streaming safetensors writer
# --------------------------------------------------------------------------------------


def write_safetensors(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    blocks: Callable[[str], Iterator[torch.Tensor]],
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Write a safetensors file whose tensors arrive as blocks; returns the data bytes written.

    ``specs`` lists (name, shape); every tensor has ``dtype``. ``blocks(name)`` yields the
    tensor's contiguous pieces in order (any device). The header is written first from the
    shapes, so nothing larger than one block is ever held in host memory. The layout is the
    standard one (8-byte little-endian header length, JSON header padded with spaces to a
    multiple of 8, tensors back to back in ``specs`` order) and reads back with safetensors.
    """
    if dtype not in _ST_CODE:
        raise ValueError(f"unsupported dtype {dtype}; expected one of {list(_ST_CODE)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": _ST_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, shape in specs:
            expected = math.prod(shape) * itemsize
            written = 0
            for block in blocks(name):
                if block.dtype != dtype:
                    raise ValueError(f"tensor {name}: block dtype {block.dtype}, expected {dtype}")
                host = block.contiguous().cpu().reshape(-1).view(torch.uint8)
                fh.write(memoryview(host.numpy()))
                written += host.numel()
                if on_bytes is not None:
                    on_bytes(host.numel())
            if written != expected:
                raise ValueError(f"tensor {name}: wrote {written} bytes, shape {list(shape)} needs {expected}")
    return offset


def _shard(specs: list[TensorSpec], nbytes: Callable[[TensorSpec], int], limit: int | None) -> list[list[TensorSpec]]:
    """Greedy packing in order; a tensor larger than ``limit`` gets a shard of its own."""
    if limit is None:
        return [specs]
    if limit <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {limit}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        b = nbytes(s)
        if shards[-1] and size + b > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += b
    return shards


# --------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------


def _check_text_only(config: Mapping[str, Any]) -> None:
    towers = [k for k in ("vision_config", "audio_config") if config.get(k) is not None]
    if towers:
        raise ValueError(
            f"write_random_checkpoint writes text weights only, but the config has {towers}; "
            "set them to null for a text-only checkpoint"
        )


def _generation_config(cfg: ModelConfig) -> dict[str, Any]:
    t = cfg.text
    eos: Any = list(t.eos_token_ids) if len(t.eos_token_ids) != 1 else t.eos_token_ids[0]
    return {"bos_token_id": t.bos_token_id, "eos_token_id": eos, "pad_token_id": t.pad_token_id}


def write_random_checkpoint(
    out_dir: str | Path,
    config_dict: Mapping[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> Path:
    """Write a random-weight checkpoint for ``config_dict`` (HF ``config.json`` form) to ``out_dir``.

    Args:
        out_dir: created if needed; existing checkpoint files in it are overwritten.
        config_dict: ``model_type`` gemma4 (text-only: ``vision_config``/``audio_config``
            null) or gemma4_text. Validated by :func:`gemma4x.config.load_config`.
        seed: base seed; each tensor's generator is seeded from (seed, tensor name).
        dtype: bf16 (default), fp16 or fp32.
        max_shard_bytes: split into ``model-0000i-of-0000n.safetensors`` shards of at most
            this many bytes (a larger single tensor gets its own shard); None: one file.
        device: where values are drawn; use "cuda" for real-size checkpoints.
        progress: show a progress bar; default: when the checkpoint exceeds 1 GiB.

    Returns the output directory.
    """
    _check_text_only(config_dict)
    cfg = load_config(config_dict)
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    specs = text_tensor_specs(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(s.numel for s in specs) * itemsize
    shards = _shard(specs, lambda s: s.numel * itemsize, max_shard_bytes)

    config_json = dict(config_dict)
    config_json.setdefault("architectures", [_ARCHITECTURES[cfg.model_type]])
    config_json["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(cfg), indent=2) + "\n")
    # A previous write with another sharding must not leave a stale index or file behind.
    for stale in [out / INDEX_FILE, out / SINGLE_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)

    by_name = {s.name: s for s in specs}
    bar = None
    if progress if progress is not None else total > (1 << 30):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}")
    try:
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(
                out / fname,
                [(s.name, s.shape) for s in shard],
                dtype,
                lambda name: _random_blocks(by_name[name], seed, device, dtype),
                on_bytes=bar.update if bar is not None else None,
            )
            weight_map.update({s.name: fname for s in shard})
    finally:
        if bar is not None:
            bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------
# NVFP4 checkpoints in ModelOpt's layout
# --------------------------------------------------------------------------------------


def nvfp4_state_dict(model, prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of a (partly) NVFP4 text model under ModelOpt's names.

    ``NVFP4Experts`` are split back into ``experts.<e>.{gate,up,down}_proj.{weight,
    weight_scale,weight_scale_2[,input_scale]}`` (scalars 0-d); ``NVFP4Linear`` tensors and
    everything else keep their names. Non-persistent buffers are not included.
    """
    from gemma4x.layers.moe import NVFP4Experts

    out: dict[str, torch.Tensor] = {}
    state = model.state_dict()  # the checkpoint layout, also of modules holding W4A16-packed weights
    for name, mod in model.named_modules():
        if not isinstance(mod, NVFP4Experts):
            continue
        base = f"{prefix}{name}."
        I = mod.intermediate_size
        own = [k for k in state if k.startswith(f"{name}.")]  # a leaf module: all its own tensors
        t = {k[len(name) + 1 :]: state.pop(k) for k in own}
        for e in range(mod.num_experts):
            for h, proj in enumerate(("gate_proj", "up_proj")):
                rows = slice(h * I, (h + 1) * I)
                k = f"{base}{e}.{proj}."
                out[k + "weight"] = t["gate_up_weight"][e, rows]
                out[k + "weight_scale"] = t["gate_up_weight_scale"][e, rows]
                out[k + "weight_scale_2"] = t["gate_up_weight_scale_2"][e, h]
                if "gate_up_input_scale" in t:
                    out[k + "input_scale"] = t["gate_up_input_scale"][e, h]
            k = f"{base}{e}.down_proj."
            out[k + "weight"] = t["down_weight"][e]
            out[k + "weight_scale"] = t["down_weight_scale"][e]
            out[k + "weight_scale_2"] = t["down_weight_scale_2"][e]
            if "down_input_scale" in t:
                out[k + "input_scale"] = t["down_input_scale"][e]
    for name, t in state.items():
        out[prefix + name] = t
    return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}


def write_nvfp4_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    scope: str = "experts",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> Path:
    """Quantize the BF16 checkpoint at ``src_dir`` to NVFP4 and write it to ``out_dir`` in ModelOpt's layout.

    Args:
        src_dir: a gemma4x-loadable checkpoint (config.json + safetensors), not quantized.
        out_dir: created if needed; gets ``config.json`` (with ``quantization_config``),
            ``hf_quant_config.json``, ``model.safetensors`` and the source's
            ``generation_config.json`` / ``tokenizer.json`` when present.
        scope: ``"experts"`` (routed experts only) or ``"all"`` (see
            :func:`gemma4x.config.nvfp4_quant_config`).
        dtype: of the tensors left unquantized.
        device: where the reference quantizer runs.

    Weight-only (``W4A16_NVFP4``, no ``input_scale``): the quantized tensors are the ones
    ModelOpt writes for the same weights (shared ``weight_scale_2`` per q/k/v, MLP gate/up
    and expert gate/up groups), but no activations are calibrated. The text decoder only:
    the KV weights of KV-shared layers, which the model never reads, are not written.
    """
    import shutil

    from safetensors.torch import save_file

    from gemma4x.config import HF_QUANT_CONFIG, load_config, nvfp4_quant_config
    from gemma4x.loader import load_checkpoint
    from gemma4x.models.text import Gemma4TextModel

    src, out = Path(src_dir), Path(out_dir)
    cfg = load_config(src)
    if cfg.quantization is not None:
        raise ValueError(f"{src} is already quantized ({cfg.quantization.quant_algo})")
    quant = nvfp4_quant_config(cfg, scope)
    with torch.device("meta"):
        model = Gemma4TextModel(cfg.text, cfg.mm_placeholder_token_ids)
    ignore = model.ignored_checkpoint_keys(cfg.weight_prefix)
    load_checkpoint(model, src, prefix=cfg.weight_prefix, device=device, dtype=dtype, ignore_patterns=ignore)
    model.quantize_(quant)

    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / INDEX_FILE, out / SINGLE_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    save_file(nvfp4_state_dict(model, cfg.weight_prefix), str(out / SINGLE_FILE), metadata={"format": "pt"})
    config_json = dict(cfg.raw)
    config_json["quantization_config"] = quant.quantization_config()
    (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    (out / HF_QUANT_CONFIG).write_text(json.dumps(quant.hf_quant_config(), indent=4) + "\n")
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / extra).is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src / extra, out / extra)
    return out


# --------------------------------------------------------------------------------------
# Tiny tokenizer for demo checkpoints
# --------------------------------------------------------------------------------------

# Enough varied English for a few hundred byte-level merges; the demo prompts come from it.
_TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Gemma runs on the GPU with fused kernels and a paged cache. "
    "Once upon a time there was a small model that wanted to write poems about the sea. "
    "Tokens per second measure how fast the model generates text, one token after another. "
    "Hello world! The weather today is sunny with a light breeze from the west. "
    "Mixture of experts routes every token to a few experts and sums their outputs. "
    "Sliding window attention looks at recent tokens while full attention sees them all. "
)
TINY_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3 as in Gemma
# Gemma 4's chat control tokens, for tiny tokenizers that render chat templates.
CHAT_SPECIAL_TOKENS = CHAT_TOKENS


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int, extra_special_tokens: Sequence[str] = ()) -> Path:
    """Train and write a byte-level BPE ``tokenizer.json`` of at most ``vocab_size`` ids.

    Special tokens take ids 0-3 (``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``), then
    ``extra_special_tokens`` (e.g. Gemma 4's chat control tokens, :data:`CHAT_SPECIAL_TOKENS`),
    and a template post-processor prepends ``<bos>`` as Gemma's does. Any text encodes
    (byte-level), so ``vocab_size`` must be at least the specials + 256. Needs the ``tokenizers``
    package.
    """
    from gemma4x.tokenizer import require_tokenizers

    tk = require_tokenizers()
    specials = [*TINY_SPECIAL_TOKENS, *extra_special_tokens]
    min_vocab = len(specials) + 256
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (need >= {min_vocab})")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    tok.post_processor = tk.processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path

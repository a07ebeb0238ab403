"""NVFP4 checkpoints: malformed tensors and configs fail clearly; ``from_pretrained(quantize=...)``.

Checkpoints come from ``write_nvfp4_checkpoint`` (ModelOpt's layout, see
tests/model/test_nvfp4.py for its equality with a real ModelOpt export), then one tensor
or config field is broken. Every error is one CheckpointError / ValueError naming it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma4_tiny as gt  # noqa: E402

from gemma4x.checkpoint import write_nvfp4_checkpoint  # noqa: E402
from gemma4x.config import load_config  # noqa: E402
from gemma4x.loader import CheckpointError  # noqa: E402
from gemma4x.runtime.runtime import Gemma4Runtime  # noqa: E402

pytest.importorskip("transformers")

P = "model.language_model."
EXPERT = P + "layers.1.experts.3."


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> NVFP4 checkpoint dir ("experts": MoE, experts only; "all": E2B-like, every linear), plus "bf16"."""
    out = {}
    src = tmp_path_factory.mktemp("moe_bf16")
    gt.make_checkpoint(gt.CONFIGS["moe_kv_eq"], src, seed=2)
    out["bf16"] = src
    out["experts"] = write_nvfp4_checkpoint(src, tmp_path_factory.mktemp("experts"), scope="experts")
    src = tmp_path_factory.mktemp("e2b_bf16")
    gt.make_checkpoint(gt.CONFIGS["e2b_like"], src, seed=2)
    out["all"] = write_nvfp4_checkpoint(src, tmp_path_factory.mktemp("all"), scope="all")
    dense = tmp_path_factory.mktemp("dense_bf16")
    gt.make_checkpoint(gt.CONFIGS["dense"], dense, seed=2)
    out["dense"] = dense
    return out


def variant(src: Path, dst: Path, edit=None, quant_edit=None) -> Path:
    """Copy a checkpoint, applying ``edit(tensors)`` and ``quant_edit(hf_quant_config.json doc)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(str(dst / "model.safetensors"))
        edit(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if quant_edit is not None:
        f = dst / "hf_quant_config.json"
        doc = json.loads(f.read_text())
        quant_edit(doc)
        f.write_text(json.dumps(doc))
    return dst


def load(path):
    return Gemma4Runtime.from_pretrained(path, max_seq_len=64)


def test_loads_and_generates_like_quantize_at_load(ckpts):
    loaded = load(ckpts["experts"])
    at_load = Gemma4Runtime.from_pretrained(ckpts["bf16"], max_seq_len=64, quantize="nvfp4")
    prompts = [[2, 17, 40, 99], [2, 5]]
    a = [r.token_ids for r in loaded.generate(prompts, max_new_tokens=6)]
    b = [r.token_ids for r in at_load.generate(prompts, max_new_tokens=6)]
    assert a == b
    assert at_load.config.quantization.source == "quantized at load (experts)"
    assert loaded.config.quantization.exclude_modules == at_load.config.quantization.exclude_modules


@pytest.mark.parametrize(
    "key,make,match",
    [
        # packed weight not halved along K
        (EXPERT + "gate_proj.weight", lambda t: torch.zeros(t.shape[0], t.shape[1] * 2, dtype=torch.uint8),
         r"shape mismatch for '" + EXPERT + r"gate_proj\.weight'.*\[32, 64\].*\[32, 32\]"),
        # block scales in fp32 instead of float8_e4m3fn
        (EXPERT + "down_proj.weight_scale", lambda t: t.float(),
         r"unusable dtype for '" + EXPERT + r"down_proj\.weight_scale'.*F32.*float8_e4m3fn"),
        # packed weight as int8
        (EXPERT + "up_proj.weight", lambda t: t.view(torch.int8),
         r"unusable dtype for '" + EXPERT + r"up_proj\.weight'.*I8.*uint8"),
        # global scale not a scalar
        (EXPERT + "up_proj.weight_scale_2", lambda t: t.reshape(1, 1),
         r"shape mismatch for '" + EXPERT + r"up_proj\.weight_scale_2'"),
    ],
)  # fmt: skip
def test_malformed_expert_tensor(ckpts, tmp_path, key, make, match):
    def edit(sd):
        sd[key] = make(sd[key])

    with pytest.raises(CheckpointError, match=match):
        load(variant(ckpts["experts"], tmp_path / "bad", edit))


def test_missing_global_scale(ckpts, tmp_path):
    def edit(sd):
        del sd[EXPERT + "down_proj.weight_scale_2"]

    with pytest.raises(CheckpointError, match=r"1 tensors missing.*" + EXPERT + r"down_proj\.weight_scale_2"):
        load(variant(ckpts["experts"], tmp_path / "bad", edit))


def test_malformed_linear_tensor(ckpts, tmp_path):
    key = P + "layers.0.self_attn.q_proj.weight_scale"

    def edit(sd):
        sd[key] = sd[key].to(torch.bfloat16)

    with pytest.raises(CheckpointError, match=r"unusable dtype for '" + key + "'"):
        load(variant(ckpts["all"], tmp_path / "bad", edit))

    def drop(sd):
        del sd[P + "per_layer_model_projection.weight_scale_2"]

    with pytest.raises(CheckpointError, match=r"missing.*per_layer_model_projection\.weight_scale_2"):
        load(variant(ckpts["all"], tmp_path / "bad2", drop))


def test_quantized_tensor_in_excluded_module(ckpts, tmp_path):
    """The config says BF16 but the file holds NVFP4: the error says so and points at the config."""

    def exclude(doc):
        doc["quantization"]["exclude_modules"].append(P + "layers.0.self_attn.q_proj")

    path = variant(ckpts["all"], tmp_path / "bad", quant_edit=exclude)
    with pytest.raises(CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert "layers.0.self_attn.q_proj.weight" in msg and "quantized storage format" in msg
    assert "exclude_modules" in msg and "layers.0.self_attn.q_proj.weight_scale_2" in msg  # unexpected


def test_quantized_checkpoint_without_quant_config(ckpts, tmp_path):
    path = variant(ckpts["experts"], tmp_path / "bad")
    (path / "hf_quant_config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"(?s)missing.*experts\.gate_up_proj.*unexpected.*experts\.0\..*hint"):
        load(path)


def test_config_json_alone_is_enough(ckpts, tmp_path):
    path = variant(ckpts["experts"], tmp_path / "cfg_only")
    (path / "hf_quant_config.json").unlink()
    mc = load_config(path)
    assert mc.quantization.source == "config.json"
    assert mc.text.nvfp4_modules == load_config(ckpts["experts"]).text.nvfp4_modules


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("quant_algo", "FP8", r"quant_algo.*unsupported 'FP8'"),
        ("quant_algo", "NVFP4_AWQ", r"quant_algo"),
        ("group_size", 32, r"group_size.*blocks of 16"),
        ("kv_cache_quant_algo", "NVFP4", r"kv_cache_quant_algo.*unsupported KV-cache quantization 'NVFP4'"),
        ("exclude_modules", "lm_head", r"exclude_modules.*list of glob"),
    ],
)
def test_bad_quant_config(ckpts, tmp_path, field, value, match):
    def edit(doc):
        doc["quantization"][field] = value

    with pytest.raises(ValueError, match=match):
        load_config(variant(ckpts["experts"], tmp_path / "bad", quant_edit=edit))


def test_non_modelopt_quant_method(ckpts, tmp_path):
    path = variant(ckpts["experts"], tmp_path / "bad")
    (path / "hf_quant_config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quant_method.*compressed-tensors"):
        load_config(path)


def test_quantize_argument_errors(ckpts):
    with pytest.raises(ValueError, match=r"quantize must be None or one of \['nvfp4', 'nvfp4-all'\]"):
        Gemma4Runtime.from_pretrained(ckpts["bf16"], quantize="int4")
    with pytest.raises(ValueError, match="already quantized"):
        Gemma4Runtime.from_pretrained(ckpts["experts"], quantize="nvfp4")
    with pytest.raises(ValueError, match="needs an MoE model"):
        Gemma4Runtime.from_pretrained(ckpts["dense"], quantize="nvfp4")


def test_quantize_all_on_dense_model(ckpts):
    rt = Gemma4Runtime.from_pretrained(ckpts["dense"], max_seq_len=64, quantize="nvfp4-all", dtype=torch.bfloat16)
    mods = rt.config.quantization.modules
    assert "layers.0.self_attn.q_proj" in mods and "layers.4.mlp.down_proj" in mods
    assert rt.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert rt.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    out = rt.generate([[2, 9, 10]], max_new_tokens=4)[0]
    assert len(out.token_ids) == 4


def test_quant_config_forms_globs_and_widths():
    """The older ModelOpt ``config.json`` form, glob matching on full HF names, K % 16 checks."""
    import copy

    base = gt.multimodal(gt.MOE_TEXT)
    cfg = copy.deepcopy(base)
    cfg["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "kv_cache_quant_algo": None,
        "exclude_modules": ["lm_head", "*router*", P + "layers.*.self_attn*", P + "layers.1.experts"],
    }
    cfg["quantization_config"]["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    mc = load_config(cfg)
    assert mc.quantization.source == "config.json" and mc.quantization.has_input_scales
    assert mc.quantization.kv_cache_quant_algo == mc.text.kv_cache_quant_algo == "FP8"
    want = {f"layers.{i}.mlp.{p}" for i in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    want |= {f"layers.{i}.experts" for i in (0, 2, 3)}
    assert mc.text.nvfp4_modules == want
    cfg["text_config"]["moe_intermediate_size"] = 24
    with pytest.raises(ValueError, match=r"layers\.0\.experts'.*moe_intermediate_size=24 is not a multiple of"):
        load_config(cfg)


def test_sharded_checkpoint_parts_across_files(ckpts, tmp_path):
    """One fused expert tensor filled from keys spread over several shards (the real 26B-A4B
    NVFP4 export is sharded): same parameters as the single-file load."""
    from safetensors.torch import load_file, save_file

    src = ckpts["experts"]
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00003.safetensors": keys[0::3], "model-00002-of-00003.safetensors": keys[1::3],
              "model-00003-of-00003.safetensors": keys[2::3]}  # fmt: skip
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(dst / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    a = dict(load(src).model.named_parameters())
    b = dict(load(dst).model.named_parameters())
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert torch.equal(t.reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k

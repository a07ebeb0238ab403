"""Strict safetensors loading (gemma4x.loader) on a toy model, plus corrupt-file handling."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gemma4x.loader import CheckpointError, load_checkpoint, read_safetensors_header, scan_checkpoint

PREFIX = "model."


class Toy(nn.Module):
    """Covers what the loader must handle: tied weights, persistent / non-persistent / int buffers,
    a parameter with a weight_loader, nesting."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.block = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4, bias=False))
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as Gemma's lm_head
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("ordering", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("inv_freq", torch.ones(2), persistent=False)
        self.swapped = nn.Parameter(torch.empty(4, 3))
        # Repacking loader: the checkpoint holds [gate; up] rows, the model wants them swapped.
        self.swapped.weight_loader = self._swap_halves
        self.init_calls = 0

    @staticmethod
    def _swap_halves(param, tensor):
        param.copy_(torch.cat([tensor[2:], tensor[:2]]))

    def init_non_persistent_buffers(self):
        self.init_calls += 1
        self.inv_freq.copy_(torch.tensor([1.0, 0.5]))


def _meta_toy() -> Toy:
    with torch.device("meta"):
        return Toy()


def _toy_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {
        "embed.weight": torch.randn(11, 4, generator=g),
        "block.0.weight": torch.randn(6, 4, generator=g),
        "block.0.bias": torch.randn(6, generator=g),
        "block.1.weight": torch.randn(4, 6, generator=g),
        "layer_scalar": torch.tensor([0.75]),
        "swapped": torch.randn(4, 3, generator=g),
    }
    sd = {PREFIX + k: v.to(dtype) for k, v in sd.items()}
    sd[PREFIX + "ordering"] = torch.tensor([2, 0, 1], dtype=torch.int32)
    return sd


def _write(tmp_path, sd, name="model.safetensors"):
    save_file(sd, str(tmp_path / name), metadata={"format": "pt"})
    return tmp_path / name


def _write_sharded(tmp_path, sd, groups: list[list[str]]):
    weight_map = {}
    for i, keys in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write(tmp_path, {k: sd[k] for k in keys}, fname)
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


def _check_loaded(model: Toy, sd, dtype):
    assert model.embed.weight.dtype == dtype and model.embed.weight.device.type == "cpu"
    assert model.head.weight is model.embed.weight, "tied parameters must stay tied"
    assert torch.equal(model.embed.weight, sd[PREFIX + "embed.weight"].to(dtype))
    assert torch.equal(model.block[0].bias, sd[PREFIX + "block.0.bias"].to(dtype))
    assert torch.equal(model.layer_scalar, sd[PREFIX + "layer_scalar"].to(dtype))
    assert model.ordering.dtype == torch.int64 and model.ordering.tolist() == [2, 0, 1]
    src = sd[PREFIX + "swapped"].to(dtype)
    assert torch.equal(model.swapped, torch.cat([src[2:], src[:2]]))
    assert model.inv_freq.dtype == torch.float32 and model.inv_freq.tolist() == [1.0, 0.5]
    assert model.init_calls == 1
    assert not any(p.requires_grad for p in model.parameters())
    assert isinstance(model.block[0].weight, nn.Parameter) and callable(model.swapped.weight_loader)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_single_file(tmp_path, dtype):
    sd = _toy_state()
    _write(tmp_path, sd)
    model = _meta_toy()
    load_checkpoint(model, tmp_path, prefix=PREFIX, device="cpu", dtype=dtype)
    _check_loaded(model, sd, dtype)
    # A file path works as well as its directory.
    model = _meta_toy()
    load_checkpoint(model, tmp_path / "model.safetensors", prefix=PREFIX, device="cpu", dtype=dtype)
    _check_loaded(model, sd, dtype)


def test_sharded(tmp_path):
    sd = _toy_state(torch.bfloat16)
    keys = sorted(sd)
    _write_sharded(tmp_path, sd, [keys[:3], keys[3:5], keys[5:]])
    model = _meta_toy()
    load_checkpoint(model, tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    _check_loaded(model, sd, torch.float32)
    assert len(scan_checkpoint(tmp_path / "model.safetensors.index.json")) == len(sd)


def test_lists_every_missing_tensor_and_leaves_the_model_untouched(tmp_path):
    sd = _toy_state()
    for k in ("block.0.weight", "block.0.bias", "swapped"):
        del sd[PREFIX + k]
    _write(tmp_path, sd)
    model = _meta_toy()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    msg = str(err.value)
    assert "3 tensors missing" in msg
    for k in ("model.block.0.weight", "model.block.0.bias", "model.swapped"):
        assert k in msg
    assert model.embed.weight.is_meta, "nothing is materialised when validation fails"


def test_unexpected_and_ignored_tensors(tmp_path):
    sd = _toy_state()
    sd["lm_head.weight"] = torch.zeros(11, 4)
    sd[PREFIX + "layers.3.self_attn.k_proj.weight"] = torch.zeros(2, 2)
    sd["model.vision_tower.patch.weight"] = torch.zeros(2)
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    msg = str(err.value)
    assert "3 unexpected tensors" in msg and "lm_head.weight (in model.safetensors)" in msg
    assert "model.vision_tower.patch.weight" in msg and "layers.3.self_attn.k_proj.weight" in msg

    ignore = [r"^lm_head\.weight$", r"layers\.3\.self_attn\.(k|v)_proj", r"^model\.vision_tower\."]
    model = _meta_toy()
    load_checkpoint(model, tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32, ignore_patterns=ignore)
    _check_loaded(model, _toy_state(), torch.float32)


def test_ignore_patterns_never_excuse_a_missing_tensor(tmp_path):
    sd = _toy_state()
    del sd[PREFIX + "layer_scalar"]
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError, match="model.layer_scalar"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32, ignore_patterns=[".*"])


def test_tied_alias_in_checkpoint_is_accepted(tmp_path):
    # Some exports write the tied lm_head too; under our prefix it names the same tensor.
    sd = _toy_state()
    sd[PREFIX + "head.weight"] = sd[PREFIX + "embed.weight"].clone()
    _write(tmp_path, sd)
    model = _meta_toy()
    load_checkpoint(model, tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    assert model.head.weight is model.embed.weight


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path):
    sd = _toy_state()
    sd[PREFIX + "block.0.weight"] = torch.zeros(6, 5)
    sd[PREFIX + "layer_scalar"] = torch.zeros(())
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    msg = str(err.value)
    assert "'model.block.0.weight' in" in msg and "model.safetensors" in msg
    assert "checkpoint [6, 5], model expects [6, 4]" in msg
    assert "checkpoint [], model expects [1]" in msg


def test_weight_loader_checkpoint_shape_and_errors(tmp_path):
    sd = _toy_state()
    sd[PREFIX + "swapped"] = torch.zeros(3, 4)
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"'model.swapped'.*checkpoint \[3, 4\], model expects \[4, 3\]"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)

    # A loader that reshapes declares the checkpoint shape it accepts.
    model = _meta_toy()
    model.swapped.checkpoint_shape = (3, 4)
    model.swapped.weight_loader = lambda p, t: p.copy_(t.t())
    load_checkpoint(model, tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    assert model.swapped.shape == (4, 3)

    # A loader that fails is reported with the tensor and file.
    model = _meta_toy()
    model.swapped.checkpoint_shape = (3, 4)
    model.swapped.weight_loader = lambda p, t: p.copy_(t)  # wrong shape for copy_
    with pytest.raises(CheckpointError, match=r"loading 'model.swapped' from .*model.safetensors failed"):
        load_checkpoint(model, tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (torch.zeros(6, 4, dtype=torch.int32), "I32 cannot fill a torch.float32 tensor"),
        (torch.zeros(6, 4, dtype=torch.bool), "BOOL cannot fill"),
        (torch.zeros(6, 4, dtype=torch.uint8), "quantized"),
        (torch.zeros(6, 4, dtype=torch.float8_e4m3fn), "quantized"),
    ],
)
def test_unusable_dtypes(tmp_path, bad, needle):
    sd = _toy_state()
    sd[PREFIX + "block.0.weight"] = bad
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    assert needle in str(err.value) and "model.block.0.weight" in str(err.value)


def test_float_into_int_buffer_is_rejected(tmp_path):
    sd = _toy_state()
    sd[PREFIX + "ordering"] = torch.zeros(3)
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError, match="F32 cannot fill an integer tensor"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Corrupt files and indexes


def _corrupt(tmp_path, how: str):
    path = _write(tmp_path, _toy_state())
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if how == "huge_header_length":
        raw = struct.pack("<Q", 1 << 40) + raw[8:]
    elif how == "invalid_json":
        raw = raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n :]
    elif how == "json_not_object":
        body = b"[1, 2]".ljust(n, b" ")
        raw = raw[:8] + body + raw[8 + n :]
    elif how == "truncated":
        raw = raw[:-10]
    elif how == "trailing":
        raw = raw + b"\0" * 16
    elif how == "tiny":
        raw = raw[:5]
    elif how == "bad_offsets":
        header = json.loads(raw[8 : 8 + n])
        header[PREFIX + "block.0.bias"]["data_offsets"][1] += 4
        body = json.dumps(header, separators=(",", ":")).encode().ljust(n, b" ")
        assert len(body) == n
        raw = raw[:8] + body + raw[8 + n :]
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("huge_header_length", "header length field"),
        ("invalid_json", "not valid JSON"),
        ("json_not_object", "expected an object"),
        ("truncated", "truncated"),
        ("trailing", "trailing bytes"),
        ("tiny", "too short"),
        ("bad_offsets", "data_offsets span"),
    ],
)
def test_corrupt_files_raise_checkpoint_error_naming_the_file(tmp_path, how, needle):
    path = _corrupt(tmp_path, how)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    assert str(path) in str(err.value) and needle in str(err.value)
    with pytest.raises(CheckpointError):
        read_safetensors_header(path)


def test_index_problems(tmp_path):
    sd = _toy_state()
    keys = sorted(sd)
    _write_sharded(tmp_path, sd, [keys[:3], keys[3:]])
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    # A shard the index names is gone.
    (tmp_path / "model-00002-of-00002.safetensors").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(CheckpointError, match=r"shard files that do not exist: \['model-00002-of-00002\.safetensors'\]"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    (tmp_path / "elsewhere.bin").rename(tmp_path / "model-00002-of-00002.safetensors")

    # The index maps a key to a shard that does not hold it.
    moved = dict(index)
    moved["weight_map"] = {**index["weight_map"], keys[0]: "model-00002-of-00002.safetensors"}
    index_path.write_text(json.dumps(moved))
    with pytest.raises(CheckpointError, match=f"{keys[0]} \\(index says model-00002-of-00002.safetensors\\)"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)

    # Paths escaping the checkpoint directory, and malformed indexes.
    index_path.write_text(json.dumps({"weight_map": {keys[0]: "../x.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside its directory"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint index"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)

    # A corrupt shard is named.
    index_path.write_text(json.dumps(index))
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=f"corrupt safetensors file {shard}"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(_meta_toy(), tmp_path / "nope", prefix=PREFIX, device="cpu", dtype=torch.float32)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    _write(tmp_path, _toy_state(), "weights-a.safetensors")
    with pytest.raises(CheckpointError, match="weights-a.safetensors"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)


def test_meta_non_persistent_buffers_need_an_init_hook(tmp_path):
    class NoHook(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("inv_freq", torch.ones(2), persistent=False)

    with torch.device("meta"):
        model = NoHook()
    _write(tmp_path, {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"inv_freq.*init_non_persistent_buffers"):
        load_checkpoint(model, tmp_path, prefix="", device="cpu", dtype=torch.float32)


def test_progress_bar_on_request(tmp_path, capsys):
    _write(tmp_path, _toy_state())
    load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32, progress=True)
    assert "loading" in capsys.readouterr().err
    load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32)
    assert capsys.readouterr().err == ""


@pytest.mark.cuda
def test_loads_onto_cuda_and_casts_there(tmp_path):
    sd = _toy_state()
    _write(tmp_path, sd)
    model = _meta_toy()
    load_checkpoint(model, tmp_path, prefix=PREFIX, device="cuda", dtype=torch.bfloat16)
    assert model.embed.weight.device.type == "cuda" and model.inv_freq.device.type == "cuda"
    assert torch.equal(model.block[0].weight.cpu(), sd[PREFIX + "block.0.weight"].bfloat16())


# --------------------------------------------------------------------------------------
# Integration with the real text model (models/text.py)


def _text_model(ckpt_dir):
    from gemma4x.config import load_config
    from gemma4x.models.text import Gemma4TextModel

    cfg = load_config(ckpt_dir)
    with torch.device("meta"):
        model = Gemma4TextModel(cfg.text, cfg.mm_placeholder_token_ids)
    return cfg, model


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-ple"])
def test_text_model_loads_written_checkpoints(tmp_path, preset):
    from gemma4x import checkpoint, presets

    checkpoint.write_random_checkpoint(tmp_path, presets.preset(preset), max_shard_bytes=300_000)
    cfg, model = _text_model(tmp_path)
    load_checkpoint(
        model, tmp_path, prefix=cfg.weight_prefix, device="cpu", dtype=torch.float32,
        ignore_patterns=model.ignored_checkpoint_keys(cfg.weight_prefix),
    )  # fmt: skip
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    entries = scan_checkpoint(tmp_path)
    key = cfg.weight_prefix + "layers.1.layer_scalar"
    from safetensors import safe_open

    with safe_open(str(entries[key].file), "pt") as f:
        assert torch.equal(model.layers[1].layer_scalar, f.get_tensor(key).float())


def test_text_model_loads_hf_save_pretrained_and_ignores_shared_kv(tmp_path):
    # An E2B-like HF checkpoint, plus the k/v weights of KV-shared layers and a tied lm_head
    # that hub checkpoints may carry: both are ignored through the model's patterns.
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from gemma4x import presets

    text = presets.preset("tiny-ple")["text_config"]
    hf_cfg = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
    transformers.Gemma4ForConditionalGeneration(hf_cfg).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    p = "model.language_model."
    sd[p + "layers.5.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    sd[p + "layers.4.self_attn.k_norm.weight"] = torch.zeros(16)
    sd["lm_head.weight"] = sd[p + "embed_tokens.weight"].clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))

    cfg, model = _text_model(tmp_path)
    load_checkpoint(
        model, tmp_path, prefix=cfg.weight_prefix, device="cpu", dtype=torch.bfloat16,
        ignore_patterns=model.ignored_checkpoint_keys(cfg.weight_prefix),
    )  # fmt: skip
    assert torch.equal(model.embed_tokens.weight, sd[p + "embed_tokens.weight"].bfloat16())
    # Without the patterns the extra tensors are reported.
    cfg, model = _text_model(tmp_path)
    with pytest.raises(CheckpointError, match="3 unexpected tensors"):
        load_checkpoint(model, tmp_path, prefix=cfg.weight_prefix, device="cpu", dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------
# Errors surfacing through Gemma4Runtime.from_pretrained


@pytest.fixture()
def tiny_ckpt(tmp_path):
    from gemma4x import checkpoint, presets

    return checkpoint.write_random_checkpoint(tmp_path, presets.preset("tiny-moe"))


def _edit_config(ckpt, **text_changes):
    config = json.loads((ckpt / "config.json").read_text())
    for k, v in text_changes.items():
        if k == "model_type":
            config[k] = v
        else:
            config["text_config"][k] = v
    (ckpt / "config.json").write_text(json.dumps(config))


def test_from_pretrained_loads_and_reports_bad_checkpoints(tiny_ckpt):
    from gemma4x.runtime import Gemma4Runtime

    rt = Gemma4Runtime.from_pretrained(tiny_ckpt, device="cpu")
    assert rt.model.embed_tokens.weight.dtype == torch.float32

    _edit_config(tiny_ckpt, model_type="gemma3")
    with pytest.raises(ValueError, match="unsupported model_type 'gemma3'"):
        Gemma4Runtime.from_pretrained(tiny_ckpt, device="cpu")
    _edit_config(tiny_ckpt, model_type="gemma4", num_kv_shared_layers=4)  # leaves no full-attention producer
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        Gemma4Runtime.from_pretrained(tiny_ckpt, device="cpu")
    # A config that does not describe these weights: every mismatching tensor is named.
    _edit_config(tiny_ckpt, num_kv_shared_layers=0, moe_intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"12 tensors do not fit(.|\n)*experts\.gate_up_proj' in .*safetensors"):
        Gemma4Runtime.from_pretrained(tiny_ckpt, device="cpu")
    _edit_config(tiny_ckpt, moe_intermediate_size=32, enable_moe_block=False)
    with pytest.raises(CheckpointError, match=r"unexpected tensors(.|\n)*router\.proj\.weight"):
        Gemma4Runtime.from_pretrained(tiny_ckpt, device="cpu")


def test_argument_checks(tmp_path):
    _write(tmp_path, _toy_state())
    with pytest.raises(ValueError, match="floating-point"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.int8)
    with pytest.raises(TypeError, match="not a single string"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32, ignore_patterns="x")
    with pytest.raises(ValueError, match="invalid ignore pattern"):
        load_checkpoint(_meta_toy(), tmp_path, prefix=PREFIX, device="cpu", dtype=torch.float32, ignore_patterns=["("])

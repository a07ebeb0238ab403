"""NVFP4: the reference quantizer, and NVFP4 checkpoints against transformers with dequantised weights.

* ``reference.quant`` against hand-made cases and, when ``nvidia-modelopt`` is installed,
  against ModelOpt's own ``NVFP4QTensor`` bit for bit.
* Tiny checkpoints exported by ModelOpt itself (``export_hf_checkpoint``, on the CPU) load
  and give the logits of an HF model holding the dequantised weights (fp32, 1e-4 of the max
  logit as in test_text_model; in practice bitwise equal), and ModelOpt's packed tensors
  equal our quantizer's. Skipped without ModelOpt.
* Checkpoints written by ``gemma4x.checkpoint.write_nvfp4_checkpoint`` (ModelOpt's layout,
  our quantizer) do the same without ModelOpt, and ``from_pretrained(quantize=...)``
  gives the same model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma4_tiny as gt  # noqa: E402

from gemma4x.checkpoint import write_nvfp4_checkpoint  # noqa: E402
from gemma4x.config import load_config  # noqa: E402
from gemma4x.layers.linear import NVFP4Linear  # noqa: E402
from gemma4x.layers.moe import NVFP4Experts  # noqa: E402
from gemma4x.loader import load_checkpoint  # noqa: E402
from gemma4x.models.text import Gemma4TextModel  # noqa: E402
from gemma4x.reference.quant import (  # noqa: E402
    E2M1_VALUES,
    e2m1_decode,
    e2m1_encode,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
    pack_nibbles,
    unpack_nibbles,
)

pytest.importorskip("transformers")

FP32_RTOL = 1e-4
LENGTH = 23  # longer than the sliding window (8)


def _modelopt():
    try:
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    except Exception:  # not installed, or it fails to import on this machine
        return None
    return NVFP4QTensor


needs_modelopt = pytest.mark.skipif(_modelopt() is None, reason="needs nvidia-modelopt (pip install nvidia-modelopt)")


def build(path, dtype=torch.float32) -> Gemma4TextModel:
    mc = load_config(path)
    with torch.device("meta"):
        model = Gemma4TextModel(mc.text, mc.mm_placeholder_token_ids)
    ignore = model.ignored_checkpoint_keys(mc.weight_prefix)
    load_checkpoint(model, path, prefix=mc.weight_prefix, device="cpu", dtype=dtype, ignore_patterns=ignore)
    return model.eval()


def logits(model, ids, native: bool) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.inference_mode():
        return model.compute_logits((model.forward_native if native else model)(ids, pos))


def rel_err(a, ref) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def prompt(vocab=256) -> torch.Tensor:
    return torch.randint(3, vocab, (2, LENGTH), generator=torch.Generator().manual_seed(7))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality for any dtype (float8 has no torch.equal)."""
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def ref_dequantize(w, s, g):
    return nvfp4_dequantize(w, s, g)


# --------------------------------------------------------------------------------------
# The reference quantizer


def test_e2m1_codes_round_ties_to_even_and_saturate():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_decode(codes)
    assert vals[:8].tolist() == list(E2M1_VALUES) and vals[8:].tolist() == [-v for v in E2M1_VALUES]
    assert torch.equal(e2m1_encode(vals[:8]), codes[:8])  # every magnitude encodes to itself
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.2501, 5.01, 7.0, 1e9, -0.1, -0.0, -2.6])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, 6.0, 6.0, -0.0, 0.0, -3.0]
    assert e2m1_decode(e2m1_encode(x)).tolist() == want
    assert e2m1_encode(torch.tensor([-0.1])).item() == 8  # "-0", as ModelOpt's sign bit


def test_pack_low_nibble_is_even_k():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_nibbles(packed), codes)
    r = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(r)), r)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


def test_quantize_exact_values_round_trip():
    # e2m1 values times power-of-two block scales and a global scale: exactly representable.
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8)
    codes[:, ::16] = 7  # every block holds 6: its scale is exact
    block = 2.0 ** torch.randint(-3, 4, (8, 4), generator=g).float()
    w = (e2m1_decode(codes).view(8, 4, 16) * block[..., None]).view(8, 64) * 0.01
    q, s, gs = nvfp4_quantize(w)
    assert q.dtype == torch.uint8 and q.shape == (8, 32)
    assert s.dtype == torch.float8_e4m3fn and s.shape == (8, 4)
    assert gs.dtype == torch.float32 and gs.shape == ()
    torch.testing.assert_close(nvfp4_dequantize(q, s, gs), w, rtol=2**-20, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (33, 160), (2, 5, 64)])
def test_quantize_error_bound(shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    q, s, g = nvfp4_quantize(w)
    deq = nvfp4_dequantize(q, s, g, torch.float32)
    blocks = w.float().reshape(*shape[:-1], -1, 16)
    step = (s.float() * g)[..., None]  # e2m1 spacing is at most 2 (4 -> 6) block-scale units
    bound = step + blocks.abs().amax(-1, keepdim=True) / 16  # plus the e4m3 rounding of the scale
    assert ((deq.reshape(blocks.shape) - blocks).abs() <= bound).all()
    assert nvfp4_dequantize(q, s, g, dtype).dtype == dtype


def test_zero_blocks_and_zero_tensor():
    w = torch.randn(4, 32)
    w[1, :16] = 0
    q, s, g = nvfp4_quantize(w)
    assert s[1, 0].float().item() == 1.0  # ModelOpt's "all-zero block -> scale 1"
    assert (nvfp4_dequantize(q, s, g)[1, :16] == 0).all()
    q, s, g = nvfp4_quantize(torch.zeros(2, 16))
    assert g.item() == 1.0 and (nvfp4_dequantize(q, s, g) == 0).all()


def test_batched_global_scales_equal_per_slice():
    w = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(2))
    gs = nvfp4_global_scale(w.abs().amax(dim=(1, 2)))
    q, s, _ = nvfp4_quantize(w, gs)
    for e in range(3):
        qe, se, ge = nvfp4_quantize(w[e])
        assert torch.equal(q[e], qe) and torch.equal(s[e].view(torch.uint8), se.view(torch.uint8))
        assert ge.item() == gs[e].item()
    torch.testing.assert_close(nvfp4_dequantize(q, s, gs)[1], nvfp4_dequantize(q[1], s[1], gs[1]), rtol=0, atol=0)


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.randn(4, 24))
    q, s, g = nvfp4_quantize(torch.randn(4, 32))
    with pytest.raises(ValueError, match="weight_scale"):
        nvfp4_dequantize(q, s[:, :1], g)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        nvfp4_dequantize(q, s.float(), g)


@needs_modelopt
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 32), (64, 48), (3, 5, 128), (1, 2816)])
def test_matches_modelopt_quantizer(shape, dtype):
    Q = _modelopt()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g) * torch.rand((*shape[:-1], 1), generator=g) * 4
    w[0, :16] = 0  # an all-zero block
    w.view(-1)[5] = w.abs().max()  # a tie with the tensor amax
    w = w.to(dtype)
    qt, s_mo, g_mo = Q.quantize(w.clone(), 16)
    q, s, gs = nvfp4_quantize(w)
    assert gs.item() == g_mo.float().item()
    assert torch.equal(s.view(torch.uint8), s_mo.view(torch.uint8))
    assert torch.equal(q, qt._quantized_data)
    deq_mo = qt.dequantize(dtype=torch.float32, scale=s_mo, double_scale=g_mo, block_sizes={-1: 16})
    assert torch.equal(nvfp4_dequantize(q, s, gs), deq_mo)


def test_nvfp4_layers_are_dequantised_bf16_layers():
    from gemma4x.layers.linear import Linear
    from gemma4x.layers.moe import Experts

    g = torch.Generator().manual_seed(5)
    lin = Linear(48, 24, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 48, generator=g))
        lin.bias.copy_(torch.randn(24, generator=g))
    q = NVFP4Linear.from_linear(lin)
    assert q.input_scale is None and q.weight.dtype == torch.uint8 and q.bias is lin.bias
    x = torch.randn(3, 5, 48, generator=g)
    want = torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias)
    assert torch.equal(q(x), want) and torch.equal(q.forward_native(x), want)

    ex = Experts(4, 32, 16)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(4, 32, 32, generator=g))
        ex.down_proj.copy_(torch.randn(4, 32, 16, generator=g))
    qx = NVFP4Experts.from_experts(ex)
    gu, dn = qx.dequantized_weights()
    ref = Experts(4, 32, 16)
    with torch.no_grad():
        ref.gate_up_proj.copy_(gu)
        ref.down_proj.copy_(dn)
    x = torch.randn(6, 32, generator=g)
    w = torch.rand(6, 2, generator=g)
    idx = torch.randint(0, 4, (6, 2), generator=g)
    assert torch.equal(qx(x, w, idx), ref.forward_native(x, w, idx))
    # gate and up of an expert share one global scale, as in ModelOpt's export
    assert torch.equal(qx.gate_up_weight_scale_2[:, 0], qx.gate_up_weight_scale_2[:, 1])


@pytest.mark.cuda
def test_cuda_quantizer_equals_cpu():
    """The reference quantizer is device-agnostic: bit-identical on CUDA (quantize-at-load on a GPU)."""
    w = torch.randn(3, 64, 256, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    gs = nvfp4_global_scale(w.abs().amax(dim=(1, 2)).float())
    cpu = nvfp4_quantize(w, gs)
    gpu = nvfp4_quantize(w.cuda(), gs.cuda())
    for a, b in zip(cpu, gpu):
        assert same_bits(a, b.cpu())
    assert torch.equal(nvfp4_dequantize(*gpu, torch.bfloat16).cpu(), nvfp4_dequantize(*cpu, torch.bfloat16))
    # the CUDA quantizer kernel (what quantize-at-load uses on a GPU), bit for bit too
    from gemma4x.ops.nvfp4 import nvfp4_quantize as cuda_quantize

    for a, b in zip(cpu, cuda_quantize(w.cuda(), gs.cuda())):
        assert same_bits(a, b.cpu())


# --------------------------------------------------------------------------------------
# ModelOpt's own exports


# (config, ModelOpt preset(s))
MODELOPT_CASES = {
    "moe_experts": (gt.MOE_TEXT, "NVFP4_EXPERTS_ONLY_CFG"),
    "moe_all_multimodal": (gt.multimodal(gt.MOE_TEXT), "NVFP4_DEFAULT_CFG"),
    "e2b_w4a16_multimodal": (gt.multimodal(gt.E2B_TEXT), "W4A16_NVFP4_CFG"),
    # + an FP8 KV cache: k_proj.k_scale / v_proj.v_scale tensors, which we read past
    "moe_experts_fp8_kv": (gt.MOE_TEXT, ("NVFP4_EXPERTS_ONLY_CFG", "FP8_KV_CFG")),
}


@pytest.fixture(scope="module")
def modelopt_exports(tmp_path_factory):
    """name -> (export dir, config dict, the fp32 HF model ModelOpt quantized)."""
    if _modelopt() is None:
        pytest.skip("needs nvidia-modelopt")
    out = {}
    for name, (cfg, algo) in MODELOPT_CASES.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, cfg, gt.modelopt_export(cfg, path, algo, seed=3))
    return out


def _modelopt_dequantize(w, s, g):
    Q = _modelopt()
    return Q((w.shape[0], w.shape[1] * 2), torch.float32, w).dequantize(
        dtype=torch.float32, scale=s, double_scale=g, block_sizes={-1: 16}
    )


@needs_modelopt
def test_modelopt_export_layout(modelopt_exports):
    """The format facts the loader relies on, as ModelOpt 0.47 writes them."""
    from safetensors import safe_open

    path, _, _ = modelopt_exports["moe_experts"]
    mc = load_config(path)
    assert mc.quantization.quant_algo == "NVFP4" and mc.quantization.source == "hf_quant_config.json"
    assert mc.text.nvfp4_modules == {f"layers.{i}.experts" for i in range(4)}
    H, I = 64, 32
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        b = "model.layers.2.experts.5."
        want = {
            "gate_proj.weight": (torch.uint8, (I, H // 2)),
            "up_proj.weight_scale": (torch.float8_e4m3fn, (I, H // 16)),
            "down_proj.weight": (torch.uint8, (H, I // 2)),
            "down_proj.weight_scale": (torch.float8_e4m3fn, (H, I // 16)),
            "down_proj.weight_scale_2": (torch.float32, ()),
            "gate_proj.input_scale": (torch.float32, ()),
        }
        for k, (dt, shape) in want.items():
            t = f.get_tensor(b + k)
            assert (t.dtype, tuple(t.shape)) == (dt, shape), k
        # gate and up of one expert share their global scale (one fused GEMM per expert).
        assert f.get_tensor(b + "gate_proj.weight_scale_2") == f.get_tensor(b + "up_proj.weight_scale_2")
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype != torch.uint8  # excluded: BF16/fp32


@needs_modelopt
@pytest.mark.parametrize("name", list(MODELOPT_CASES))
def test_modelopt_checkpoint_matches_dequantised_hf(modelopt_exports, name):
    path, cfg, _ = modelopt_exports[name]
    model = build(path)
    mc = load_config(path)
    n_quant = len(mc.text.nvfp4_modules)
    assert n_quant and sum(isinstance(m, (NVFP4Linear, NVFP4Experts)) for m in model.modules()) == n_quant
    assert mc.quantization.kv_cache_quant_algo == ("FP8" if name.endswith("fp8_kv") else None)
    oracle = gt.nvfp4_oracle(cfg, path, _modelopt_dequantize)
    ids = prompt()
    with torch.inference_mode():
        ref = oracle(ids).logits.float()
    assert torch.equal(logits(model, ids, True), ref)  # same ops, same rounding points: bitwise
    assert rel_err(logits(model, ids, False), ref) < FP32_RTOL


@needs_modelopt
@pytest.mark.parametrize("name", ["moe_experts", "moe_all_multimodal"])
def test_modelopt_packed_tensors_equal_reference_quantizer(modelopt_exports, name):
    """ModelOpt's weight / weight_scale are our quantizer's given its weight_scale_2."""
    from safetensors.torch import load_file

    path, _, hf = modelopt_exports[name]
    sd = load_file(str(path / "model.safetensors"))
    ref = dict(hf.state_dict())
    checked = 0
    for k in sd:
        if not k.endswith(".weight_scale_2"):
            continue
        b = k[: -len("weight_scale_2")]
        if ".experts." in b:
            stem, rest = b.split(".experts.")
            e, proj = int(rest.split(".")[0]), rest.split(".")[1]
            gate_up, down = ref[stem + ".experts.gate_up_proj"], ref[stem + ".experts.down_proj"]
            I = gate_up.shape[1] // 2
            w = {"gate_proj": gate_up[e, :I], "up_proj": gate_up[e, I:], "down_proj": down[e]}[proj]
        else:
            w = ref[b + "weight"]
        q, s, _ = nvfp4_quantize(w, sd[k])
        assert torch.equal(q, sd[b + "weight"]), b
        assert torch.equal(s.view(torch.uint8), sd[b + "weight_scale"].view(torch.uint8)), b
        checked += 1
    assert checked >= 4 * 8 * 3


@needs_modelopt
def test_writer_matches_modelopt_export(modelopt_exports, tmp_path):
    """write_nvfp4_checkpoint(scope="experts") writes ModelOpt's names, dtypes, shapes and
    (weight-only) quantized bytes for the same weights."""
    from safetensors.torch import load_file

    path, _, hf = modelopt_exports["moe_experts"]
    src = tmp_path / "src"
    hf.save_pretrained(src)
    ours = write_nvfp4_checkpoint(src, tmp_path / "ours", scope="experts", dtype=torch.float32)
    a, b = load_file(str(path / "model.safetensors")), load_file(str(ours / "model.safetensors"))
    no_input_scale = {k for k in a if not k.endswith(".input_scale")}
    assert set(b) == no_input_scale
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert same_bits(a[k], b[k]), k
    theirs, mine = load_config(path).quantization, load_config(ours).quantization
    assert mine.modules == theirs.modules
    assert mine.exclude_modules == theirs.exclude_modules  # the very list ModelOpt writes


# --------------------------------------------------------------------------------------
# Our ModelOpt-layout writer and quantize-at-load (no ModelOpt needed)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (BF16 HF checkpoint dir, NVFP4 dir, config dict)."""
    out = {}
    for name, cfg, scope in (
        ("moe_kv_eq", gt.CONFIGS["moe_kv_eq"], "experts"),
        ("e2b_like", gt.CONFIGS["e2b_like"], "all"),
    ):
        src = tmp_path_factory.mktemp(name + "_bf16")
        gt.make_checkpoint(cfg, src, seed=4)
        dst = write_nvfp4_checkpoint(src, tmp_path_factory.mktemp(name + "_nvfp4"), scope=scope, dtype=torch.float32)
        out[name] = (src, dst, cfg)
    return out


@pytest.mark.parametrize("name", ["moe_kv_eq", "e2b_like"])
def test_written_checkpoint_matches_dequantised_hf(written, name):
    src, dst, cfg = written[name]
    mc = load_config(dst)
    assert mc.quantization.quant_algo == "W4A16_NVFP4"
    model = build(dst)
    oracle = gt.nvfp4_oracle(cfg, dst, ref_dequantize)
    ids = prompt()
    with torch.inference_mode():
        ref = oracle(ids).logits.float()
    assert torch.equal(logits(model, ids, True), ref)  # same ops, same rounding points: bitwise
    assert rel_err(logits(model, ids, False), ref) < FP32_RTOL
    # and it is not simply the BF16 model: quantization changed the logits
    with torch.inference_mode():
        assert rel_err(logits(build(src), ids, True), ref) > 1e-3


@pytest.mark.parametrize("name,mode", [("moe_kv_eq", "nvfp4"), ("e2b_like", "nvfp4-all")])
def test_quantize_at_load_equals_written_checkpoint(written, name, mode):
    from gemma4x.runtime.runtime import Gemma4Runtime

    src, dst, _ = written[name]
    rt = Gemma4Runtime.from_pretrained(src, quantize=mode)
    loaded = build(dst)
    assert rt.config.quantization.modules == load_config(dst).text.nvfp4_modules
    assert rt.model.config.nvfp4_modules == rt.config.quantization.modules
    a = dict(rt.model.named_parameters())
    b = dict(loaded.named_parameters())
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert t.dtype == b[k].dtype and same_bits(t, b[k]), k
    ids = prompt()
    assert torch.equal(logits(rt.model, ids, True), logits(loaded, ids, True))


@pytest.mark.parametrize("name", ["moe_kv_eq", "e2b_like"])
def test_bf16_bitwise_equal_to_hf_with_dequantised_weights(written, name, tmp_path):
    """bf16: the dequantised weights are rounded to bf16 once, as HF's bf16 loading does, and
    the rest is HF's ops, so the logits are bit for bit HF's. (The oracle is reloaded with
    ``from_pretrained(dtype=bf16)``: a model cast with ``.to(bf16)`` rounds differently.)"""
    from transformers import Gemma4ForConditionalGeneration

    _, dst, cfg = written[name]
    gt.nvfp4_oracle(cfg, dst, ref_dequantize).save_pretrained(tmp_path)
    oracle = Gemma4ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = prompt()
    with torch.inference_mode():
        ref = oracle(ids).logits.float()
    assert torch.equal(logits(build(dst, torch.bfloat16), ids, True), ref)

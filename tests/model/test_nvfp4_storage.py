"""NVFP4 layers hold their weights once: the checkpoint layout, or (SM90) the W4A16 packing.

CPU: ``pack_w4a16_(force=True)`` runs the release path the GPU takes; the packed bytes equal the
old per-forward cache, and every reader of the checkpoint layout (attribute names,
``forward_native``, ``dequantized_weight(s)``, ``state_dict()``, ``load_state_dict``, the
loader, ``nvfp4_state_dict``, the SM100 preparation, deepcopy) sees the same bits as before,
in the same order; assigning a name restores the layout; no packing during capture.
GPU (``-m cuda``, SM90): the live tensors hold one copy after packing; forward outputs are
bit-identical to the old path (same kernels on the same packed bytes); ``state_dict()``
round-trips; ``Gemma4Runtime`` packs at construction, before capturing its graphs.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma4x.layers import nvfp4_storage  # noqa: E402
from gemma4x.layers.linear import Linear, NVFP4Linear  # noqa: E402
from gemma4x.layers.moe import Experts, NVFP4Experts  # noqa: E402
from gemma4x.reference.nvfp4_w4a16 import w4a16_pack  # noqa: E402


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality for any dtype (float8 has no torch.equal)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    )


def same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(same_bits(a[k], b[k]) for k in a)


def cloned(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def make_linear(N=48, K=192, bias=True, device="cpu", seed=0) -> NVFP4Linear:
    g = torch.Generator(device=device).manual_seed(seed)
    lin = Linear(K, N, bias=bias).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g, device=device) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g, device=device))
    return NVFP4Linear.from_linear(lin)


def make_experts(E=3, H=128, I=64, device="cpu", seed=0) -> NVFP4Experts:
    g = torch.Generator(device=device).manual_seed(seed)
    ex = Experts(E, H, I).to(device)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g, device=device) * 0.06)
        ex.down_proj.copy_(torch.randn(E, H, I, generator=g, device=device) * 0.09)
    return NVFP4Experts.from_experts(ex)


def route(T, k, E, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.rand(T, E, generator=g, device=device).topk(k, dim=-1).indices
    w = torch.rand(T, k, generator=g, device=device) + 0.1
    return w, idx


def old_linear_cache(q: NVFP4Linear) -> torch.Tensor:
    """What ``NVFP4Linear.w4a16_packed`` built and kept beside the checkpoint tensors before."""
    return w4a16_pack(q.weight, q.weight_scale)


def old_experts_cache(q: NVFP4Experts) -> tuple[torch.Tensor, torch.Tensor]:
    gu = torch.stack(
        [w4a16_pack(q.gate_up_weight[e], q.gate_up_weight_scale[e], interleave_gate_up=True) for e in range(q.num_experts)]
    )
    dn = torch.stack([w4a16_pack(q.down_weight[e], q.down_weight_scale[e]) for e in range(q.num_experts)])
    return gu, dn


def ckpt_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# --- CPU: the release path, forced ------------------------------------------------------------------


def test_cpu_does_not_pack_unless_forced():
    q, qx = make_linear(), make_experts()
    assert q.pack_w4a16_() == 0 and qx.pack_w4a16_() == 0
    assert not q.w4a16_is_packed and not qx.w4a16_is_packed
    assert "weight" in q._parameters and "gate_up_weight" in qx._parameters
    from gemma4x.models.text import Gemma4TextModel

    model = torch.nn.Module()
    model.a, model.b = q, qx
    assert Gemma4TextModel.pack_nvfp4_(model) == 0  # what the runtime calls: nothing on the CPU


def test_linear_pack_release_unpack_round_trip():
    q = make_linear()
    x = torch.randn(5, q.in_features)
    sd0 = cloned(q.state_dict())
    y0, w0 = q.forward_native(x), q.dequantized_weight()
    names0 = [n for n, _ in q.named_parameters()]
    old = old_linear_cache(q)
    want_freed = ckpt_bytes(q.weight, q.weight_scale)

    assert q.pack_w4a16_(force=True) == want_freed
    assert q.w4a16_is_packed and "packed" in repr(q)
    assert "weight" not in q._parameters and "weight_scale" not in q._parameters
    assert [n for n, _ in q.named_parameters()] == ["w4a16_weight", "weight_scale_2", "bias"]
    assert same_bits(q.w4a16_packed(), old)  # the same bytes the kernels read before
    assert ckpt_bytes(q.w4a16_weight) == want_freed  # 0.5625 bytes per weight, as the checkpoint
    assert q.pack_w4a16_(force=True) == 0  # once

    # every reader of the checkpoint layout sees the same bits
    assert same_bits(q.weight, sd0["weight"]) and same_bits(q.weight_scale, sd0["weight_scale"])
    assert same_state(q.state_dict(), sd0)  # same keys, order, dtypes, bytes
    assert torch.equal(q.forward_native(x), y0) and torch.equal(q(x), y0)  # CPU forward is forward_native
    assert torch.equal(q.dequantized_weight(), w0)
    assert same_state(copy.deepcopy(q).state_dict(), sd0)

    # load_state_dict: restored, loaded, packed again
    sd1 = cloned(make_linear(seed=1).state_dict())
    q.load_state_dict(sd1)
    assert q.w4a16_is_packed and same_state(q.state_dict(), sd1)
    q.load_state_dict(sd0)

    # back to the checkpoint layout: the same parameters, order and loader hints
    q.restore_checkpoint_layout_()
    assert not q.w4a16_is_packed and [n for n, _ in q.named_parameters()] == names0
    assert isinstance(q.weight, torch.nn.Parameter) and q.weight.keep_dtype and q.weight_scale.keep_dtype
    assert same_state(q.state_dict(), sd0) and torch.equal(q.forward_native(x), y0)


def test_linear_assigning_a_name_restores_the_layout():
    q = make_linear(bias=False)
    sd0 = cloned(q.state_dict())
    q.pack_w4a16_(force=True)
    new = torch.nn.Parameter(torch.zeros_like(sd0["weight"]), requires_grad=False)
    q.weight = new
    assert not q.w4a16_is_packed and q.weight is new
    assert same_bits(q.weight_scale, sd0["weight_scale"])  # the other tensor of the pair came back
    assert list(q.state_dict()) == list(sd0)


def test_experts_pack_release_unpack_round_trip():
    qx = make_experts()
    w, idx = route(7, 2, qx.num_experts)
    x = torch.randn(7, qx.hidden_size)
    sd0 = cloned(qx.state_dict())
    y0 = qx.forward_native(x, w, idx)
    gu0, dn0 = qx.dequantized_weights()
    # as the loader builds it: parameters carrying their checkpoint_parts
    built = NVFP4Experts(qx.num_experts, qx.hidden_size, qx.intermediate_size, input_scale=False)
    built.load_state_dict(qx.state_dict())
    qx = built
    parts0 = {n: p.checkpoint_parts for n, p in qx.named_parameters()}
    old_gu, old_dn = old_experts_cache(qx)
    want_freed = ckpt_bytes(qx.gate_up_weight, qx.gate_up_weight_scale, qx.down_weight, qx.down_weight_scale)

    assert qx.pack_w4a16_(force=True) == want_freed
    assert [n for n, _ in qx.named_parameters()] == [
        "w4a16_gate_up", "gate_up_weight_scale_2", "w4a16_down", "down_weight_scale_2"
    ]  # fmt: skip
    gu, dn = qx.w4a16_packed()
    assert same_bits(gu, old_gu) and same_bits(dn, old_dn)
    assert ckpt_bytes(gu, dn) == want_freed

    assert same_state(qx.state_dict(), sd0)
    assert torch.equal(qx.forward_native(x, w, idx), y0) and torch.equal(qx(x, w, idx), y0)
    gu1, dn1 = qx.dequantized_weights()
    assert torch.equal(gu1, gu0) and torch.equal(dn1, dn0)
    for name in ("gate_up_weight", "gate_up_weight_scale", "down_weight", "down_weight_scale"):
        assert same_bits(getattr(qx, name), sd0[name]), name

    other = cloned(make_experts(seed=3).state_dict())
    qx.load_state_dict(other)
    assert qx.w4a16_is_packed and same_state(qx.state_dict(), other)
    qx.load_state_dict(sd0)

    qx.restore_checkpoint_layout_()
    assert not qx.w4a16_is_packed and same_state(qx.state_dict(), sd0)
    assert {n: p.checkpoint_parts for n, p in qx.named_parameters()} == parts0  # the loader's hints survive
    assert torch.equal(qx.forward_native(x, w, idx), y0)


def test_sm100_preparation_reads_the_checkpoint_layout():
    qx = make_experts(E=2)
    want = qx.w4a4_sm100_packed()
    qx.pack_w4a16_(force=True)
    got = qx.w4a4_sm100_packed()  # the storage changed: prepared again, from the rebuilt layout
    assert got is not want
    for f in ("gate_up", "gate_up_scale", "gate_up_scale_2", "down", "down_scale", "down_scale_2"):
        assert same_bits(getattr(got, f), getattr(want, f)), f
    assert qx.w4a4_sm100_packed() is got  # and cached while the storage stays


def test_no_packing_during_graph_capture(monkeypatch):
    q = make_linear()
    monkeypatch.setattr(nvfp4_storage, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during CUDA-graph capture.*pack_w4a16_"):
        q.pack_w4a16_(force=True)
    with pytest.raises(RuntimeError, match="during CUDA-graph capture"):
        q.w4a16_packed()
    assert not q.w4a16_is_packed and "weight" in q._parameters


def test_pack_is_all_or_nothing():
    qx = make_experts(E=2, H=128, I=32)  # gate/up packs (K = 128), down does not (K = 32)
    sd0 = cloned(qx.state_dict())
    with pytest.raises(ValueError, match="K = 32 must be a positive multiple of 64"):
        qx.pack_w4a16_(force=True)
    assert not qx._packed_names() and same_state(qx.state_dict(), sd0)


def test_bounded_pack_equals_whole_pack():
    qx = make_experts(E=4)
    for wname, sname, inter in (("gate_up_weight", "gate_up_weight_scale", True), ("down_weight", "down_weight_scale", False)):
        w, s = getattr(qx, wname), getattr(qx, sname)
        p = nvfp4_storage.pack_bounded(w, s, inter)
        assert same_bits(p, w4a16_pack(w, s, interleave_gate_up=inter))
        w2, s2 = nvfp4_storage.unpack_bounded(p, inter)
        assert same_bits(w2, w) and same_bits(s2, s)


# --- CPU: a whole model, the checkpoint writer and the loader ---------------------------------------


@pytest.fixture(scope="module")
def nvfp4_ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    import gemma4_tiny as gt
    from gemma4x.checkpoint import write_nvfp4_checkpoint

    src = tmp_path_factory.mktemp("moe_bf16")
    cfg = gt.multimodal({**gt.MOE_TEXT, "moe_intermediate_size": 64})  # experts the W4A16 layout takes
    gt.make_checkpoint(cfg, src, seed=5)
    return write_nvfp4_checkpoint(src, tmp_path_factory.mktemp("moe_nvfp4"), scope="all", dtype=torch.float32)


def _load(path):
    from gemma4x.config import load_config
    from gemma4x.loader import load_checkpoint
    from gemma4x.models.text import Gemma4TextModel

    mc = load_config(path)
    with torch.device("meta"):
        model = Gemma4TextModel(mc.text, mc.mm_placeholder_token_ids)
    ignore = model.ignored_checkpoint_keys(mc.weight_prefix)
    load_checkpoint(model, path, prefix=mc.weight_prefix, device="cpu", dtype=torch.float32, ignore_patterns=ignore)
    return model.eval(), mc, ignore


def _force_pack(model) -> tuple[int, int]:
    """Pack every NVFP4 module whose shapes the W4A16 layout takes (as an SM90 GPU would)."""
    linears = experts = 0
    for m in model.modules():
        if isinstance(m, nvfp4_storage.W4A16Storage):
            try:
                m.pack_w4a16_(force=True)
            except ValueError:  # N % 16 or K % 64: the kernels would not take it either
                assert not m._packed_names()  # all or nothing
                continue
            linears += isinstance(m, NVFP4Linear)
            experts += isinstance(m, NVFP4Experts)
    return linears, experts


def test_model_state_and_reload_with_packed_layers(nvfp4_ckpt):
    from gemma4x.checkpoint import nvfp4_state_dict
    from gemma4x.loader import load_checkpoint
    from safetensors.torch import load_file

    model, mc, ignore = _load(nvfp4_ckpt)
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)[None]
    with torch.inference_mode():
        ref = model.compute_logits(model.forward_native(ids, pos))
    sd0 = cloned(model.state_dict())
    linears, experts = _force_pack(model)
    assert linears > 0 and experts > 0
    with torch.inference_mode():
        assert torch.equal(model.compute_logits(model.forward_native(ids, pos)), ref)
    assert same_state(model.state_dict(), sd0)
    # the checkpoint writer's view is still the file's tensors
    written = load_file(str(nvfp4_ckpt / "model.safetensors"))
    got = nvfp4_state_dict(model, mc.weight_prefix)
    assert got.keys() == written.keys() and all(same_bits(got[k], written[k]) for k in got)
    # a reload into the live (packed) model goes through the checkpoint layout
    load_checkpoint(model, nvfp4_ckpt, prefix=mc.weight_prefix, device="cpu", dtype=torch.float32, ignore_patterns=ignore)
    assert same_state(model.state_dict(), sd0)
    with torch.inference_mode():
        assert torch.equal(model.compute_logits(model.forward_native(ids, pos)), ref)


# --- GPU (SM90): one copy, same outputs ----------------------------------------------------------------

cuda = pytest.mark.cuda


def _sm90():
    from gemma4x.ops.nvfp4 import sm90_available

    return torch.cuda.is_available() and sm90_available(torch.device("cuda"))


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs a compute capability 9.0 GPU and an sm_90a build")
ALLOC_SLACK = 64 * 1024  # small scratch


def gpu_bytes(stat: str = "current") -> int:
    """Bytes the live tensors asked for. ``memory_allocated`` counts cached blocks, and a large
    tensor reusing a block up to 1 MiB bigger than it is counted at the block's size."""
    torch.cuda.synchronize()
    return torch.cuda.memory_stats()[f"requested_bytes.all.{stat}"]


@cuda
@needs_sm90
def test_cuda_linear_one_copy_same_outputs():
    from gemma4x.ops.nvfp4 import w4a16_gemm

    m0 = gpu_bytes()
    q = make_linear(N=2112, K=2816, bias=False, device="cuda")
    m1 = gpu_bytes()
    ckpt = ckpt_bytes(q.weight, q.weight_scale)
    xs = [torch.randn(M, 2816, device="cuda").bfloat16() for M in (1, 5, 64, 300)]
    with torch.no_grad():
        old = old_linear_cache(q)  # the copy the old forward kept beside the checkpoint tensors
        want = [w4a16_gemm(x, old, q.weight_scale_2.reshape(1)) for x in xs]
        m_old = gpu_bytes()
        assert m_old - m1 >= ckpt  # two copies
        del old
        m_before = gpu_bytes()

        assert q.pack_w4a16_() == ckpt  # not forced: the SM90 kernels run here
        got = [q(x) for x in xs]
        m_after = gpu_bytes() - sum(ckpt_bytes(y) for y in got)
    assert abs(m_after - m_before) < ALLOC_SLACK  # one copy: the packed one replaced the checkpoint's
    assert m_old - m_after > ckpt - ALLOC_SLACK  # the old path held the checkpoint layout on top
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert m1 - m0 >= ckpt


@cuda
@needs_sm90
def test_cuda_experts_one_copy_same_outputs_and_state_round_trip():
    from gemma4x.ops.nvfp4 import w4a16_moe_experts

    E, H, I = 64, 2816, 704  # the 26B-A4B expert shapes, half the experts
    qx = make_experts(E, H, I, device="cuda")
    sd0 = {k: v.cpu() for k, v in qx.state_dict().items()}
    gate_up = ckpt_bytes(qx.gate_up_weight, qx.gate_up_weight_scale)
    ckpt = gate_up + ckpt_bytes(qx.down_weight, qx.down_weight_scale)
    cases = []
    for T, k in ((1, 8), (4, 8), (300, 8)):
        w, idx = route(T, k, E, device="cuda", seed=T)
        cases.append((torch.randn(T, H, device="cuda").bfloat16(), w, idx))
    with torch.no_grad():
        gu, dn = old_experts_cache(qx)
        want = [
            w4a16_moe_experts(x, idx, w, gu, qx.gate_up_weight_scale_2, dn, qx.down_weight_scale_2)
            for x, w, idx in cases
        ]
        del gu, dn
        m_before = gpu_bytes()
        torch.cuda.reset_peak_memory_stats()
        assert qx.pack_w4a16_() == ckpt
        m_after = gpu_bytes()
        peak = gpu_bytes("peak") - m_before
        got = [qx(x, w, idx) for x, w, idx in cases]
    assert qx.w4a16_is_packed
    assert abs(m_after - m_before) < ALLOC_SLACK  # one copy
    # pair by pair, expert by expert: at most the packed gate/up beside everything (+ one expert's temporaries)
    assert peak < gate_up + 32 * 2**20 < ckpt
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # state_dict round trip: the checkpoint layout, bit for bit, and it loads back
    sd1 = qx.state_dict()
    assert list(sd1) == list(sd0) and all(same_bits(sd1[k].cpu(), sd0[k]) for k in sd0)
    fresh = make_experts(E, H, I, device="cuda", seed=9)
    fresh.pack_w4a16_()
    fresh.load_state_dict(sd1)
    assert fresh.w4a16_is_packed
    with torch.no_grad():
        for (x, w, idx), b in zip(cases, want):
            assert torch.equal(fresh(x, w, idx), b)


@cuda
@needs_sm90
def test_cuda_forward_packs_once_outside_capture():
    """A layer never packed packs on its first SM90 forward; inside graph capture that is refused."""
    q = make_linear(N=256, K=512, bias=False, device="cuda")
    x = torch.randn(3, 512, device="cuda").bfloat16()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="during CUDA-graph capture"), torch.cuda.graph(graph):
        q(x)
    graph = torch.cuda.CUDAGraph()
    assert not q.w4a16_is_packed
    y = q(x)
    assert q.w4a16_is_packed and "weight" not in q._parameters
    with torch.cuda.graph(graph):
        yg = q(x)
    graph.replay()
    assert torch.equal(yg, y)


@cuda
@needs_sm90
def test_cuda_runtime_packs_before_capture(nvfp4_ckpt):
    """Gemma4Runtime on the GPU: the NVFP4 layers the kernels take are packed at construction;
    the model's checkpoint view is still the file's tensors; greedy decoding runs from graphs."""
    from gemma4x.checkpoint import nvfp4_state_dict
    from gemma4x.config import load_config
    from gemma4x.runtime.runtime import Gemma4Runtime
    from safetensors.torch import load_file

    rt = Gemma4Runtime.from_pretrained(nvfp4_ckpt, device="cuda", max_batch_size=2, max_seq_len=32)
    mods = [m for m in rt.model.modules() if isinstance(m, nvfp4_storage.W4A16Storage)]
    applicable = [m for m in mods if m._w4a16_applicable(torch.device("cuda"))]
    assert applicable and all(m.w4a16_is_packed for m in applicable)
    assert not any(m.w4a16_is_packed for m in mods if m not in applicable)
    written = load_file(str(nvfp4_ckpt / "model.safetensors"))
    got = nvfp4_state_dict(rt.model, load_config(nvfp4_ckpt).weight_prefix)
    assert got.keys() == written.keys()
    quantized = [k for k, t in written.items() if t.dtype in (torch.uint8, torch.float8_e4m3fn)]
    assert quantized and all(same_bits(got[k], written[k]) for k in quantized)
    out = rt.generate([[2, 17, 40, 99]], max_new_tokens=5)[0]
    assert len(out.token_ids) == 5

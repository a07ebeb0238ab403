"""GPU tests of the interleaved gate/up layout: the SM90 prefill path with the GeGLU in GEMM1's
epilogue (no GeGLU kernel, no h1 buffer), the fused one-launch prep, and the decode kernels reading
the interleaved rows. Accuracy as the other MoE tests (error vs fp64 at most 2x PyTorch's bf16
path); the fused epilogue rounds where the separate GeGLU kernel rounds (bf16 gate and up, bf16
gelu, bf16 product), so it must also equal the HF-layout path bit for bit.
"""

import pytest
import torch

from gemma4x import ops
from gemma4x.ops import moe as moe_ops
from gemma4x.reference import moe as ref

from test_moe_cuda import REAL, _expert_weights, _poison_allocator, _rand, _routing, assert_experts_accurate

pytestmark = pytest.mark.cuda


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="the prefill kernels are built for sm_90a (H100/H200)")


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(777)


@pytest.fixture(scope="module")
def real_weights():
    g = torch.Generator(device="cuda").manual_seed(13)
    gate_up, down = _expert_weights(REAL["E"], REAL["H"], REAL["I"], torch.bfloat16, g)
    return gate_up, ref.interleave_gate_up(gate_up), down


def _prefill(x, idx, w, gate_up, down, tile=0, interleaved=False, prep=0):
    return torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gate_up, down, tile, interleaved, prep)


@needs_sm90
@pytest.mark.parametrize("T", [9, 65, 1000, 8192])
@pytest.mark.parametrize("skew", [False, True])
def test_geglu_epilogue_real_shape(T, skew, real_weights, gen):
    gate_up, gate_up_il, down = real_weights
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen, skew)
    _poison_allocator(T * REAL["H"] * 40, torch.bfloat16)  # workspace and output start as NaN
    out = ops.moe_experts(x, idx, w, gate_up_il, down, gate_up_interleaved=True)
    assert_experts_accurate(out, x, idx, w, gate_up, down)
    assert torch.equal(out, ops.moe_experts(x, idx, w, gate_up, down)), "differs from the HF-layout path"
    assert torch.equal(out, ops.moe_experts(x, idx, w, gate_up_il, down, gate_up_interleaved=True)), "not deterministic"


@needs_sm90
@pytest.mark.parametrize("tile", [1, 2])
def test_geglu_epilogue_both_tiles(tile, real_weights, gen):
    gate_up, gate_up_il, down = real_weights
    T = 700
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen)
    out = _prefill(x, idx, w, gate_up_il, down, tile, True)
    assert_experts_accurate(out, x, idx, w, gate_up, down)
    assert torch.equal(out, _prefill(x, idx, w, gate_up_il, down, 3 - tile, True))
    assert torch.equal(out, _prefill(x, idx, w, gate_up, down, tile, False))


@needs_sm90
@pytest.mark.parametrize("T,skew", [(9, False), (65, True), (300, False), (512, True)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_prep_equals_multi_kernel_prep(T, skew, interleaved, real_weights, gen):
    """Rows land elsewhere inside an expert's segment; no output bit changes."""
    gate_up, gate_up_il, down = real_weights
    gu = gate_up_il if interleaved else gate_up
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen, skew)
    fused = _prefill(x, idx, w, gu, down, 0, interleaved, 1)
    assert_experts_accurate(fused, x, idx, w, gate_up, down)
    assert torch.equal(fused, _prefill(x, idx, w, gu, down, 0, interleaved, 2))


@needs_sm90
@pytest.mark.parametrize(
    "T,E,H,I,k",
    [(9, 8, 64, 32, 8), (40, 16, 256, 96, 4), (33, 5, 200, 64, 3), (300, 64, 136, 40, 2), (17, 256, 128, 64, 32),
     (129, 1, 72, 16, 1), (600, 8, 64, 136, 8)],
)
def test_geglu_epilogue_small_shapes(T, E, H, I, k, gen):
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    gate_up_il = ref.interleave_gate_up(gate_up)
    x = _rand((T, H), torch.bfloat16, gen)
    w, idx = _routing(T, E, k, gen)
    for tile in (1, 2):
        for prep in (1, 2):
            if prep == 1 and T * k > moe_ops.FUSED_PREP_MAX_PAIRS:
                continue
            out = _prefill(x, idx, w, gate_up_il, down, tile, True, prep)
            assert_experts_accurate(out, x, idx, w, gate_up, down)


@needs_sm90
@pytest.mark.parametrize("prep", [1, 2])
def test_geglu_epilogue_empty_experts_all_to_one_and_bad_ids(prep, gen):
    E, H, I, k, T = 64, 256, 96, 2, 100
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    gate_up_il = ref.interleave_gate_up(gate_up)
    x = _rand((T, H), torch.bfloat16, gen)
    idx = torch.full((T, k), 63, dtype=torch.int64, device="cuda")  # every pair to the last expert but 10
    idx[:10, 1] = 0
    w = torch.rand(T, k, generator=gen, device="cuda")
    assert_experts_accurate(_prefill(x, idx, w, gate_up_il, down, 0, True, prep), x, idx, w, gate_up, down)
    bad = idx.clone()
    bad[::3, 1] = -1
    bad[::5, 0] = E
    dropped = (bad < 0) | (bad >= E)
    out = _prefill(x, bad, w, gate_up_il, down, 0, True, prep)
    assert_experts_accurate(out, x, torch.where(dropped, 0, bad), torch.where(dropped, 0.0, w), gate_up, down)


@needs_sm90
def test_opcheck_with_the_new_arguments(gen):
    E, H, I, k, T = 16, 128, 64, 4, 40
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, H), torch.bfloat16, gen)
    w, idx = _routing(T, E, k, gen)
    il = ref.interleave_gate_up(gate_up)
    torch.library.opcheck(torch.ops.gemma4x.moe_experts_prefill.default, (x, idx, w, il, down, 0, True, 1))
    torch.library.opcheck(torch.ops.gemma4x.moe_experts_prefill.default, (x, idx, w, gate_up, down, 2, False, 2))
    torch.library.opcheck(torch.ops.gemma4x.moe_experts_decode.default, (x[:3], idx[:3], w[:3], il, down, True))


@needs_sm90
@pytest.mark.parametrize("T", [64, 1024])
def test_block_with_interleaved_weights_in_a_cuda_graph(T, real_weights, gen):
    """Router + experts (fused prep at 64 tokens, multi-kernel beyond 512) captured once, replayed."""
    _, gate_up_il, down = real_weights
    proj = _rand((REAL["E"], REAL["H"]), torch.bfloat16, gen)
    scale = _rand((REAL["H"],), torch.bfloat16, gen, 0.3) + 1
    pes = (torch.rand(REAL["E"], generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    h = _rand((T, REAL["H"]), torch.bfloat16, gen, 2.0)
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)

    def block():
        w, idx = ops.moe_router(h, proj, scale, pes, REAL["k"], 1e-6)
        return ops.moe_experts(x, idx, w, gate_up_il, down, gate_up_interleaved=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block()
    for _ in range(2):
        h.copy_(_rand((T, REAL["H"]), torch.bfloat16, gen, 2.0))
        x.copy_(_rand((T, REAL["H"]), torch.bfloat16, gen))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, block())


@needs_sm90
def test_block_launches_at_64_tokens(real_weights, gen):
    """Router + prep + GEMM1 (GeGLU epilogue) + GEMM2 + finalize: 5 kernels per MoE block."""
    from torch.profiler import ProfilerActivity, profile

    _, gate_up_il, down = real_weights
    T = 64
    proj = _rand((REAL["E"], REAL["H"]), torch.bfloat16, gen)
    scale = _rand((REAL["H"],), torch.bfloat16, gen, 0.3) + 1
    pes = (torch.rand(REAL["E"], generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    h = _rand((T, REAL["H"]), torch.bfloat16, gen, 2.0)
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)

    def block():
        w, idx = ops.moe_router(h, proj, scale, pes, REAL["k"], 1e-6)
        return ops.moe_experts(x, idx, w, gate_up_il, down, gate_up_interleaved=True)

    block()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        block()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
               and "Memset" not in e.name]
    assert len(kernels) <= 5, kernels
    assert not any("geglu_kernel" in k for k in kernels), kernels


@needs_sm90
def test_gelu_approx_knob_within_bounds_and_off_by_default(real_weights, gen):
    """The benchmark knob (tanh.approx.f32 in the epilogue) rounds some activations differently
    from HF, so it is only held to the error bound, and the default path stays bit-exact."""
    from gemma4x.ops._load import extension
    from test_moe_cuda import experts_fp64

    gate_up, gate_up_il, down = real_weights
    T = 1000
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen)
    tune = extension().moe_prefill.moe_prefill_tuning
    tune(gelu_approx=True)
    try:
        approx = ops.moe_experts(x, idx, w, gate_up_il, down, gate_up_interleaved=True)
    finally:
        tune(gelu_approx=False)
    exact = experts_fp64(x, idx, w, gate_up, down)
    expected = ref.moe_experts(x, idx, w, gate_up, down)
    err = (approx.double() - exact).norm() / exact.norm()
    err_torch = (expected.double() - exact).norm() / exact.norm()
    assert torch.isfinite(approx).all() and err <= 2 * err_torch, (err.item(), err_torch.item())
    default = ops.moe_experts(x, idx, w, gate_up_il, down, gate_up_interleaved=True)
    assert torch.equal(default, ops.moe_experts(x, idx, w, gate_up, down))


# ------------------------------------------------------------------------------ decode kernels


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("variant", ["split", "stream"])
def test_decode_reads_the_interleaved_layout(T, variant, real_weights, gen, monkeypatch):
    gate_up, gate_up_il, down = real_weights
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen)
    monkeypatch.setattr(moe_ops, "DECODE_KERNEL", "split")
    want = ops.moe_experts(x, idx, w, gate_up, down)
    monkeypatch.setattr(moe_ops, "DECODE_KERNEL", variant)
    from test_moe_cuda import run_recording_decode_kernel

    out, ran = run_recording_decode_kernel(
        lambda: ops.moe_experts(x, idx, w, gate_up_il, down, gate_up_interleaved=True)
    )
    assert ran == "split"  # the stream kernel reads the HF layout only
    assert torch.equal(out, want)
    assert_experts_accurate(out, x, idx, w, gate_up, down)


def test_layer_loaded_interleaved_matches_hf_layout(gen):
    """Experts filled by the loader's weight_loader (interleaved) against one holding HF's layout."""
    from gemma4x.layers.moe import Experts

    E, H, I = 16, 256, 96
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    loaded = Experts(E, H, I).cuda().to(torch.bfloat16)
    plain = Experts(E, H, I).cuda().to(torch.bfloat16)
    with torch.no_grad():
        loaded.gate_up_proj.weight_loader(loaded.gate_up_proj, gate_up)
        plain.gate_up_proj.copy_(gate_up)
        loaded.down_proj.copy_(down)
        plain.down_proj.copy_(down)
    assert loaded.gate_up_interleaved and not plain.gate_up_interleaved
    for T, k in ((3, 4), (100, 4)):  # decode, prefill
        x = _rand((T, H), torch.bfloat16, gen)
        w, idx = _routing(T, E, k, gen)
        assert torch.equal(loaded(x, w, idx), plain(x, w, idx))
        # The reference permutes grouped_mm's output columns back: same products, same rounding.
        torch.testing.assert_close(loaded.forward_native(x, w, idx), plain.forward_native(x, w, idx),
                                   rtol=1e-2, atol=1e-3)

"""GPU tests of the MoE prefill path (T*k > 64: device permute, CUTLASS grouped GEMMs on SM90,
GeGLU, weighted combine) against an fp64 evaluation of the same bf16 inputs: error at most 2x the
error of PyTorch's own bf16 path (the reference), and closer to the reference than either is to fp64.
"""

import pytest
import torch

from gemma4x import ops
from gemma4x.ops import moe as moe_ops
from gemma4x.ops._load import extension
from gemma4x.reference import moe as ref

from test_moe_cuda import REAL, _expert_weights, _poison_allocator, _rand, _routing, assert_experts_accurate

pytestmark = pytest.mark.cuda


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="the prefill kernels are built for sm_90a (H100/H200)")


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(4321)


@pytest.fixture(scope="module")
def real_weights():
    g = torch.Generator(device="cuda").manual_seed(11)
    return _expert_weights(REAL["E"], REAL["H"], REAL["I"], torch.bfloat16, g)


def test_dispatch_takes_the_prefill_path_on_sm90(real_weights, gen):
    gate_up, down = real_weights
    x = _rand((9, REAL["H"]), torch.bfloat16, gen)  # T*k = 72: the first size past the decode path
    _, idx = _routing(9, REAL["E"], REAL["k"], gen)
    assert not moe_ops.decode_supported(x, idx, gate_up, down)
    assert moe_ops.prefill_supported(x, idx, gate_up, down)
    assert moe_ops.prefill_device_ok(x.device) == (_sm90() and extension().moe_prefill.has_sm90)


@needs_sm90
@pytest.mark.parametrize("T", [9, 65, 1000, 8192])
@pytest.mark.parametrize("skew", [False, True])
def test_prefill_real_shape(T, skew, real_weights, gen):
    gate_up, down = real_weights
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen, skew)
    _poison_allocator(T * REAL["H"] * 40, torch.bfloat16)  # workspace and output start as NaN
    out = ops.moe_experts(x, idx, w, gate_up, down)
    assert_experts_accurate(out, x, idx, w, gate_up, down)
    assert torch.equal(out, ops.moe_experts(x, idx, w, gate_up, down)), "not deterministic"


@needs_sm90
@pytest.mark.parametrize("tile", [1, 2])
def test_prefill_both_tiles_agree(tile, real_weights, gen):
    gate_up, down = real_weights
    T = 700
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen)
    out = torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gate_up, down, tile)
    assert_experts_accurate(out, x, idx, w, gate_up, down)
    # Same rows, same K order: the tile changes only which CTA computes a row, not its value.
    assert torch.equal(out, torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gate_up, down, 3 - tile))


@needs_sm90
@pytest.mark.parametrize(
    "T,E,H,I,k",
    [(9, 8, 64, 32, 8), (40, 16, 256, 96, 4), (33, 5, 200, 64, 3), (300, 64, 136, 40, 2), (17, 256, 128, 64, 32),
     (129, 1, 72, 16, 1)],
)
def test_prefill_small_shapes(T, E, H, I, k, gen):
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, H), torch.bfloat16, gen)
    w, idx = _routing(T, E, k, gen)
    for tile in (1, 2):
        out = torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gate_up, down, tile)
        assert_experts_accurate(out, x, idx, w, gate_up, down)


@needs_sm90
def test_prefill_experts_without_tokens_and_all_to_one(gen):
    E, H, I, k, T = 64, 256, 96, 2, 100
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, H), torch.bfloat16, gen)
    idx = torch.full((T, k), 63, dtype=torch.int64, device="cuda")  # every pair to the last expert but 10
    idx[:10, 1] = 0
    w = torch.rand(T, k, generator=gen, device="cuda")
    out = torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gate_up, down)
    assert_experts_accurate(out, x, idx, w, gate_up, down)


@needs_sm90
def test_prefill_out_of_range_ids_contribute_nothing(gen):
    E, H, I, k, T = 16, 128, 64, 4, 50
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, H), torch.bfloat16, gen)
    w, idx = _routing(T, E, k, gen)
    bad = idx.clone()
    bad[::3, 1] = -1
    bad[::5, 2] = E
    out = torch.ops.gemma4x.moe_experts_prefill(x, bad, w, gate_up, down)
    dropped = (bad < 0) | (bad >= E)
    expected = ref.moe_experts(x, torch.where(dropped, 0, bad), torch.where(dropped, 0.0, w), gate_up, down)
    assert_experts_accurate(out, x, torch.where(dropped, 0, bad), torch.where(dropped, 0.0, w), gate_up, down)
    assert (out.double() - expected.double()).norm() <= 1e-2 * expected.double().norm()


@needs_sm90
def test_prefill_strided_x_and_output_dtype(gen):
    E, H, I, k, T = 16, 256, 96, 4, 70
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, 2 * H), torch.bfloat16, gen)[:, H:]
    w, idx = _routing(T, E, k, gen)
    out = torch.ops.gemma4x.moe_experts_prefill(x, idx, w, gate_up, down)
    assert_experts_accurate(out, x, idx, w, gate_up, down)


@needs_sm90
def test_prefill_empty(gen):
    gate_up, down = _expert_weights(8, 64, 32, torch.bfloat16, gen)
    x = torch.empty(0, 64, dtype=torch.bfloat16, device="cuda")
    idx = torch.empty(0, 2, dtype=torch.int64, device="cuda")
    out = torch.ops.gemma4x.moe_experts_prefill(x, idx, torch.empty(0, 2, device="cuda"), gate_up, down)
    assert out.shape == (0, 64)


@needs_sm90
def test_limits_match_the_extension():
    assert extension().moe_prefill.moe_prefill_limits() == (moe_ops.PREFILL_MAX_EXPERTS, moe_ops.PREFILL_MAX_TOP_K)


@needs_sm90
def test_opcheck(gen):
    E, H, I, k, T = 16, 128, 64, 4, 40
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, H), torch.bfloat16, gen)
    w, idx = _routing(T, E, k, gen)
    torch.library.opcheck(torch.ops.gemma4x.moe_experts_prefill.default, (x, idx, w, gate_up, down, 0))


@needs_sm90
def test_prefill_block_in_a_cuda_graph(real_weights, gen):
    """Router + prefill experts captured once, replayed on new inputs: no host sync, no stale shapes."""
    gate_up, down = real_weights
    T = 1024  # past ROUTER_FUSED_MAX_TOKENS: the many-token router too
    proj = _rand((REAL["E"], REAL["H"]), torch.bfloat16, gen)
    scale = _rand((REAL["H"],), torch.bfloat16, gen, 0.3) + 1
    pes = (torch.rand(REAL["E"], generator=gen, device="cuda") + 0.5).to(torch.bfloat16)
    h = _rand((T, REAL["H"]), torch.bfloat16, gen, 2.0)
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)

    def block():
        w, idx = ops.moe_router(h, proj, scale, pes, REAL["k"], 1e-6)
        return ops.moe_experts(x, idx, w, gate_up, down)

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


# ------------------------------------------------------------------------ many-token router


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,E,H,k", [(513, 128, 2816, 8), (4096, 128, 2816, 8), (600, 256, 512, 32), (700, 40, 96, 3)])
def test_router_many_tokens(dtype, T, E, H, k, gen):
    from test_moe_cuda import _router_inputs, assert_router_matches

    h, proj, scale, pes = _router_inputs(T, E, H, dtype, gen)
    w, idx = ops.moe_router(h, proj, scale, pes, k, 1e-6)  # T > ROUTER_FUSED_MAX_TOKENS: moe_router_many
    assert T > moe_ops.ROUTER_FUSED_MAX_TOKENS
    assert_router_matches(w, idx, h, proj, scale, pes, k)
    # Same picks and weights as the fused one-launch router, up to fp32 reduction order.
    _, idx_f = torch.ops.gemma4x.moe_router(h, proj, scale, pes, k, 1e-6)
    assert (idx == idx_f).all(-1).double().mean().item() >= 0.98


def test_router_many_tokens_fp32_scale_strided_and_ties(gen):
    from test_moe_cuda import _router_inputs, assert_router_matches

    _, proj, scale, pes = _router_inputs(600, 128, 2816, torch.bfloat16, gen, pes_dtype=torch.float32)
    proj[77] = proj[5]
    big = _rand((600, 2816 + 64), torch.bfloat16, gen, 2.0)
    hs = big[:, 8 : 8 + 2816]
    w, idx = torch.ops.gemma4x.moe_router_many(hs, proj, scale, pes, 8, 1e-6)
    assert_router_matches(w, idx, hs, proj, scale, pes, 8)
    for row in idx.tolist():
        picked = [e for e in row if e in (5, 77)]
        assert picked == [5, 77][: len(picked)], row
    torch.library.opcheck(torch.ops.gemma4x.moe_router_many.default, (hs, proj, scale, pes, 8, 1e-6))

"""GPU tests of the MoE kernels (router, decode experts) against gemma4x.reference.moe.

Router: the kernel rounds where HF rounds, so it must pick the reference's experts; a different
pick is allowed only where two probabilities are within one bf16 step of each other (the fp32
reduction order can flip one rounding of a logit). Experts: error against an fp64 evaluation of
the same bf16 inputs at most 2x the error of PyTorch's own bf16 path (the reference).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from gemma4x import ops
from gemma4x.ops import moe as moe_ops
from gemma4x.ops._load import extension
from gemma4x.reference import moe as ref
from gemma4x.reference.norm import rms_norm

pytestmark = pytest.mark.cuda

EPS = 1e-6
REAL = dict(E=128, H=2816, I=704, k=8)


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(1234)


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


def _router_inputs(T, E, H, dtype, gen, pes_dtype=None):
    h = _rand((T, H), dtype, gen, 2.0)
    proj = _rand((E, H), dtype, gen, 1.0)  # logits of O(1): many near ties in bf16, as in a real router
    scale = _rand((H,), dtype, gen, 0.3) + 1
    pes = (torch.rand(E, generator=gen, device="cuda") + 0.5).to(pes_dtype or dtype)
    return h, proj, scale, pes


def _router_probs(h, proj, scale, eps):
    r = rms_norm(h, None, eps) * scale * (h.shape[-1] ** -0.5)
    return torch.softmax(F.linear(r, proj), dim=-1, dtype=torch.float32)


def assert_router_matches(w, idx, h, proj, scale, pes, k, eps=EPS):
    w_ref, idx_ref = ref.moe_router(h, proj, scale, pes, k, eps)
    assert w.shape == w_ref.shape and w.dtype == torch.float32
    assert idx.shape == idx_ref.shape and idx.dtype == torch.int64
    if idx.numel() == 0:
        return
    E = proj.shape[0]
    assert ((idx >= 0) & (idx < E)).all()
    assert (idx.sort(-1).values.diff(dim=-1) != 0).all(), "an expert picked twice in one row"
    probs = _router_probs(h, proj, scale, eps)
    p_ours, p_ref = probs.gather(-1, idx), probs.gather(-1, idx_ref)
    # Equal logits are frequent in bf16 (128 values one step 2^-6 apart), and torch.topk may order
    # a tie either way: compare the probabilities picked, not the ids.
    same = (p_ours == p_ref).all(-1)
    # Rows that differ must differ only by near-ties (one bf16 step of a logit, ~1.6% of p).
    bad = ~same & ~torch.isclose(p_ours, p_ref, rtol=2**-5, atol=0).all(-1)
    assert not bad.any(), f"{int(bad.sum())} rows pick experts the reference does not"
    assert same.double().mean().item() >= 0.98
    # Renormalised probabilities (before the per-expert scale, which differs between tied experts).
    # The fp32 reduction order can flip the rounding of a logit: one ulp of the logit dtype moves
    # p by up to that much, so a few rows may differ by ~2^-mantissa; the rest agree to fp32 noise.
    loose = {torch.bfloat16: 2**-6, torch.float16: 2**-8, torch.float32: 1e-5}[h.dtype]
    norm_ours = (w / pes.float()[idx])[same]
    norm_ref = (w_ref / pes.float()[idx_ref])[same]
    torch.testing.assert_close(norm_ours, norm_ref, rtol=loose, atol=1e-7)
    # A flipped logit moves its whole row (the renormalisation); other rows agree to fp32 noise.
    loose_rows = (~torch.isclose(norm_ours, norm_ref, rtol=4e-6, atol=1e-7)).any(-1)
    assert loose_rows.sum().item() <= max(1, 0.02 * loose_rows.numel())
    ids = (idx == idx_ref).all(-1)
    torch.testing.assert_close(w[ids], w_ref[ids], rtol=loose, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,E,H,k", [(1, 8, 64, 2), (3, 16, 256, 4), (1, 128, 2816, 8), (3, 128, 2816, 8),
                                     (64, 128, 2816, 8), (1000, 128, 2816, 8), (7, 256, 512, 32), (5, 40, 96, 3)])
def test_router(dtype, T, E, H, k, gen):
    h, proj, scale, pes = _router_inputs(T, E, H, dtype, gen)
    kernel = torch.ops.gemma4x.moe_router  # the fused kernel at every T
    w, idx = kernel(h, proj, scale, pes, k, EPS)
    assert_router_matches(w, idx, h, proj, scale, pes, k)
    # Same inputs, same result: no race between the cluster's blocks.
    w2, idx2 = kernel(h, proj, scale, pes, k, EPS)
    assert torch.equal(w, w2) and torch.equal(idx, idx2)
    # The public op: the kernel up to ROUTER_FUSED_MAX_TOKENS tokens, the reference beyond.
    w3, idx3 = ops.moe_router(h, proj, scale, pes, k, EPS)
    if T <= moe_ops.ROUTER_FUSED_MAX_TOKENS:
        assert torch.equal(w3, w) and torch.equal(idx3, idx)
    else:
        assert_router_matches(w3, idx3, h, proj, scale, pes, k)


def test_router_fp32_per_expert_scale_and_batched_strided_h(gen):
    h, proj, scale, pes = _router_inputs(12, 128, 2816, torch.bfloat16, gen, pes_dtype=torch.float32)
    big = _rand((3, 4, 2816 + 64), torch.bfloat16, gen, 2.0)
    hb = big[..., 8 : 8 + 2816]  # [3, 4, H], row stride 2880, 16-byte aligned
    w, idx = ops.moe_router(hb, proj, scale, pes, 8, EPS)
    assert w.shape == (3, 4, 8) and idx.shape == (3, 4, 8)
    assert_router_matches(w.view(-1, 8), idx.view(-1, 8), hb.reshape(-1, 2816), proj, scale, pes, 8)
    hu = big[..., 3 : 3 + 2816]  # misaligned rows: copied by the wrapper
    w, idx = ops.moe_router(hu, proj, scale, pes, 8, EPS)
    assert_router_matches(w.view(-1, 8), idx.view(-1, 8), hu.reshape(-1, 2816), proj, scale, pes, 8)


def test_router_ties_go_to_the_lower_expert(gen):
    E, H = 128, 2816
    h, proj, scale, pes = _router_inputs(16, E, H, torch.bfloat16, gen)
    proj[77] = proj[5]  # identical rows: identical logits and probabilities
    proj[100] = proj[5]
    w, idx = ops.moe_router(h, proj, scale, pes, 8, EPS)
    for row in idx.tolist():
        picked = [e for e in row if e in (5, 77, 100)]
        assert picked == sorted(picked) and picked == [5, 77, 100][: len(picked)], row


def test_router_empty(gen):
    h, proj, scale, pes = _router_inputs(0, 128, 2816, torch.bfloat16, gen)
    w, idx = ops.moe_router(h, proj, scale, pes, 8, EPS)
    assert w.shape == (0, 8) and idx.shape == (0, 8)


# ---------------------------------------------------------------------------------------- experts


def _expert_weights(E, H, I, dtype, gen):
    gate_up = _rand((E, 2 * I, H), dtype, gen, H**-0.5 * 2)
    down = _rand((E, H, I), dtype, gen, I**-0.5)
    return gate_up, down


def _routing(T, E, k, gen, skew=False):
    scores = torch.rand(T, E, generator=gen, device="cuda")
    if skew:
        scores[:, 3] += 2  # every token picks expert 3
    w, idx = scores.topk(k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).float()
    return w, idx


def _gelu_tanh64(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def experts_fp64(x, idx, weights, gate_up, down):
    """The same math on the same inputs in fp64, one expert at a time."""
    T, k = idx.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float64, device=x.device)
    I = gate_up.shape[1] // 2
    for e in idx.unique().tolist():
        rows, slots = (idx == e).nonzero(as_tuple=True)
        gu = x[rows].double() @ gate_up[e].double().T
        a = _gelu_tanh64(gu[:, :I]) * gu[:, I:]
        y = a @ down[e].double().T
        out.index_add_(0, rows, y * weights[rows, slots].double()[:, None])
    return out


def assert_experts_accurate(out, x, idx, weights, gate_up, down):
    expected = ref.moe_experts(x, idx, weights, gate_up, down)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    exact = experts_fp64(x, idx, weights, gate_up, down)
    norm = exact.norm().item()
    err_ours = (out.double() - exact).norm().item() / norm
    err_torch = (expected.double() - exact).norm().item() / norm
    assert err_ours <= 2 * err_torch + 1e-7, f"error {err_ours:.3e} vs PyTorch's bf16 path {err_torch:.3e}"
    # Same rounding points as the reference: far closer to it than either is to fp64.
    assert (out.double() - expected.double()).norm().item() / norm <= err_torch


@pytest.fixture(scope="module")
def real_weights():
    g = torch.Generator(device="cuda").manual_seed(7)
    return _expert_weights(REAL["E"], REAL["H"], REAL["I"], torch.bfloat16, g)


def _poison_allocator(numel, dtype):
    torch.empty(max(numel, 1), dtype=dtype, device="cuda").fill_(float("nan"))


@pytest.fixture(params=["stream", "split"])
def decode_kernel(request, monkeypatch):
    """Runs a test once per decode path (the one-launch stream kernel and the two-kernel split)."""
    monkeypatch.setattr(moe_ops, "DECODE_KERNEL", request.param)
    return request.param


def run_recording_decode_kernel(fn) -> tuple[torch.Tensor, str | None]:
    """``fn()`` under the profiler, and which decode kernels it launched: "stream", "split" or None."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    stream = any("moe_decode_stream_kernel" in n for n in names)
    split = any("moe_decode_gate_up_kernel" in n for n in names)
    assert not (stream and split), names
    return out, "stream" if stream else "split" if split else None


@pytest.mark.parametrize("T", [1, 3, 8, 64, 200])
@pytest.mark.parametrize("skew", [False, True])
def test_experts_real_shape(T, skew, real_weights, gen, decode_kernel):
    gate_up, down = real_weights
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen, skew)
    assert moe_ops.decode_supported(x, idx, gate_up, down) == (T * REAL["k"] <= 64)
    _poison_allocator(T * REAL["H"], torch.bfloat16)
    out, ran = run_recording_decode_kernel(lambda: ops.moe_experts(x, idx, w, gate_up, down))
    # The stream kernel needs cooperative launch and <= 32 output rows per SM: true on H100/H200.
    assert ran == (decode_kernel if T * REAL["k"] <= 64 else None)
    assert_experts_accurate(out, x, idx, w, gate_up, down)
    assert torch.equal(out, ops.moe_experts(x, idx, w, gate_up, down))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,H,I,k", [(1, 8, 64, 32, 2), (3, 8, 64, 32, 2), (32, 8, 64, 32, 2), (5, 16, 256, 96, 4),
                                       (16, 16, 256, 96, 4), (2, 256, 136, 40, 32), (1, 4, 3072, 1024, 4),
                                       (7, 5, 200, 64, 3), (16, 16, 2048, 64, 4)])  # x over 48 KB: x in registers
def test_experts_decode_shapes(dtype, T, E, H, I, k, gen, decode_kernel):
    gate_up, down = _expert_weights(E, H, I, dtype, gen)
    x = _rand((T, H), dtype, gen)
    w, idx = _routing(T, E, k, gen)
    assert moe_ops.decode_supported(x, idx, gate_up, down)
    _poison_allocator(T * H, dtype)
    out, ran = run_recording_decode_kernel(lambda: torch.ops.gemma4x.moe_experts_decode(x, idx, w, gate_up, down))
    assert ran == decode_kernel  # the stream kernel needs cooperative launch: true on H100/H200
    assert_experts_accurate(out, x, idx, w, gate_up, down)


def test_experts_all_tokens_one_expert_and_repeated_slots(gen, decode_kernel):
    E, H, I, k, T = 16, 256, 96, 4, 16
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, H), torch.bfloat16, gen)
    idx = torch.full((T, k), 9, dtype=torch.int64, device="cuda")  # 64 pairs, one expert
    idx[:, 1] = 2
    w = torch.rand(T, k, generator=gen, device="cuda")
    out, ran = run_recording_decode_kernel(lambda: torch.ops.gemma4x.moe_experts_decode(x, idx, w, gate_up, down))
    assert ran == decode_kernel  # the stream kernel needs cooperative launch: true on H100/H200
    assert_experts_accurate(out, x, idx, w, gate_up, down)


def test_experts_out_of_range_ids_contribute_nothing(gen, decode_kernel):
    E, H, I, k, T = 16, 256, 96, 4, 5
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    x = _rand((T, H), torch.bfloat16, gen)
    w, idx = _routing(T, E, k, gen)
    bad = idx.clone()
    bad[:, 1] = E + 3
    bad[2, :] = -1  # token 2 has no valid expert: its output is 0
    out = torch.ops.gemma4x.moe_experts_decode(x, bad, w, gate_up, down)
    keep = (bad >= 0) & (bad < E)
    expected = ref.moe_experts(x, idx, w * keep, gate_up, down)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("T", [1, 8])
def test_stream_kernel_repeatable_and_in_a_cuda_graph(T, real_weights, gen, decode_kernel):
    """Same inputs, same bits (no race across the grid barrier), eager and replayed in a graph."""
    gate_up, down = real_weights
    x = _rand((T, REAL["H"]), torch.bfloat16, gen)
    w, idx = _routing(T, REAL["E"], REAL["k"], gen)
    first = ops.moe_experts(x, idx, w, gate_up, down)
    for _ in range(20):
        assert torch.equal(first, ops.moe_experts(x, idx, w, gate_up, down))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.moe_experts(x, idx, w, gate_up, down)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.moe_experts(x, idx, w, gate_up, down)
    for _ in range(3):
        x.copy_(_rand((T, REAL["H"]), torch.bfloat16, gen))
        w2, idx2 = _routing(T, REAL["E"], REAL["k"], gen)
        w.copy_(w2)
        idx.copy_(idx2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ops.moe_experts(x, idx, w, gate_up, down))


def test_experts_strided_x_and_general_path_dtypes(gen):
    E, H, I, k = 16, 256, 96, 4
    gate_up, down = _expert_weights(E, H, I, torch.bfloat16, gen)
    w, idx = _routing(6, E, k, gen)
    big = _rand((6, H + 40), torch.bfloat16, gen)
    for x in (big[:, 8 : 8 + H], big[:, 3 : 3 + H]):  # aligned stride; misaligned (copied)
        assert_experts_accurate(ops.moe_experts(x, idx, w, gate_up, down), x, idx, w, gate_up, down)
    # float32 is not a decode dtype: the reference path runs.
    x32 = _rand((2, H), torch.float32, gen)
    out = ops.moe_experts(x32, idx[:2], w[:2], gate_up.float(), down.float())
    torch.testing.assert_close(out, ref.moe_experts(x32, idx[:2], w[:2], gate_up.float(), down.float()))


def test_experts_empty(gen):
    gate_up, down = _expert_weights(8, 64, 32, torch.bfloat16, gen)
    x = _rand((0, 64), torch.bfloat16, gen)
    idx = torch.zeros(0, 2, dtype=torch.int64, device="cuda")
    out = ops.moe_experts(x, idx, torch.zeros(0, 2, device="cuda"), gate_up, down)
    assert out.shape == (0, 64)


def test_limits_match_the_extension():
    assert tuple(extension().moe.moe_decode_limits()) == (
        moe_ops.DECODE_MAX_PAIRS, moe_ops.DECODE_MAX_EXPERTS, moe_ops.DECODE_MAX_HIDDEN, moe_ops.DECODE_MAX_INTER,
    )  # fmt: skip


def test_opcheck(gen):
    h, proj, scale, pes = _router_inputs(3, 16, 256, torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.gemma4x.moe_router.default, (h, proj, scale, pes, 4, EPS))
    gate_up, down = _expert_weights(16, 256, 96, torch.bfloat16, gen)
    x = _rand((3, 256), torch.bfloat16, gen)
    w, idx = _routing(3, 16, 4, gen)
    torch.library.opcheck(torch.ops.gemma4x.moe_experts_decode.default, (x, idx, w, gate_up, down))


def test_routed_block_in_a_cuda_graph(real_weights, gen, decode_kernel):
    gate_up, down = real_weights
    E, H, k = REAL["E"], REAL["H"], REAL["k"]
    _, proj, scale, pes = _router_inputs(1, E, H, torch.bfloat16, gen)
    h = _rand((2, H), torch.bfloat16, gen)
    x = _rand((2, H), torch.bfloat16, gen)

    def block():
        w, idx = ops.moe_router(h, proj, scale, pes, k, EPS)
        return ops.moe_experts(x, idx, w, gate_up, down)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        block()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block()
    for _ in range(2):
        h.copy_(_rand((2, H), torch.bfloat16, gen))
        x.copy_(_rand((2, H), torch.bfloat16, gen))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, block())


def test_layers_use_the_kernels(gen):
    from gemma4x.layers.moe import Experts, Router

    E, H, I, k = 16, 256, 96, 4
    router = Router(H, E, k, EPS).cuda().to(torch.bfloat16)
    experts = Experts(E, H, I).cuda().to(torch.bfloat16)
    with torch.no_grad():
        router.proj.weight.copy_(_rand((E, H), torch.bfloat16, gen))
        router.scale.copy_(_rand((H,), torch.bfloat16, gen) + 1)
        experts.gate_up_proj.copy_(_rand((E, 2 * I, H), torch.bfloat16, gen, 0.1))
        experts.down_proj.copy_(_rand((E, H, I), torch.bfloat16, gen, 0.1))
    h = _rand((3, H), torch.bfloat16, gen)
    w, idx = router(h)
    assert_router_matches(w, idx, h, router.proj.weight, router.scale, router.per_expert_scale, k)
    out, out_n = experts(h, w, idx), experts.forward_native(h, w, idx)
    assert (out.double() - out_n.double()).norm() <= 1e-2 * out_n.double().norm()

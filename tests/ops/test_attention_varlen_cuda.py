"""GPU tests of the sm_90a varlen attention kernel against the fp32 reference.

Each case compares ``ops.attention_varlen`` (both MMA backends) with
``reference.attention_varlen`` on the same bf16/fp16 inputs upcast to fp32, by relative L2 error,
and requires it to be at most 2x the error of PyTorch's own half-precision path (SDPA per
sequence with the same boolean mask) on the same inputs. Masks: causal, sliding-window edges,
image blocks (several, at the start / end, longer than the window; Gemma4 and unified overlays),
cached prefixes, odd lengths, empty sequences, every Gemma 4 GQA ratio, head dims 64/72/256/512.
"""

import pytest
import torch

from gemma4x import ops
from gemma4x.ops import attention as attn_ops
from gemma4x.reference.attention_varlen import attention_varlen as ref_varlen
from gemma4x.reference.attention_varlen import block_ids_from_ranges

pytestmark = pytest.mark.cuda

BACKENDS = tuple(attn_ops.BACKENDS)


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="the kernel is sm_90a only (other GPUs run the SDPA fallback)")


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(20261121)


def _inputs(lens, nH, nKV, d, dtype, gen):
    """Packed q/k/v for sequences of (Lq, Lk); values like Gemma's normed q/k (O(1) entries, scale 1 / sqrt(d))."""
    Nq, Nk = sum(a for a, _ in lens), sum(b for _, b in lens)
    q = (torch.randn(Nq, nH, d, generator=gen, device="cuda") * d**-0.25 * 1.5).to(dtype)
    k = (torch.randn(Nk, nKV, d, generator=gen, device="cuda") * d**-0.25 * 1.5).to(dtype)
    v = torch.randn(Nk, nKV, d, generator=gen, device="cuda").to(dtype)
    cq = torch.tensor([0] + [a for a, _ in lens], device="cuda").cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + [b for _, b in lens], device="cuda").cumsum(0).to(torch.int32)
    return q, k, v, cq, ck


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _check(q, k, v, cq, ck, backend, **mask):
    out = ops.attention_varlen(q, k, v, cq, ck, backend=backend, **mask)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    ref = ref_varlen(q.float(), k.float(), v.float(), cq, ck, **mask)
    torch_half = attn_ops._attention_varlen_sdpa(
        q, k, v, cq, ck, mask.get("window_left"), mask.get("window_right", 0), mask.get("q_block"),
        mask.get("k_block"), mask.get("unified", False), mask.get("scale", 1.0),
    )  # fmt: skip
    if ref.numel() == 0 or ref.float().norm() == 0:
        assert (out == 0).all()
        return
    err, base = _rel(out, ref), _rel(torch_half, ref)
    assert err <= 2 * base + 1e-6, f"kernel error {err:.3e} > 2 x torch {q.dtype} error {base:.3e}"
    # Rows that see no key are exactly zero.
    zero_rows = ref.float().abs().amax(dim=(1, 2)) == 0
    assert (out[zero_rows] == 0).all()
    return err, base


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,nH,nKV", [(256, 16, 8), (512, 16, 2)])
@pytest.mark.parametrize("L", [1, 7, 64, 129, 1000])
def test_causal(backend, d, nH, nKV, L, gen):
    _check(*_inputs([(L, L)], nH, nKV, d, torch.bfloat16, gen), backend, window_left=None, window_right=0)


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,nH,nKV", [(256, 16, 8), (512, 16, 2)])
@pytest.mark.parametrize("W", [63, 64, 65, 127, 128, 129])
def test_window_edges(backend, d, nH, nKV, W, gen):
    # Sliding window W: q - W < k <= q, i.e. window_left = W - 1; lengths around W and past it.
    for L in (W - 1, W, W + 1, 517):
        _check(*_inputs([(L, L)], nH, nKV, d, torch.bfloat16, gen), backend, window_left=W - 1, window_right=0)


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,nH,nKV", [(256, 16, 8), (512, 16, 2)])
@pytest.mark.parametrize("unified", [False, True])
def test_image_blocks(backend, d, nH, nKV, unified, gen):
    # Three images: at the start, one longer than the window, one at the very end; plus a second
    # sequence with a cached prefix whose queries start inside an image.
    L, W = 700, 100
    b0 = block_ids_from_ranges(L, [(0, 50), (200, 450), (651, 700)])
    b1 = block_ids_from_ranges(400, [(100, 180), (300, 390)])
    q, k, v, cq, ck = _inputs([(L, L), (250, 400)], nH, nKV, d, torch.bfloat16, gen)
    k_block = torch.cat([b0, b1]).to("cuda", torch.int32)
    q_block = torch.cat([b0, b1[150:]]).to("cuda", torch.int32)
    for wl in (W - 1, None):
        _check(q, k, v, cq, ck, backend, window_left=wl, window_right=0, q_block=q_block, k_block=k_block,
               unified=unified)  # fmt: skip


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,nH,nKV", [(256, 16, 8), (512, 16, 2)])
@pytest.mark.parametrize("window_left", [None, 127])
def test_prefix_odd_and_empty(backend, d, nH, nKV, window_left, gen):
    # Cached prefixes (Lk > Lq), odd lengths, empty sequences (no queries, no keys, neither),
    # and more queries than keys (the first queries see nothing causally).
    lens = [(100, 1000), (1, 513), (0, 50), (64, 64), (30, 0), (0, 0), (77, 333), (9, 5)]
    _check(*_inputs(lens, nH, nKV, d, torch.bfloat16, gen), backend, window_left=window_left, window_right=0)


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nH,nKV", [(16, 8), (16, 2), (32, 16), (32, 4), (8, 1), (8, 2), (16, 1)])
@pytest.mark.parametrize("d", [256, 512])
def test_gqa_ratios(backend, nH, nKV, d, gen):
    _check(*_inputs([(200, 200), (33, 90)], nH, nKV, d, torch.bfloat16, gen), backend, window_left=None)


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [64, 72])
@pytest.mark.parametrize("lens", [[256], [100, 1024, 7, 0, 300]])
def test_vision_bidirectional(backend, d, lens, gen):
    lens = [(L, L) for L in lens]
    _check(*_inputs(lens, 16, 16, d, torch.bfloat16, gen), backend, window_left=None, window_right=None)


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,nH,nKV", [(64, 16, 16), (72, 16, 16), (256, 16, 8), (512, 16, 2)])
def test_fp16_and_scale(backend, d, nH, nKV, gen):
    q, k, v, cq, ck = _inputs([(300, 300), (50, 120)], nH, nKV, d, torch.float16, gen)
    _check(q, k, v, cq, ck, backend, window_left=None, window_right=0, scale=d**-0.5)
    _check(q, k, v, cq, ck, backend, window_left=31, window_right=5)


@needs_sm90
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [256, 512, 72])
def test_strided_views(backend, d, gen):
    # q, k, v as column slices of one fused projection [T, (nH + 2 nKV) * d] (strided rows).
    nH, nKV, T = 8, 2, 300
    qkv = torch.randn(T, (nH + 2 * nKV) * d, generator=gen, device="cuda").to(torch.bfloat16) * 0.3
    q = qkv[:, : nH * d].view(T, nH, d)
    k = qkv[:, nH * d : (nH + nKV) * d].view(T, nKV, d)
    v = qkv[:, (nH + nKV) * d :].view(T, nKV, d)
    cu = torch.tensor([0, 120, T], device="cuda", dtype=torch.int32)
    _check(q, k, v, cu, cu, backend, window_left=None, window_right=0 if d != 72 else None)


@needs_sm90
@pytest.mark.parametrize("backend", ["wgmma", "fa3", "fa3_alt"])
@pytest.mark.parametrize("d", [256, 512])
def test_long_sliding_with_images(backend, d, gen):
    # 8k tokens, window 1024, images longer and shorter than the window.
    L = 8192
    blocks = block_ids_from_ranges(L, [(0, 280), (3000, 4400), (8000, 8192)]).to("cuda", torch.int32)
    q, k, v, cq, ck = _inputs([(L, L)], 8, 4, d, torch.bfloat16, gen)
    _check(q, k, v, cq, ck, backend, window_left=1023, window_right=0, q_block=blocks, k_block=blocks)


@needs_sm90
@pytest.mark.parametrize("backend", ["fa3", "fa3_alt"])
@pytest.mark.parametrize("d,nH,nKV", [(256, 16, 8), (512, 16, 2)])
def test_fa3_long_causal_multi_sequence(backend, d, nH, nKV, gen):
    # Many key stages per CTA (the ring wraps many times), several sequences, a cached prefix.
    lens = [(3000, 3000), (700, 2500), (1, 1), (1500, 1500)]
    _check(*_inputs(lens, nH, nKV, d, torch.bfloat16, gen), backend, window_left=None, window_right=0)


@needs_sm90
def test_block_m_matches_kernel():
    from gemma4x.ops._load import extension

    for d in attn_ops.HEAD_DIMS:
        for variant in attn_ops.BACKENDS.values():
            assert extension().attention.attention_varlen_block_m(d, variant) == attn_ops.block_m(d, variant)


@needs_sm90
@pytest.mark.parametrize("backend", [None, "wgmma", "fa3", "fa3_alt"])
@pytest.mark.parametrize("d", [256, 512])
def test_cuda_graph_capture(backend, d, gen):
    q, k, v, cq, ck = _inputs([(300, 300), (64, 200)], 16, 2, d, torch.bfloat16, gen)
    eager = ops.attention_varlen(q, k, v, cq, ck, backend=backend)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.attention_varlen(q, k, v, cq, ck, backend=backend)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = ops.attention_varlen(q, k, v, cq, ck, backend=backend)
    q.copy_(q * 0.5)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.attention_varlen(q, k, v, cq, ck, backend=backend))
    assert not torch.equal(out, eager)


@needs_sm90
def test_opcheck(gen):
    q, k, v, cq, ck = _inputs([(70, 70), (10, 40)], 4, 2, 256, torch.bfloat16, gen)
    b = torch.full((110,), -1, dtype=torch.int32, device="cuda")
    torch.library.opcheck(
        torch.ops.gemma4x.attention_varlen, (q, k, v, cq, ck, None, None, -1, 0, False, 1.0, 1)
    )
    torch.library.opcheck(
        torch.ops.gemma4x.attention_varlen, (q, k, v, cq, ck, b[:80], b, 9, 0, False, 1.0, 2)
    )
    torch.library.opcheck(
        torch.ops.gemma4x.attention_varlen, (q, k, v, cq, ck, b[:80], b, 9, 0, False, 1.0, 4)
    )
    torch.library.opcheck(torch.ops.gemma4x.attention_varlen, (q, k, v, cq, ck, None, None, -1, 0, False, 1.0, 6))


@needs_sm90
@pytest.mark.parametrize("d,nH,nKV,window", [(256, 8, 4, 127), (512, 8, 1, None)])
def test_layer_prefill_routing(d, nH, nKV, window, gen):
    """The text model's attention op: prefill goes to the kernel, the result matches SDPA's contract."""
    from gemma4x.layers.attention_prefill import prefill_self_attention
    from gemma4x.reference.attention import attention_sdpa, self_attention_sdpa

    calls = []

    def fallback(*a, **kw):
        calls.append(1)
        return self_attention_sdpa(*a, **kw)

    fn = prefill_self_attention(fallback)
    T = 333
    q = torch.randn(1, T, nH, d, generator=gen, device="cuda").to(torch.bfloat16) * 0.3
    K = torch.randn(1, T, nKV, d, generator=gen, device="cuda").to(torch.bfloat16) * 0.3
    V = torch.randn(1, T, nKV, d, generator=gen, device="cuda").to(torch.bfloat16)
    pos = torch.arange(T, device="cuda")[None]
    out = fn(q, K, V, pos, window_left=window, window_right=0, scale=1.0)
    assert not calls
    ref = attention_sdpa(q.float(), K.float(), V.float(), pos, pos, window_left=window, window_right=0)
    base = attention_sdpa(q, K, V, pos, pos, window_left=window, window_right=0)
    assert _rel(out, ref) <= 2 * _rel(base, ref) + 1e-6
    fn(q[:, :1], K[:, :1], V[:, :1], pos[:, :1], window_left=window, window_right=0, scale=1.0)  # one token
    assert calls == [1]

"""GPU tests of the head-dim 64/72 FlashAttention-3-structured kernel (attention_varlen_fa3_small_sm90.cuh).

The vision tower's attention: bidirectional, one sequence per image, packed images of 1k-4k
patches, head dims 72 (26B-A4B / 31B, 16 heads) and 64 (E2B / E4B, 12 heads). Each case compares
``ops.attention_varlen`` with the fp32 reference on the same bf16/fp16 inputs by relative L2 error,
within 2x of PyTorch's own half-precision error (SDPA per sequence). Also: odd lengths, empty
sequences (no queries, and queries without keys), the text masks at these head dims (causal,
windows at tile edges, image blocks, cached prefixes, GQA), strided views, CUDA-graph capture and
the default backend.
"""

import pytest
import torch

from gemma4x import ops
from gemma4x.ops import attention as attn_ops
from gemma4x.reference.attention_varlen import attention_varlen as ref_varlen
from gemma4x.reference.attention_varlen import block_ids_from_ranges

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
        reason="the kernel is sm_90a only (other GPUs run the SDPA fallback)",
    ),
]

SMALL = ("fa3", "fa3_alt", "fa3_ovl", "fa3_m192")
BIDIR = {"window_left": None, "window_right": None}


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(20261121)


def _inputs(lens, nH, nKV, d, dtype, gen):
    """Packed q/k/v for sequences of (Lq, Lk); O(1) normed-like q/k entries, scale 1 / sqrt(d) folded in."""
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
    """Kernel vs fp32 reference, within 2x of torch's half-precision error; keyless rows exactly 0."""
    out = ops.attention_varlen(q, k, v, cq, ck, backend=backend, **mask)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    ref = ref_varlen(q.float(), k.float(), v.float(), cq, ck, **mask)
    torch_half = attn_ops._attention_varlen_sdpa(
        q, k, v, cq, ck, mask.get("window_left"), mask.get("window_right", 0), mask.get("q_block"),
        mask.get("k_block"), mask.get("unified", False), mask.get("scale", 1.0),
    )  # fmt: skip
    zero_rows = ref.float().abs().amax(dim=(1, 2)) == 0
    assert (out[zero_rows] == 0).all()
    if ref.numel() == 0 or ref.float().norm() == 0:
        return
    err, base = _rel(out, ref), _rel(torch_half, ref)
    assert err <= 2 * base + 1e-6, f"kernel error {err:.3e} > 2 x torch {q.dtype} error {base:.3e}"


def _lens(*ls):
    return [(x, x) for x in ls]


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("d,nH", [(72, 16), (64, 12)])
@pytest.mark.parametrize(
    "lens",
    [
        [1024],
        [4096],
        [2304, 1024, 4096],  # several images of 1k-4k patches in one launch
        [1, 7, 129, 1000, 333],  # odd lengths, under / over one tile
        [0, 577, 0, 1024, 0],  # empty images between real ones
    ],
)
def test_vision_images(backend, d, nH, lens, gen):
    _check(*_inputs(_lens(*lens), nH, nH, d, torch.bfloat16, gen), backend, **BIDIR)


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("d", [64, 72])
def test_fp16_scale_and_keyless_queries(backend, d, gen):
    # (5, 0): queries with no keys get exact zeros; (0, 9): keys without queries.
    q, k, v, cq, ck = _inputs([(300, 300), (5, 0), (0, 9), (130, 130)], 16, 16, d, torch.float16, gen)
    _check(q, k, v, cq, ck, backend, scale=d**-0.5, **BIDIR)


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("d", [64, 72])
def test_large_logits(backend, d, gen):
    # Scores of O(30): the online softmax rescales across the 128-key tiles.
    q, k, v, cq, ck = _inputs(_lens(1500), 16, 16, d, torch.bfloat16, gen)
    _check(q * 4, k * 4, v, cq, ck, backend, **BIDIR)


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("d", [64, 72])
@pytest.mark.parametrize("W", [127, 128, 129])
def test_text_masks_window_edges(backend, d, W, gen):
    q, k, v, cq, ck = _inputs([(700, 700), (65, 300)], 16, 4, d, torch.bfloat16, gen)
    _check(q, k, v, cq, ck, backend, window_left=W - 1, window_right=0)
    _check(q, k, v, cq, ck, backend, window_left=None, window_right=0)


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("d", [64, 72])
@pytest.mark.parametrize("unified", [False, True])
def test_text_masks_image_blocks(backend, d, unified, gen):
    # Images at the start, in the middle (longer than the window) and at the end; a prefix sequence.
    lens = [(900, 900), (200, 500)]
    q, k, v, cq, ck = _inputs(lens, 8, 2, d, torch.bfloat16, gen)
    kb = torch.cat([block_ids_from_ranges(900, [(0, 100), (300, 650), (840, 900)]),
                    block_ids_from_ranges(500, [(350, 420)]) + 10]).to("cuda", torch.int32)  # fmt: skip
    qb = torch.cat([kb[:900], kb[900 + 300 :]])
    for wl in (127, None):
        _check(q, k, v, cq, ck, backend, window_left=wl, window_right=0, q_block=qb, k_block=kb, unified=unified)


@pytest.mark.parametrize("backend", SMALL)
def test_strided_views(backend, gen):
    nH, nKV, T, d = 16, 16, 1100, 72
    qkv = torch.randn(T, (nH + 2 * nKV) * d, generator=gen, device="cuda").to(torch.bfloat16) * 0.3
    q = qkv[:, : nH * d].view(T, nH, d)
    k = qkv[:, nH * d : (nH + nKV) * d].view(T, nKV, d)
    v = qkv[:, (nH + nKV) * d :].view(T, nKV, d)
    cu = torch.tensor([0, 257, T], device="cuda", dtype=torch.int32)
    _check(q, k, v, cu, cu, backend, **BIDIR)


@pytest.mark.parametrize("backend", [None, "fa3", "fa3_ovl", "fa3_m192"])
@pytest.mark.parametrize("d", [64, 72])
def test_cuda_graph_capture(backend, d, gen):
    q, k, v, cq, ck = _inputs(_lens(1024, 300), 16, 16, d, torch.bfloat16, gen)
    run = lambda: ops.attention_varlen(q, k, v, cq, ck, backend=backend, **BIDIR)  # noqa: E731
    eager = run()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = run()
    q.copy_(q * 0.5)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run())
    assert not torch.equal(out, eager)


def test_default_backend_is_fa3():
    for d in (64, 72):
        assert attn_ops.DEFAULT_BACKENDS[d] == "fa3"


def test_opcheck(gen):
    q, k, v, cq, ck = _inputs(_lens(70, 200), 4, 4, 72, torch.bfloat16, gen)
    for variant in (4, 5, 6, 12):
        args = (q, k, v, cq, ck, None, None, -1, -1, False, 1.0, variant)
        torch.library.opcheck(torch.ops.gemma4x.attention_varlen, args)

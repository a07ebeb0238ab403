"""GPU tests of the decode-attention kernel against the fp32 reference.

Error bound: at most 2x the error PyTorch's own bf16/fp16 SDPA makes on the same inputs
against the fp32 reference (plus 2^-10 absolute slack for the cases where both are ~exact).
Full-layer cache rows past each sequence's length hold NaN: a kernel that read one of them
(even masked: 0 * NaN) would return NaN.
"""

from __future__ import annotations

import sys

import pytest
import torch

import gemma4x.ops.attention_decode  # noqa: F401
from gemma4x import ops
from gemma4x.reference.attention import attention, attention_sdpa
from gemma4x.reference.attention_decode import attention_decode as ref_decode
from gemma4x.reference.attention_decode import dense_kv

pytestmark = pytest.mark.cuda
ad_mod = sys.modules["gemma4x.ops.attention_decode"]  # the package re-exports a function of this name

GQA = [(16, 8), (16, 2), (32, 16), (32, 4), (8, 1), (8, 2), (16, 1)]


def build(lengths, *, nH, nKV, d, Tq=1, ring=None, cap=None, slots=None, dtype=torch.bfloat16, seed=0):
    """Cache whose sequence b holds positions 0..L_b+Tq-2 in slot slots[b]; queries are its last Tq."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = len(lengths)
    slots = list(range(B)) if slots is None else slots
    S = max(slots) + 1
    n_max = max(lengths) + Tq - 1
    R = ring if ring else (cap or n_max + 5)
    std = d**-0.25  # q.k ~ N(0, 1): a softmax that is neither flat nor one-hot
    kc = (torch.randn(S, R, nKV, d, generator=g, device="cuda") * std).to(dtype)
    vc = torch.randn(S, R, nKV, d, generator=g, device="cuda").to(dtype)
    rp = torch.full((S, R), -1, dtype=torch.long, device="cuda") if ring else None
    q_pos = torch.zeros(B, Tq, dtype=torch.long, device="cuda")
    for b, (L, s) in enumerate(zip(lengths, slots)):
        n = L + Tq - 1
        if ring:
            p = torch.arange(max(0, n - R), n, device="cuda")
            rp[s, p % R] = p
        else:
            kc[s, n:] = float("nan")  # never to be read
            vc[s, n:] = float("nan")
        q_pos[b] = torch.arange(n - Tq, n, device="cuda")
    q = (torch.randn(B, Tq, nH, d, generator=g, device="cuda") * std).to(dtype)
    st = None if slots == list(range(B)) else torch.tensor(slots, device="cuda")
    return q, kc, vc, q_pos, st, rp


def check(q, kc, vc, q_pos, st, rp, window_left=None, **kw):
    out = ops.attention_decode(q, kc, vc, q_pos, st, rp, window_left=window_left, **kw)
    clean_k, clean_v = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    exact = ref_decode(q.float(), clean_k.float(), clean_v.float(), q_pos, st, rp, window_left=window_left)
    K, V, k_pos = dense_kv(clean_k, clean_v, q_pos, st, rp)
    torch_lp = attention_sdpa(q, K, V, q_pos, k_pos, window_left=window_left, window_right=0)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "NaN/inf: a row past a sequence's length was read"
    err = (out.float() - exact).abs().max().item()
    err_torch = (torch_lp.float() - exact).abs().max().item()
    assert err <= 2 * err_torch + 2**-10, (err, err_torch)
    return out


@pytest.mark.parametrize("d", [256, 512])
@pytest.mark.parametrize("nH,nKV", GQA)
@pytest.mark.parametrize("Tq", [1, 3])
def test_full_layer_gqa_mixed_lengths(nH, nKV, d, Tq):
    # mixed batch: 1, odd, a tile edge and beyond, in shuffled slots
    q, kc, vc, q_pos, st, rp = build([1, 7, 64, 1025], nH=nH, nKV=nKV, d=d, Tq=Tq, slots=[2, 0, 3, 1])
    check(q, kc, vc, q_pos, st, rp)


@pytest.mark.parametrize("W", [512, 1024])
@pytest.mark.parametrize("Tq", [1, 2])
def test_ring_layer_window_edges_and_wrap(W, Tq):
    lengths = [1, 2, W - 1, W, W + 1, 3 * W + 17]
    q, kc, vc, q_pos, st, rp = build(lengths, nH=16, nKV=8, d=256, Tq=Tq, ring=W, slots=[5, 4, 3, 2, 1, 0])
    check(q, kc, vc, q_pos, st, rp, window_left=W - 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256, 512])
def test_dtypes_and_head_dims(dtype, d):
    q, kc, vc, q_pos, st, rp = build([5, 300, 129], nH=8, nKV=2, d=d, dtype=dtype)
    check(q, kc, vc, q_pos, st, rp)


def test_full_layer_with_window_and_hints():
    q, kc, vc, q_pos, st, rp = build([3, 700, 2000], nH=16, nKV=2, d=512, Tq=2, cap=4096)
    for hint in (None, 2001, 1):  # the hint only sizes the split; any value is correct
        check(q, kc, vc, q_pos, st, rp, window_left=511, max_kv_len=hint)


@pytest.mark.parametrize("L", [1, 8191, 70_000])
def test_long_context_batch_one_splits(L):
    q, kc, vc, q_pos, st, rp = build([L], nH=16, nKV=2, d=512)
    check(q, kc, vc, q_pos, st, rp)


def test_padding_rows_and_bad_slots_give_zeros():
    q, kc, vc, q_pos, st, rp = build([10, 20, 30], nH=8, nKV=1, d=256)
    q_pos[1] = -1
    out = ops.attention_decode(q, kc, vc, q_pos, torch.tensor([0, 1, 99], device="cuda"))
    assert (out[1] == 0).all() and (out[2] == 0).all() and out[0].abs().sum() > 0


def test_strided_query_and_out_of_place_cache_view():
    q, kc, vc, q_pos, st, rp = build([17, 40], nH=16, nKV=2, d=256)
    wide = torch.zeros(2, 1, 16, 264, dtype=q.dtype, device="cuda")
    wide[..., :256] = q
    check(wide[..., :256], kc, vc, q_pos, st, rp)


def test_cuda_graph_replay_follows_positions():
    """Captured once at small lengths; replays at new positions read the new lengths."""
    B, cap = 4, 4096
    q, kc, vc, q_pos, st, rp = build([cap - 5] * B, nH=16, nKV=2, d=512, cap=cap)
    kc.nan_to_num_(0.0), vc.nan_to_num_(0.0)
    pos = torch.tensor([[0], [1], [2], [3]], device="cuda")
    static_pos = pos.clone()
    out = ops.attention_decode(q, kc, vc, static_pos, max_kv_len=cap)  # warm-up (lazy init)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.attention_decode(q, kc, vc, static_pos, max_kv_len=cap)
    for new in ([[5], [63], [1000], [4000]], [[4000], [0], [17], [2048]], [[1], [1], [1], [1]]):
        static_pos.copy_(torch.tensor(new, device="cuda"))
        graph.replay()
        exact = ref_decode(q.float(), kc.float(), vc.float(), static_pos)
        K, V, k_pos = dense_kv(kc, vc, static_pos)
        err_torch = (attention_sdpa(q, K, V, static_pos, k_pos).float() - exact).abs().max().item()
        assert (out.float() - exact).abs().max().item() <= 2 * err_torch + 2**-10


def test_opcheck():
    q, kc, vc, q_pos, st, rp = build([3, 9], nH=8, nKV=2, d=256, ring=16)
    torch.library.opcheck(torch.ops.gemma4x.attention_decode.default, (q, kc, vc, q_pos, None, rp, 15, 1.0, None))


def test_layer_decode_matches_reference_attention():
    """Through the layer's dispatch: the op the CUDA namespace picks equals dense attention."""
    from gemma4x.layers.dispatch import ops_for

    q, kc, vc, q_pos, st, rp = build([3, 33], nH=8, nKV=2, d=256)
    kc.nan_to_num_(0.0), vc.nan_to_num_(0.0)
    o = ops_for(q).attention_decode(q, kc, vc, q_pos, st, None, window_left=None, scale=1.0, max_kv_len=40)
    K, V, k_pos = dense_kv(kc, vc, q_pos)
    exact = attention(q.float(), K.float(), V.float(), q_pos, k_pos)
    err_torch = (attention_sdpa(q, K, V, q_pos, k_pos).float() - exact).abs().max().item()
    assert (o.float() - exact).abs().max().item() <= 2 * err_torch + 2**-10


@pytest.mark.parametrize(
    "variant",
    [
        ad_mod.VARIANT_MAIN,
        ad_mod.VARIANT_OLD_COMBINE,
        ad_mod.VARIANT_WIDE_COMBINE,
        ad_mod.VARIANT_NO_EARLY_TRIGGER | ad_mod.VARIANT_NO_SPLIT_ROUNDING,
    ],
)
@pytest.mark.parametrize("case", ["long_b1", "mixed_tq3", "ring"])
def test_launch_variants_match_reference(variant, case):
    """Every launch variant (set_tuning) computes the same attention: both combine kernels, with
    and without the early PDL trigger and split rounding."""
    prev = ad_mod.set_tuning(variant, 0)
    try:
        if case == "long_b1":
            check(*build([8191], nH=16, nKV=2, d=512))
        elif case == "mixed_tq3":
            check(*build([1, 70, 1025, 3000], nH=32, nKV=4, d=512, Tq=3, slots=[1, 3, 0, 2]))
        else:
            q, kc, vc, q_pos, st, rp = build([5, 1500, 2100], nH=16, nKV=8, d=256, ring=1024)
            check(q, kc, vc, q_pos, st, rp, window_left=1023)
    finally:
        ad_mod.set_tuning(*prev)


def test_split_override_and_tuning_validation():
    prev = ad_mod.set_tuning(0, 7)  # 7 splits whatever the heuristic says
    try:
        check(*build([5000], nH=16, nKV=2, d=512))
    finally:
        ad_mod.set_tuning(*prev)
    for bad in ((-1, 0), (ad_mod.NUM_VARIANTS, 0), (0, -1), (0, 1025), (True, 0)):
        with pytest.raises(ValueError, match="set_tuning"):
            ad_mod.set_tuning(*bad)
    assert ad_mod.set_tuning(*prev) == prev

"""CPU tests of the decode-attention reference and of the op's argument validation.

The reference must equal plain attention over each sequence's own history (rebuilt from
scratch, no cache), for full slabs and rings, mixed lengths, any slot order and several
queries per sequence. Validation runs before any kernel, so bad arguments fail on the CPU too,
naming the argument with expected vs actual.
"""

from __future__ import annotations

import pytest
import torch

from gemma4x import ops
from gemma4x.reference.attention import attention
from gemma4x.reference.attention_decode import (
    attention_decode,
    attention_decode_sdpa,
    attention_decode_sdpa_single_query,
    dense_kv,
)


def make_case(lengths, *, Tq=1, nH=4, nKV=2, d=8, ring=None, slots=None, num_slots=None, cap=40, seed=0):
    """Cache with sequence b's positions 0..L_b+Tq-2 in slot slots[b] (its last Tq are the queries).

    Returns (q, k_cache, v_cache, q_pos, slots_tensor, ring_pos, history) where history[b] is
    the (K, V) of every position of sequence b in order.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    slots = list(range(B)) if slots is None else slots
    S = num_slots or max(slots) + 1
    R = ring or cap
    kc = torch.randn(S, R, nKV, d, generator=g)  # stale garbage everywhere
    vc = torch.randn(S, R, nKV, d, generator=g)
    rp = torch.full((S, R), -1, dtype=torch.long) if ring else None
    q_pos = torch.zeros(B, Tq, dtype=torch.long)
    hist = []
    for b, (L, s) in enumerate(zip(lengths, slots)):
        n = L + Tq - 1  # positions 0..n-1 are cached; queries at n-Tq..n-1
        K, V = torch.randn(n, nKV, d, generator=g), torch.randn(n, nKV, d, generator=g)
        hist.append((K, V))
        for p in range(n):
            r = p % R if ring else p
            kc[s, r], vc[s, r] = K[p], V[p]
            if ring:
                rp[s, r] = p
        q_pos[b] = torch.arange(n - Tq, n)
    q = torch.randn(B, Tq, nH, d, generator=g)
    st = None if slots == list(range(B)) else torch.tensor(slots)
    return q, kc, vc, q_pos, st, rp, hist


def from_history(q, q_pos, hist, window_left, ring=None):
    """Attention of each sequence over its whole history (what survives in a ring only)."""
    outs = []
    for b, (K, V) in enumerate(hist):
        n = K.shape[0]
        k_pos = torch.arange(n)
        if ring:
            k_pos = torch.where(k_pos >= n - ring, k_pos, -1)  # overwritten ring rows are gone
        outs.append(
            attention(q[b : b + 1], K[None], V[None], q_pos[b : b + 1], k_pos[None], window_left=window_left)
        )
    return torch.cat(outs)


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("slots", [None, [3, 0, 2]])
def test_full_layer_matches_history(Tq, slots):
    q, kc, vc, q_pos, st, rp, hist = make_case([1, 9, 30], Tq=Tq, slots=slots)
    out = attention_decode(q, kc, vc, q_pos, st)
    torch.testing.assert_close(out, from_history(q, q_pos, hist, None))


@pytest.mark.parametrize("Tq", [1, 2])
@pytest.mark.parametrize("W", [5, 8])
def test_ring_layer_matches_history(Tq, W):
    # lengths around the window edges and a wrap-around several times over
    q, kc, vc, q_pos, st, rp, hist = make_case([1, W - 1, W, W + 1, 3 * W + 2], Tq=Tq, ring=W, slots=[4, 3, 2, 1, 0])
    out = attention_decode(q, kc, vc, q_pos, st, rp, window_left=W - 1)
    torch.testing.assert_close(out, from_history(q, q_pos, hist, W - 1, ring=W))


def test_full_layer_with_window():
    q, kc, vc, q_pos, st, rp, hist = make_case([3, 17, 33], Tq=2)
    out = attention_decode(q, kc, vc, q_pos, st, window_left=6)
    torch.testing.assert_close(out, from_history(q, q_pos, hist, 6))


def test_sdpa_variants_agree_and_kv_len_truncates():
    q, kc, vc, q_pos, st, rp, hist = make_case([2, 12, 7], nH=8, nKV=2)
    ref = attention_decode(q, kc, vc, q_pos, st)
    n = int(q_pos.max()) + 1
    for fn in (attention_decode_sdpa, attention_decode_sdpa_single_query):
        torch.testing.assert_close(fn(q, kc, vc, q_pos, st, max_kv_len=n), ref)
        torch.testing.assert_close(fn(q, kc, vc, q_pos, st), ref)
    K, V, k_pos = dense_kv(kc, vc, q_pos, st, None, n)
    assert K.shape[1] == n and k_pos.shape == (3, n)
    assert k_pos[0].tolist() == [0, 1] + [-1] * (n - 2)


def test_padding_query_gives_zeros():
    q, kc, vc, q_pos, st, rp, hist = make_case([4, 6])
    q_pos[1] = -1  # no key is at or before position -1
    out = attention_decode(q, kc, vc, q_pos, st)
    assert (out[1] == 0).all() and (out[0] != 0).any()


# ---- validation (CPU tensors: the checks run before the device check) ----


def _args(dtype=torch.bfloat16, B=2, Tq=1, nH=4, nKV=2, d=64, S=3, R=16):
    return dict(
        q=torch.randn(B, Tq, nH, d).to(dtype),
        k_cache=torch.randn(S, R, nKV, d).to(dtype),
        v_cache=torch.randn(S, R, nKV, d).to(dtype),
        q_pos=torch.zeros(B, Tq, dtype=torch.long),
    )


def _call(**kw):
    a = _args()
    a.update(kw)
    q, kc, vc, qp = a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("q_pos")
    return ops.attention_decode(q, kc, vc, qp, **a)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(q=torch.randn(2, 4, 64).bfloat16()), ValueError, r"q must be \[B, Tq, nH, d\]"),
        (dict(q=torch.randn(2, 1, 4, 64)), TypeError, "q has dtype float32, expected bfloat16 or float16"),
        (dict(q=torch.randn(2, 9, 4, 64).bfloat16(), q_pos=torch.zeros(2, 9, dtype=torch.long)), ValueError,
         r"q has Tq=9 queries per sequence, expected 1..8"),
        (dict(q=torch.randn(2, 1, 4, 96).bfloat16()), ValueError, "head_dim 96 is not supported"),
        (dict(k_cache=torch.randn(3, 16, 2, 128).bfloat16()), ValueError, "k_cache has head_dim 128, expected 64"),
        (dict(k_cache=torch.randn(3, 16, 3, 64).bfloat16(), v_cache=torch.randn(3, 16, 3, 64).bfloat16()), ValueError,
         "q has 4 heads, not a multiple of k_cache's 3 KV heads"),
        (dict(v_cache=torch.randn(3, 15, 2, 64).bfloat16()), ValueError,
         r"v_cache has shape \[3, 15, 2, 64\], expected \[3, 16, 2, 64\]"),
        (dict(v_cache=torch.randn(3, 16, 2, 64).half()), TypeError, "v_cache has dtype float16, expected bfloat16"),
        (dict(k_cache=torch.randn(3, 16, 64, 2).bfloat16().transpose(-1, -2)), ValueError,
         "k_cache must be contiguous in its last dimension"),
        (dict(q=torch.randn(2, 1, 4, 68).bfloat16()[..., :64]), ValueError, "q strides .* multiples of 8"),
        (dict(q_pos=torch.zeros(2, 1, dtype=torch.int32)), TypeError, "q_pos has dtype int32, expected int64"),
        (dict(q_pos=torch.zeros(2, 2, dtype=torch.long)), ValueError, r"q_pos has shape \[2, 2\], expected \[2, 1\]"),
        (dict(slots=torch.zeros(3, dtype=torch.long)), ValueError, r"slots has shape \[3\], expected \[2\]"),
        (dict(ring_pos=torch.zeros(3, 15, dtype=torch.long)), ValueError,
         r"ring_pos has shape \[3, 15\], expected \[3, 16\]"),
        (dict(q=torch.randn(4, 1, 4, 64).bfloat16(), q_pos=torch.zeros(4, 1, dtype=torch.long)), ValueError,
         "batch 4 without slots needs slots 0..3, but k_cache has 3"),
        (dict(window_left=-1), ValueError, "window_left must be None or an int >= 0, got -1"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
        (dict(max_kv_len=0), ValueError, "max_kv_len must be None or an int >= 1, got 0"),
    ],
)
def test_rejects(kw, exc, match):
    with pytest.raises(exc, match="attention_decode: " + match):
        _call(**kw)


def test_valid_cpu_call_asks_for_cuda():
    with pytest.raises(ValueError, match="attention_decode: q must be a CUDA tensor"):
        _call()

"""KVCache: full slabs, sliding rings that keep exactly the window, nothing for KV-shared layers."""

from __future__ import annotations

import torch

from gemma4x.layers.attention import LayerCacheSpec
from gemma4x.reference.attention import attention
from gemma4x.runtime.kv_cache import KVCache

SPECS = [
    LayerCacheSpec("sliding", 2, 4, 5, 0),
    LayerCacheSpec("full", 1, 8, None, 1),
    LayerCacheSpec("none", 2, 4, None, 0),
]


def _cache(slots=3, max_seq_len=32):
    return KVCache(SPECS, num_slots=slots, max_seq_len=max_seq_len, device=torch.device("cpu"), dtype=torch.float32)


def test_allocation_follows_the_spec():
    c = _cache()
    assert c.k[0].shape == (3, 5, 2, 4) and c.ring_pos[0].shape == (3, 5)
    assert c.k[1].shape == (3, 32, 1, 8) and c.ring_pos[1] is None
    assert c.k[2] is None and c.v[2] is None  # KV-shared consumers own no cache
    assert c.nbytes() == 2 * 4 * (3 * 5 * 2 * 4 + 3 * 32 * 8)
    assert _cache(max_seq_len=3).k[0].shape[1] == 3  # a ring never exceeds max_seq_len


def test_prefill_longer_than_window_keeps_the_last_window():
    c = _cache()
    T = 12
    k = torch.arange(T, dtype=torch.float32)[None, :, None, None].expand(1, T, 2, 4).clone()
    pos = torch.arange(T)[None]
    view = c.prefill_view(slot=1)
    K, V, k_pos = view.update(0, k, k.clone(), pos)
    assert K is k and torch.equal(k_pos, pos)  # the prompt attends over itself
    assert sorted(c.ring_pos[0][1].tolist()) == [7, 8, 9, 10, 11]
    for r, p in enumerate(c.ring_pos[0][1].tolist()):
        assert r == p % 5 and (c.k[0][1, r] == p).all()
    assert (c.ring_pos[0][0] == -1).all()  # other slots untouched


def test_decode_ring_and_full_views_match_dense_attention():
    """Decode over ring/slab views equals attention over each sequence's whole history."""
    torch.manual_seed(0)
    c = _cache()
    lengths = {0: 3, 2: 9}  # slot -> prompt length (one shorter, one longer than the ring)
    hist = {}
    for slot, T in lengths.items():
        k0, v0 = torch.randn(1, T, 2, 4), torch.randn(1, T, 2, 4)
        k1, v1 = torch.randn(1, T, 1, 8), torch.randn(1, T, 1, 8)
        view = c.prefill_view(slot)
        pos = torch.arange(T)[None]
        view.update(0, k0, v0, pos)
        view.update(1, k1, v1, pos)
        hist[slot] = [k0, v0, k1, v1]
    slots = [2, 0]  # not in slot order: exercises the gather path
    positions = torch.tensor([[lengths[s]] for s in slots])
    nk0, nv0 = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    nk1, nv1 = torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8)
    view = c.decode_view(slots, kv_len=max(lengths.values()) + 1)
    K0, V0, p0 = view.update(0, nk0, nv0, positions).dense(positions)
    K1, V1, p1 = view.update(1, nk1, nv1, positions).dense(positions)
    q0, q1 = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 8)
    out0 = attention(q0, K0, V0, positions, p0, window_left=4, window_right=0)
    out1 = attention(q1, K1, V1, positions, p1, window_left=None, window_right=0)
    for b, s in enumerate(slots):
        k0, v0, k1, v1 = hist[s]
        T = lengths[s] + 1
        fk0, fv0 = torch.cat([k0, nk0[b : b + 1]], 1), torch.cat([v0, nv0[b : b + 1]], 1)
        fk1, fv1 = torch.cat([k1, nk1[b : b + 1]], 1), torch.cat([v1, nv1[b : b + 1]], 1)
        ap = torch.arange(T)[None]
        ref0 = attention(q0[b : b + 1], fk0, fv0, positions[b : b + 1], ap, window_left=4, window_right=0)
        ref1 = attention(q1[b : b + 1], fk1, fv1, positions[b : b + 1], ap, window_left=None, window_right=0)
        torch.testing.assert_close(out0[b : b + 1], ref0)
        torch.testing.assert_close(out1[b : b + 1], ref1)


def test_prefill_forgets_the_previous_sequence_of_a_slot():
    c = _cache()
    c.prefill_view(0).update(0, torch.ones(1, 9, 2, 4), torch.ones(1, 9, 2, 4), torch.arange(9)[None])
    c.prefill_view(0).update(0, torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), torch.arange(2)[None])
    assert sorted(p for p in c.ring_pos[0][0].tolist() if p >= 0) == [0, 1]

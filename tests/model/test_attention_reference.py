"""The attention oracle (masks, block ids, packed varlen batches) against HF's mask builders and itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gemma4x.reference.attention import attention, attention_mask
from gemma4x.reference.attention_varlen import (
    attention_varlen,
    block_ids_from_ranges,
    gemma4_layer_mask_args,
    vision_block_ids,
)

transformers = pytest.importorskip("transformers")

GQA = [(16, 8), (16, 2), (32, 16), (32, 4), (8, 1), (8, 2), (16, 1)]

# One row each: image at the start / end, several images, an image longer than W, video frames
# (separated by type-0 timestamps), audio (type 3, never bidirectional), left padding.
MM_ROWS = [
    [1, 1, 1, 1, 1, 1, 1, 0, 0, 2, 2, 0, 2, 2, 0, 3, 3, 0, 0],
    [0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 3, 3, 0, 0, 1, 2, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 2, 0, 2, 2],
]
PAD_LEFT = [0, 0, 0, 3]  # row 3 is left-padded by 3 tokens (attention_mask 0)


def _tiny_config(W: int, impl: str = "eager"):
    from transformers import Gemma4Config, Gemma4TextConfig

    tc = Gemma4TextConfig(
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=W,
        use_bidirectional_attention="vision", hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, global_head_dim=8, vocab_size=64, intermediate_size=16, hidden_size_per_layer_input=0,
    )  # fmt: skip
    cfg = Gemma4Config(text_config=tc.to_dict())
    cfg.get_text_config()._attn_implementation = impl  # eager: additive 0 / min; sdpa: boolean
    return cfg


def _hf_allowed(m: torch.Tensor) -> torch.Tensor:
    return (m if m.dtype == torch.bool else m == 0)[:, 0]  # [B, 1, Tq, Tk] -> bool [B, Tq, Tk]


def _ours(layer: str, W: int, q_pos, k_pos, q_blk, k_blk, *, unified=False, blocks=True):
    a = gemma4_layer_mask_args(layer, W, unified=unified, blocks=blocks)
    qb, kb = (q_blk, k_blk) if a["use_blocks"] else (None, None)
    return attention_mask(q_pos, k_pos, a["window_left"], a["window_right"], qb, kb, unified=a["unified"])


def _batch():
    mm = torch.tensor(MM_ROWS)
    B, T = mm.shape
    am = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(PAD_LEFT):
        am[b, :n] = 0
    idx = torch.arange(T).expand(B, T)
    k_pos = torch.where(am.bool(), idx, -1)  # HF's mask functions index by row slot; padding = empty
    return mm, am, idx, k_pos


def test_vision_block_ids_match_hf():
    from transformers.models.gemma4.modeling_gemma4 import (
        get_block_sequence_ids_for_mask,
    )

    g = torch.Generator().manual_seed(0)
    mm = torch.cat([torch.tensor(MM_ROWS), torch.randint(0, 4, (8, 33), generator=g)[:, :19]])
    assert torch.equal(vision_block_ids(mm), get_block_sequence_ids_for_mask(mm, mm.device))
    assert vision_block_ids(torch.tensor(MM_ROWS[0])).tolist()[:13] == [0] * 7 + [-1, -1, 1, 1, -1, 2]
    # ranges: same ids wherever no two ranges touch (row 1 has images at 3:5, 6:9, 14:19)
    assert torch.equal(block_ids_from_ranges(19, [(14, 19), (3, 5), (6, 9), (7, 7)]), vision_block_ids(mm[1]))
    assert torch.equal(block_ids_from_ranges(19, [(0, 7), (9, 11), (12, 14)]), vision_block_ids(mm[0]))
    with pytest.raises(ValueError, match="overlap"):
        block_ids_from_ranges(10, [(0, 5), (4, 6)])
    with pytest.raises(ValueError, match="outside"):
        block_ids_from_ranges(10, [(8, 11)])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("W", [2, 3, 4, 5, 7])
def test_masks_match_hf_gemma4(W, impl):
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4ForConditionalGeneration,
    )

    mm, am, idx, k_pos = _batch()
    B, T = mm.shape
    masks = Gemma4ForConditionalGeneration.create_masks_for_generate(
        _tiny_config(W, impl), torch.zeros(B, T, 16), am, None, idx, mm_token_type_ids=mm
    )
    blk = vision_block_ids(mm)
    for layer in ("sliding_attention", "full_attention"):
        ours = _ours(layer, W, idx, k_pos, blk, blk)
        assert torch.equal(ours, _hf_allowed(masks[layer])), layer
    # text-only (decode, or no mm_token_type_ids): plain causal / sliding
    plain = Gemma4ForConditionalGeneration.create_masks_for_generate(
        _tiny_config(W, impl), torch.zeros(B, T, 16), am, None, idx, mm_token_type_ids=None
    )
    for layer in ("sliding_attention", "full_attention"):
        assert torch.equal(_ours(layer, W, idx, k_pos, blk, blk, blocks=False), _hf_allowed(plain[layer]))


@pytest.mark.parametrize("W", [3, 5])
def test_masks_match_hf_unified_forward(W):
    """gemma4_unified forward(): create_masks_for_generate(block_sequence_ids=...), OR after the base mask."""
    from transformers.masking_utils import create_masks_for_generate
    from transformers.models.gemma4_unified.modeling_gemma4_unified import (
        Gemma4UnifiedForConditionalGeneration,
    )

    mm, am, idx, k_pos = _batch()
    B, T = mm.shape
    cfg, blk = _tiny_config(W), vision_block_ids(mm)
    masks = create_masks_for_generate(cfg, torch.zeros(B, T, 16), am, None, idx, block_sequence_ids=blk)
    for layer in ("sliding_attention", "full_attention"):
        assert torch.equal(_ours(layer, W, idx, k_pos, blk, blk, unified=True), _hf_allowed(masks[layer])), layer
    # Its static-cache create_masks_for_generate is the Gemma4 rule instead (spec §6.5, §10.2).
    static = Gemma4UnifiedForConditionalGeneration.create_masks_for_generate(
        cfg, torch.zeros(B, T, 16), am, None, idx, mm_token_type_ids=mm
    )
    for layer in ("sliding_attention", "full_attention"):
        assert torch.equal(_ours(layer, W, idx, k_pos, blk, blk), _hf_allowed(static[layer])), layer
    assert not torch.equal(_hf_allowed(static["full_attention"]), _hf_allowed(masks["full_attention"]))


@pytest.mark.parametrize("prefix", [3, 5, 9])
def test_masks_match_hf_with_cached_prefix(prefix):
    """A chunk after a prefix in HF's DynamicCache: sliding keys are the last W-1 cached + the chunk."""
    from transformers import DynamicCache
    from transformers.masking_utils import _preprocess_mask_arguments
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4ForConditionalGeneration,
    )

    W, B = 4, 1
    cfg = _tiny_config(W)
    mm = torch.tensor(MM_ROWS[1:2])
    T = mm.shape[1]
    C = T - prefix
    cache = DynamicCache(config=cfg.get_text_config())
    for layer in range(2):
        kv = torch.zeros(B, 1, prefix, 8)
        cache.update(kv, kv, layer)
    q_pos = torch.arange(prefix, T)[None]
    emb = torch.zeros(B, C, 16)
    am = torch.ones(B, T, dtype=torch.long)
    masks = Gemma4ForConditionalGeneration.create_masks_for_generate(cfg, emb, am, cache, q_pos, mm_token_type_ids=mm)
    blk = vision_block_ids(mm)
    for layer_idx, layer in enumerate(("sliding_attention", "full_attention")):
        *_, kv_length, _, kv_offset = _preprocess_mask_arguments(cfg.get_text_config(), emb, am, cache, q_pos, layer_idx)
        k_pos = torch.arange(kv_offset, kv_offset + kv_length)[None]
        ours = _ours(layer, W, q_pos, k_pos, blk[:, prefix:], blk[:, kv_offset : kv_offset + kv_length])
        assert torch.equal(ours, _hf_allowed(masks[layer])), layer


def test_mask_window_edges_and_blocks():
    p = torch.arange(9)
    m = attention_mask(p, p, 3, 0)  # sliding W = 4: q-4 < k <= q
    assert m.sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4]
    assert m[6].tolist() == [False, False, False, True, True, True, True, False, False]
    blk = torch.tensor([-1, 0, 0, 0, 0, 0, 0, -1, -1])  # a 6-token image, longer than W
    g = attention_mask(p, p, 3, 0, blk, blk)
    u = attention_mask(p, p, 3, 0, blk, blk, unified=True)
    # Gemma4: the image's whole future is visible (right bound relaxed), the left window still applies.
    assert g[1].tolist() == [True, True, True, True, True, True, True, False, False]
    assert g[3].tolist() == [True, True, True, True, True, True, True, False, False]
    assert g[6].tolist() == [False, False, False, True, True, True, True, False, False]
    # unified: the whole own block is visible regardless of the window
    assert u[6].tolist() == [False, True, True, True, True, True, True, False, False]
    assert u[1].tolist() == [True, True, True, True, True, True, True, False, False]
    # an empty slot is never visible, whatever its block
    k_pos = p.clone()
    k_pos[2] = -1
    assert not attention_mask(p, k_pos, None, 0, blk, blk, unified=True)[:, 2].any()


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _dense_per_seq(q, k, v, lq, lk, **kw):
    """Each sequence alone through the dense oracle, queries aligned to the end of the keys."""
    outs, q0, k0 = [], 0, 0
    for a, b in zip(lq, lk):
        if a:
            qp = torch.arange(b - a, b)[None]
            kp = torch.arange(b)[None]
            o = attention(q[None, q0 : q0 + a], k[None, k0 : k0 + b], v[None, k0 : k0 + b], qp, kp, **kw)[0]
            if b == 0:
                o = torch.zeros_like(o)
            outs.append(o)
        q0, k0 = q0 + a, k0 + b
    return torch.cat(outs) if outs else q.new_zeros(0, *q.shape[1:])


@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("window", [(None, 0), (4, 0), (None, None)])
def test_varlen_equals_dense_per_sequence(heads, window):
    nH, nKV = heads
    d = 8
    # odd lengths, empty sequences (no queries, no keys, neither), a cached prefix (lk > lq)
    lq = [7, 0, 1, 5, 0, 11, 3]
    lk = [7, 4, 1, 13, 0, 11, 20]
    q = _rand((sum(lq), nH, d), 1)
    k, v = _rand((sum(lk), nKV, d), 2), _rand((sum(lk), nKV, d), 3)
    out = attention_varlen(q, k, v, _cu(lq), _cu(lk), window_left=window[0], window_right=window[1], scale=0.3)
    ref = _dense_per_seq(q, k, v, lq, lk, window_left=window[0], window_right=window[1], scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [64, 72, 256, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_head_dims(d, dtype):
    lq, lk = [3, 1, 0, 2], [5, 1, 2, 2]
    q = _rand((sum(lq), 4, d), 4, dtype) * d**-0.25
    k, v = _rand((sum(lk), 2, d), 5, dtype) * d**-0.25, _rand((sum(lk), 2, d), 6, dtype)
    out = attention_varlen(q, k, v, _cu(lq), _cu(lk), window_left=2)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, _dense_per_seq(q, k, v, lq, lk, window_left=2), rtol=0, atol=0)


@pytest.mark.parametrize("W", [4, 5])
def test_varlen_window_edges(W):
    """Sequences of W-1, W, W+1 (and 1, 2W+1) tokens: sliding equals causal until the window bites."""
    lens = [W - 1, W, W + 1, 1, 2 * W + 1]
    q = _rand((sum(lens), 4, 16), 7)
    k, v = _rand((sum(lens), 2, 16), 8), _rand((sum(lens), 2, 16), 9)
    cu = _cu(lens)
    slid = attention_varlen(q, k, v, cu, cu, window_left=W - 1)
    causal = attention_varlen(q, k, v, cu, cu, window_left=None)
    torch.testing.assert_close(slid, _dense_per_seq(q, k, v, lens, lens, window_left=W - 1), rtol=1e-6, atol=1e-6)
    q_pos = torch.cat([torch.arange(n) for n in lens])
    same = q_pos < W  # a query at position < W sees every earlier key either way
    torch.testing.assert_close(slid[same], causal[same], rtol=0, atol=0)
    assert not torch.allclose(slid[~same], causal[~same])
    # the one key that differs at q = W: key 0 is outside (q-W < k), key 1 inside
    last = cu[2].item() + W  # sequence of W+1 tokens, query position W
    kk, vv = k[cu[2] + 1 : cu[2] + W + 1], v[cu[2] + 1 : cu[2] + W + 1]
    want = attention(q[None, last : last + 1], kk[None], vv[None], torch.tensor([[W]]), torch.arange(1, W + 1)[None])
    torch.testing.assert_close(slid[last], want[0, 0], rtol=1e-6, atol=1e-6)


def test_varlen_blocks_equal_hf_mask_attention():
    """Packed rows with images/videos/audio vs SDPA under HF's own Gemma4 sliding/full masks."""
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4ForConditionalGeneration,
    )

    W = 4
    mm = torch.tensor(MM_ROWS[:3])
    B, T = mm.shape
    masks = Gemma4ForConditionalGeneration.create_masks_for_generate(
        _tiny_config(W), torch.zeros(B, T, 16), None, None, torch.arange(T)[None], mm_token_type_ids=mm
    )
    q = _rand((B, T, 8, 32), 10)
    k, v = _rand((B, T, 2, 32), 11), _rand((B, T, 2, 32), 12)
    blk = vision_block_ids(mm).reshape(-1)
    cu = _cu([T] * B)
    for layer in ("sliding_attention", "full_attention"):
        a = gemma4_layer_mask_args(layer, W)
        qb, kb = (blk, blk) if a["use_blocks"] else (None, None)
        out = attention_varlen(
            q.reshape(B * T, 8, 32), k.reshape(B * T, 2, 32), v.reshape(B * T, 2, 32), cu, cu,
            window_left=a["window_left"], window_right=0, q_block=qb, k_block=kb,
        )  # fmt: skip
        ref = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=masks[layer], scale=1.0, enable_gqa=True
        ).transpose(1, 2)
        torch.testing.assert_close(out, ref.reshape(B * T, 8, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [[19], [9, 10], [3, 6, 5, 5], [14, 5], [1, 2, 6, 10]])
@pytest.mark.parametrize("layer", ["sliding_attention", "full_attention"])
def test_chunked_prefill_equals_full_prefill(chunks, layer):
    """Queries appended to a cached prefix, chunk by chunk, equal one prefill (blocks never split)."""
    W, T = 4, 19
    mm = torch.tensor(MM_ROWS[1])  # blocks at 3:5, 6:9, 14:19: no chunk boundary inside one
    blk = vision_block_ids(mm)
    q, k, v = _rand((T, 4, 16), 13), _rand((T, 2, 16), 14), _rand((T, 2, 16), 15)
    a = gemma4_layer_mask_args(layer, W)
    kw = {"window_left": a["window_left"], "window_right": 0}
    qb = blk if a["use_blocks"] else None
    full = attention_varlen(q, k, v, _cu([T]), _cu([T]), q_block=qb, k_block=qb, **kw)
    pieces, start = [], 0
    for c in chunks:
        end = start + c
        # the cache holds every key so far plus this chunk; block ids of the whole row
        qb_c = None if qb is None else qb[start:end]
        kb_c = None if qb is None else qb[:end]
        pieces.append(attention_varlen(q[start:end], k[:end], v[:end], _cu([c]), _cu([end]), q_block=qb_c, k_block=kb_c, **kw))
        start = end
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-6, atol=1e-6)
    # and all chunks of two different sequences in one packed call
    lq, lk = [chunks[-1], T], [T, T]
    both = attention_varlen(
        torch.cat([q[T - chunks[-1] :], q]), torch.cat([k, k]), torch.cat([v, v]), _cu(lq), _cu(lk),
        q_block=None if qb is None else torch.cat([qb[T - chunks[-1] :], qb]),
        k_block=None if qb is None else torch.cat([qb, qb]), **kw,
    )  # fmt: skip
    torch.testing.assert_close(both, torch.cat([full[T - chunks[-1] :], full]), rtol=1e-6, atol=1e-6)


def test_splitting_a_block_across_chunks_changes_the_result():
    """Why the runtime must never split a vision block: the earlier chunk misses its block's future."""
    W, T = 4, 19
    blk = vision_block_ids(torch.tensor(MM_ROWS[1]))
    q, k, v = _rand((T, 4, 16), 16), _rand((T, 2, 16), 17), _rand((T, 2, 16), 18)
    full = attention_varlen(q, k, v, _cu([T]), _cu([T]), window_left=W - 1, q_block=blk, k_block=blk)
    first = attention_varlen(q[:7], k[:7], v[:7], _cu([7]), _cu([7]), window_left=W - 1, q_block=blk[:7], k_block=blk[:7])
    assert not torch.allclose(first[6], full[6])  # token 6 starts the block 6:9


@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("W", [4, 6])
def test_decode_over_ring_buffer_equals_dense(n_q, W):
    """Decode / speculative verification: per-slot ring buffers (slot = pos % R) vs the full history."""
    R = W - 1 + n_q  # the ring keeps W-1 past tokens plus this step's queries
    hist = [2, W - 1, W, W + 1, 3 * W + 2]  # tokens already seen per sequence (odd, window edges)
    nH, nKV, d = 8, 2, 16
    qs, ks, vs, kps, refs, lk = [], [], [], [], [], []
    for i, h in enumerate(hist):
        L = h + n_q
        q, k, v = _rand((n_q, nH, d), 20 + i), _rand((L, nKV, d), 40 + i), _rand((L, nKV, d), 60 + i)
        ring_k, ring_v = torch.zeros(R, nKV, d), torch.zeros(R, nKV, d)
        ring_pos = torch.full((R,), -1)
        for p in range(L):
            ring_k[p % R], ring_v[p % R], ring_pos[p % R] = k[p], v[p], p
        qs.append(q), ks.append(ring_k), vs.append(ring_v), kps.append(ring_pos), lk.append(R)
        refs.append(attention(q[None], k[None], v[None], torch.arange(h, L)[None], torch.arange(L)[None], window_left=W - 1)[0])
    q_pos = torch.cat([torch.arange(h, h + n_q) for h in hist])
    out = attention_varlen(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), _cu([n_q] * len(hist)), _cu(lk), q_pos, torch.cat(kps), window_left=W - 1
    )  # fmt: skip
    torch.testing.assert_close(out, torch.cat(refs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [64, 72])
def test_vision_encoder_attention(d):
    """Bidirectional within each image, images packed: equals a padded batch with padding keys masked."""
    lens = [9, 1, 16, 5]  # patches per image (variable), MHA as in the vision tower
    nH = 4
    N = max(lens)
    q, k, v = _rand((sum(lens), nH, d), 80) * 0.2, _rand((sum(lens), nH, d), 81) * 0.2, _rand((sum(lens), nH, d), 82)
    cu = _cu(lens)
    out = attention_varlen(q, k, v, cu, cu, window_left=None, window_right=None)
    # padded batch [B, N, ...] with -1 positions on padding keys, through SDPA with HF-style key masks
    pad = lambda x: torch.stack([F.pad(x[cu[b] : cu[b + 1]], (0, 0, 0, 0, 0, N - n)) for b, n in enumerate(lens)])
    valid = torch.stack([torch.arange(N) < n for n in lens])
    pos = torch.where(valid, torch.arange(N), -1)
    dense = attention(pad(q), pad(k), pad(v), torch.arange(N).expand(len(lens), N), pos, window_left=None, window_right=None)
    ref = F.scaled_dot_product_attention(
        pad(q).transpose(1, 2), pad(k).transpose(1, 2), pad(v).transpose(1, 2), attn_mask=valid[:, None, None, :], scale=1.0
    ).transpose(1, 2)
    torch.testing.assert_close(out, dense[valid], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref[valid], rtol=1e-5, atol=1e-5)


def test_varlen_rows_without_keys_are_zero():
    q, k, v = _rand((4, 2, 8), 90), _rand((3, 1, 8), 91), _rand((3, 1, 8), 92)
    k_pos = torch.tensor([-1, 5, 6])  # one empty slot; query at position 2 sees no key
    out = attention_varlen(q, k, v, _cu([2, 2]), _cu([3, 0]), torch.tensor([2, 6, 0, 1]), k_pos)
    assert torch.equal(out[0], torch.zeros(2, 8)) and torch.equal(out[2:], torch.zeros(2, 2, 8))
    assert out[1].abs().sum() > 0


def test_varlen_shape_errors_name_the_argument():
    q, k, v = torch.zeros(5, 4, 8), torch.zeros(6, 2, 8), torch.zeros(6, 2, 8)
    cq, ck = _cu([2, 3]), _cu([3, 3])
    attention_varlen(q, k, v, cq, ck)
    cases = [
        ({"q": torch.zeros(5, 4)}, "q must be"),
        ({"k": torch.zeros(6, 2, 4)}, "k must be"),
        ({"v": torch.zeros(6, 2, 4)}, "v must be"),
        ({"q": torch.zeros(5, 3, 8)}, "not a multiple"),
        ({"cu_seqlens_q": _cu([2, 2])}, "cu_seqlens_q"),
        ({"cu_seqlens_k": torch.tensor([0.0, 3.0, 6.0])}, "cu_seqlens_k"),
        ({"cu_seqlens_k": _cu([6])}, "sequences"),
        ({"q_pos": torch.zeros(4, dtype=torch.long)}, "q_pos"),
        ({"k_pos": torch.zeros(6)}, "k_pos"),
        ({"q_block": torch.zeros(5, dtype=torch.long)}, "both q_block and k_block"),
        ({"q_block": torch.zeros(4, dtype=torch.long), "k_block": torch.zeros(6, dtype=torch.long)}, "q_block"),
    ]
    base = {"q": q, "k": k, "v": v, "cu_seqlens_q": cq, "cu_seqlens_k": ck}
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            attention_varlen(**{**base, **change})

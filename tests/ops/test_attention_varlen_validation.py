"""CPU tests of the varlen attention op: argument validation (each bad argument raises an error
naming it, with expected vs actual), the block-id tile summaries, the SDPA fallback against the
fp32 reference, and the text model's prefill routing (which must leave CPU tensors alone)."""

import pytest
import torch

from gemma4x import ops
from gemma4x.ops import attention as attn_ops
from gemma4x.reference.attention_varlen import attention_varlen as ref_varlen
from gemma4x.reference.attention_varlen import block_ids_from_ranges

Nq, Nk, nH, nKV, d = 10, 14, 4, 2, 256


def _args(dtype=torch.bfloat16):
    return dict(
        q=torch.randn(Nq, nH, d).to(dtype),
        k=torch.randn(Nk, nKV, d).to(dtype),
        v=torch.randn(Nk, nKV, d).to(dtype),
        cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 6, 14], dtype=torch.int32),
    )


def _call(**over):
    a = _args()
    kw = {}
    for key, value in over.items():
        (a if key in a else kw)[key] = value
    return ops.attention_varlen(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(q=torch.randn(Nq, nH, d)), TypeError, "attention_varlen: q has dtype float32, expected bfloat16 or float16"),
        (dict(q=torch.randn(Nq, nH * d).to(torch.bfloat16)), ValueError, r"attention_varlen: q must be 3-D"),
        (dict(q=torch.randn(Nq, nH, 128).to(torch.bfloat16)), ValueError,
         r"attention_varlen: head_dim must be one of \(64, 72, 256, 512\), got 128"),
        (dict(k=torch.randn(Nk, nKV, 512).to(torch.bfloat16)), ValueError,
         r"attention_varlen: k must have shape \[Nk, nKV, 256\], got \[14, 2, 512\]"),
        (dict(v=torch.randn(Nk, 1, d).to(torch.bfloat16)), ValueError,
         r"attention_varlen: v must have shape \[14, 2, 256\] like k, got \[14, 1, 256\]"),
        (dict(k=torch.randn(Nk, 3, d).to(torch.bfloat16), v=torch.randn(Nk, 3, d).to(torch.bfloat16)), ValueError,
         "attention_varlen: q has 4 heads, not a multiple of k's 3 KV heads"),
        (dict(v=torch.randn(Nk, nKV, d).to(torch.float16)), TypeError,
         "attention_varlen: v has dtype float16, expected bfloat16 \\(as q\\)"),
        (dict(q=torch.randn(Nq, d, nH).to(torch.bfloat16).transpose(1, 2)), ValueError,
         "attention_varlen: q must be contiguous in head_dim"),
        (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), ValueError, "cu_seqlens_q must be a 1-D"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.float32)), TypeError,
         "attention_varlen: cu_seqlens_q has dtype float32, expected int32 or int64"),
        (dict(cu_seqlens_k=torch.tensor([[0, 6, 14]])), ValueError, "attention_varlen: cu_seqlens_k must be a 1-D"),
        (dict(cu_seqlens_k=torch.tensor([0, 14])), ValueError,
         "attention_varlen: cu_seqlens_q has 2 sequences, cu_seqlens_k 1"),
        (dict(q_block=torch.zeros(Nq, dtype=torch.int32)), ValueError, "give both q_block and k_block, or neither"),
        (dict(q_block=torch.zeros(Nq + 1, dtype=torch.int32), k_block=torch.zeros(Nk, dtype=torch.int32)), ValueError,
         r"attention_varlen: q_block must have shape \[10\], got \[11\]"),
        (dict(q_block=torch.zeros(Nq), k_block=torch.zeros(Nk)), TypeError,
         "attention_varlen: q_block has dtype float32, expected int32 or int64"),
        (dict(window_left=-1), ValueError, "attention_varlen: window_left must be None or an int in"),
        (dict(window_right=1.5), ValueError, "attention_varlen: window_right must be None or an int in"),
        (dict(scale=0.0), ValueError, "attention_varlen: scale must be a finite float > 0, got 0.0"),
        (dict(scale=float("nan")), ValueError, "attention_varlen: scale must be a finite float > 0"),
        ({}, ValueError, "attention_varlen: q must be a CUDA tensor, got device cpu"),
    ],
)
def test_rejects(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_rejects_bad_offsets():
    with pytest.raises(ValueError, match=r"cu_seqlens_k \[0, 9, 6\] must start at 0, never decrease and end at 6"):
        attn_ops._check_cu_values(torch.tensor([0, 2, 4]), torch.tensor([0, 9, 6]), 4, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_q \[1, 4\] must start at 0"):
        attn_ops._check_cu_values(torch.tensor([1, 4]), torch.tensor([0, 6]), 4, 6)
    attn_ops._check_cu_values(torch.tensor([0, 0, 4]), torch.tensor([0, 6, 6]), 4, 6)


def test_rejects_too_many_tiles():
    q = torch.empty(64 * 65535, 1, 512, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 1, 512, dtype=torch.bfloat16, device="meta")
    cu = torch.zeros(2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="over the limit 65535"):
        attn_ops._check_args(q, k, k, cu, cu, None, None, 1.0)


def test_kernel_not_supported_on_cpu():
    assert not attn_ops.kernel_supported(torch.randn(4, 2, 256).to(torch.bfloat16))


def test_block_summary():
    torch.manual_seed(0)
    kb = torch.full((300,), -1, dtype=torch.int32)
    kb[10:70] = 3
    kb[130:131] = 0
    kb[260:300] = 7
    kmin, kmax = attn_ops._kb_summary(kb, 300)
    big = torch.iinfo(torch.int32).max
    assert kmin.tolist() == [3, 3, 0, big, 7]
    assert kmax.tolist() == [3, 3, 0, -1, 7]


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("window_left,window_right", [(None, 0), (7, 0), (None, None), (3, 2)])
def test_sdpa_fallback_matches_reference(unified, window_left, window_right):
    torch.manual_seed(1)
    lens = [(20, 20), (0, 5), (6, 30), (3, 0)]
    q = torch.randn(sum(a for a, _ in lens), 4, 64)
    k = torch.randn(sum(b for _, b in lens), 2, 64)
    v = torch.randn_like(k)
    cq = torch.tensor([0] + [a for a, _ in lens]).cumsum(0)
    ck = torch.tensor([0] + [b for _, b in lens]).cumsum(0)
    kb = torch.cat([block_ids_from_ranges(20, [(2, 12)]), torch.full((5,), -1), block_ids_from_ranges(30, [(20, 28)])])
    qb = torch.cat([kb[:20], kb[49:55], torch.full((3,), -1)])
    kw = dict(window_left=window_left, window_right=window_right, q_block=qb, k_block=kb, unified=unified, scale=0.5)
    ref = ref_varlen(q, k, v, cq, ck, **kw)
    out = attn_ops._attention_varlen_sdpa(q, k, v, cq, ck, window_left, window_right, qb, kb, unified, 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_prefill_routing_leaves_cpu_alone():
    from gemma4x.layers.attention_prefill import prefill_self_attention, with_prefill_kernel
    from gemma4x.layers.dispatch import REFERENCE

    seen = []
    fn = prefill_self_attention(lambda *a, **kw: seen.append(kw) or "fallback")
    q = torch.randn(1, 5, 4, 256).to(torch.bfloat16)
    pos = torch.arange(5)[None]
    assert fn(q, q[:, :, :2], q[:, :, :2], pos, window_left=3, window_right=0, scale=1.0) == "fallback"
    assert seen == [dict(window_left=3, window_right=0, scale=1.0)]
    ns = with_prefill_kernel(REFERENCE)
    assert ns.self_attention.__wrapped__ is REFERENCE.self_attention
    assert ns.attention is REFERENCE.attention and ns.rms_norm is REFERENCE.rms_norm


def test_self_keys_route_to_self_attention(monkeypatch):
    """The prompt's own keys (NoCache, the cache's prefill view) come back as SelfKV and go to
    ``self_attention``; keys with an older prefix are a plain tuple and go to ``attention``."""
    from types import SimpleNamespace

    from gemma4x.layers import attention as attn_layer
    from gemma4x.layers.attention import NoCache, SelfKV
    from gemma4x.layers.dispatch import REFERENCE
    from gemma4x.reference.attention import attention_sdpa

    k = torch.randn(1, 4, 2, 8)
    pos = torch.arange(4)[None]
    keys = NoCache().update(0, k, k, pos)
    assert isinstance(keys, SelfKV) and keys.k is k and keys.positions is pos
    calls = []
    ns = SimpleNamespace(**{
        **vars(REFERENCE),
        "self_attention": lambda *a, **kw: calls.append("self") or REFERENCE.self_attention(*a, **kw),
        "attention": lambda *a, **kw: calls.append("cross") or attention_sdpa(*a, **kw),
    })  # fmt: skip
    monkeypatch.setattr(attn_layer, "ops_for", lambda x, native=False: ns)
    import gemma4_tiny as gt
    from gemma4x.config import parse_text_config

    cfg = parse_text_config(gt.DENSE)
    layer = attn_layer.Attention(cfg, 0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 4, cfg.hidden_size)
    cos, sin = torch.ones(1, 4, layer.head_dim), torch.zeros(1, 4, layer.head_dim)
    out_self, kv = layer.forward_native(x, cos, sin, pos, NoCache(), None)
    assert calls == ["self"] and isinstance(kv, SelfKV)

    class PrefixStore:  # older keys in front of the prompt: a plain (K, V, k_pos)
        def update(self, layer_id, k, v, positions):
            return (torch.cat([k, k], 1), torch.cat([v, v], 1), torch.cat([positions - 4, positions], 1))

    layer.forward_native(x, cos, sin, pos + 4, PrefixStore(), None)
    assert calls == ["self", "cross"]

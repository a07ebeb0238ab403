"""The pure-PyTorch reference ops against transformers' own functions and each other."""

from __future__ import annotations

import pytest
import torch

from gemma4x.reference.activation import geglu, gelu_tanh
from gemma4x.reference.attention import attention, attention_mask, attention_sdpa, attention_sdpa_single_query
from gemma4x.reference.moe import moe_experts, moe_router
from gemma4x.reference.rope import apply_rope, rope_cos_sin, rope_inv_freq

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "rope, head_dim",
    [
        ({"rope_type": "default", "rope_theta": 10000.0}, 256),
        ({"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}, 512),
        ({"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e6, "factor": 16.0}, 64),
        ({"rope_type": "proportional", "partial_rotary_factor": 1.0, "rope_theta": 1e4}, 32),
    ],
)
def test_inv_freq_matches_hf(rope, head_dim):
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    t = "full_attention"
    cfg = Gemma4TextConfig(
        num_hidden_layers=1, head_dim=head_dim, global_head_dim=head_dim,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, t: rope},
    )  # fmt: skip
    hf = Gemma4TextRotaryEmbedding(cfg)
    ours = rope_inv_freq(
        head_dim, rope["rope_theta"], rope_type=rope["rope_type"],
        partial_rotary_factor=rope.get("partial_rotary_factor", 1.0), factor=rope.get("factor", 1.0),
    )  # fmt: skip
    assert torch.equal(ours, getattr(hf, f"{t}_inv_freq"))
    x = torch.randn(2, 9, 3, head_dim, dtype=torch.bfloat16)
    pos = torch.arange(100, 109)[None].expand(2, -1)
    cos, sin = rope_cos_sin(pos, ours, torch.bfloat16)
    hcos, hsin = hf(x, pos, t)
    assert torch.equal(cos, hcos) and torch.equal(sin, hsin)
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    assert torch.equal(apply_rope(x, cos, sin), apply_rotary_pos_emb(x, hcos, hsin, unsqueeze_dim=2))


def test_proportional_rotates_pairs_i_and_i_plus_half():
    inv = rope_inv_freq(512, 1e6, rope_type="proportional", partial_rotary_factor=0.25)
    assert (inv[:64] > 0).all() and (inv[64:] == 0).all()
    cos, sin = rope_cos_sin(torch.tensor([[5]]), inv, torch.float32)
    x = torch.randn(1, 1, 1, 512)
    y = apply_rope(x, cos, sin)
    untouched = torch.cat([torch.arange(64, 256), torch.arange(320, 512)])
    assert torch.equal(y[..., untouched], x[..., untouched])
    assert not torch.allclose(y[..., :64], x[..., :64])


def test_gelu_tanh_formula():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    ref = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(gelu_tanh(x), ref)
    assert torch.equal(geglu(x, 2 * x), gelu_tanh(x) * (2 * x))


def _ring_case(B=3, nH=4, nKV=2, d=16, W=5, steps=(9, 3, 14), dtype=torch.float32, seed=0):
    """Keys of a ring buffer (scrambled rows, empty slots) plus an equivalent dense layout."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, nH, d, generator=g, dtype=dtype)
    k = torch.randn(B, W, nKV, d, generator=g, dtype=dtype)
    v = torch.randn(B, W, nKV, d, generator=g, dtype=dtype)
    q_pos = torch.tensor(steps)[:, None]
    k_pos = torch.full((B, W), -1)
    for b, p in enumerate(steps):
        for j in range(max(0, p - W + 1), p + 1):
            k_pos[b, j % W] = j
    return q, k, v, q_pos, k_pos


def test_attention_ring_equals_dense_softmax():
    q, k, v, q_pos, k_pos = _ring_case()
    out = attention(q, k, v, q_pos, k_pos, window_left=4, window_right=0)
    for b in range(q.shape[0]):
        valid = k_pos[b] >= 0
        kk, vv = k[b, valid].repeat_interleave(2, dim=1), v[b, valid].repeat_interleave(2, dim=1)
        s = torch.einsum("hd,khd->hk", q[b, 0], kk).softmax(-1)
        torch.testing.assert_close(out[b, 0], torch.einsum("hk,khd->hd", s, vv))


@pytest.mark.parametrize("window", [(None, 0), (3, 0), (4, 4), (None, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_oracle_vs_sdpa(window, dtype):
    g = torch.Generator().manual_seed(1)
    B, T, nH, nKV, d = 2, 11, 8, 2, 32
    q = torch.randn(B, T, nH, d, generator=g).to(dtype)
    k = torch.randn(B, T, nKV, d, generator=g).to(dtype)
    v = torch.randn(B, T, nKV, d, generator=g).to(dtype)
    pos = torch.arange(T)[None].expand(B, -1).clone()
    pos[1, :3] = -1  # row 1: three empty key slots (and padding queries)
    a = attention(q, k, v, pos, pos, window_left=window[0], window_right=window[1])
    b = attention_sdpa(q, k, v, pos, pos, window_left=window[0], window_right=window[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    if window == (None, 0):  # padding queries whose keys are all empty come out zero
        assert (a[1, :3] == 0).all() and (b[1, :3] == 0).all()


@pytest.mark.parametrize("heads", [(8, 1, 64), (16, 2, 128), (8, 8, 32), (32, 16, 64)])
@pytest.mark.parametrize("window", [(None, 0), (5, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_sdpa_matches_oracle(heads, window, dtype):
    """Decode path: GQA heads folded into queries of their KV head; same contract as the oracle."""
    nH, nKV, d = heads
    g = torch.Generator().manual_seed(nH * d)
    B, Tk = 3, 23
    q = torch.randn(B, 1, nH, d, generator=g).to(dtype)
    k = torch.randn(B, Tk, nKV, d, generator=g).to(dtype)
    v = torch.randn(B, Tk, nKV, d, generator=g).to(dtype)
    q_pos = torch.tensor([[22], [9], [0]])
    k_pos = torch.arange(Tk)[None].repeat(B, 1)
    k_pos[1, 12:] = -1  # empty slots
    k_pos[2] = -1  # a padding row: no visible key -> zeros
    a = attention(q, k, v, q_pos, k_pos, window_left=window[0], window_right=window[1])
    b = attention_sdpa_single_query(q, k, v, q_pos, k_pos, window_left=window[0], window_right=window[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)
    assert (b[2] == 0).all()
    one = attention_sdpa_single_query(q[:1], k[:1], v[:1], q_pos[:1], k_pos[:1], window_left=window[0])
    torch.testing.assert_close(one.float(), a[:1].float(), rtol=tol, atol=tol)  # batch 1 path


def test_attention_mask_semantics():
    p = torch.arange(6)[None]
    m = attention_mask(p, p, 2, 0)[0]  # sliding W=3: q-3 < k <= q
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert attention_mask(p, p, None, None)[0].all()
    with pytest.raises(ValueError, match="query heads"):
        attention(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), p[:, :2], p[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_matches_hf_grouped_mm(dtype):
    """Router and experts against HF's Gemma4TextRouter + grouped_mm experts, bitwise."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts, Gemma4TextRouter

    H, E, K, I, T = 64, 8, 2, 32, 19
    cfg = Gemma4TextConfig(
        hidden_size=H, num_experts=E, top_k_experts=K, moe_intermediate_size=I, enable_moe_block=True,
        num_hidden_layers=1,
    )  # fmt: skip
    cfg._experts_implementation = "grouped_mm"
    g = torch.Generator().manual_seed(0)
    router, experts = Gemma4TextRouter(cfg), Gemma4TextExperts(cfg)
    with torch.no_grad():
        for p in list(router.parameters()) + list(experts.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0))
    router, experts = router.to(dtype), experts.to(dtype)
    h = torch.randn(T, H, generator=g).to(dtype)
    with torch.no_grad():
        _, hw, hidx = router(h)
        w, idx = moe_router(h, router.proj.weight, router.scale, router.per_expert_scale, K, cfg.rms_norm_eps)
        assert torch.equal(idx, hidx) and torch.equal(w, hw) and w.dtype == torch.float32
        ref = experts(h, hidx, hw)
        out = moe_experts(h, idx, w, experts.gate_up_proj, experts.down_proj)
    assert out.dtype == dtype
    assert torch.equal(out, ref)

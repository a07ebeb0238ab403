"""GPU tests of ops.qkv_norm_rope against the op chain it replaces (gemma4x.reference.rope).

The kernel rounds at the chain's rounding points, so on the same inputs 16-bit outputs agree
bit for bit except where the fp32 sum of squares, summed in another order, flips the norm's
rounding (rare, one ulp of the norm, carried through RoPE). Against an fp64 evaluation of the
same formula, its error must stay within 2x the error of the PyTorch bf16/fp16 chain.
"""

import pytest
import torch
from gemma4x import ops
from gemma4x.reference import rope as ref
from gemma4x.reference.rope import rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (q heads, kv heads): Gemma 4 sliding and full layers, and the small ones of tiny models.
HEADS = [(16, 8), (32, 4), (8, 1), (16, 2)]


def _inputs(B, T, hq, hkv, d, dtype, gen, *, proportional=False, fused=False):
    rnd = lambda *s: torch.randn(*s, generator=gen, device="cuda")
    if fused:  # q, k, v as column slices of one projection output, as a fused qkv GEMM gives them
        qkv = (rnd(B, T, (hq + 2 * hkv) * d) * 3).to(dtype)
        q = qkv[..., : hq * d].view(B, T, hq, d)
        k = qkv[..., hq * d : (hq + hkv) * d].view(B, T, hkv, d)
        v = qkv[..., (hq + hkv) * d :].view(B, T, hkv, d)
    else:
        q, k, v = ((rnd(B, T, h, d) * 3).to(dtype) for h in (hq, hkv, hkv))
    qw = (1 + 0.5 * rnd(d)).to(dtype)
    kw = (1 + 0.5 * rnd(d)).to(dtype)
    pos = torch.randint(0, 100_000, (B, T), generator=gen, device="cuda")
    inv = (
        rope_inv_freq(d, 1e6, rope_type="proportional", partial_rotary_factor=0.25)
        if proportional
        else (rope_inv_freq(d, 1e4))
    )
    cos, sin = rope_cos_sin(pos, inv.cuda(), dtype)
    return q, k, v, qw, kw, cos, sin


def _fp64_chain(q, k, v, qw, kw, cos, sin, eps):
    d = lambda t: None if t is None else t.double()
    return ref.qkv_norm_rope(d(q), d(k), d(v), d(qw), d(kw), d(cos), d(sin), eps)


def _check(out, chain, exact, eps=1e-6):
    """``out`` vs the same-dtype chain (``chain``) and vs fp64 (``exact``)."""
    for o, c, e in zip(out, chain, exact):
        if c is None:
            assert o is None
            continue
        assert o.shape == c.shape and o.dtype == c.dtype and o.is_contiguous()
        assert torch.isfinite(o).all(), "unwritten (NaN) or non-finite outputs"
        err_kernel = (o.double() - e).abs().max().item()
        err_torch = (c.double() - e).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-6, (err_kernel, err_torch)
        if o.dtype != torch.float32:
            assert (o != c).double().mean().item() <= 2e-3


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256, 512])
@pytest.mark.parametrize("B,T", [(1, 1), (8, 1), (2, 37), (1, 1000)])
def test_matches_chain(gen, dtype, d, B, T):
    for hq, hkv in HEADS[:2] if d >= 256 else HEADS[2:]:
        q, k, v, qw, kw, cos, sin = _inputs(B, T, hq, hkv, d, dtype, gen)
        out = ops.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6)
        _check(out, ref.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6), _fp64_chain(q, k, v, qw, kw, cos, sin, 1e-6))


@pytest.mark.parametrize("d", [256, 512])
def test_fused_projection_slices_and_proportional_rope(gen, d):
    q, k, v, qw, kw, cos, sin = _inputs(3, 5, 16, 2, d, torch.bfloat16, gen, proportional=True, fused=True)
    assert not q.is_contiguous()
    out = ops.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6)
    _check(out, ref.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6), _fp64_chain(q, k, v, qw, kw, cos, sin, 1e-6))
    # Proportional RoPE leaves the last 3/4 of each half unrotated: there the output is the norm.
    n = ref.rms_norm(q, qw, 1e-6)
    quarter = d // 8
    assert torch.equal(out[0][..., quarter : d // 2], n[..., quarter : d // 2])


def test_kv_shared_and_k_eq_v(gen):
    q, k, _, qw, kw, cos, sin = _inputs(2, 3, 16, 2, 512, torch.bfloat16, gen)
    qo, ko, vo = ops.qkv_norm_rope(q, None, None, qw, None, cos, sin, 1e-6)  # KV-shared layer: q only
    assert ko is None and vo is None
    assert torch.equal(qo, ref.qkv_norm_rope(q, None, None, qw, None, cos, sin, 1e-6)[0])
    out = ops.qkv_norm_rope(q, k, k, qw, kw, cos, sin, 1e-6)  # attention_k_eq_v: v is the raw k
    _check(out, ref.qkv_norm_rope(q, k, k, qw, kw, cos, sin, 1e-6), _fp64_chain(q, k, k, qw, kw, cos, sin, 1e-6))


def test_uncollapsible_batch_layout_is_copied(gen):
    q, k, v, qw, kw, cos, sin = _inputs(2, 9, 16, 8, 256, torch.bfloat16, gen)
    qs, ks, vs = q[:, :4], k[:, :4], v[:, :4]  # batch stride 9 tokens, token stride 1 token
    cs, ss = cos[:, :4], sin[:, :4]
    out = ops.qkv_norm_rope(qs, ks, vs, qw, kw, cs, ss, 1e-6)
    _check(out, ref.qkv_norm_rope(qs, ks, vs, qw, kw, cs, ss, 1e-6), _fp64_chain(qs, ks, vs, qw, kw, cs, ss, 1e-6))


def test_empty_batch(gen):
    q, k, v, qw, kw, cos, sin = _inputs(2, 0, 16, 8, 256, torch.bfloat16, gen)
    qo, ko, vo = ops.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6)
    assert qo.shape == q.shape and ko.shape == k.shape and vo.shape == v.shape


def test_cuda_graph_replay(gen):
    q, k, v, qw, kw, cos, sin = _inputs(4, 1, 16, 8, 256, torch.bfloat16, gen)
    ops.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6)
    for _ in range(2):
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda").to(q.dtype))
        graph.replay()
        torch.cuda.synchronize()
        want = ref.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6)
        _check(out, want, _fp64_chain(q, k, v, qw, kw, cos, sin, 1e-6))


def test_opcheck(gen):
    q, k, v, qw, kw, cos, sin = _inputs(2, 3, 8, 1, 256, torch.bfloat16, gen)
    torch.library.opcheck(torch.ops.gemma4x.qkv_norm_rope.default, (q, k, v, qw, kw, cos, sin, 1e-6))
    torch.library.opcheck(torch.ops.gemma4x.qkv_norm_rope.default, (q, None, None, qw, None, cos, sin, 1e-6))


def test_fallback_for_other_head_dims(gen):
    q, k, v, qw, kw, cos, sin = _inputs(1, 2, 4, 2, 32, torch.bfloat16, gen)
    out = ops.qkv_norm_rope_or_reference(q, k, v, qw, kw, cos, sin, 1e-6)
    for o, c in zip(out, ref.qkv_norm_rope(q, k, v, qw, kw, cos, sin, 1e-6)):
        assert torch.equal(o, c)

"""KV-cache write: the reference against a per-sequence loop (CPU), validation, and the CUDA op
against the reference (GPU), including CUDA-graph replay with changing positions."""

from __future__ import annotations

import pytest
import torch
from gemma4x.reference.kv_cache import kv_cache_write as ref_write


def _case(S=4, R=16, nkv=2, d=64, B=3, ring=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(S, R, nkv, d, generator=g).to(dtype).to(device)
    vc = torch.randn(S, R, nkv, d, generator=g).to(dtype).to(device)
    rp = torch.full((S, R), -1, dtype=torch.int64, device=device) if ring else None
    k = torch.randn(B, 1, nkv, d, generator=g).to(dtype).to(device)  # the layer hands k[:, 0]
    v = torch.randn(B, 1, nkv, d, generator=g).to(dtype).to(device)
    slots = torch.randperm(S, generator=g)[:B].to(device)
    pos = torch.randint(0, 3 * R if ring else R, (B, 1), generator=g).to(device)
    return kc, vc, rp, k, v, slots, pos


def _loop(kc, vc, rp, k, v, slots, pos):
    R = kc.shape[1]
    for b in range(k.shape[0]):
        s, p = int(slots[b]), int(pos[b])
        r = p % R if rp is not None else p
        if 0 <= s < kc.shape[0] and p >= 0 and r < R:
            kc[s, r], vc[s, r] = k[b], v[b]
            if rp is not None:
                rp[s, r] = p


@pytest.mark.parametrize("ring", [True, False])
def test_reference_equals_loop(ring):
    kc, vc, rp, k, v, slots, pos = _case(ring=ring)
    want = [t.clone() if t is not None else None for t in (kc, vc, rp)]
    _loop(*want, k[:, 0], v[:, 0], slots, pos[:, 0])
    ref_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0])
    for got, exp in zip((kc, vc, rp), want):
        if got is not None:
            assert torch.equal(got, exp)


def test_reference_skips_out_of_range_entries():
    kc, vc, rp, k, v, _, _ = _case(S=2, R=8, B=3, ring=False)
    before = kc.clone()
    ref_write(kc, vc, rp, k[:, 0], v[:, 0], torch.tensor([0, 5, 1]), torch.tensor([8, 0, -1]))
    assert torch.equal(kc, before)  # row 8 >= R, slot 5 >= S, position -1: nothing written


def test_op_validates_before_touching_a_gpu():
    from gemma4x import ops

    kc, vc, rp, k, v, slots, pos = _case()
    with pytest.raises(ValueError, match=r"kv_cache_write: k has shape \[3, 1, 2, 64\], expected \[3, 2, 64\]"):
        ops.kv_cache_write(kc, vc, rp, k, v[:, 0], slots, pos[:, 0])
    with pytest.raises(TypeError, match="kv_cache_write: slots has dtype int32, expected int64"):
        ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], slots.int(), pos[:, 0])
    with pytest.raises(TypeError, match="kv_cache_write: v has dtype float16, expected float32"):
        ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0].half(), slots, pos[:, 0])
    with pytest.raises(ValueError, match=r"ring_pos must be a contiguous int64 \[4, 16\]"):
        ops.kv_cache_write(kc, vc, rp[:, :8], k[:, 0], v[:, 0], slots, pos[:, 0])
    with pytest.raises(ValueError, match="kv_cache_write: k_cache must be a CUDA tensor"):
        ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ring", [True, False])
@pytest.mark.parametrize("nkv,d,B", [(2, 512, 1), (8, 256, 8), (1, 64, 5), (16, 256, 32)])
def test_cuda_equals_reference(dtype, ring, nkv, d, B):
    from gemma4x import ops

    kc, vc, rp, k, v, slots, pos = _case(
        S=max(B, 4) + 2, R=64, nkv=nkv, d=d, B=B, ring=ring, dtype=dtype, device="cuda"
    )
    want = [t.clone() if t is not None else None for t in (kc, vc, rp)]
    ref_write(*want, k[:, 0], v[:, 0], slots, pos[:, 0])
    ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0])
    for got, exp in zip((kc, vc, rp), want):
        if got is not None:
            assert torch.equal(got, exp)


@pytest.mark.cuda
def test_cuda_skips_out_of_range_entries():
    from gemma4x import ops

    kc, vc, rp, k, v, _, _ = _case(S=2, R=8, B=3, ring=False, dtype=torch.bfloat16, device="cuda")
    before = kc.clone()
    slots = torch.tensor([0, 5, 1], device="cuda")
    pos = torch.tensor([8, 0, -1], device="cuda")
    ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos)
    torch.cuda.synchronize()
    assert torch.equal(kc, before)


@pytest.mark.cuda
def test_cuda_graph_replay_follows_positions():
    from gemma4x import ops

    kc, vc, rp, k, v, slots, pos = _case(S=4, R=16, nkv=2, d=256, B=4, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(4, device="cuda")
    ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0])  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0])
    for step in range(20, 40):  # wraps the 16-row ring
        pos.fill_(step)
        k.normal_()
        v.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc[:, step % 16], k[:, 0])
        assert torch.equal(vc[:, step % 16], v[:, 0])
        assert torch.all(rp[:, step % 16] == step)


@pytest.mark.cuda
def test_opcheck():
    kc, vc, rp, k, v, slots, pos = _case(dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.gemma4x.kv_cache_write, (kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0]))

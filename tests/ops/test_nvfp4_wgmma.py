"""NVFP4 W4A16 prefill kernels on SM90 (TMA + RS WGMMA): ``gemma4x.ops.nvfp4_prefill``.

CPU: how a consumer thread reads its natural-K-order wgmma A fragment out of the packed unit
(the decode kernels' layout, no second copy), the 64-byte TMA swizzle's bank spread, the exact
bf16 scale, argument validation through the fake implementations.
GPU (``-m cuda``): dense and grouped GEMMs against fp64 references (error within 2x of PyTorch's
bf16 path on the dequantised weights), the exact decode of every code and scale, real expert
shapes at 65..8192 tokens with random / skewed / single-expert routing, empty experts, invalid
ids, both tile sizes, CUDA-graph capture, opcheck, and the dispatch of ``ops.nvfp4``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gemma4x.reference.nvfp4_w4a16 import w4a16_dequantize, w4a16_moe_experts, w4a16_pack
from gemma4x.reference.quant import nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize


def rand_nvfp4(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    *lead, N, K = shape
    codes = torch.randint(0, 256, (*lead, N, K // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(*lead, N, K // 16, generator=g) * 2 + 0.01).to(torch.float8_e4m3fn)
    return codes, scales


# --- CPU: fragment addressing ----------------------------------------------------------------------


def swz64(o: int) -> int:
    return o ^ ((o >> 3) & 0x30)


def test_wgmma_fragment_from_packed_unit():
    """Thread (g, t), k16 step j: chunk of lane 4g + j, nibble pair t of words x, z, y, w = the natural
    A fragment {row g, g+8} x {16j + 2t + {0,1}, 16j + 8 + 2t + {0,1}}; scales at 512 + 8g + 2j."""
    w, s = rand_nvfp4(16, 64, seed=11)
    unit = w4a16_pack(w, s)[0, 0].numpy()
    codes = torch.stack((w & 15, w >> 4), dim=-1).reshape(16, 64).numpy()
    sb = s.view(torch.uint8).numpy()
    for g in range(8):
        for t in range(4):
            for j in range(4):
                words = np.frombuffer(unit[16 * (4 * g + j) : 16 * (4 * g + j) + 16].tobytes(), dtype="<u4")
                frag = {0: (words[0], g, 0), 1: (words[2], g + 8, 0), 2: (words[1], g, 8), 3: (words[3], g + 8, 8)}
                for _, (word, row, koff) in frag.items():
                    shifted = (int(word) << (4 * t)) & 0xFFFFFFFF
                    lo, hi = (shifted >> 12) & 15, (shifted >> 28) & 15
                    assert lo == codes[row, 16 * j + koff + 2 * t]
                    assert hi == codes[row, 16 * j + koff + 2 * t + 1]
                assert unit[512 + 8 * g + 2 * j] == sb[g, j]
                assert unit[512 + 8 * g + 2 * j + 1] == sb[g + 8, j]


def test_swizzle64_reads_are_conflict_free():
    """For each unit of a stage and each step j, the 8 quads of a warp hit 8 distinct 16-byte bank groups."""
    for unit in range(8):
        for j in range(4):
            groups = {(swz64(576 * unit + 64 * g + 16 * j) % 128) // 16 for g in range(8)}
            assert len(groups) == 8
        scale_groups = {swz64(576 * unit + 512 + 8 * g) // 16 for g in range(8)}
        assert len(scale_groups) == 4  # 8 bytes per quad: 64 bytes, one wavefront


def test_swizzle64_is_a_permutation_of_chunks():
    offs = sorted(swz64(16 * c) for c in range(8 * 576 // 16))
    assert offs == [16 * c for c in range(8 * 576 // 16)]


# --- CPU: validation -------------------------------------------------------------------------------


def test_gemm_validation():
    from gemma4x.ops import nvfp4_prefill as ops

    w, s = rand_nvfp4(32, 128)
    p = w4a16_pack(w, s)
    g = torch.tensor([1.0])
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.w4a16_gemm_sm90(torch.randn(80, 128).bfloat16(), p, g)
    fake = torch.ops.gemma4x.nvfp4_w4a16_gemm_sm90
    x = torch.empty(80, 128, dtype=torch.bfloat16, device="meta")
    pm, gm = p.to("meta"), g.to("meta")
    assert fake(x, pm, gm, 0).shape == (80, 32)
    with pytest.raises(TypeError, match="expected bfloat16"):
        fake(x.half(), pm, gm, 0)
    with pytest.raises(ValueError, match="tile must be 0"):
        fake(x, pm, gm, 4)
    with pytest.raises(ValueError, match=r"x must be \[..., K=128\]"):
        fake(x[:, :64], pm, gm, 0)
    with pytest.raises(ValueError, match="one-element float32"):
        fake(x, pm, torch.ones(2, device="meta"), 0)


def test_moe_validation():
    from gemma4x.ops import nvfp4_prefill as ops

    E, H, I, T, k = 4, 128, 64, 70, 8
    gu = w4a16_pack(*rand_nvfp4(E, 2 * I, H), interleave_gate_up=True).to("meta")
    dn = w4a16_pack(*rand_nvfp4(E, H, I)).to("meta")
    x = torch.empty(T, H, dtype=torch.bfloat16, device="meta")
    idx = torch.empty(T, k, dtype=torch.int64, device="meta")
    wts = torch.empty(T, k, device="meta")
    g2, g1 = torch.ones(E, 2, device="meta"), torch.ones(E, device="meta")
    op = torch.ops.gemma4x.nvfp4_moe_experts_prefill
    assert op(x, idx, wts, gu, g2, dn, g1, 0).shape == (T, H)
    with pytest.raises(TypeError, match="expected bfloat16"):
        op(x.float(), idx, wts, gu, g2, dn, g1, 0)
    with pytest.raises(ValueError, match="tile must be 0"):
        op(x, idx, wts, gu, g2, dn, g1, -1)
    with pytest.raises(ValueError, match="top_k must be <= 32"):
        big = torch.empty(T, 33, dtype=torch.int64, device="meta")
        op(x, big, torch.empty(T, 33, device="meta"), gu, g2, dn, g1, 0)
    with pytest.raises(ValueError, match="down must pack"):
        op(x, idx, wts, gu, g2, dn[:2], g1, 0)
    cpu = dict(gate_up=w4a16_pack(*rand_nvfp4(E, 2 * I, H), interleave_gate_up=True), gate_up_scale_2=torch.ones(E, 2),
               down=w4a16_pack(*rand_nvfp4(E, H, I)), down_scale_2=torch.ones(E))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.w4a16_moe_experts_prefill(torch.randn(T, H).bfloat16(), torch.zeros(T, k, dtype=torch.int64),
                                      torch.ones(T, k), **cpu)


# --- GPU -------------------------------------------------------------------------------------------

cuda = pytest.mark.cuda


def _sm90():
    from gemma4x.ops.nvfp4 import sm90_available

    return torch.cuda.is_available() and sm90_available(torch.device("cuda"))


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs a compute capability 9.0 GPU and an sm_90a build")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _dense(N, K, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, s, gs = nvfp4_quantize(torch.randn(N, K, generator=g, device="cuda"))
    return q, s, gs


@cuda
@needs_sm90
@pytest.mark.parametrize("M", [65, 128, 200, 512, 777, 4096])
@pytest.mark.parametrize("NK", [(2112, 2816), (2816, 2112), (48, 704), (400, 1024), (32, 64), (272, 192)])
@pytest.mark.parametrize("tile", [0, 1, 2, 3])
def test_gemm_dense(M, NK, tile):
    from gemma4x.ops import nvfp4_prefill as ops

    if tile and M not in (200, 777):
        pytest.skip("explicit tiles at two sizes")
    N, K = NK
    q, s, gs = _dense(N, K, M + N)
    p = w4a16_pack(q, s)
    x = torch.randn(M, K, device="cuda").bfloat16()
    w64 = nvfp4_dequantize(q, s, gs, torch.float64)
    ref = x.double() @ w64.T
    torch_err = rel_err(x @ w64.bfloat16().T, ref)
    out = ops.w4a16_gemm_sm90(x, p, gs.reshape(1), tile)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 2 * torch_err + 1e-6, (rel_err(out, ref), torch_err)


@cuda
@needs_sm90
def test_gemm_every_code_and_scale_exact():
    """One-hot activations read single weights: out = bf16(fp32(e2m1 * s) * g) for every code and scale."""
    from gemma4x.ops import nvfp4_prefill as ops

    N, K = 256, 256
    codes = torch.arange(N * K, dtype=torch.int64).remainder(16).reshape(N, K)
    codes = codes[:, torch.randperm(K, generator=torch.Generator().manual_seed(0))]
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    sbits = torch.arange(N * K // 16).remainder(127).to(torch.uint8).reshape(N, K // 16)  # zero and subnormals too
    s = sbits.view(torch.float8_e4m3fn)
    gs = torch.tensor([0.37])
    p = w4a16_pack(q, s).cuda()
    w32 = nvfp4_dequantize(q, s, torch.tensor(1.0), torch.float32)  # e2m1 * s, exact in fp32
    want = (w32 * gs).bfloat16().cuda()
    for tile in (1, 2, 3):
        out = ops.w4a16_gemm_sm90(torch.eye(K, dtype=torch.bfloat16, device="cuda"), p, gs.cuda(), tile)
        assert torch.equal(out, want.T.contiguous())


@cuda
@needs_sm90
def test_gemm_strided_x_graph_and_opcheck():
    from gemma4x.ops import nvfp4_prefill as ops

    N, K = 256, 512
    q, s, gs = _dense(N, K, 5)
    p = w4a16_pack(q, s)
    big = torch.randn(300, 2 * K, device="cuda").bfloat16()
    x = big[:, 64 : 64 + K]  # row stride 2K, 128-byte offset
    ref = ops.w4a16_gemm_sm90(x.contiguous(), p, gs)
    assert torch.equal(ops.w4a16_gemm_sm90(x, p, gs), ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = ops.w4a16_gemm_sm90(x, p, gs)
    x.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, ops.w4a16_gemm_sm90(x, p, gs))
    torch.library.opcheck(torch.ops.gemma4x.nvfp4_w4a16_gemm_sm90, (x.contiguous()[:70], p, gs.reshape(1), 0))


@cuda
@needs_sm90
def test_gemm_dispatch():
    from gemma4x.ops import nvfp4 as ops
    from gemma4x.ops import nvfp4_prefill

    for N, K, M in ((2112, 2816, 100), (16384, 128, 100), (16384, 128, 1500)):
        q, s, gs = _dense(N, K, 9)
        p = w4a16_pack(q, s)
        x = torch.randn(2, M // 2, K, device="cuda").bfloat16()
        out = ops.w4a16_gemm(x, p, gs)
        if ops.dense_prefill_wgmma(M, N, K):
            want = nvfp4_prefill.w4a16_gemm_sm90(x.reshape(M, K), p, gs)
        else:
            want = torch.nn.functional.linear(x.reshape(M, K), nvfp4_dequantize(q, s, gs, torch.bfloat16))
        assert torch.equal(out, want.reshape(2, M // 2, N))


def _experts(E, H, I, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gu_src = torch.randn(E, 2 * I, H, generator=g, device="cuda") * 2 * H**-0.5
    dn_src = torch.randn(E, H, I, generator=g, device="cuda") * I**-0.5
    g_gu = nvfp4_global_scale(gu_src.abs().amax(dim=(1, 2)))
    g_dn = nvfp4_global_scale(dn_src.abs().amax(dim=(1, 2)))
    qg, sg, _ = nvfp4_quantize(gu_src, g_gu)
    qd, sd, _ = nvfp4_quantize(dn_src, g_dn)
    g2 = g_gu[:, None].expand(E, 2).contiguous()
    g2[:, 1] *= 1.5  # distinct gate/up scales
    return dict(
        gate_up=w4a16_pack(qg, sg, interleave_gate_up=True), gate_up_scale_2=g2,
        down=w4a16_pack(qd, sd), down_scale_2=g_dn,
    )


def _route(T, k, E, seed=0, mode="random"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if mode == "random":
        idx = torch.rand(T, E, generator=g, device="cuda").topk(k, dim=-1).indices
    elif mode == "skewed":  # Zipf-like: a few experts take most pairs, many stay empty
        logits = -2.0 * torch.log1p(torch.arange(E, device="cuda").float())
        idx = (logits + torch.rand(T, E, generator=g, device="cuda") * 3).topk(k, dim=-1).indices
    else:  # every pair on one expert
        idx = torch.full((T, k), 5, device="cuda")
    w = torch.rand(T, k, generator=g, device="cuda") + 0.1
    return w, idx


def _moe_refs(x, w, idx, W):
    from gemma4x.reference.moe import moe_experts

    gu = w4a16_dequantize(W["gate_up"], W["gate_up_scale_2"], torch.float64, interleave_gate_up=True)
    dn = w4a16_dequantize(W["down"], W["down_scale_2"], torch.float64)
    ref64 = moe_experts(x.double(), idx, w.double(), gu, dn)
    bf16 = w4a16_moe_experts(x, idx, w, **W)
    return ref64, bf16


@cuda
@needs_sm90
@pytest.mark.parametrize(
    "T,k,mode,tile",
    [(65, 8, "random", 0), (300, 8, "skewed", 0), (1000, 8, "random", 1), (1000, 8, "random", 2),
     (1000, 8, "skewed", 3), (4096, 8, "random", 0), (4096, 8, "skewed", 2), (4096, 8, "random", 1),
     (8192, 8, "random", 0), (600, 1, "one", 0), (700, 8, "one", 1), (700, 8, "one", 2)],
)
def test_moe_prefill_real_shape(T, k, mode, tile):
    from gemma4x.ops import nvfp4_prefill as ops

    E, H, I = 128, 2816, 704
    W = _experts(E, H, I, seed=T + k)
    w, idx = _route(T, k, E, seed=T, mode=mode)
    x = (torch.randn(T, H, device="cuda") * 2).bfloat16()
    out = ops.w4a16_moe_experts_prefill(x, idx, w, **W, tile=tile)
    ref64, bf16 = _moe_refs(x, w, idx, W)
    torch_err = rel_err(bf16, ref64)
    assert out.shape == (T, H) and torch.isfinite(out).all()
    assert rel_err(out, ref64) <= 2 * torch_err + 1e-6, (rel_err(out, ref64), torch_err)


@cuda
@needs_sm90
def test_moe_prefill_invalid_ids_small_shape_graph_opcheck():
    from gemma4x.ops import nvfp4 as nv
    from gemma4x.ops import nvfp4_prefill as ops

    E, H, I, T, k = 16, 256, 128, 150, 4
    W = _experts(E, H, I, seed=1)
    w, idx = _route(T, k, E, seed=2)
    x = torch.randn(T, H, device="cuda").bfloat16()
    bad = idx.clone()
    bad[1, 2] = E + 3
    bad[2, 0] = -1
    out = ops.w4a16_moe_experts_prefill(x, bad, w, **W)
    keep = (bad >= 0) & (bad < E)
    ref64, bf16 = _moe_refs(x, w * keep, bad.clamp(0, E - 1), W)
    assert rel_err(out, ref64) <= 2 * rel_err(bf16, ref64) + 1e-6
    # the dispatcher takes this path beyond the decode sizes
    assert T * k > nv.MOE_CHUNKED_MAX_PAIRS
    assert torch.equal(nv.w4a16_moe_experts(x, idx, w, **W), ops.w4a16_moe_experts_prefill(x, idx, w, **W))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = ops.w4a16_moe_experts_prefill(x, idx, w, **W)
    x.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, ops.w4a16_moe_experts_prefill(x, idx, w, **W))
    args = (x, idx, w, W["gate_up"], W["gate_up_scale_2"], W["down"], W["down_scale_2"], 0)
    torch.library.opcheck(torch.ops.gemma4x.nvfp4_moe_experts_prefill, args)


@cuda
@needs_sm90
def test_layers_use_prefill_kernels():
    """NVFP4Linear and NVFP4Experts at prefill sizes against their native forward."""
    from gemma4x.layers.linear import Linear, NVFP4Linear
    from gemma4x.layers.moe import Experts, NVFP4Experts

    lin = Linear(704, 16384).cuda()
    torch.nn.init.normal_(lin.weight, std=0.03)
    q = NVFP4Linear.from_linear(lin)
    xb = torch.randn(300, 704, device="cuda").bfloat16()
    assert rel_err(q(xb), q.forward_native(xb)) < 1e-2
    ex = Experts(8, 256, 128).cuda()
    torch.nn.init.normal_(ex.gate_up_proj, std=0.06)
    torch.nn.init.normal_(ex.down_proj, std=0.09)
    qx = NVFP4Experts.from_experts(ex)
    w, idx = _route(300, 2, 8, seed=4)
    xe = torch.randn(300, 256, device="cuda").bfloat16()
    assert rel_err(qx(xe, w, idx), qx.forward_native(xe, w, idx)) < 1e-2


def test_dense_dispatch_rule():
    from gemma4x.ops import nvfp4 as ops

    assert not ops.dense_prefill_wgmma(64, 21504, 5376)  # decode kernel
    assert ops.dense_prefill_wgmma(512, 21504, 5376)  # measured 1.26x over dequantise + cuBLAS
    assert not ops.dense_prefill_wgmma(4096, 21504, 5376)
    assert not ops.dense_prefill_wgmma(512, 2112, 2816)

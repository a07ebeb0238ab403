"""NVFP4 W4A16 (SM90) and the CUDA quantizer/dequantizer.

CPU: the packed layout (round trip, the bit positions the kernel decodes), argument validation.
GPU (``-m cuda``): the quantizer bit for bit against the CPU reference, the dequantizer bit for
bit, the decode GEMM and the routed experts against fp64 references (bf16 error within 2x of
PyTorch's own bf16 path on the dequantised weights), the exact decode of every e2m1 code and
e4m3 scale (one-hot activations), skewed routing, CUDA-graph capture, the layers' dispatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gemma4x.reference.nvfp4_w4a16 import (
    gate_up_row_order,
    w4a16_dequantize,
    w4a16_moe_experts,
    w4a16_pack,
    w4a16_unpack,
)
from gemma4x.reference.quant import nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def rand_nvfp4(*shape, seed=0, device="cpu"):
    """Random codes and valid e4m3 scales of a [..., N, K] weight."""
    g = torch.Generator().manual_seed(seed)
    *lead, N, K = shape
    codes = torch.randint(0, 256, (*lead, N, K // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(*lead, N, K // 16, generator=g) * 2 + 0.01).to(torch.float8_e4m3fn)
    return codes.to(device), scales.to(device)


# --- CPU: layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 64), (48, 192), (2, 32, 128), (3, 16, 704)])
@pytest.mark.parametrize("interleave", [False, True])
def test_pack_round_trip(shape, interleave):
    w, s = rand_nvfp4(*shape, seed=len(shape))
    p = w4a16_pack(w, s, interleave_gate_up=interleave)
    assert p.shape == (*shape[:-2], shape[-2] // 16, shape[-1] // 64, 576) and p.dtype == torch.uint8
    w2, s2 = w4a16_unpack(p, interleave_gate_up=interleave)
    assert torch.equal(w, w2) and same_bits(s, s2)


def test_pack_bit_positions():
    """Decode the packed bytes exactly as the kernel does (lane, word, shift) and find the checkpoint codes."""
    w, s = rand_nvfp4(32, 128, seed=3)
    p = w4a16_pack(w, s)
    codes = torch.stack((w & 15, w >> 4), dim=-1).reshape(32, 128)
    for rb in range(2):
        for u in range(2):
            unit = p[rb, u].numpy()
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                words = np.frombuffer(unit[16 * lane : 16 * lane + 16].tobytes(), dtype="<u4")
                for h in range(2):
                    row = 16 * rb + 8 * h + g
                    for k in range(16):
                        wi, pr, lohi = k >> 3, (k & 7) >> 1, k & 1
                        code = (int(words[2 * h + wi]) >> (12 - 4 * pr + 16 * lohi)) & 15
                        assert code == codes[row, 64 * u + 16 * t + k]
                    assert unit[512 + 2 * lane + h] == s.view(torch.uint8)[row, 4 * u + t]


def test_bf16_bit_trick_decodes_every_code():
    """(t & 0x80008000) | ((t & 0x70007000) >> 6) is e2m1 * 2^-126 as a bf16, subnormal 0.5 included."""
    from gemma4x.reference.quant import e2m1_decode

    c = torch.arange(16)
    t = c << 12
    bits = ((t & 0x8000) | ((t & 0x7000) >> 6)).to(torch.int16)
    assert torch.equal(bits.view(torch.bfloat16).double() * 2.0**126, e2m1_decode(c.to(torch.uint8)).double())


def test_gate_up_interleave_order():
    assert gate_up_row_order(32).tolist() == list(range(8)) + list(range(16, 24)) + list(range(8, 16)) + list(range(24, 32))


def test_reference_dequantize_matches_checkpoint_layout():
    w, s = rand_nvfp4(2, 32, 128, seed=5)
    g = torch.tensor([0.5, 3.0])
    p = w4a16_pack(w, s)
    assert torch.equal(w4a16_dequantize(p, g), nvfp4_dequantize(w, s, g))
    gg = torch.tensor([[0.5, 2.0], [1.5, 0.25]])
    p = w4a16_pack(w, s, interleave_gate_up=True)
    assert torch.equal(w4a16_dequantize(p, gg, interleave_gate_up=True), nvfp4_dequantize(w, s, gg.repeat_interleave(16, dim=1)))


def test_token_chunks_equal_one_call():
    """Chunking over tokens (slices of x, idx, weights; results concatenated) is the identity on a per-token op."""
    from gemma4x.ops.nvfp4 import token_chunks

    T, H, k = 21, 32, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g)
    idx = torch.randint(0, 6, (T, k), generator=g)
    w = torch.rand(T, k, generator=g)

    def fn(xc, ic, wc):  # any per-token function
        return xc * wc.sum(-1, keepdim=True) + ic.sum(-1, keepdim=True)

    whole = fn(x, idx, w)
    for max_pairs in (1, 4, 8, 64, 84, 1000):
        assert torch.equal(token_chunks(fn, x, idx, w, max_pairs), whole)


# --- CPU: validation -----------------------------------------------------------------------------


def test_pack_validation():
    w, s = rand_nvfp4(32, 128)
    with pytest.raises(TypeError, match="weight must be uint8"):
        w4a16_pack(w.float(), s)
    with pytest.raises(TypeError, match="weight_scale must be float8_e4m3fn"):
        w4a16_pack(w, s.float())
    with pytest.raises(ValueError, match="N = 24 must be a positive multiple of 16"):
        w4a16_pack(*rand_nvfp4(24, 128))
    with pytest.raises(ValueError, match="K = 96 must be a positive multiple of 64"):
        w4a16_pack(*rand_nvfp4(32, 96))
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        w4a16_pack(w, s[:, :4])


def test_ops_validation_messages():
    from gemma4x.ops import nvfp4 as ops

    w, s = rand_nvfp4(32, 128)
    p = w4a16_pack(w, s)
    g = torch.tensor([1.0])
    with pytest.raises(ValueError, match=r"x must be \[..., K=128\]"):
        ops.w4a16_gemm(torch.randn(2, 64), p, g)
    with pytest.raises(TypeError, match="expected uint8"):
        ops.w4a16_gemm(torch.randn(2, 128), p.float(), g)
    with pytest.raises(ValueError, match="packed .*576"):
        ops.w4a16_gemm(torch.randn(2, 128), p[..., :500], g)
    with pytest.raises(ValueError, match="one-element float32"):
        ops.w4a16_gemm(torch.randn(2, 128), p, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.w4a16_gemm(torch.randn(2, 128), p, g)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.nvfp4_quantize(torch.randn(4, 32))
    with pytest.raises(ValueError, match="K = 24 must be a positive multiple of 16"):
        ops._check_quantize(torch.randn(4, 24), torch.tensor(1.0))
    with pytest.raises(ValueError, match="global_scale must be a scalar or one per leading index"):
        ops._check_quantize(torch.randn(2, 4, 32), torch.ones(3))
    assert ops._check_quantize(torch.randn(2, 4, 32), torch.ones(2)) == 4


def test_moe_validation_messages():
    from gemma4x.ops import nvfp4 as ops

    E, H, I, T, k = 4, 128, 64, 3, 2
    gu = w4a16_pack(*rand_nvfp4(E, 2 * I, H), interleave_gate_up=True)
    dn = w4a16_pack(*rand_nvfp4(E, H, I))
    x = torch.randn(T, H).bfloat16()
    idx = torch.zeros(T, k, dtype=torch.int64)
    wts = torch.ones(T, k)
    g2, g1 = torch.ones(E, 2), torch.ones(E)
    with pytest.raises(ValueError, match=r"gate_up packs K = 128 columns, expected H = 64"):
        ops.w4a16_moe_experts(x[:, :64], idx, wts, gu, g2, dn, g1)
    with pytest.raises(TypeError, match="idx has dtype int32"):
        ops.w4a16_moe_experts(x, idx.int(), wts, gu, g2, dn, g1)
    with pytest.raises(ValueError, match="gate_up_scale_2 must have shape"):
        ops.w4a16_moe_experts(x, idx, wts, gu, g1, dn, g1)
    with pytest.raises(ValueError, match="down must pack"):
        ops.w4a16_moe_experts(x, idx, wts, gu, g2, dn[:2], g1)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ops.w4a16_moe_experts(x, idx, wts, gu, g2, dn, g1)


# --- GPU -----------------------------------------------------------------------------------------

cuda = pytest.mark.cuda


def _sm90():
    from gemma4x.ops.nvfp4 import sm90_available

    return torch.cuda.is_available() and sm90_available(torch.device("cuda"))


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs a compute capability 9.0 GPU and an sm_90a build")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@cuda
def test_limits_match_extension():
    from gemma4x.ops import nvfp4 as ops
    from gemma4x.ops._load import extension

    if not getattr(extension().nvfp4, "has_sm90", False):
        pytest.skip("no sm_90a in this build")
    assert extension().nvfp4.w4a16_limits() == (ops.GEMV_MAX_TOKENS, ops.MOE_MAX_PAIRS, ops.MOE_MAX_EXPERTS)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 64, 256), (7, 16), (2112, 2816)])
def test_cuda_quantizer_bit_identical(dtype, shape):
    from gemma4x.ops.nvfp4 import nvfp4_quantize as cuda_quantize

    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(*shape, generator=g) * torch.logspace(-6, 2, shape[-1])).to(dtype)
    w[..., :16] = 0  # an all-zero block
    w.view(-1)[16:32] = 1e-30  # a block far below the global scale: the 2^-9 clamp
    gs = nvfp4_global_scale(w.float().abs().amax(dim=tuple(range(1, w.dim()))) if w.dim() == 3 else w.float().abs().amax())
    cpu = nvfp4_quantize(w, gs)
    gpu = cuda_quantize(w.cuda(), gs.cuda())
    for a, b in zip(cpu, gpu):
        assert same_bits(a, b.cpu())


@cuda
def test_cuda_quantizer_ties_and_signs():
    """Values landing exactly on the rounding bounds (ties to the even code) and negative zeros."""
    from gemma4x.ops.nvfp4 import nvfp4_quantize as cuda_quantize

    bounds = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -3.5, -5.0, -0.1, 0.1, 6.0])
    w = torch.stack([bounds * 2.0**e for e in range(-4, 4)]).float()  # block amax 6 -> s = 1 under g = 1/6 ...
    gs = torch.tensor(1.0 / 6.0)
    cpu = nvfp4_quantize(w, gs)
    gpu = cuda_quantize(w.cuda(), gs.cuda())
    for a, b in zip(cpu, gpu):
        assert same_bits(a, b.cpu())


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleave", [False, True])
def test_cuda_dequantize_bit_identical(dtype, interleave):
    from gemma4x.ops.nvfp4 import w4a16_dequantize as cuda_dequantize

    w, s = rand_nvfp4(3, 64, 192, seed=9)
    g = torch.rand(3, 2) + 0.1 if interleave else torch.rand(3) + 0.1
    p = w4a16_pack(w, s, interleave_gate_up=interleave)
    ref = w4a16_dequantize(p, g, dtype, interleave_gate_up=interleave)
    out = cuda_dequantize(p.cuda(), g.cuda(), dtype, interleave_gate_up=interleave)
    assert same_bits(out.cpu(), ref)


def _bf16_torch_error(x, w_exact_f64, w_bf16):
    ref = x.double() @ w_exact_f64.T
    return ref, rel_err((x @ w_bf16.T).double(), ref)


@cuda
@needs_sm90
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16, 33, 64])
@pytest.mark.parametrize("NK", [(2112, 2816), (2816, 2112), (16, 64), (48, 704)])
def test_w4a16_gemm_decode(M, NK):
    from gemma4x.ops import nvfp4 as ops

    N, K = NK
    g = torch.Generator(device="cuda").manual_seed(M * 7 + N)
    w_src = torch.randn(N, K, generator=g, device="cuda")
    q, s, gs = nvfp4_quantize(w_src)
    p = w4a16_pack(q, s)
    x = torch.randn(M, K, generator=g, device="cuda").bfloat16()
    w64 = nvfp4_dequantize(q, s, gs, torch.float64)
    ref, torch_err = _bf16_torch_error(x, w64, w64.bfloat16())
    out = ops.w4a16_gemm(x, p, gs.reshape(1))
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 2 * torch_err + 1e-6, (rel_err(out, ref), torch_err)


@cuda
@needs_sm90
def test_w4a16_gemm_every_code_and_scale_exact():
    """One-hot activations read single weights: every e2m1 code (the subnormal 0.5 included) and
    every e4m3 scale magnitude (subnormal scales included) come back as e2m1 * s * g."""
    from gemma4x.ops._load import extension

    N, K = 256, 256
    codes = torch.arange(N * K, dtype=torch.int64).remainder(16).reshape(N, K)
    codes = codes[:, torch.randperm(K)]
    q = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    sbits = torch.arange(N * K // 16).remainder(127).to(torch.uint8).reshape(N, K // 16)  # every positive e4m3 but NaN
    s = sbits.view(torch.float8_e4m3fn)
    gs = torch.tensor([0.37])
    p = w4a16_pack(q, s).cuda()
    wexact = nvfp4_dequantize(q, s, gs, torch.float64).cuda()
    for k0 in range(0, K, 64):
        x = torch.zeros(64, K, dtype=torch.bfloat16, device="cuda")
        x[torch.arange(64), k0 + torch.arange(64)] = 1
        out = torch.full((64, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        extension().nvfp4.w4a16_gemv(out.data_ptr(), N, x.data_ptr(), K, p.data_ptr(), gs.cuda().data_ptr(), 64, N, K,
                                     torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        want = wexact[:, k0 : k0 + 64].T
        assert torch.isfinite(out).all()
        assert torch.equal(out.double(), want.float().bfloat16().double()) or (
            (out.double() - want).abs() <= want.abs() * 2.0**-7
        ).all()


@cuda
@needs_sm90
def test_w4a16_gemm_strided_x_and_graph():
    from gemma4x.ops import nvfp4 as ops

    N, K = 2816, 2112
    q, s, gs = nvfp4_quantize(torch.randn(N, K, device="cuda"))
    p = w4a16_pack(q, s)
    big = torch.randn(4, 2 * K, device="cuda").bfloat16()
    x = big[:, :K]  # row stride 2K
    eager = ops.w4a16_gemm(x, p, gs.reshape(1))
    assert torch.equal(eager, ops.w4a16_gemm(x.contiguous(), p, gs.reshape(1)))
    static_x = x.contiguous()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.w4a16_gemm(static_x, p, gs.reshape(1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@cuda
@needs_sm90
def test_w4a16_gemm_opcheck():
    from gemma4x.ops import nvfp4  # noqa: F401  (registers the op)

    q, s, gs = nvfp4_quantize(torch.randn(64, 128, device="cuda"))
    p = w4a16_pack(q, s)
    torch.library.opcheck(torch.ops.gemma4x.nvfp4_w4a16_gemv, (torch.randn(3, 128, device="cuda").bfloat16(), p, gs.reshape(1)))


@cuda
@pytest.mark.parametrize("M", [65, 512])
def test_w4a16_gemm_prefill_path_equals_dequantised(M, monkeypatch):
    """The dequantise fallback (the WGMMA path is tests/ops/test_nvfp4_wgmma.py)."""
    from gemma4x.ops import nvfp4 as ops

    monkeypatch.setattr(ops, "PREFILL_WGMMA", False)

    N, K = 2112, 2816
    q, s, gs = nvfp4_quantize(torch.randn(N, K, device="cuda"))
    p = w4a16_pack(q, s)
    x = torch.randn(M, K, device="cuda").bfloat16()
    out = ops.w4a16_gemm(x, p, gs.reshape(1))
    assert torch.equal(out, torch.nn.functional.linear(x, nvfp4_dequantize(q, s, gs, torch.bfloat16)))


def _experts(E, H, I, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    gu_src = torch.randn(E, 2 * I, H, generator=g, device=device) * 2 * H**-0.5
    dn_src = torch.randn(E, H, I, generator=g, device=device) * I**-0.5
    g_gu = nvfp4_global_scale(gu_src.abs().amax(dim=(1, 2)))
    g_dn = nvfp4_global_scale(dn_src.abs().amax(dim=(1, 2)))
    qg, sg, _ = nvfp4_quantize(gu_src, g_gu)
    qd, sd, _ = nvfp4_quantize(dn_src, g_dn)
    g2 = g_gu[:, None].expand(E, 2).contiguous()
    g2[:, 1] *= 1.5  # distinct gate/up scales must work too
    return dict(
        gate_up=w4a16_pack(qg, sg, interleave_gate_up=True), gate_up_scale_2=g2,
        down=w4a16_pack(qd, sd), down_scale_2=g_dn,
    )


def _route(T, k, E, device="cuda", seed=0, mode="random"):
    g = torch.Generator(device=device).manual_seed(seed)
    if mode == "random":
        idx = torch.rand(T, E, generator=g, device=device).topk(k, dim=-1).indices
    elif mode == "same":  # every token picks the same k experts
        idx = torch.arange(k, device=device).expand(T, k).contiguous() * 3
    else:  # one expert takes everything (k = 1)
        idx = torch.full((T, k), 5, device=device)
    w = torch.rand(T, k, generator=g, device=device) + 0.1
    return w, idx


def _moe_refs(x, w, idx, W):
    """(fp64 reference, bf16 reference on dequantised weights)."""
    gu = w4a16_dequantize(W["gate_up"], W["gate_up_scale_2"], torch.float64, interleave_gate_up=True)
    dn = w4a16_dequantize(W["down"], W["down_scale_2"], torch.float64)
    from gemma4x.reference.moe import moe_experts

    ref64 = moe_experts(x.double(), idx, w.double(), gu, dn)
    bf16 = w4a16_moe_experts(x, idx, w, **W)
    return ref64, bf16


@cuda
@needs_sm90
@pytest.mark.parametrize(
    "T,k,mode", [(1, 8, "random"), (2, 8, "random"), (8, 8, "random"), (8, 8, "same"), (64, 1, "one"), (3, 8, "random")]
)
def test_moe_decode_real_shape(T, k, mode):
    from gemma4x.ops import nvfp4 as ops

    E, H, I = 128, 2816, 704
    W = _experts(E, H, I, seed=T)
    w, idx = _route(T, k, E, seed=T, mode=mode)
    x = (torch.randn(T, H, device="cuda") * 2).bfloat16()
    out = ops.w4a16_moe_experts(x, idx, w, **W)
    ref64, bf16 = _moe_refs(x, w, idx, W)
    torch_err = rel_err(bf16, ref64)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64) <= 2 * torch_err + 1e-6, (rel_err(out, ref64), torch_err)


@cuda
@needs_sm90
def test_moe_decode_invalid_ids_and_graph():
    from gemma4x.ops import nvfp4 as ops

    E, H, I, T, k = 16, 256, 128, 4, 4
    W = _experts(E, H, I, seed=1)
    w, idx = _route(T, k, E, seed=2)
    x = torch.randn(T, H, device="cuda").bfloat16()
    bad = idx.clone()
    bad[1, 2] = E + 3
    bad[2, 0] = -1
    out = ops.w4a16_moe_experts(x, bad, w, **W)
    keep = (bad >= 0) & (bad < E)
    ref64, bf16 = _moe_refs(x, w * keep, bad.clamp(0, E - 1), W)
    assert rel_err(out, ref64) <= 2 * rel_err(bf16, ref64) + 1e-6
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = ops.w4a16_moe_experts(x, idx, w, **W)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_out, ops.w4a16_moe_experts(x, idx, w, **W))


@cuda
@needs_sm90
@pytest.mark.parametrize("T", [9, 64])
def test_moe_chunked_decode(T):
    """T*k in (64, MOE_CHUNKED_MAX_PAIRS]: the decode kernels over chunks of 8 tokens."""
    from gemma4x.ops import nvfp4 as ops

    E, H, I, k = 128, 2816, 704, 8
    W = _experts(E, H, I, seed=T)
    w, idx = _route(T, k, E, seed=T)
    x = torch.randn(T, H, device="cuda").bfloat16()
    out = ops.w4a16_moe_experts(x, idx, w, **W)
    ref64, bf16 = _moe_refs(x, w, idx, W)
    assert rel_err(out, ref64) <= 2 * rel_err(bf16, ref64) + 1e-6
    assert torch.equal(out[8:9], ops.w4a16_moe_experts(x[8:9], idx[8:9], w[8:9], **W))


@cuda
@pytest.mark.parametrize("T", [100])
def test_moe_prefill_path_equals_bf16_op(T, monkeypatch):
    """The dequantise fallback (the WGMMA path is tests/ops/test_nvfp4_wgmma.py)."""
    from gemma4x.ops import moe as moe_ops
    from gemma4x.ops import nvfp4 as ops

    monkeypatch.setattr(ops, "PREFILL_WGMMA", False)

    E, H, I, k = 128, 2816, 704, 8
    W = _experts(E, H, I, seed=T)
    w, idx = _route(T, k, E, seed=T)
    x = torch.randn(T, H, device="cuda").bfloat16()
    gu = w4a16_dequantize(W["gate_up"], W["gate_up_scale_2"], torch.bfloat16, interleave_gate_up=True)
    dn = w4a16_dequantize(W["down"], W["down_scale_2"], torch.bfloat16)
    assert torch.equal(ops.w4a16_moe_experts(x, idx, w, **W), moe_ops.moe_experts(x, idx, w, gu, dn))


@cuda
def test_layers_dispatch(monkeypatch):
    from gemma4x.layers.linear import Linear, NVFP4Linear
    from gemma4x.layers.moe import Experts, NVFP4Experts
    from gemma4x.ops import nvfp4 as ops

    monkeypatch.setattr(ops, "PREFILL_WGMMA", False)  # 300 rows: the dequantise fallback, bit-exact

    lin = Linear(704, 2112).cuda()
    torch.nn.init.normal_(lin.weight, std=0.03)
    q = NVFP4Linear.from_linear(lin)
    x = torch.randn(5, 704, device="cuda").bfloat16()
    ref = q.forward_native(x)
    assert rel_err(q(x), ref) < 1e-2
    xb = torch.randn(300, 704, device="cuda").bfloat16()
    assert torch.equal(q(xb), q.forward_native(xb))
    ex = Experts(8, 256, 128).cuda()
    torch.nn.init.normal_(ex.gate_up_proj, std=0.06)
    torch.nn.init.normal_(ex.down_proj, std=0.09)
    qx = NVFP4Experts.from_experts(ex)
    w, idx = _route(3, 2, 8, seed=4)
    xe = torch.randn(3, 256, device="cuda").bfloat16()
    assert rel_err(qx(xe, w, idx), qx.forward_native(xe, w, idx)) < 1e-2

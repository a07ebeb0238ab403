"""Benchmark of NVFP4 weights on Hopper (W4A16) beside the BF16 path, same run.

Dense: the 26B dense MLP (gate or up 2816 -> 2112, down 2112 -> 2816) and 31B (5376 -> 21504,
21504 -> 5376) linears; grouped: the 26B-A4B routed experts (E=128, k=8, H=2816, I=704), and the
whole MoE block (router + experts) at decode. Tokens 1, 8, 64, 512, 4096. For each: µs (CUDA-graph
replay over rotated weight/input sets, medians), TB/s of the bytes the op needs (weights once at
0.5625 B/param for NVFP4, 2 B for BF16, plus activations in and out), TFLOP/s, beside
``F.linear`` (cuBLAS) / ``ops.moe_experts`` on bf16 weights and the copy bandwidth and matmul
ceilings measured in the same process. NVFP4 takes the decode kernels at <= 64 tokens
(T*k <= 64 for experts) and dequantize-into-bf16 + the bf16 op beyond.

Prefill section: the W4A16 WGMMA kernels (ops.nvfp4_prefill, tiles auto / 128x128 / 128x256 / 256x128)
beside the dequantise path and the bf16 op (cuBLAS / ops.moe_experts on bf16 weights), TFLOP/s.

    python bench/ops/bench_nvfp4.py [--tokens 1 8 64 512 4096] [--skip-moe] [--prefill-only]
        [--prefill-tokens 512 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from gemma4x import ops
from gemma4x.ops import nvfp4
from gemma4x.reference import moe as ref_moe
from gemma4x.reference.nvfp4_w4a16 import w4a16_pack
from gemma4x.reference.quant import nvfp4_global_scale

from bench.harness import (
    Report,
    copy_bandwidth_gbs,
    matmul_tflops,
    sets_to_rotate,
    time_graph,
)

DENSE = {
    "26B mlp gate|up 2816->2112": (2112, 2816),
    "26B mlp down 2112->2816": (2816, 2112),
    "31B mlp gate|up 5376->21504": (21504, 5376),
    "31B mlp down 21504->5376": (5376, 21504),
}
E, TOPK, H, I = 128, 8, 2816, 704
EPS = 1e-6


def quantized(N, K, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, generator=g, device="cuda") * K**-0.5
    q, s, gs = nvfp4.nvfp4_quantize(w)
    return w4a16_pack(q, s), gs.reshape(1), w.bfloat16()


def bench_dense(report, tokens, copy_gbs):
    print(f"\n{'dense':<30} {'T':>5} | {'nvfp4 us':>9} {'TB/s':>6} {'%copy':>5} {'TFLOP/s':>7} | "
          f"{'bf16 us':>9} {'TB/s':>6} {'TFLOP/s':>7} | speedup")
    for name, (N, K) in DENSE.items():
        n_sets_q = sets_to_rotate(N * K * 9 // 16, max_sets=64)
        n_sets_b = sets_to_rotate(N * K * 2, max_sets=64)
        qsets = [quantized(N, K, seed) for seed in range(max(n_sets_q, n_sets_b))]
        bsets = [s[2] for s in qsets[:n_sets_b]]
        qsets = [(p, g) for p, g, _ in qsets[:n_sets_q]]
        torch.cuda.empty_cache()
        for T in tokens:
            xs = [torch.randn(T, K, device="cuda").bfloat16() for _ in range(max(n_sets_q, n_sets_b))]
            act_bytes = T * (K + N) * 2
            flops = 2 * T * N * K
            tq = time_graph([lambda p=p, g=g, x=x: nvfp4.w4a16_gemm(x, p, g) for (p, g), x in zip(qsets, xs)],
                            replays=20).median_us
            tb = time_graph([lambda w=w, x=x: F.linear(x, w) for w, x in zip(bsets, xs)], replays=20).median_us
            q_tbs = (N * K * 9 / 16 + act_bytes) / (tq * 1e-6) / 1e12
            b_tbs = (N * K * 2 + act_bytes) / (tb * 1e-6) / 1e12
            row = dict(kind="dense", shape=name, N=N, K=K, tokens=T, nvfp4_us=tq, nvfp4_TBps=q_tbs,
                       nvfp4_TFLOPs=flops / (tq * 1e-6) / 1e12, bf16_us=tb, bf16_TBps=b_tbs,
                       bf16_TFLOPs=flops / (tb * 1e-6) / 1e12, pct_copy=100 * q_tbs * 1e3 / copy_gbs)
            report.add(**row)
            print(f"{name:<30} {T:>5} | {tq:9.1f} {q_tbs:6.2f} {row['pct_copy']:5.0f} {row['nvfp4_TFLOPs']:7.1f} | "
                  f"{tb:9.1f} {b_tbs:6.2f} {row['bf16_TFLOPs']:7.1f} | {tb / tq:5.2f}x", flush=True)
        del qsets, bsets
        torch.cuda.empty_cache()


def expert_weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    gu = (torch.randn(E, 2 * I, H, generator=g, device="cuda") * 2 * H**-0.5).bfloat16()
    dn = (torch.randn(E, H, I, generator=g, device="cuda") * I**-0.5).bfloat16()
    g_gu = nvfp4_global_scale(gu.float().abs().amax(dim=(1, 2)))
    g_dn = nvfp4_global_scale(dn.float().abs().amax(dim=(1, 2)))
    qg, sg, _ = nvfp4.nvfp4_quantize(gu, g_gu)
    qd, sd, _ = nvfp4.nvfp4_quantize(dn, g_dn)
    W4 = dict(gate_up=torch.stack([w4a16_pack(qg[e], sg[e], interleave_gate_up=True) for e in range(E)]),
              gate_up_scale_2=g_gu[:, None].expand(E, 2).contiguous(),
              down=torch.stack([w4a16_pack(qd[e], sd[e]) for e in range(E)]), down_scale_2=g_dn)
    router = dict(proj=(torch.randn(E, H, generator=g, device="cuda")).bfloat16(),
                  scale=(torch.randn(H, generator=g, device="cuda") * 0.3 + 1).bfloat16(),
                  pes=(torch.rand(E, generator=g, device="cuda") + 0.5).bfloat16())
    return gu, dn, W4, router


def bench_moe(report, tokens, copy_gbs):
    gu, dn, W4, R = expert_weights()
    print(f"\n{'experts (26B-A4B)':<18} {'T':>5} {'used':>5} | {'nvfp4 us':>9} {'TB/s':>6} {'%copy':>5} "
          f"{'TFLOP/s':>7} | {'bf16 us':>9} {'TB/s':>6} {'TFLOP/s':>7} | speedup")
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        n_sets = 8 if T <= 64 else 2
        sets = []
        for _ in range(n_sets):
            h = (torch.randn(T, H, generator=g, device="cuda") * 2).bfloat16()
            x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
            w, idx = ref_moe.moe_router(h, R["proj"], R["scale"], R["pes"], TOPK, EPS)
            sets.append((h, x, w, idx))
        used = statistics.mean(s[3].unique().numel() for s in sets)
        flops = 2 * T * TOPK * 3 * I * H
        tq = time_graph([lambda s=s: nvfp4.w4a16_moe_experts(s[1], s[3], s[2], **W4) for s in sets],
                        inner=4 if T <= 64 else 1, replays=20).median_us
        tb = time_graph([lambda s=s: ops.moe_experts(s[1], s[3], s[2], gu, dn) for s in sets],
                        inner=4 if T <= 64 else 1, replays=20).median_us
        act_bytes = T * H * 4
        q_tbs = (used * 3 * I * H * 9 / 16 + act_bytes) / (tq * 1e-6) / 1e12
        b_tbs = (used * 3 * I * H * 2 + act_bytes) / (tb * 1e-6) / 1e12
        row = dict(kind="experts", tokens=T, experts_used=used, nvfp4_us=tq, nvfp4_TBps=q_tbs,
                   nvfp4_TFLOPs=flops / (tq * 1e-6) / 1e12, bf16_us=tb, bf16_TBps=b_tbs,
                   bf16_TFLOPs=flops / (tb * 1e-6) / 1e12, pct_copy=100 * q_tbs * 1e3 / copy_gbs)
        out_q = nvfp4.w4a16_moe_experts(sets[0][1], sets[0][3], sets[0][2], **W4).float()
        out_b = ops.moe_experts(sets[0][1], sets[0][3], sets[0][2], gu, dn).float()
        row["rel_diff_vs_bf16_weights"] = ((out_q - out_b).norm() / out_b.norm()).item()
        report.add(**row)
        print(f"{'':<18} {T:>5} {used:>5.1f} | {tq:9.1f} {q_tbs:6.2f} {row['pct_copy']:5.0f} {row['nvfp4_TFLOPs']:7.1f} | "
              f"{tb:9.1f} {b_tbs:6.2f} {row['bf16_TFLOPs']:7.1f} | {tb / tq:5.2f}x", flush=True)
        if T == 1:  # the whole MoE block at decode: router + experts
            def block(s, nv):
                w, idx = ops.moe_router(s[0], R["proj"], R["scale"], R["pes"], TOPK, EPS)
                if nv:
                    return nvfp4.w4a16_moe_experts(s[1], idx, w, **W4)
                return ops.moe_experts(s[1], idx, w, gu, dn)

            bq = time_graph([lambda s=s: block(s, True) for s in sets], inner=4, replays=20).median_us
            bb = time_graph([lambda s=s: block(s, False) for s in sets], inner=4, replays=20).median_us
            report.add(kind="moe_block", tokens=T, nvfp4_us=bq, bf16_us=bb, speedup=bb / bq)
            print(f"{'  MoE block':<18} {T:>5} {'':>5} | {bq:9.1f} {'':>6} {'':>5} {'':>7} | {bb:9.1f} {'':>6} "
                  f"{'':>7} | {bb / bq:5.2f}x  (router + experts)", flush=True)


def bench_prefill(report, tokens, tflops):
    """Prefill sizes: the W4A16 WGMMA kernels (tile auto / 128 / 256 tokens) beside the dequantise
    path and the bf16 op on bf16 weights, same run, TFLOP/s."""
    from gemma4x.ops import nvfp4_prefill

    def dequant_path(fn):
        def run():
            nvfp4.PREFILL_WGMMA = False
            try:
                return fn()
            finally:
                nvfp4.PREFILL_WGMMA = True
        return run

    print(f"\n{'prefill dense':<30} {'T':>5} | {'wgmma us':>9} {'TFLOP/s':>7} {'128x128':>7} {'128x256':>7} {'256x128':>7} | "
          f"{'dequant':>9} {'TFLOP/s':>7} | {'bf16 us':>9} {'TFLOP/s':>7} | vs bf16  vs dequant")
    for name, (N, K) in DENSE.items():
        n_sets = max(2, sets_to_rotate(N * K * 2, max_sets=8))
        qsets = [quantized(N, K, seed) for seed in range(n_sets)]
        for T in [t for t in tokens if t > nvfp4.GEMV_MAX_TOKENS]:
            xs = [torch.randn(T, K, device="cuda").bfloat16() for _ in range(n_sets)]
            flops = 2 * T * N * K
            t = {}
            for tile in (0, 1, 2, 3):
                t[tile] = time_graph([lambda p=p, g=g, x=x, tile=tile: nvfp4_prefill.w4a16_gemm_sm90(x, p, g, tile)
                                      for (p, g, _), x in zip(qsets, xs)], replays=20).median_us
            td = time_graph([dequant_path(lambda p=p, g=g, x=x: nvfp4.w4a16_gemm(x, p, g))
                             for (p, g, _), x in zip(qsets, xs)], replays=20).median_us
            tb = time_graph([lambda w=w, x=x: F.linear(x, w) for (_, _, w), x in zip(qsets, xs)], replays=20).median_us
            tf = lambda us: flops / (us * 1e-6) / 1e12  # noqa: E731
            report.add(kind="prefill_dense", shape=name, N=N, K=K, tokens=T, wgmma_us=t[0], wgmma_TFLOPs=tf(t[0]),
                       wgmma_128x128_us=t[1], wgmma_128x256_us=t[2], wgmma_256x128_us=t[3], dequant_us=td, dequant_TFLOPs=tf(td), bf16_us=tb,
                       bf16_TFLOPs=tf(tb), vs_bf16=tb / t[0], vs_dequant=td / t[0])
            print(f"{name:<30} {T:>5} | {t[0]:9.1f} {tf(t[0]):7.1f} {t[1]:7.1f} {t[2]:7.1f} {t[3]:7.1f} | {td:9.1f} {tf(td):7.1f} | "
                  f"{tb:9.1f} {tf(tb):7.1f} | {tb / t[0]:6.2f}x {td / t[0]:6.2f}x", flush=True)
        del qsets
        torch.cuda.empty_cache()

    gu, dn, W4, R = expert_weights()
    print(f"\n{'prefill experts (26B-A4B)':<26} {'T':>5} | {'wgmma us':>9} {'TFLOP/s':>7} {'128x128':>7} {'128x256':>7} {'256x128':>7} | "
          f"{'dequant':>9} {'TFLOP/s':>7} | {'bf16 us':>9} {'TFLOP/s':>7} | vs bf16  vs dequant  rel diff")
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        sets = []
        for _ in range(2):
            h = (torch.randn(T, H, generator=g, device="cuda") * 2).bfloat16()
            x = torch.randn(T, H, generator=g, device="cuda").bfloat16()
            w, idx = ref_moe.moe_router(h, R["proj"], R["scale"], R["pes"], TOPK, EPS)
            sets.append((x, w, idx))
        flops = 2 * T * TOPK * 3 * I * H
        t = {}
        for tile in (0, 1, 2, 3):
            t[tile] = time_graph([lambda s=s, tile=tile: nvfp4_prefill.w4a16_moe_experts_prefill(s[0], s[2], s[1], **W4, tile=tile)
                                  for s in sets], replays=10).median_us
        td = time_graph([dequant_path(lambda s=s: nvfp4.w4a16_moe_experts(s[0], s[2], s[1], **W4)) for s in sets],
                        replays=10).median_us
        tb = time_graph([lambda s=s: ops.moe_experts(s[0], s[2], s[1], gu, dn) for s in sets], replays=10).median_us
        tf = lambda us: flops / (us * 1e-6) / 1e12  # noqa: E731
        out_q = nvfp4_prefill.w4a16_moe_experts_prefill(sets[0][0], sets[0][2], sets[0][1], **W4).float()
        out_b = ops.moe_experts(sets[0][0], sets[0][2], sets[0][1], gu, dn).float()
        rel = ((out_q - out_b).norm() / out_b.norm()).item()
        row = dict(kind="prefill_experts", tokens=T, wgmma_us=t[0], wgmma_TFLOPs=tf(t[0]), wgmma_128x128_us=t[1],
                   wgmma_128x256_us=t[2], wgmma_256x128_us=t[3], dequant_us=td, dequant_TFLOPs=tf(td), bf16_us=tb, bf16_TFLOPs=tf(tb),
                   vs_bf16=tb / t[0], vs_dequant=td / t[0], rel_diff_vs_bf16_weights=rel)
        if T * TOPK <= nvfp4.MOE_CHUNKED_MAX_PAIRS:  # where the chunked decode kernels still run
            row["chunked_decode_us"] = time_graph(
                [lambda s=s: nvfp4.w4a16_moe_experts(s[0], s[2], s[1], **W4) for s in sets], replays=10).median_us
        report.add(**row)
        extra = f"  chunked decode {row['chunked_decode_us']:.1f} us" if "chunked_decode_us" in row else ""
        print(f"{'':<26} {T:>5} | {t[0]:9.1f} {tf(t[0]):7.1f} {t[1]:7.1f} {t[2]:7.1f} {t[3]:7.1f} | {td:9.1f} {tf(td):7.1f} | "
              f"{tb:9.1f} {tf(tb):7.1f} | {tb / t[0]:6.2f}x {td / t[0]:6.2f}x  {rel:.2e}{extra}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--skip-moe", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--prefill-only", action="store_true", help="only the prefill-size comparison")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[512, 4096])
    args = p.parse_args()
    report = Report("bench_nvfp4")
    copy_gbs = copy_bandwidth_gbs()
    tflops = matmul_tflops()
    report.ceilings.update(copy_GBps=copy_gbs, matmul_TFLOPs=tflops)
    print(f"device: {report.device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write); bf16 matmul {tflops:.0f} TFLOP/s")
    if not args.skip_dense and not args.prefill_only:
        bench_dense(report, args.tokens, copy_gbs)
    if not args.skip_moe and not args.prefill_only:
        bench_moe(report, args.tokens, copy_gbs)
    if not args.skip_prefill:
        bench_prefill(report, args.prefill_tokens, tflops)
    print("wrote", report.write())


if __name__ == "__main__":
    main()

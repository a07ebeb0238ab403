"""Benchmark of decode-size linear layers: ops.skinny_gemm against cuBLAS (F.linear).

For the Gemma 4 linears a decode step runs (fused q/k/v, o, fused gate/up, down; the LM head),
at 1-16 tokens: µs per call inside a CUDA graph (weights rotated through more than the L2), the
achieved weight bandwidth, and its share of the copy bandwidth measured in the same run. Also
``torch.compile`` of F.linear (max-autotune-no-cudagraphs) with ``--compile``.

    python bench/ops/bench_skinny_gemm.py [--tokens 1 2 4 8 16] [--compile]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs, sets_to_rotate, time_graph  # noqa: E402
from gemma4x import ops  # noqa: E402

# (label, N, K)
SHAPES = [
    ("26B qkv (fused)", 8192, 2816),
    ("26B o", 2816, 4096),
    ("26B gate/up (fused)", 4224, 2816),
    ("26B down", 2816, 2112),
    ("31B qkv (fused)", 16384, 5376),
    ("31B o", 5376, 8192),
    ("31B gate/up (fused)", 43008, 5376),
    ("31B down", 5376, 21504),
    ("E2B qkv (fused)", 2560, 1536),
    ("E2B gate/up (fused)", 12288, 1536),
    ("E2B down", 1536, 6144),
    ("LM head 26B", 262144, 2816),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    report = Report("bench_skinny_gemm")
    copy = copy_bandwidth_gbs()
    report.ceilings["copy_GBs"] = copy
    compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs") if args.compile else None
    print(f"device {torch.cuda.get_device_name(0)}; copy bandwidth {copy:.0f} GB/s")
    print(
        f"{'layer':>20} {'M':>3} {'MB':>7} | {'gemma4x µs':>10} {'TB/s':>5} {'%copy':>5} | {'cuBLAS µs':>9} "
        f"{'TB/s':>5} | {'compile µs':>10} | speed-up"
    )
    dt = torch.bfloat16
    for label, N, K in SHAPES:
        nbytes = N * K * 2
        ws = [torch.randn(N, K, device="cuda", dtype=dt) / K**0.5 for _ in range(sets_to_rotate(nbytes, 8))]
        for M in args.tokens:
            xs = [torch.randn(M, K, device="cuda", dtype=dt) for _ in ws]
            t_ours = time_graph([lambda x=x, w=w: ops.skinny_gemm(x, w) for x, w in zip(xs, ws)])
            t_cublas = time_graph([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)])
            t_comp = time_graph([lambda x=x, w=w: compiled(x, w) for x, w in zip(xs, ws)]) if compiled else None
            tb = nbytes / (t_ours.median_us * 1e-6) / 1e12
            tb_c = nbytes / (t_cublas.median_us * 1e-6) / 1e12
            comp = f"{t_comp.median_us:10.1f}" if t_comp else f"{'-':>10}"
            print(
                f"{label:>20} {M:3d} {nbytes / 1e6:7.1f} | {t_ours.median_us:10.1f} {tb:5.2f} {tb * 1e3 / copy:5.0%} | "
                f"{t_cublas.median_us:9.1f} {tb_c:5.2f} | {comp} | {t_cublas.median_us / t_ours.median_us:5.2f}x"
            )
            report.add(
                layer=label,
                N=N,
                K=K,
                tokens=M,
                gemma4x_us=t_ours.median_us,
                cublas_us=t_cublas.median_us,
                compile_us=t_comp.median_us if t_comp else None,
                gemma4x_TBs=tb,
                cublas_TBs=tb_c,
            )
        del ws
        torch.cuda.empty_cache()
    print("wrote", report.write())


if __name__ == "__main__":
    main()

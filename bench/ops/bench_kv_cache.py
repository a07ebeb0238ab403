"""Benchmark of the decode step's KV-cache write (one token per sequence, one layer).

Prints µs per call inside a CUDA graph, for each Gemma 4 layer kind and batch size:
  gemma4x   ops.kv_cache_write: K, V and the ring position in one launch
  index     what the runtime ran before: ``pos % R``, two index_puts and the ring positions
            (2-4 kernels)
The write moves only B * nKV * d * 2 tensors * 2 bytes, so both are launch-bound; the number that
matters is the time per layer and step (26B-A4B: 30 layers; 31B: 60), not bandwidth. The achieved
GB/s is printed beside the copy bandwidth measured in the same run for completeness.

    python bench/ops/bench_kv_cache.py [--batch 1 8 32]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs, time_graph  # noqa: E402
from gemma4x import ops  # noqa: E402

# (label, kv heads, head dim, rows per slot, ring)
LAYERS = [
    ("26B sliding (ring 1024)", 8, 256, 1024, True),
    ("26B full (4096 slab)", 2, 512, 4096, False),
    ("31B sliding (ring 1024)", 16, 256, 1024, True),
    ("31B full (4096 slab)", 4, 512, 4096, False),
]


def index_write(kc, vc, rp, k, v, slots, pos):
    rows = pos if rp is None else pos % kc.shape[1]
    kc[slots, rows] = k
    vc[slots, rows] = v
    if rp is not None:
        rp[slots, rows] = pos


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    args = p.parse_args()
    report = Report("bench_kv_cache")
    copy = copy_bandwidth_gbs()
    report.ceilings["copy_GBs"] = copy
    print(f"device {torch.cuda.get_device_name(0)}; copy bandwidth {copy:.0f} GB/s")
    print(f"{'layer':>26} {'B':>3} | {'gemma4x µs':>10} | {'index µs':>9} | speed-up | gemma4x GB/s")
    dt = torch.bfloat16
    for label, nkv, d, R, ring in LAYERS:
        for B in args.batch:
            S = max(B, 8)
            kc = torch.zeros(S, R, nkv, d, device="cuda", dtype=dt)
            vc = torch.zeros_like(kc)
            rp = torch.full((S, R), -1, device="cuda", dtype=torch.int64) if ring else None
            k = torch.randn(B, 1, nkv, d, device="cuda", dtype=dt)
            v = torch.randn_like(k)
            slots = torch.arange(B, device="cuda")
            pos = torch.randint(0, R, (B, 1), device="cuda")
            fused = time_graph([lambda: ops.kv_cache_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0])], inner=20)
            index = time_graph([lambda: index_write(kc, vc, rp, k[:, 0], v[:, 0], slots, pos[:, 0])], inner=20)
            nbytes = 2 * 2 * B * nkv * d * 2  # read + write, K and V
            gbs = nbytes / (fused.median_us * 1e-6) / 1e9
            print(f"{label:>26} {B:>3} | {fused.median_us:10.2f} | {index.median_us:9.2f} | "
                  f"{index.median_us / fused.median_us:7.2f}x | {gbs:8.0f}")
            report.add(layer=label, batch=B, gemma4x_us=fused.median_us, index_us=index.median_us, gemma4x_GBs=gbs)
    print("wrote", report.write())


if __name__ == "__main__":
    main()

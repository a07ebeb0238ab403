"""Benchmark of the Gemma 4 MoE-block tail (3 RMSNorms + residual + layer scalar).

Prints µs per call, achieved GB/s and % of the device copy bandwidth measured in the same run,
for gemma4x's kernel beside torch eager (the reference), torch.compile of the reference and a
Triton kernel of the peer's design. Every call runs inside a CUDA graph over rotated input sets.

    python bench/ops/bench_norm.py [--hidden 2816 5376] [--rows 1 16 256 4096 16384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs, sets_to_rotate, time_graph  # noqa: E402
from bench.ops.triton_moe_tail import moe_tail_norm_triton  # noqa: E402
from gemma4x import ops  # noqa: E402
from gemma4x.reference import norm as ref  # noqa: E402

EPS = (1e-6, 1e-6, 1e-6)


def make_sets(n_sets, rows, hidden, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = [torch.randn(hidden, device="cuda", generator=g).to(dtype) for _ in range(3)]
    s = torch.tensor([0.7], device="cuda", dtype=dtype)
    sets = []
    for _ in range(n_sets):
        x1, x2, r = (torch.randn(rows, hidden, device="cuda", generator=g).to(dtype) for _ in range(3))
        sets.append((x1, x2, r, *w, s))
    return sets


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, nargs="+", default=[2816, 5376])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256, 4096, 16384])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--impls", nargs="+", default=None, help="subset of gemma4x triton_peer torch_eager torch_compile")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = p.parse_args()

    dtype = torch.bfloat16
    report = Report("bench_norm")
    copy_gbs = copy_bandwidth_gbs()
    report.ceilings["copy_GBps"] = copy_gbs
    print(f"device: {report.device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")

    report.bench += args.tag
    compiled = None if args.no_compile or (args.impls and "torch_compile" not in args.impls) else torch.compile(ref.moe_tail_norm, dynamic=True)
    impls = {
        "gemma4x": ops.moe_tail_norm,
        "triton_peer": moe_tail_norm_triton,
        "torch_eager": ref.moe_tail_norm,
    }
    if compiled is not None:
        impls["torch_compile"] = compiled
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}

    header = f"{'hidden':>6} {'rows':>6} | " + " | ".join(f"{k:>24}" for k in impls)
    print(header + "\n" + "-" * len(header))
    for hidden in args.hidden:
        for rows in args.rows:
            nbytes = 4 * rows * hidden * 2 + 3 * hidden * 2  # x1, x2, residual read; out written; weights
            n_sets = sets_to_rotate(nbytes)
            sets = make_sets(n_sets, rows, hidden, dtype)
            expected = ref.moe_tail_norm(*sets[0], *EPS)
            cells = []
            for name, fn in impls.items():
                out = fn(*sets[0], *EPS)
                err = (out.float() - expected.float()).abs().max().item()
                # Small calls are repeated inside the graph so launch gaps, not graph setup, dominate.
                inner = max(1, 64 // n_sets) if rows <= 256 else 1
                t = time_graph([lambda s=s, fn=fn: fn(*s, *EPS) for s in sets], inner=inner)
                gbs = nbytes / (t.median_us * 1e-6) / 1e9
                report.add(impl=name, hidden=hidden, rows=rows, us=t.median_us, p10_us=t.p10_us, p90_us=t.p90_us,
                           GBps=gbs, pct_copy=100 * gbs / copy_gbs, max_abs_err_vs_ref=err)
                cells.append(f"{t.median_us:7.2f}us {gbs:6.0f}GB/s {100 * gbs / copy_gbs:3.0f}%")
            print(f"{hidden:>6} {rows:>6} | " + " | ".join(f"{c:>24}" for c in cells), flush=True)
    print("wrote", report.write())


if __name__ == "__main__":
    main()

"""Where the batch-1 decode-attention time goes (GPU only).

    python bench/ops/profile_attention_decode.py timings     # ceilings, launch variants, split counts, timeline
    python bench/ops/profile_attention_decode.py ncu-driver --shapes "26B full" --ctx 8192 --variants 0
    python bench/ops/profile_attention_decode.py ncu-read --mb 33.6

`timings` measures, in one process: the copy ceiling (harness), the read-only ceiling of one kernel
at each batch-1 size (bench/read_ceiling.py), the cost of a chain of empty kernels in a graph,
then ops.attention_decode at batch 1 (1k/8k/64k) under each launch variant
(ops.attention_decode.set_tuning: PDL trigger in the combine, the wide combine, no combine) and
split count, and a torch.profiler timeline of three graph-replayed calls per shape.
`ncu-driver` makes one eager call per (shape, variant) for ncu to profile (filter with -k).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import copy_bandwidth_gbs, sets_to_rotate, time_graph  # noqa: E402
import gemma4x.ops.attention_decode  # noqa: E402,F401
from gemma4x import ops  # noqa: E402

ad = sys.modules["gemma4x.ops.attention_decode"]  # the package re-exports a function of the same name

SHAPES = {"26B full": (512, 16, 2), "31B full": (512, 32, 4), "sliding": (256, 16, 8)}


def make_sets(B, ctx, d, nH, nKV, n_sets, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        kc = torch.empty(B, ctx, nKV, d, device="cuda", dtype=torch.bfloat16).normal_(0, d**-0.25, generator=gen)
        vc = torch.empty(B, ctx, nKV, d, device="cuda", dtype=torch.bfloat16).normal_(generator=gen)
        q = torch.empty(B, 1, nH, d, device="cuda", dtype=torch.bfloat16).normal_(0, d**-0.25, generator=gen)
        sets.append((q, kc, vc))
    pos = torch.full((B, 1), ctx - 1, dtype=torch.long, device="cuda")
    return sets, pos


def timed(sets, pos, ctx, variant, splits=0):
    prev = ad.set_tuning(variant, splits)
    try:
        return time_graph([lambda s=s: ops.attention_decode(*s, pos, max_kv_len=ctx) for s in sets], replays=30)
    finally:
        ad.set_tuning(*prev)


def timeline(sets, pos, ctx, variant, calls=3):
    """Kernel start/duration (µs, from the first kernel's start) of `calls` graph-replayed calls."""
    from torch.profiler import ProfilerActivity, profile

    prev = ad.set_tuning(variant, 0)
    try:
        fns = [lambda s=s: ops.attention_decode(*s, pos, max_kv_len=ctx) for s in sets[:calls]]
        for f in fns:
            f()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
    finally:
        ad.set_tuning(*prev)
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    if not evs:
        return ["    (no kernel events recorded)"]
    t0 = evs[0].time_range.start
    lines = []
    for e in evs:
        name = e.name.split("<")[0].split("(")[0][-40:]
        st, en = e.time_range.start - t0, e.time_range.end - t0
        lines.append(f"    {name:40s} start {st:8.2f}  end {en:8.2f}  dur {en - st:7.2f} us")
    return lines


def cmd_timings(args):
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name(0)}; copy {copy_gbs:.0f} GB/s (read + write, 2 GiB)", flush=True)

    # A chain of empty kernels in one graph: the per-launch floor of any kernel boundary.
    x = torch.zeros(1, device="cuda")
    for n in (1, 2):
        t = time_graph([lambda n=n: [x.add_(1) for _ in range(n)] for _ in range(20)], replays=30)
        print(f"empty-kernel chain: {t.median_us / n:.2f} us per kernel ({n} per call, no PDL)", flush=True)

    from bench.read_ceiling import read_time_us

    for mb in args.read_mb:
        nbytes = int(mb * 1e6)
        t, shape = read_time_us(nbytes, verbose=mb in (33.6, 67.1))
        print(f"read ceiling {mb:8.1f} MB: {t:8.2f} us  {nbytes / t / 1e6:5.2f} TB/s "
              f"{100 * nbytes / t / 1e3 / copy_gbs:4.0f}% of copy  ({shape})", flush=True)  # fmt: skip

    # ad.VARIANT_* bits turn the session-3 changes off; 0 is the shipped launch. The session-3
    # profiling run used the earlier numbering: main, +trigger, +wide, +both, no combine.
    variants = {ad.VARIANT_MAIN: "main", ad.VARIANT_MAIN & ~ad.VARIANT_NO_EARLY_TRIGGER: "main+trig",
                ad.VARIANT_NO_SPLIT_ROUNDING: "new-unrounded", 0: "new", ad.VARIANT_SKIP_COMBINE: "new-no-combine"}
    for label, (d, nH, nKV) in SHAPES.items():
        for B, ctxs in ((1, (1024, 8192, 65536)), (32, (1024, 8192))):
            for ctx in ctxs:
                kv = B * ctx * nKV * d * 4
                sets, pos = make_sets(B, ctx, d, nH, nKV, sets_to_rotate(kv))
                splits = ad.extension().attention_decode.num_splits(B, 1, nH, nKV, d, ctx, _code())
                prev = ad.set_tuning(ad.VARIANT_MAIN, 0)
                ref = ops.attention_decode(sets[0][0], sets[0][1], sets[0][2], pos).float()
                ad.set_tuning(*prev)
                cells = []
                for v, name in variants.items():
                    if v != ad.VARIANT_MAIN and not v & ad.VARIANT_SKIP_COMBINE:  # compare outputs
                        prev = ad.set_tuning(v, 0)
                        out = ops.attention_decode(*sets[0], pos).float()  # vs main's output
                        ad.set_tuning(*prev)
                        err = (out - ref).abs().max().item()
                    else:
                        err = 0.0
                    t = timed(sets, pos, ctx, v)
                    cells.append(f"{name} {t.median_us:7.2f}" + (f" (err {err:.1e})" if err else ""))
                print(f"{label:9s} B={B:<2d} ctx={ctx:<6d} {kv / 1e6:8.1f} MB splits={splits:<4d} | " + " | ".join(cells),
                      flush=True)  # fmt: skip
                if B == 1 and ctx == 8192:
                    for v in (ad.VARIANT_MAIN, 0):
                        row = []
                        for s in args.splits:
                            row.append(f"{s}: {timed(sets, pos, ctx, v, s).median_us:6.2f}")
                        print(f"    splits sweep, variant {variants[v]:10s} " + " | ".join(row), flush=True)
                    for v in (ad.VARIANT_MAIN, 0):
                        print(f"    timeline, variant {variants[v]} (3 graph-replayed calls):")
                        try:
                            print("\n".join(timeline(sets, pos, ctx, v)), flush=True)
                        except Exception as exc:  # noqa: BLE001 - the profiler may not see graph kernels
                            print(f"    timeline failed: {type(exc).__name__}: {exc}")
                del sets
                torch.cuda.empty_cache()


def _code():
    from gemma4x.ops._dtypes import dtype_code

    return dtype_code(torch.empty(0, dtype=torch.bfloat16), "x", (torch.bfloat16,))


def cmd_ncu_driver(args):
    for label in args.shapes:
        d, nH, nKV = SHAPES[label]
        for ctx in args.ctx:
            sets, pos = make_sets(1, ctx, d, nH, nKV, 1)
            for v in args.variants:
                prev = ad.set_tuning(v, 0)
                ops.attention_decode(*sets[0], pos, max_kv_len=ctx)
                ad.set_tuning(*prev)
            torch.cuda.synchronize()
            print(f"ncu-driver: {label} ctx {ctx} variants {args.variants}", flush=True)


def cmd_ncu_read(args):
    from bench.read_ceiling import _read_kernel

    n = int(args.mb * 1e6) // 4
    x = torch.randint(0, 1 << 20, (n,), dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block = 8192
    nprog = sms * args.per_sm
    blocks = (n + block - 1) // block
    iters = (blocks + nprog - 1) // nprog
    out = torch.empty(nprog, dtype=torch.int32, device="cuda")
    _read_kernel[(nprog,)](x, out, n, iters, BLOCK=block, CONTIG=False, num_warps=8)
    torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timings")
    t.add_argument("--read-mb", type=float, nargs="+", default=[4.2, 8.4, 33.6, 67.1, 268.4, 536.9])
    t.add_argument("--splits", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    n = sub.add_parser("ncu-driver")
    n.add_argument("--shapes", nargs="+", default=list(SHAPES))
    n.add_argument("--ctx", type=int, nargs="+", default=[8192])
    n.add_argument("--variants", type=int, nargs="+", default=[0])
    r = sub.add_parser("ncu-read")
    r.add_argument("--mb", type=float, default=33.6)
    r.add_argument("--per-sm", type=int, default=4)
    args = p.parse_args()
    {"timings": cmd_timings, "ncu-driver": cmd_ncu_driver, "ncu-read": cmd_ncu_read}[args.cmd](args)


if __name__ == "__main__":
    main()

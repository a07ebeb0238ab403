"""Benchmark of decode attention over a KV cache (one query token per sequence).

For Gemma 4 head shapes at several context lengths and batch sizes, prints µs per call and the
achieved TB/s on the K/V bytes the step needs (B * ctx * nKV * d * 2 tensors * 2 bytes), beside
the device copy bandwidth measured in the same run, for:
  gemma4x      ops.attention_decode, K/V read in place from the cache, split-KV
  prev         what the runtime ran before: SDPA with a boolean mask, GQA heads folded into queries
  sdpa_<be>    torch SDPA without a mask (best case for it: every key visible), GQA folded, one
               backend at a time (flash, efficient, cudnn; math only when small)
  flex         FlexAttention (torch.compile), with --flex (first shape, --flex-ctx contexts)
Each call is timed inside a CUDA graph over rotated caches (harness.time_graph).
--variants V ... times gemma4x under each launch variant (ops.attention_decode.set_tuning bitmask;
0 = the session-2 launch) in the same run, as gemma4x.vV. --read-ceiling also times a one-kernel
read of the same number of bytes (bench/read_ceiling.py) for steps up to 1.1 GB and prints % of it
beside % of the 2 GiB copy ceiling: a small read cannot reach the big copy's rate.

    python bench/ops/bench_attention_decode.py [--ctx 1024 8192 65536 131072] [--batch 1 32] [--flex]
        [--variants 0 3] [--read-ceiling]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs, sets_to_rotate, time_graph  # noqa: E402
from bench.read_ceiling import read_time_us  # noqa: E402
from gemma4x import ops  # noqa: E402
from gemma4x.ops.attention_decode import set_tuning  # noqa: E402
from gemma4x.reference.attention import attention_sdpa_single_query  # noqa: E402

# (label, head_dim, q heads, kv heads)
SHAPES = [
    ("26B full", 512, 16, 2),
    ("31B full", 512, 32, 4),
    ("sliding", 256, 16, 8),
]


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ctx", type=int, nargs="+", default=[1024, 8192, 65536, 131072])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles per shape)")
    p.add_argument("--flex-ctx", type=int, nargs="+", default=[8192], help="contexts FlexAttention is timed at")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--tag", default="")
    p.add_argument("--variants", type=int, nargs="+", default=None, help="launch variants to time (set_tuning)")
    p.add_argument("--read-ceiling", action="store_true", help="also time a one-kernel read of the same bytes")
    args = p.parse_args()

    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains each backend it skips
    dtype = torch.bfloat16
    report = Report("bench_attention_decode" + args.tag)
    copy_gbs = copy_bandwidth_gbs()
    report.ceilings["copy_GBps"] = copy_gbs
    print(f"device: {report.device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    from torch.nn.attention import sdpa_kernel

    flex = None
    if args.flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    for label, d, nH, nKV in SHAPES:
        g = nH // nKV
        for B in args.batch:
            for ctx in args.ctx:
                kv_bytes = B * ctx * nKV * d * 2 * 2
                n_sets = sets_to_rotate(kv_bytes)
                gen = torch.Generator(device="cuda").manual_seed(0)
                sets = []
                for _ in range(n_sets):
                    kc = torch.empty(B, ctx, nKV, d, device="cuda", dtype=dtype).normal_(0, d**-0.25, generator=gen)
                    vc = torch.empty(B, ctx, nKV, d, device="cuda", dtype=dtype).normal_(generator=gen)
                    q = torch.empty(B, 1, nH, d, device="cuda", dtype=dtype).normal_(0, d**-0.25, generator=gen)
                    sets.append((q, kc, vc))
                pos = torch.full((B, 1), ctx - 1, dtype=torch.long, device="cuda")
                k_pos = torch.arange(ctx, device="cuda")[None].expand(B, ctx)
                impls = {}
                if args.variants is None:
                    impls["gemma4x"] = lambda q, kc, vc: ops.attention_decode(q, kc, vc, pos, max_kv_len=ctx)
                else:
                    for v in args.variants:

                        def run_variant(q, kc, vc, v=v):
                            prev = set_tuning(v, 0)  # read at launch: the captured graph keeps it
                            try:
                                return ops.attention_decode(q, kc, vc, pos, max_kv_len=ctx)
                            finally:
                                set_tuning(*prev)

                        impls[f"gemma4x.v{v}"] = run_variant
                read_us = None
                if args.read_ceiling and kv_bytes <= 1.1e9:
                    read_us, _ = read_time_us(kv_bytes)
                if not args.no_baselines:
                    impls["prev"] = lambda q, kc, vc: attention_sdpa_single_query(q, kc, vc, pos, k_pos)
                    for name, be in sdpa_backends().items():
                        if name == "math" and kv_bytes > 2**30:
                            continue

                        def run(q, kc, vc, be=be):
                            with sdpa_kernel(be):
                                return F.scaled_dot_product_attention(
                                    q.view(B, nKV, g, d), kc.transpose(1, 2), vc.transpose(1, 2), scale=1.0
                                )

                        impls[f"sdpa_{name}"] = run
                    if flex is not None and ctx in args.flex_ctx and label == SHAPES[0][0]:
                        impls["flex"] = lambda q, kc, vc: flex(
                            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), scale=1.0, enable_gqa=True
                        )
                q0, k0, v0 = sets[0]
                ref = ops.attention_decode(q0, k0, v0, pos).float()
                cells = []
                for name, fn in impls.items():
                    try:
                        out = fn(*sets[0])
                        err = (out.float().reshape(ref.shape) - ref).abs().max().item()
                        t = time_graph([lambda s=s, fn=fn: fn(*s) for s in sets], replays=20)
                    except Exception as exc:  # a backend that refuses the shape
                        cells.append(f"{name} n/a")
                        report.add(shape=label, batch=B, ctx=ctx, impl=name, error=f"{type(exc).__name__}: {exc}"[:200])
                        continue
                    tbs = kv_bytes / (t.median_us * 1e-6) / 1e12
                    pct_read = None if read_us is None else 100 * read_us / t.median_us
                    report.add(
                        shape=label, head_dim=d, q_heads=nH, kv_heads=nKV, batch=B, ctx=ctx, impl=name,
                        us=t.median_us, p10_us=t.p10_us, p90_us=t.p90_us, kv_MB=kv_bytes / 1e6,
                        TBps=tbs, pct_copy=100 * tbs * 1e3 / copy_gbs, pct_read_same_size=pct_read,
                        max_abs_diff_vs_gemma4x=err,
                    )  # fmt: skip
                    cell = f"{name} {t.median_us:8.1f}us {tbs:5.2f}TB/s {100 * tbs * 1e3 / copy_gbs:3.0f}%"
                    if pct_read is not None:
                        cell += f" ({pct_read:3.0f}% of read)"
                    cells.append(cell)
                head = f"{label:9s} hd{d} {nH}/{nKV} B={B:<3d} ctx={ctx:<7d} {kv_bytes / 1e6:9.1f}MB"
                if read_us is not None:
                    head += f" read {read_us:7.1f}us {kv_bytes / read_us / 1e6:4.2f}TB/s"
                print(head + " | " + " | ".join(cells), flush=True)
                del sets, impls
                torch.cuda.empty_cache()
    print("wrote", report.write())


if __name__ == "__main__":
    main()

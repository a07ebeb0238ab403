"""Where the decode MoE block's time goes: knobs of the one-launch stream kernel and of the router.

Experts alone (CUDA graph over rotated routings, as bench_moe.py) for
  - mode 1 (the weights stream through the pipeline, no math): the pipeline's own ceiling;
  - mode 0 (the real kernel) at several pipeline depths and bulk-copy piece sizes;
and the router alone at each cluster size. Prints µs and TB/s of the expert weight bytes.

    python bench/ops/sweep_moe_decode.py [--tokens 1 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, time_graph  # noqa: E402
from bench.ops.bench_moe import DTYPE, EPS, EXPERT_BYTES, H, K, make_weights  # noqa: E402
from gemma4x import ops  # noqa: E402
from gemma4x.ops import moe as moe_ops  # noqa: E402
from gemma4x.ops._load import extension  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    ext = extension().moe
    report = Report("sweep_moe_decode")
    W = make_weights()
    print(f"device: {report.device}")
    for T in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(100 + T)
        sets = [(torch.randn(T, H, generator=g, device="cuda").to(DTYPE) * 2,
                 torch.randn(T, H, generator=g, device="cuda").to(DTYPE)) for _ in range(8)]
        routes = [ops.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS) for h, _ in sets]
        used = statistics.mean(r[1].unique().numel() for r in routes)
        nbytes = used * EXPERT_BYTES

        def experts(kernel, sets=sets, routes=routes):
            moe_ops.DECODE_KERNEL = kernel
            try:
                return time_graph([lambda s=s, r=r: ops.moe_experts(s[1], r[1], r[0], W["gate_up"], W["down"])
                                   for s, r in zip(sets, routes)], inner=4, replays=20).median_us
            finally:
                moe_ops.DECODE_KERNEL = "auto"

        rows = [("split", None, experts("split"))]
        for mode in (1, 0):
            for stages in (4, 3, 2):
                for piece in (0, 8192, 2048):
                    if stages != 4 and piece != 0:
                        continue
                    ext.moe_stream_tuning(stages, piece, mode)
                    rows.append((f"stream mode={mode} stages={stages} piece={piece}", (mode, stages, piece),
                                 experts("stream")))
        ext.moe_stream_tuning(4, 0, 0)
        for name, knobs, us in rows:
            tbs = nbytes / (us * 1e-6) / 1e12
            report.add(tokens=T, what=name, knobs=knobs, us=us, TBps=tbs)
            print(f"T={T:<3} experts {name:<40} {us:8.1f} us  {tbs:5.2f} TB/s", flush=True)
        for c in (1, 2, 4, 8):
            ext.moe_router_tuning(c)
            us = time_graph([lambda s=s: ops.moe_router(s[0], W["proj"], W["scale"], W["pes"], K, EPS) for s in sets],
                            inner=4, replays=20).median_us
            report.add(tokens=T, what=f"router cluster={c}", us=us)
            print(f"T={T:<3} router cluster={c:<3} {us:8.1f} us", flush=True)
        ext.moe_router_tuning(0)
    print("wrote", report.write())


if __name__ == "__main__":
    main()

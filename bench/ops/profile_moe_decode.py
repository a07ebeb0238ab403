"""Kernels of one routed-block call at decode, for Nsight Compute (where the decode time goes).

    ncu --clock-control none -k regex:moe_ --launch-skip 10 --launch-count 5 \
        python3 bench/ops/profile_moe_decode.py [--tokens 1]

Warm-up: two calls of each decode path (stream: router + 1 kernel; split, the default: router +
2 kernels), then the profiled calls: one stream block, one split block.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.ops.bench_moe import DTYPE, H, block_gemma4x, block_gemma4x_stream, make_weights  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1)
    args = p.parse_args()
    W = make_weights()
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(args.tokens, H, generator=g, device="cuda").to(DTYPE)
    x = torch.randn(args.tokens, H, generator=g, device="cuda").to(DTYPE)
    for _ in range(2):
        block_gemma4x_stream(W, h, x)
    for _ in range(2):
        block_gemma4x(W, h, x)
    torch.cuda.synchronize()
    block_gemma4x_stream(W, h, x)
    block_gemma4x(W, h, x)
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()

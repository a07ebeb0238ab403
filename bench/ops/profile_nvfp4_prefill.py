"""Profiling target (ncu): one 26B-A4B expert prefill at 4096 tokens on the W4A16 WGMMA path.

    ncu -k regex:w4a16_wgmma -c 2 --section SpeedOfLight --section WarpStateStats python3 bench/ops/profile_nvfp4_prefill.py [tile]
"""
import sys

import torch

sys.path.insert(0, ".")
from bench.ops.bench_nvfp4 import EPS, TOPK, H, expert_weights  # noqa: E402
from gemma4x.ops import nvfp4_prefill  # noqa: E402
from gemma4x.reference import moe as ref_moe  # noqa: E402

tile = int(sys.argv[1]) if len(sys.argv) > 1 else 0
_, _, W4, R = expert_weights()
g = torch.Generator(device="cuda").manual_seed(1)
h = (torch.randn(4096, H, generator=g, device="cuda") * 2).bfloat16()
x = torch.randn(4096, H, generator=g, device="cuda").bfloat16()
w, idx = ref_moe.moe_router(h, R["proj"], R["scale"], R["pes"], TOPK, EPS)
for _ in range(2):
    nvfp4_prefill.w4a16_moe_experts_prefill(x, idx, w, **W4, tile=tile)
torch.cuda.synchronize()

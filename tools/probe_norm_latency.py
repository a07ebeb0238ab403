"""Kernel-only durations of the MoE-tail kernels at decode sizes, for `ncu` (no graph, no timing):
    ncu --clock-control none --metrics gpu__time_duration.sum python3 tools/probe_norm_latency.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ops.triton_moe_tail import moe_tail_norm_triton  # noqa: E402
from gemma4x import ops  # noqa: E402

for hidden in (2816, 5376):
    for rows in (1, 16):
        x1, x2, r = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
        s = torch.ones(1, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            ops.moe_tail_norm(x1, x2, r, w, w, w, s, 1e-6, 1e-6, 1e-6)
            moe_tail_norm_triton(x1, x2, r, w, w, w, s, 1e-6, 1e-6, 1e-6)
torch.cuda.synchronize()

"""Time to first token of a 1000-token prompt, and where the prefill's GPU time goes.

For each model: a random bf16 checkpoint at real shapes (written once into --workdir, reused on
later runs, so two builds of the package can be compared on one machine), loaded with
``Gemma4Runtime``; TTFT = ``generate(prompt, max_new_tokens=1)``, median of --repeats after a
warm-up; then one profiled prefill: total CUDA kernel time, launches, and the top kernels. A TTFT
far above the kernel time means the prefill is host-bound (Python and launch overhead).

    python bench/e2e/profile_prefill.py --models 26b-a4b e2b [--tag new] [--workdir /tmp/g4x]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from gemma4x import checkpoint, presets
from gemma4x.runtime import Gemma4Runtime


def profile_model(name: str, workdir: str, tag: str, prompt_len: int, repeats: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    path = os.path.join(workdir, f"ck_{name}")
    if not os.path.exists(os.path.join(path, "config.json")):
        checkpoint.write_random_checkpoint(
            path, copy.deepcopy(presets.preset(name)), device="cuda", max_shard_bytes=4 << 30, progress=False
        )
    rt = Gemma4Runtime.from_pretrained(
        path, device="cuda", dtype=torch.bfloat16, max_batch_size=1, max_seq_len=prompt_len + 100
    )
    rt.eos_token_ids = ()  # random weights: never stop early
    g = torch.Generator().manual_seed(1)
    prompt = [[2] + torch.randint(3, 200_000, (prompt_len - 1,), generator=g).tolist()]
    rt.generate(prompt, max_new_tokens=1)  # warm-up
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rt.generate(prompt, max_new_tokens=1)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    ms = [round(t * 1e3, 1) for t in samples]
    print(f"[{tag}] {name}: TTFT({prompt_len} tokens) median {statistics.median(samples) * 1e3:.1f} ms, all {ms}",
          flush=True)  # fmt: skip
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        rt.generate(prompt, max_new_tokens=1)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels)
    print(f"[{tag}] {name}: CUDA kernel time {total / 1e3:.1f} ms in {sum(e.count for e in kernels)} launches")
    for e in kernels[:top]:
        print(f"   {e.device_time_total / 1e3:8.2f} ms {e.count:5d}  {e.key[:110]}")
    del rt
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["26b-a4b", "e2b"])
    p.add_argument("--tag", default="", help="a label for the printed lines (e.g. the build under test)")
    p.add_argument("--workdir", default="/tmp/gemma4x_prefill", help="random checkpoints, reused when present")
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    for name in args.models:
        profile_model(name, args.workdir, args.tag, args.prompt_len, args.repeats, args.top)


if __name__ == "__main__":
    main()

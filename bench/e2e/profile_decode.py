"""Where a decode step's time goes: one graph-replayed step of Gemma4Runtime, kernel by kernel.

For each model (random bf16 weights at real shapes, as bench_generate.py): prefill a 128-token
prompt per sequence, then measure at batch 1 and 8

  - the whole ``generate`` step (replay + logits + sampling + the host sync), from generate(1+N) - generate(1);
  - the graph replay alone, back to back on the GPU (CUDA events over 50 replays, median of 5);
  - the kernels inside one replay (torch.profiler, CUPTI), summed per kernel name and per
    category, against the step's weight-byte floor at the copy bandwidth measured in the same run.

    python bench/e2e/profile_decode.py --models 26b-a4b e2b [--batches 1 8] [--top 25]
        [--variants before now cublas untail]

``--variants`` measures several decode paths in the same process, graphs re-captured for each:
``before`` (separate projections on cuBLAS, q/k/v norms + RoPE as PyTorch ops, the layer tail
as separate ops), ``now`` (the runtime's path), ``cublas`` (``now`` with every linear on cuBLAS)
and ``untail`` (``now`` with ``geglu`` / ``residual_rms_norm`` as the separate ops they fuse).
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs  # noqa: E402
from gemma4x import checkpoint, presets  # noqa: E402
from gemma4x.runtime import Gemma4Runtime  # noqa: E402

# Kernel name -> category, first match wins (lower-case substrings).
CATEGORIES = [
    ("moe", ("moe",)),
    ("attention", ("attention", "attn", "flash", "fmha")),
    ("kv write", ("kv_cache",)),
    ("norm", ("rms", "norm")),
    ("nvfp4", ("w4a16", "nvfp4")),
    ("elementwise/copy", ("geglu",)),  # before "gemm": every gemma4x:: kernel name contains "gemm"
    ("gemm (cuBLAS/CUTLASS)", ("gemm", "nvjet", "xmma", "cutlass", "gemv", "splitk")),
    ("sampling/argmax", ("argmax", "reduce", "topk", "sort")),
    ("elementwise/copy", ("elementwise", "vectorized", "copy", "fill", "cat", "index", "gather", "scatter")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def step_weight_bytes(model, t, batch: int) -> float:
    """Bytes a decode step must read at least: every parameter once, except that embedding
    tables are looked up, not streamed (a tied LM head streams the token table once), and of the
    routed experts only those a step is expected to hit under uniform routing count."""
    total = 0.0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if "experts" in name and t.num_experts:
            E, k = t.num_experts, t.top_k_experts
            n *= (1 - (1 - k / E) ** batch)  # expected share of experts hit by `batch` tokens
        elif "embed" in name and p.dim() == 2 and p.shape[0] >= t.vocab_size_per_layer_input:
            n = p.numel() * p.element_size() if (t.tie_word_embeddings and p.shape[1] == t.hidden_size) else 0
        total += n
    return total


def time_replays(graph: torch.cuda.CUDAGraph, n: int = 50) -> float:
    samples = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            graph.replay()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) / 1e3 / n)
    return statistics.median(samples)


def kernel_table(graph: torch.cuda.CUDAGraph, replays: int = 5) -> dict[str, tuple[float, int]]:
    """Kernel name -> (µs per replay, launches per replay)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    table: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            row = table[ev.name]
            row[0] += ev.device_time_total / replays
            row[1] += 1 / replays
    return {k: (v[0], round(v[1])) for k, v in table.items()}


def _set_path(rt: Gemma4Runtime, variant: str) -> None:
    """Put the decode step on one path and re-capture the graphs:
    ``before``: separate q/k/v and gate/up GEMMs on cuBLAS, norms + RoPE as the op chain;
    ``now``: fused projections, ``ops.gemv.linear`` (skinny GEMM at decode), ``ops.qkv_norm_rope``;
    ``cublas``: as ``now`` with every linear on cuBLAS (the skinny GEMM's share);
    ``untail``: as ``now`` with the layer tail unfused (``dispatch.unfused_tail``): the fusion's share."""
    from bench.ops.bench_qkv_norm_rope import eager_chain
    from gemma4x import ops
    from gemma4x.layers import dispatch
    from gemma4x.runtime.cuda_graph import CudaGraphDecoder

    saved = rt.__dict__.setdefault("_fused_saved", {})
    for i, layer in enumerate(rt.model.layers):
        if i not in saved:
            saved[i] = (layer.self_attn.fused_qkv, layer.mlp.fused_gate_up)
        fused = saved[i] if variant != "before" else (None, None)
        layer.self_attn.fused_qkv, layer.mlp.fused_gate_up = fused
    dispatch._CUDA.qkv_norm_rope = eager_chain if variant == "before" else ops.qkv_norm_rope_or_reference
    dispatch._CUDA.linear = ops.gemv.linear if variant in ("now", "untail") else torch.nn.functional.linear
    unfused = dispatch.unfused_tail(dispatch._CUDA)  # reads rms_norm / gelu_tanh at call time
    tail_off = variant in ("before", "untail")
    dispatch._CUDA.geglu = unfused.geglu if tail_off else ops.geglu
    dispatch._CUDA.residual_rms_norm = unfused.residual_rms_norm if tail_off else ops.residual_rms_norm
    rt.graphs = None
    torch.cuda.empty_cache()
    rt.graphs = CudaGraphDecoder(rt.model, rt.cache, max_batch_size=rt.max_batch_size, max_seq_len=rt.max_seq_len)


def profile_model(name: str, batches: list[int], top: int, decode_tokens: int, bw: float, report: Report,
                  workdir: str | None, variants: list[str]) -> None:
    cfg = copy.deepcopy(presets.preset(name))
    path = tempfile.mkdtemp(prefix=f"gemma4x_{name}_", dir=workdir)
    try:
        t0 = time.perf_counter()
        checkpoint.write_random_checkpoint(path, cfg, device="cuda", max_shard_bytes=4 << 30, progress=False)
        rt = Gemma4Runtime.from_pretrained(path, device="cuda", dtype=torch.bfloat16, max_batch_size=max(batches),
                                           max_seq_len=1024)
        rt.eos_token_ids = ()
        print(f"{name}: checkpoint + load {time.perf_counter() - t0:.1f} s", flush=True)
        for variant, batch in ((v, b) for v in variants for b in batches):
            if batch == batches[0] and variants != ["now"]:
                _set_path(rt, variant)
            prompts = [[2] + [1000 + 7 * i + j for j in range(127)] for i in range(batch)]
            rt.generate(prompts, max_new_tokens=1)  # warm-up; the caches hold 128 positions per slot
            t1 = []
            tn = []
            for _ in range(3):
                torch.cuda.synchronize()
                a = time.perf_counter()
                rt.generate(prompts, max_new_tokens=1)
                b = time.perf_counter()
                rt.generate(prompts, max_new_tokens=1 + decode_tokens)
                torch.cuda.synchronize()
                c = time.perf_counter()
                t1.append(b - a)
                tn.append(c - b)
            step = (statistics.median(tn) - statistics.median(t1)) / decode_tokens
            graph, _ = rt.graphs.graphs[next(x for x in rt.graphs.buckets if x >= batch)]
            replay = time_replays(graph)
            kernels = kernel_table(graph)
            gpu = sum(v[0] for v in kernels.values()) * 1e-6
            launches = sum(v[1] for v in kernels.values())
            floor = step_weight_bytes(rt.model, rt.config.text, batch) / bw
            print(f"\n== {name} [{variant}] batch {batch}: generate step {step * 1e3:.3f} ms ({1 / step:.1f} tok/s per seq), "
                  f"graph replay {replay * 1e3:.3f} ms, kernels {gpu * 1e3:.3f} ms in {launches} launches, "
                  f"weight floor {floor * 1e3:.3f} ms at {bw / 1e9:.0f} GB/s", flush=True)
            cats: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
            for k, (us, n) in kernels.items():
                c = cats[category(k)]
                c[0] += us
                c[1] += n
            print(f"{'category':<24} {'ms/step':>9} {'share':>6} {'launches':>9}")
            for c, (us, n) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
                print(f"{c:<24} {us / 1e3:9.3f} {us * 1e-6 / gpu:6.1%} {n:9d}")
                report.add(model=name, variant=variant, batch=batch, category=c, ms=us / 1e3, launches=n)
            print(f"top {top} kernels (µs per step, launches):")
            for k, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
                print(f"  {us:9.1f} {n:5d}  {k[:150]}")
            report.add(model=name, variant=variant, batch=batch, metric="summary", step_ms=step * 1e3, replay_ms=replay * 1e3,
                       kernels_ms=gpu * 1e3, launches=launches, floor_ms=floor * 1e3)
        del rt
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["26b-a4b", "e2b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--workdir", default=None)
    p.add_argument("--variants", nargs="+", default=["now"], choices=["before", "now", "cublas", "untail"],
                   help="decode paths to measure in the same process (see _set_path)")
    args = p.parse_args()
    bw = copy_bandwidth_gbs() * 1e9  # bytes/s, read + write, measured in this process
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    report = Report("profile_decode_" + "_".join(args.models))
    for name in args.models:
        profile_model(name, args.batches, args.top, args.decode_tokens, bw, report, args.workdir, args.variants)
        torch.cuda.empty_cache()
    print("wrote", report.write(), flush=True)


if __name__ == "__main__":
    main()

"""End-to-end generation benchmark: gemma4x vs HF transformers on one GPU, random weights at
real Gemma 4 shapes (python/gemma4x/presets.py).

For each model: a random bf16 checkpoint is written once (on the GPU, seeded), then
  - TTFT: a 1000-token prompt through generate(max_new_tokens=1), median of 3 after a warm-up;
  - decode: per-step time at batch 1 and 8 (128-token prompts), from the difference between
    generate(1 + N) and generate(1), so prefill is excluded;
for gemma4x (CUDA graphs on) and then for HF transformers (Gemma4ForConditionalGeneration, bf16,
its default experts implementation, grouped_mm) loaded from the same files. The two models are
never resident together, so 31B fits one H200.

    python bench/e2e/bench_generate.py --models e2b 26b-a4b [--decode-tokens 32] [--no-hf]
        [--hf-models 26b-a4b] [--quantize none nvfp4]

``--quantize nvfp4`` also runs gemma4x with the experts quantized to NVFP4 at load (the same
weights, W4A16 kernels on SM90); ``--hf-models`` limits the HF runs to some of the models.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report  # noqa: E402
from gemma4x import checkpoint, presets  # noqa: E402
from gemma4x.runtime import Gemma4Runtime  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    """Median wall time (s) of ``fn`` after one warm-up, device synchronised."""
    fn()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def prompts(batch: int, length: int, vocab: int = 200_000) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return [[2] + torch.randint(3, vocab, (length - 1,), generator=g).tolist() for _ in range(batch)]


def measure(generate, label: str, decode_tokens: int, report: Report, impl: str, model: str) -> None:
    long = prompts(1, 1000)
    ttft = timed(lambda: generate(long, 1))
    print(f"{label}: TTFT(1000 tokens) {ttft * 1e3:.1f} ms", flush=True)
    report.add(impl=impl, model=model, metric="ttft_ms", prompt=1000, value=ttft * 1e3)
    for batch in (1, 8):
        ps = prompts(batch, 128)
        t1 = timed(lambda: generate(ps, 1), repeats=2)
        tn = timed(lambda: generate(ps, 1 + decode_tokens), repeats=2)
        step = (tn - t1) / decode_tokens
        print(
            f"{label}: batch {batch}: {step * 1e3:.2f} ms/step, {1 / step:.1f} tok/s per sequence, "
            f"{batch / step:.1f} tok/s total",
            flush=True,
        )
        report.add(impl=impl, model=model, metric="decode", batch=batch, ms_per_step=step * 1e3,
                   tok_s_per_seq=1 / step, tok_s_total=batch / step)


def run_gemma4x(path: str, name: str, decode_tokens: int, report: Report, quantize: str | None = None) -> None:
    t0 = time.perf_counter()
    rt = Gemma4Runtime.from_pretrained(
        path, device="cuda", dtype=torch.bfloat16, max_batch_size=8, max_seq_len=2048, quantize=quantize
    )
    rt.eos_token_ids = ()  # random weights: never stop early
    impl = "gemma4x" if quantize is None else f"gemma4x-{quantize}"
    print(f"{impl} {name}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    def generate(ps, n):
        return rt.generate(ps, max_new_tokens=n)

    measure(generate, f"{impl} {name}", decode_tokens, report, impl, name)
    del rt


def run_hf(path: str, name: str, decode_tokens: int, report: Report) -> None:
    import transformers
    from transformers import Gemma4ForConditionalGeneration

    t0 = time.perf_counter()
    hf = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    impl = getattr(hf.config.get_text_config(), "_experts_implementation", None)
    print(f"HF {transformers.__version__} {name}: loaded in {time.perf_counter() - t0:.1f} s (experts: {impl})",
          flush=True)

    @torch.inference_mode()
    def generate(ps, n):
        ids = torch.tensor(ps, device="cuda")
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n)

    measure(generate, f"HF {name}", decode_tokens, report, "hf_transformers", name)
    del hf


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["e2b", "26b-a4b", "31b"])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--hf-models", nargs="+", default=None, help="run HF only for these models (default: all)")
    p.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "nvfp4", "nvfp4-all"])
    p.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    args = p.parse_args()

    report = Report("bench_generate_" + "_".join(args.models))
    for name in args.models:
        cfg = copy.deepcopy(presets.preset(name))
        path = tempfile.mkdtemp(prefix=f"gemma4x_{name}_", dir=args.workdir)
        try:
            t0 = time.perf_counter()
            checkpoint.write_random_checkpoint(path, cfg, device="cuda", max_shard_bytes=4 << 30, progress=False)
            print(f"{name}: wrote random checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
            for q in args.quantize:
                if q == "nvfp4" and not cfg["text_config"].get("enable_moe_block", False):
                    continue  # experts-only NVFP4: nothing to quantize in a dense model
                run_gemma4x(path, name, args.decode_tokens, report, None if q == "none" else q)
                gc.collect()
                torch.cuda.empty_cache()
            if not args.no_hf and (args.hf_models is None or name in args.hf_models):
                run_hf(path, name, args.decode_tokens, report)
                gc.collect()
                torch.cuda.empty_cache()
        finally:
            shutil.rmtree(path, ignore_errors=True)
        print("wrote", report.write(), flush=True)


if __name__ == "__main__":
    main()

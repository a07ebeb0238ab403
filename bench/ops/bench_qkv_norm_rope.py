"""Benchmark of an attention layer's input preparation: per-head RMSNorm of q, k, v and RoPE of q, k.

Prints µs per call inside a CUDA graph for Gemma 4 layer shapes, decode (1 and 8 tokens) and
prefill (1000 and 8192 tokens):
  gemma4x   ops.qkv_norm_rope: one launch
  eager     the op chain the runtime ran before: three ops.rms_norm launches plus RoPE as PyTorch
            elementwise ops (mul, neg, cat, mul, add for each of q and k)
  compile   torch.compile of the reference chain (gemma4x.reference.rope.qkv_norm_rope)
and the achieved GB/s (bytes read + written) beside the copy bandwidth measured in the same run.
At decode the work is a few hundred KB, so the time per layer, not bandwidth, is what matters.

    python bench/ops/bench_qkv_norm_rope.py [--tokens 1 8 1000 8192] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs, sets_to_rotate, time_graph  # noqa: E402
from gemma4x import ops  # noqa: E402
from gemma4x.reference import rope as ref  # noqa: E402
from gemma4x.reference.rope import rope_cos_sin, rope_inv_freq  # noqa: E402

# (label, q heads, kv heads, head dim, v is the raw k)
LAYERS = [
    ("26B sliding", 16, 8, 256, False),
    ("26B full (k=v)", 16, 2, 512, True),
    ("31B sliding", 32, 16, 256, False),
    ("31B full (k=v)", 32, 4, 512, True),
    ("E2B sliding", 8, 1, 256, False),
]


def eager_chain(q, k, v, qw, kw, cos, sin, eps):
    """The runtime's previous path: gemma4x RMSNorm kernels, RoPE in PyTorch ops (k, v may be None)."""
    q = ref.apply_rope(ops.rms_norm(q, qw, eps), cos, sin)
    if k is not None:
        k = ref.apply_rope(ops.rms_norm(k, kw, eps), cos, sin)
    return q, k, (ops.rms_norm(v, None, eps) if v is not None else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 1000, 8192])
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    report = Report("bench_qkv_norm_rope")
    copy = copy_bandwidth_gbs()
    report.ceilings["copy_GBs"] = copy
    compiled = None if args.no_compile else torch.compile(ref.qkv_norm_rope, dynamic=False)
    print(f"device {torch.cuda.get_device_name(0)}; copy bandwidth {copy:.0f} GB/s")
    print(f"{'layer':>16} {'T':>5} | {'gemma4x µs':>10} {'GB/s':>6} | {'eager µs':>8} | {'compile µs':>10} | vs eager")
    dt = torch.bfloat16
    for label, hq, hkv, d, k_eq_v in LAYERS:
        inv = rope_inv_freq(d, 1e4).cuda()
        for T in args.tokens:
            width = (hq + (1 if k_eq_v else 2) * hkv) * d
            nbytes = T * (2 * width + 2 * 2 * d) * 2  # in + out, cos + sin
            sets = []
            for _ in range(sets_to_rotate(nbytes, max_sets=16)):
                qkv = torch.randn(1, T, width, device="cuda", dtype=dt)
                q = qkv[..., : hq * d].view(1, T, hq, d)
                k = qkv[..., hq * d : (hq + hkv) * d].view(1, T, hkv, d)
                v = k if k_eq_v else qkv[..., (hq + hkv) * d :].view(1, T, hkv, d)
                cos, sin = rope_cos_sin(torch.arange(T, device="cuda")[None] + 77, inv, dt)
                qw = torch.randn(d, device="cuda", dtype=dt)
                kw = torch.randn(d, device="cuda", dtype=dt)
                sets.append((q, k, v, qw, kw, cos, sin, 1e-6))
            t_ours = time_graph([lambda s=s: ops.qkv_norm_rope(*s) for s in sets])
            t_eager = time_graph([lambda s=s: eager_chain(*s) for s in sets])
            t_comp = time_graph([lambda s=s: compiled(*s) for s in sets]) if compiled else None
            gbs = nbytes / (t_ours.median_us * 1e-6) / 1e9
            comp = f"{t_comp.median_us:10.1f}" if t_comp else f"{'-':>10}"
            print(
                f"{label:>16} {T:5d} | {t_ours.median_us:10.1f} {gbs:6.0f} | {t_eager.median_us:8.1f} | {comp} | "
                f"{t_eager.median_us / t_ours.median_us:5.1f}x"
            )
            report.add(
                layer=label,
                tokens=T,
                gemma4x_us=t_ours.median_us,
                eager_us=t_eager.median_us,
                compile_us=t_comp.median_us if t_comp else None,
                gemma4x_GBs=gbs,
                bytes=nbytes,
            )
    print("wrote", report.write())


if __name__ == "__main__":
    main()

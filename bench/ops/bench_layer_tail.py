"""Benchmark of the fused dense-layer tail ops: ``geglu`` and ``residual_rms_norm``.

Prints µs per call, achieved GB/s and % of the copy bandwidth measured in the same run for:
  - ``gemma4x``: the fused kernel (one launch);
  - ``unfused``: what the model ran before, on the same GPU: ``F.gelu(gate, "tanh") * up`` (2 launches),
    ``residual + ops.rms_norm(x)`` then ``* scalar`` (3 launches: our norm kernel + 2 PyTorch ops);
  - ``torch_eager``: the pure-PyTorch reference (``gemma4x.reference``);
  - ``torch_compile``: ``torch.compile`` of that reference (one Triton kernel where Inductor fuses).
Every call runs in a CUDA graph over input sets rotated to defeat the L2; small calls repeat inside
the graph so the per-call time includes the launch gap a decode step pays. Shapes: E2B (H 1536,
I 6144 / 12288, PLE P 256) and 31B (H 5376, I 21504) at decode (1, 8 rows) and prefill (4096 rows);
the MLP's gate/up are column views of one fused ``[rows, 2I]`` GEMM output, as in the model.

``ple_chain`` is the E2B PLE tail without its two GEMVs (h2 = h1 + norm(m); g = geglu(gate, pli);
out = (h2 + norm(proj)) * scalar): 3 launches fused against 7 before.

    python bench/ops/bench_layer_tail.py [--no-compile] [--rows 1 8 4096]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs, sets_to_rotate, time_graph  # noqa: E402
from gemma4x import ops  # noqa: E402
from gemma4x.reference import activation as ref_act  # noqa: E402
from gemma4x.reference import norm as ref_norm  # noqa: E402

EPS = 1e-6
DT = torch.bfloat16


def unfused_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def unfused_tail(residual, x, w, eps, scalar=None):
    out = residual + ops.rms_norm(x, w, eps)
    return out if scalar is None else out * scalar


def _r(*shape, g, scale=1.0):
    return (torch.randn(*shape, device="cuda", generator=g) * scale).to(DT)


def geglu_sets(n, rows, cols, g, ple):
    sets = []
    for _ in range(n):
        if ple:  # up = PLI[:, l] of a [rows, 35, P] tensor
            sets.append((_r(rows, cols, g=g, scale=3.0), _r(rows, 35, cols, g=g)[:, 7]))
        else:  # gate/up = column halves of the fused [rows, 2I] GEMM output
            buf = _r(rows, 2 * cols, g=g, scale=3.0)
            sets.append(tuple(buf.split([cols, cols], dim=-1)))
    return sets


def tail_sets(n, rows, hidden, g):
    w, s = _r(hidden, g=g), _r(1, g=g)
    return [(_r(rows, hidden, g=g), _r(rows, hidden, g=g), w, EPS, s) for _ in range(n)]


def ple_sets(n, rows, g, H=1536, P=256):
    w1, w2, s = _r(H, g=g), _r(H, g=g), _r(1, g=g)
    return [
        (_r(rows, H, g=g), _r(rows, H, g=g), _r(rows, H, g=g), _r(rows, P, g=g, scale=3.0), _r(rows, 35, P, g=g)[:, 7],
         w1, w2, s)
        for _ in range(n)
    ]  # fmt: skip


def ple_chain(ns):
    def run(h, m, proj, gate, pli, w1, w2, s):
        h2 = ns.residual_rms_norm(h, m, w1, EPS)
        g = ns.geglu(gate, pli)  # feeds the (omitted) per_layer_projection GEMV
        return torch.cat([ns.residual_rms_norm(h2, proj, w2, EPS, s).flatten(), g.flatten()])

    return run


class _NS:
    def __init__(self, geglu, residual_rms_norm):
        self.geglu, self.residual_rms_norm = geglu, residual_rms_norm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 4096])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--impls", nargs="+", default=None, help="subset of gemma4x unfused torch_eager torch_compile")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = p.parse_args()

    report = Report("bench_layer_tail" + args.tag)
    copy_gbs = copy_bandwidth_gbs()
    report.ceilings["copy_GBps"] = copy_gbs
    print(f"device: {report.device}; torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    want_compile = not args.no_compile and (args.impls is None or "torch_compile" in args.impls)
    compile_ = (lambda f: torch.compile(f, dynamic=True)) if want_compile else None
    g = torch.Generator(device="cuda").manual_seed(0)

    cases = []  # (op, label, rows, bytes, make_sets(n), {impl: fn}, reference fn)
    geglu_impls = {"gemma4x": ops.geglu, "unfused": unfused_geglu, "torch_eager": ref_act.geglu}
    tail_impls = {"gemma4x": ops.residual_rms_norm, "unfused": unfused_tail, "torch_eager": ref_norm.residual_rms_norm}
    fused_ns = _NS(ops.geglu, ops.residual_rms_norm)
    unfused_ns = _NS(unfused_geglu, unfused_tail)
    ref_ns = _NS(ref_act.geglu, ref_norm.residual_rms_norm)
    ple_impls = {"gemma4x": ple_chain(fused_ns), "unfused": ple_chain(unfused_ns), "torch_eager": ple_chain(ref_ns)}
    if compile_ is not None:
        geglu_impls["torch_compile"] = compile_(ref_act.geglu)
        tail_impls["torch_compile"] = compile_(ref_norm.residual_rms_norm)
        ple_impls["torch_compile"] = compile_(ple_chain(ref_ns))
    for rows in args.rows:
        for label, cols, ple in (("E2B PLE P", 256, True), ("E2B MLP I", 6144, False), ("E2B MLP 2x I", 12288, False),
                                 ("31B MLP I", 21504, False)):
            nbytes = 3 * rows * cols * 2
            cases.append(("geglu", f"{label}={cols}", rows, nbytes,
                          lambda n, rows=rows, cols=cols, ple=ple: geglu_sets(n, rows, cols, g, ple), geglu_impls))
        for label, hidden in (("E2B H", 1536), ("31B H", 5376)):
            nbytes = 3 * rows * hidden * 2 + hidden * 2
            cases.append(("residual_rms_norm", f"{label}={hidden}", rows, nbytes,
                          lambda n, rows=rows, hidden=hidden: tail_sets(n, rows, hidden, g), tail_impls))
        nbytes = (2 * 3 * rows * 1536 + 3 * rows * 256) * 2
        cases.append(("ple_chain", "E2B H=1536 P=256", rows, nbytes, lambda n, rows=rows: ple_sets(n, rows, g),
                      ple_impls))

    keep = lambda impls: {k: v for k, v in impls.items() if args.impls is None or k in args.impls or k == "unfused"}  # noqa: E731
    cases = [(*c[:5], keep(c[5])) for c in cases]
    names = list(keep(geglu_impls))
    header = f"{'op':<18} {'shape':<20} {'rows':>5} | " + " | ".join(f"{k:>25}" for k in names)
    print(header + "\n" + "-" * len(header))
    for op, label, rows, nbytes, make, impls in cases:
        n_sets = sets_to_rotate(nbytes)
        sets = make(n_sets)
        want = impls["unfused"](*sets[0])
        cells = []
        for name, fn in impls.items():
            out = fn(*sets[0])
            bit_equal = bool(torch.equal(out.view(torch.int16), want.view(torch.int16)))
            inner = max(1, 64 // n_sets) if rows <= 256 else 1
            t = time_graph([lambda s=s, fn=fn: fn(*s) for s in sets], inner=inner)
            gbs = nbytes / (t.median_us * 1e-6) / 1e9
            report.add(op=op, shape=label, rows=rows, impl=name, us=t.median_us, p10_us=t.p10_us, p90_us=t.p90_us,
                       GBps=gbs, pct_copy=100 * gbs / copy_gbs, bit_equal_to_unfused=bit_equal)
            cells.append(f"{t.median_us:7.2f}us {gbs:6.0f}GB/s {100 * gbs / copy_gbs:3.0f}%{'' if bit_equal else ' !='}")
        print(f"{op:<18} {label:<20} {rows:>5} | " + " | ".join(f"{c:>25}" for c in cells), flush=True)
    print("('!=': output not bit-identical to the unfused sequence; torch_eager's norm is the fp32 reference)")
    print("wrote", report.write())


if __name__ == "__main__":
    main()

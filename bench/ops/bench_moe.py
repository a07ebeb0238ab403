"""Benchmark of the Gemma 4 routed-experts block (router -> experts -> combine) at the 26B-A4B shape.

E=128 experts, top-8, H=2816, I=704, bf16. For each token count: µs per call, weight bytes read
(router matrix + every chosen expert once) over that time in TB/s, % of the device copy bandwidth
measured in the same run, and kernel launches per call, for gemma4x (decode kernels at T*k <= 64,
the SM90 prefill path beyond; "gemma4x" runs the model layer's layout, gate/up rows interleaved in
blocks of 8, so GEMM1's epilogue computes the GeGLU and up to 4096 pairs the permute is one fused
launch; "gemma4x_before" the HF layout with the separate GeGLU kernel and the three-launch permute,
i.e. the path before that change; "gemma4x_stream" the experimental one-launch decode kernel), the
reference (torch ``F.grouped_mm`` path, HF's default) and a per-expert
torch loop (HF's eager experts; it syncs with the host, so it is timed eagerly with events, not
in a graph). Every graph-timed call replays over rotated input sets.

Prefill table (T*k > 64): the same whole-block times as TFLOP/s (6*T*k*H*I expert FLOPs; the
router's 2*T*E*H is left out), beside a dense bf16 matmul of the same FLOPs and shapes (one
[T*k, H] x [H, 2I] and one [T*k, I] x [I, H] GEMM: the ceiling of a perfectly balanced grouped
GEMM) and an 8192^3 matmul, all measured in this run; then the experts alone per tile config
(gemma4x prefill op; "il_*" interleaved with the GeGLU epilogue, "hf_*" HF layout + GeGLU kernel)
against torch's grouped_mm experts, and each prefill kernel's share. Last, the fused one-launch
router against the many-token router (rows kernel, cuBLAS, top-k) at --router-tokens, which sets
ROUTER_FUSED_MAX_TOKENS.

    python bench/ops/bench_moe.py [--tokens 1 8 64 512 4096 16384] [--router-tokens 64 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, copy_bandwidth_gbs, matmul_tflops, time_graph  # noqa: E402
from gemma4x import ops  # noqa: E402
from gemma4x.ops import moe as moe_ops  # noqa: E402
from gemma4x.ops._load import extension  # noqa: E402
from gemma4x.reference import moe as ref  # noqa: E402
from gemma4x.reference.activation import gelu_tanh  # noqa: E402

E, K, H, I = 128, 8, 2816, 704
EPS = 1e-6
DTYPE = torch.bfloat16
EXPERT_BYTES = 3 * I * H * 2
ROUTER_BYTES = E * H * 2


def make_weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale).to(DTYPE)  # noqa: E731
    return dict(
        proj=rnd(E, H),
        scale=rnd(H, scale=0.3) + 1,
        pes=(torch.rand(E, generator=g, device="cuda") + 0.5).to(DTYPE),
        gate_up=rnd(E, 2 * I, H, scale=2 * H**-0.5),
        down=rnd(E, H, I, scale=I**-0.5),
    )


def add_interleaved(W):
    W["gate_up_il"] = ref.interleave_gate_up(W["gate_up"])  # as the model layer's loader stores it
    return W


def block_gemma4x(W, h, x):
    """The model layer's path: interleaved gate/up (GeGLU in GEMM1's epilogue, fused prep)."""
    w, idx = ops.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS)
    return ops.moe_experts(x, idx, w, W["gate_up_il"], W["down"], gate_up_interleaved=True)


def block_gemma4x_before(W, h, x):
    """HF layout, separate GeGLU kernel, count + scan + gather, fused router up to 512 tokens: the
    prefill path before this change."""
    router = torch.ops.gemma4x.moe_router if h.shape[0] <= 512 else torch.ops.gemma4x.moe_router_many
    w, idx = router(h, W["proj"], W["scale"], W["pes"], K, EPS)
    if idx.numel() > moe_ops.DECODE_MAX_PAIRS and moe_ops.prefill_device_ok(x.device):
        return torch.ops.gemma4x.moe_experts_prefill(x, idx, w, W["gate_up"], W["down"], 0, False, 2)
    return ops.moe_experts(x, idx, w, W["gate_up"], W["down"])


def block_gemma4x_hf(W, h, x):
    """HF layout through ops.moe_experts (the stream decode kernel reads only this layout)."""
    w, idx = ops.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS)
    return ops.moe_experts(x, idx, w, W["gate_up"], W["down"])


def block_gemma4x_stream(W, h, x):
    moe_ops.DECODE_KERNEL = "stream"
    try:
        return block_gemma4x_hf(W, h, x)
    finally:
        moe_ops.DECODE_KERNEL = "auto"


def block_reference(W, h, x):
    w, idx = ref.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS)
    return ref.moe_experts(x, idx, w, W["gate_up"], W["down"])


def block_torch_loop(W, h, x):
    """HF's eager experts: one F.linear pair per chosen expert, index_add_ into the output."""
    w, idx = ref.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS)
    out = torch.zeros_like(x)
    for e in idx.unique().tolist():
        rows, slots = torch.where(idx == e)
        gate, up = torch.nn.functional.linear(x[rows], W["gate_up"][e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(gelu_tanh(gate) * up, W["down"][e])
        out.index_add_(0, rows, (y * w[rows, slots, None]).to(x.dtype))
    return out


def time_eager(fn, sets, reps=30):
    for s in sets[:2]:
        fn(*s)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for r in range(reps):
        s = sets[r % len(sets)]
        start.record()
        fn(*s)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def device_kernels(fn, reps=1):
    """(name, µs) of each kernel one eager call launches, from the profiler (mean over reps)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name]
    return [(e.name, e.device_time if hasattr(e, "device_time") else e.cuda_time) for e in events]


def launches_per_call(fn):
    try:
        return len(device_kernels(fn))
    except Exception as exc:  # profiler missing on the machine: say so rather than fail the run
        print("launch count unavailable:", exc)
        return -1


def topk_tie_order():
    """Whether torch.topk on CUDA puts the lower index first among equal values (informational)."""
    p = torch.rand(64, 128, device="cuda")
    p[:, 77] = p[:, 5] = p.max(-1).values + 1
    _, idx = p.topk(8, dim=-1)
    return bool((idx[:, 0] == 5).all() and (idx[:, 1] == 77).all())


def expert_flops(T: int) -> float:
    """Expert FLOPs of one block call: GEMM1 2*P*H*2I plus GEMM2 2*P*I*H, P = T*k."""
    return 6.0 * T * K * H * I


def dense_same_shape_us(T: int) -> float:
    """A dense bf16 [P, H] x [H, 2I] then [P, I] x [I, H] (P = T*k): same FLOPs, no grouping."""
    P = T * K
    a = torch.randn(P, H, device="cuda").to(DTYPE)
    b = torch.randn(2 * I, H, device="cuda").to(DTYPE)
    c = torch.randn(P, I, device="cuda").to(DTYPE)
    d = torch.randn(H, I, device="cuda").to(DTYPE)
    return time_graph([lambda: (a @ b.t(), c @ d.t())], replays=10).median_us


def prefill_details(W, T, sets, us_by_impl, report):
    """Experts alone (router outside the timing): each tile config and torch's grouped_mm path."""
    routes = [ref.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS) for h, _ in sets]
    row = dict(tokens=T, block=us_by_impl, dense_us=dense_same_shape_us(T))
    experts = {}
    calls = {
        "grouped_mm": lambda s, r: ref.moe_experts(s[1], r[1], r[0], W["gate_up"], W["down"]),
    }
    if moe_ops.prefill_device_ok(sets[0][1].device):
        for tile, label in ((0, "auto"), (1, "coop128x256"), (2, "pingpong64x256")):
            calls["il_" + label] = lambda s, r, tile=tile: torch.ops.gemma4x.moe_experts_prefill(
                s[1], r[1], r[0], W["gate_up_il"], W["down"], tile, True, 0)
        for tile, label in ((0, "auto"), (1, "coop128x256"), (2, "pingpong64x256")):
            calls["hf_" + label] = lambda s, r, tile=tile: torch.ops.gemma4x.moe_experts_prefill(
                s[1], r[1], r[0], W["gate_up"], W["down"], tile, False, 0)
        calls["hf_auto_multiprep"] = lambda s, r: torch.ops.gemma4x.moe_experts_prefill(
            s[1], r[1], r[0], W["gate_up"], W["down"], 0, False, 2)
        if T * K <= moe_ops.FUSED_PREP_MAX_PAIRS:
            calls["il_auto_multiprep"] = lambda s, r: torch.ops.gemma4x.moe_experts_prefill(
                s[1], r[1], r[0], W["gate_up_il"], W["down"], 0, True, 2)
            calls["il_auto_fusedprep"] = lambda s, r: torch.ops.gemma4x.moe_experts_prefill(
                s[1], r[1], r[0], W["gate_up_il"], W["down"], 0, True, 1)
    for label, call in calls.items():
        experts[label] = time_graph([lambda s=s, r=r, call=call: call(s, r) for s, r in zip(sets, routes)],
                                    replays=10).median_us
    if "il_auto" in calls:  # the epilogue's gelu with tanh.approx.f32 (benchmark knob, not HF's rounding)
        tune = extension().moe_prefill.moe_prefill_tuning
        tune(gelu_approx=True)
        try:
            experts["il_auto_gelu_approx"] = time_graph(
                [lambda s=s, r=r: calls["il_auto"](s, r) for s, r in zip(sets, routes)], replays=10).median_us
        finally:
            tune(gelu_approx=False)
    row["experts_us"] = experts
    row["router_us"] = time_graph([lambda s=s: ops.moe_router(s[0], W["proj"], W["scale"], W["pes"], K, EPS)
                                   for s in sets], replays=10).median_us
    if "il_coop128x256" in calls:  # where the prefill time goes (eager, profiler)
        try:
            per_kernel = {}
            for il, tile, approx in ((True, 0, False), (True, 1, False), (True, 2, False), (False, 0, False),
                                     (True, 0, True)):
                s, r = sets[0], routes[0]
                gu = W["gate_up_il"] if il else W["gate_up"]
                extension().moe_prefill.moe_prefill_tuning(gelu_approx=approx)
                try:
                    kernels = device_kernels(lambda s=s, r=r, tile=tile, gu=gu, il=il:
                                             torch.ops.gemma4x.moe_experts_prefill(
                                                 s[1], r[1], r[0], gu, W["down"], tile, il, 0))
                finally:
                    extension().moe_prefill.moe_prefill_tuning(gelu_approx=False)
                for name, t in kernels:
                    short = name.split("<")[0].split("(")[0].split("::")[-1]
                    if "device_kernel" in short:  # CUTLASS: name the schedule and epilogue
                        short = ("gemm_pingpong" if "Pingpong" in name else "gemm_coop") + (
                            "_geglu" if "Geglu" in name else "")
                    tag = f"{'il' if il else 'hf'}_t{tile}{'_approx' if approx else ''}"
                    per_kernel.setdefault(f"{tag}:{short}", []).append(t)
            row["kernels_us"] = {k: [round(x, 1) for x in v] for k, v in per_kernel.items()}
        except Exception as exc:
            row["kernels_us"] = {"unavailable": str(exc)}
    report.add(impl="prefill_details", **row)
    return row


def print_prefill_table(rows, report):
    dense_peak = matmul_tflops()
    report.ceilings["matmul_8192_TFLOPs"] = dense_peak
    print(f"\nprefill (T*k > 64): expert TFLOP/s = 6*T*k*H*I / time; 8192^3 bf16 matmul {dense_peak:.0f} TFLOP/s")
    head = ["block gemma4x", "block gemma4x_before", "block grouped_mm", "block loop", "dense same FLOPs"]
    print(f"{'tokens':>6} | " + " | ".join(f"{h:>22}" for h in head))
    for r in rows:
        f = expert_flops(r["tokens"])
        cells = []
        for name in ("gemma4x", "gemma4x_before", "reference", "torch_loop"):
            us, launches = r["block"].get(name, (float("nan"), -1))
            cells.append(f"{us:9.1f}us {f / (us * 1e-6) / 1e12:5.0f}TF L{launches:<2d}")
        cells.append(f"{r['dense_us']:9.1f}us {f / (r['dense_us'] * 1e-6) / 1e12:5.0f}TF    ")
        print(f"{r['tokens']:>6} | " + " | ".join(f"{c:>22}" for c in cells))
    print("experts only (router excluded; gemma4x router alone in the last column):")
    for r in rows:
        f = expert_flops(r["tokens"])
        print(f"{r['tokens']:>6} | " + " | ".join(
            f"{k} {v:8.1f}us {f / (v * 1e-6) / 1e12:4.0f}TF" for k, v in r["experts_us"].items())
            + f" | router {r['router_us']:.1f}us")
        if "kernels_us" in r:
            print("       kernels: " + ", ".join(f"{k} {v}" for k, v in r["kernels_us"].items()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096, 16384])
    p.add_argument("--loop-max-tokens", type=int, default=512, help="largest T timed with the per-expert torch loop")
    p.add_argument("--impls", nargs="+",
                   default=["gemma4x", "gemma4x_before", "gemma4x_stream", "reference", "torch_loop"])
    p.add_argument("--router-tokens", type=int, nargs="*", default=[8, 16, 32, 48, 64, 128, 256, 512])
    p.add_argument("--tag", default="")
    args = p.parse_args()

    report = Report("bench_moe" + args.tag)
    copy_gbs = copy_bandwidth_gbs()
    report.ceilings["copy_GBps"] = copy_gbs
    report.ceilings["torch_topk_lower_index_first"] = topk_tie_order()
    print(f"device: {report.device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write); "
          f"torch.topk ties lower index first: {report.ceilings['torch_topk_lower_index_first']}")
    W = add_interleaved(make_weights())
    impls = {"gemma4x": block_gemma4x, "gemma4x_before": block_gemma4x_before, "gemma4x_stream": block_gemma4x_stream,
             "reference": block_reference, "torch_loop": block_torch_loop}
    impls = {k: v for k, v in impls.items() if k in args.impls}

    print(f"{'tokens':>6} {'experts':>7} {'MB':>7} | " + " | ".join(f"{k:>30}" for k in impls))
    prefill_rows = []
    for T in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        n_sets = 8 if T <= 64 else 2  # different tokens route to different experts: no L2 reuse
        sets = [
            (torch.randn(T, H, generator=g, device="cuda").to(DTYPE) * 2, torch.randn(T, H, generator=g, device="cuda").to(DTYPE))
            for _ in range(n_sets)
        ]
        used = []
        for h, _ in sets:
            _, idx = ref.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS)
            used.append(idx.unique().numel())
        nbytes = statistics.mean(used) * EXPERT_BYTES + ROUTER_BYTES
        expected = block_reference(W, *sets[0])
        cells = []
        us_by_impl = {}
        for name, fn in impls.items():
            if name in ("gemma4x_stream", "gemma4x_before") and (T * K > 64) == (name == "gemma4x_stream"):
                cells.append(f"{'(same as gemma4x)':>30}")
                continue
            if name == "torch_loop" and T > args.loop_max_tokens:
                cells.append(f"{'(skipped)':>30}")
                continue
            out = fn(W, *sets[0])
            err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
            if name == "torch_loop":
                us = time_eager(lambda h, x, fn=fn: fn(W, h, x), sets)
                launches = -1
            else:
                inner = 4 if T <= 64 else 1
                us = time_graph([lambda s=s, fn=fn: fn(W, *s) for s in sets], inner=inner, replays=20).median_us
                launches = launches_per_call(lambda fn=fn: fn(W, *sets[0]))
            tbs = nbytes / (us * 1e-6) / 1e12
            us_by_impl[name] = (us, launches)
            report.add(impl=name, tokens=T, experts_used=statistics.mean(used), weight_MB=nbytes / 1e6, us=us,
                       TBps=tbs, pct_copy=100 * tbs * 1e3 / copy_gbs, launches=launches, rel_err_vs_ref=err,
                       expert_TFLOPs=expert_flops(T) / (us * 1e-6) / 1e12)
            cells.append(f"{us:8.1f}us {tbs:5.2f}TB/s {100 * tbs * 1e3 / copy_gbs:3.0f}% L{launches:<3d}")
        print(f"{T:>6} {statistics.mean(used):>7.1f} {nbytes / 1e6:>7.1f} | " + " | ".join(f"{c:>30}" for c in cells),
              flush=True)
        for variant in ("split", "stream"):
            if "gemma4x" not in impls or T * K > 64:  # where the decode time goes
                break
            moe_ops.DECODE_KERNEL = variant
            h, x = sets[0]
            w, idx = ops.moe_router(h, W["proj"], W["scale"], W["pes"], K, EPS)
            t_router = time_graph([lambda s=s: ops.moe_router(s[0], W["proj"], W["scale"], W["pes"], K, EPS)
                                   for s in sets], inner=4, replays=20).median_us
            routes = [ops.moe_router(s[0], W["proj"], W["scale"], W["pes"], K, EPS) for s in sets]
            t_experts = time_graph([lambda s=s, r=r: ops.moe_experts(s[1], r[1], r[0], W["gate_up"], W["down"])
                                    for s, r in zip(sets, routes)], inner=4, replays=20).median_us
            try:  # eager, one kernel at a time (no PDL overlap): where each kernel's time goes
                per_kernel = {}
                for i, s in enumerate(sets):
                    for name, t in device_kernels(lambda s=s: block_gemma4x_hf(W, *s)):  # DECODE_KERNEL = variant
                        short = name.split("<")[0].split("(")[0].split("::")[-1]
                        per_kernel.setdefault(short, []).append(t)
                per_kernel = {k: statistics.median(v) for k, v in per_kernel.items()}
            except Exception as exc:
                per_kernel = {"unavailable": str(exc)}
            moe_ops.DECODE_KERNEL = "auto"
            report.add(impl=f"gemma4x_parts_{variant}", tokens=T, router_us=t_router, experts_us=t_experts,
                       experts_TBps=(nbytes - ROUTER_BYTES) / (t_experts * 1e-6) / 1e12, eager_kernels_us=per_kernel)
            print(f"{'':>6} {variant} parts: router {t_router:.1f} us, experts {t_experts:.1f} us "
                  f"({(nbytes - ROUTER_BYTES) / (t_experts * 1e-6) / 1e12:.2f} TB/s); eager kernels: "
                  + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in per_kernel.items()),
                  flush=True)
        if T * K > 64:
            prefill_rows.append(prefill_details(W, T, sets, us_by_impl, report))
    if prefill_rows:
        print_prefill_table(prefill_rows, report)
    if args.router_tokens:
        router_crossover(W, args.router_tokens, report)
    print("wrote", report.write())


def router_crossover(W, tokens, report):
    """Fused one-launch router against the many-token router (rows kernel, cuBLAS GEMM, top-k)."""
    print(f"\nrouter (E={E}, k={K}, H={H}): fused vs many-token, us; ROUTER_FUSED_MAX_TOKENS = "
          f"{moe_ops.ROUTER_FUSED_MAX_TOKENS}")
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(100 + T)
        hs = [torch.randn(T, H, generator=g, device="cuda").to(DTYPE) * 2 for _ in range(2)]
        times = {}
        for name in ("moe_router", "moe_router_many"):
            op = getattr(torch.ops.gemma4x, name)
            times[name] = time_graph([lambda h=h, op=op: op(h, W["proj"], W["scale"], W["pes"], K, EPS) for h in hs],
                                     inner=4, replays=20).median_us
        report.add(impl="router_crossover", tokens=T, fused_us=times["moe_router"], many_us=times["moe_router_many"])
        print(f"{T:>6} | fused {times['moe_router']:7.1f} us | many-token {times['moe_router_many']:7.1f} us")


if __name__ == "__main__":
    main()

"""Benchmark of the sm_90a prefill / vision attention kernel against torch SDPA and FlexAttention.

Vision tower first, then text layers (one sequence of L tokens, bf16): head dim 512 with 16 query / 2 KV heads (full
layers of the large models) and head dim 256 with 16 / 8 (sliding layers), at L = 1k, 8k, 32k,
for three masks: causal; sliding window 1024 (window_left = 1023); sliding window 1024 with image
blocks (bidirectional inside each image: 280-token images every 2k tokens and one 2000-token image,
longer than the window). Vision tower: head dim 72 with 16 heads (26B-A4B / 31B) and head dim 64
with 12 heads (E2B / E4B), bidirectional, one image of 1k / 2.3k / 4k patches and 8 images of 1k
packed in one launch (SDPA runs those as a batch of 8).

TFLOP/s count only allowed (query, key) pairs: 4 * pairs * d * nH. Every row is a CUDA-graph
replay median in one process, beside the measured bf16 matmul ceiling. Baselines: each SDPA
backend that accepts the shape (flash: causal / no mask only, head dim <= 256; cuDNN; efficient;
math except at 32k), K/V pre-expanded to the query heads (outside the timing); FlexAttention
compiled (block sizes hand-set for head dim 512), skipped when it fails to compile.

    python bench/ops/bench_attention_prefill.py [--quick] [--no-flex]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.harness import Report, matmul_tflops, time_graph, warm_up_gpu  # noqa: E402
from gemma4x import ops  # noqa: E402
from gemma4x.ops import attention as ops_attn  # noqa: E402
from gemma4x.reference.attention import attention_mask  # noqa: E402
from gemma4x.reference.attention_varlen import block_ids_from_ranges  # noqa: E402

DT = torch.bfloat16
WINDOW = 1024


def image_ranges(L: int) -> list[tuple[int, int]]:
    """280-token images every 2048 tokens, and one 2000-token image (longer than the window) from L/2."""
    ranges = []
    big = (L // 2, L // 2 + 2000) if L >= 4096 else None
    for s in range(100, L - 280, 2048):
        if big and s + 280 > big[0] - 10 and s < big[1] + 10:
            continue
        ranges.append((s, s + 280))
    if big:
        ranges.append(big)
    return ranges


def allowed_pairs(L: int, wl, wr, blocks) -> int:
    """Exact count of allowed (query, key) pairs, in row chunks (the 32k mask is 1 G entries)."""
    pos = torch.arange(L, device="cuda")
    total = 0
    for r0 in range(0, L, 4096):
        r1 = min(L, r0 + 4096)
        qb = None if blocks is None else blocks[r0:r1]
        m = attention_mask(pos[r0:r1], pos, wl, wr, qb, blocks)
        total += int(m.sum())
    return total


def sdpa_fn(backend, q, k, v, mask, is_causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]  # fmt: skip

    def run():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0)

    return run


def flex_fn(q, k, v, wl, wr, blocks, d):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = q.shape[2]
    bl = blocks if blocks is not None else torch.full((L,), -1, device="cuda", dtype=torch.int32)

    def mask_mod(b, h, qi, ki):
        left = (qi - ki <= wl) if wl is not None else (qi >= 0)
        right = (ki - qi <= wr) if wr is not None else (qi >= 0)
        same = (bl[qi] == bl[ki]) & (bl[qi] >= 0)
        return left & (right | same)

    bm = create_block_mask(mask_mod, None, None, L, L, device="cuda")
    opts = {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1, "num_warps": 4} if d > 256 else None
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]

    def run():
        return compiled(q, k, v, block_mask=bm, scale=1.0, enable_gqa=gqa, kernel_options=opts)

    run()  # compile outside the timing
    return run


def timed(fn, replays):
    try:
        return time_graph([fn], replays=replays).median_us
    except Exception as exc:  # a backend that rejects the shape / mask
        msg = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else type(exc).__name__
        return msg


def bench_case(rep, name, q, k, v, cu, wl, wr, blocks, d, nH, pairs, args, t_start):
    L = q.shape[0]
    replays = 20 if L <= 4096 else (10 if L <= 8192 else 4)
    tflop = 4 * pairs * d * nH / 1e12
    row = dict(case=name, L=L, d=d, heads=nH, kv_heads=k.shape[1], pairs=pairs, tflop=tflop)
    for be in ops_attn.BACKENDS:
        if args.backends and be not in args.backends:
            continue
        if (d == 72 and be.startswith("wgmma")) or (d == 512 and be.endswith("_m64")):
            continue  # the same kernel as another backend
        if d in (256, 512) and be in ops_attn.SMALL_ONLY:
            continue  # these bits only change head dims 64/72
        fn = lambda be=be: ops.attention_varlen(q, k, v, cu, cu, window_left=wl, window_right=wr,  # noqa: E731
                                                q_block=blocks, k_block=blocks, backend=be, check_offsets=False)
        row[f"gemma4x_{be}"] = timed(fn, replays)
    # SDPA, [1, nH, L, d] with K/V expanded to nH heads (not timed).
    qs = q.transpose(0, 1)[None]
    g = nH // k.shape[1]
    ks = k.transpose(0, 1)[None].repeat_interleave(g, 1)
    vs = v.transpose(0, 1)[None].repeat_interleave(g, 1)
    plain = blocks is None and wl is None
    mask = None
    if not plain:
        pos = torch.arange(L, device="cuda")
        mask = attention_mask(pos, pos, wl, wr, blocks, blocks)
    for be in ("flash", "cudnn", "efficient", "math"):
        if args.no_sdpa:
            break
        if be == "math" and L > 8192:
            row["sdpa_math"] = "skipped (too slow)"
            continue
        if be == "flash" and not plain:
            row["sdpa_flash"] = "no mask support"
            continue
        row[f"sdpa_{be}"] = timed(sdpa_fn(be, qs, ks, vs, mask, plain and wr == 0), replays)
    del mask
    if args.no_flex or (L > 8192 and not args.flex_32k) or time.time() - t_start > args.flex_budget_s:
        row["flex"] = "skipped"
    else:
        try:
            qf, kf, vf = qs, k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            row["flex"] = timed(flex_fn(qf, kf, vf, wl, wr, blocks, d), replays)
        except Exception as exc:
            row["flex"] = ("failed: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0])[:90]
    rep.add(**row)
    rep.write()  # after every row: a run stopped at its time limit keeps what it measured
    cells = []
    for key in [c for c in row if c.startswith(("gemma4x", "sdpa", "flex"))]:
        val = row[key]
        cells.append(f"{key}={val:.0f}us/{tflop / (val * 1e-6):.0f}TF" if isinstance(val, float) else f"{key}={val}")
    print(f"{name:<22} L={L:<6} d={d:<3} {nH}/{k.shape[1]}  " + "  ".join(cells), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1k and 8k only")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-32k", action="store_true")
    ap.add_argument("--flex-budget-s", type=float, default=120.0, help="stop compiling FlexAttention after this")
    ap.add_argument("--backends", type=lambda s: s.split(","), default=None, help="gemma4x backends to time (all)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baselines")
    ap.add_argument("--no-vision", action="store_true", help="text cases only")
    ap.add_argument("--vision-only", action="store_true", help="vision cases only")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = 256  # one FlexAttention compile per (shape, mask)
    dynamo.config.cache_size_limit = 256
    rep = Report("bench_attention_prefill")
    warm_up_gpu()
    rep.ceilings["matmul_tflops"] = mm = matmul_tflops()
    print(f"device {rep.device}; bf16 matmul ceiling {mm:.0f} TFLOP/s", flush=True)
    t_start = time.time()
    for (d, nH), (n_img, L) in [] if args.no_vision else [
        (dh, nl) for dh in ((72, 16), (64, 12)) for nl in ((1, 1024), (1, 2304), (1, 4096), (8, 1024))
    ]:
        T = n_img * L
        q = torch.randn(T, nH, d, device="cuda").to(DT) * 0.3
        k = torch.randn(T, nH, d, device="cuda").to(DT) * 0.3
        v = torch.randn(T, nH, d, device="cuda").to(DT)
        cu = torch.arange(0, T + 1, L, device="cuda", dtype=torch.int32)
        if n_img == 1:
            bench_case(rep, "vision", q, k, v, cu, None, None, None, d, nH, L * L, args, t_start)
        else:  # packed images: the kernel runs them in one launch, SDPA as a batch of n_img
            tflop = 4 * n_img * L * L * d * nH / 1e12
            row, cells = dict(case=f"vision x{n_img}", L=L, d=d, heads=nH, tflop=tflop), []
            for be in ops_attn.BACKENDS:
                if (args.backends and be not in args.backends) or (d == 72 and be.startswith("wgmma")):
                    continue
                def fn(be=be, q=q, k=k, v=v, cu=cu):
                    return ops.attention_varlen(q, k, v, cu, cu, window_left=None, window_right=None, backend=be,
                                                check_offsets=False)  # fmt: skip
                row[f"gemma4x_{be}"] = timed(fn, 20)
            qs, ks, vs = (t.view(n_img, L, nH, d).transpose(1, 2) for t in (q, k, v))
            for be in () if args.no_sdpa else ("flash", "cudnn", "efficient"):
                row[f"sdpa_{be}"] = timed(sdpa_fn(be, qs, ks, vs, None, False), 20)
            for key, t in row.items():
                if key.startswith(("gemma4x", "sdpa")):
                    cells.append(f"{key}=" + (f"{t:.0f}us/{tflop / (t * 1e-6):.0f}TF" if isinstance(t, float) else t))
            rep.add(**row)
            rep.write()
            print(f"vision x{n_img:<14} L={L:<6} d={d:<3} {nH}/{nH}  " + "  ".join(cells), flush=True)
    if args.vision_only:
        print("json:", rep.write())
        return
    lengths = args.lengths or ([1024, 8192] if args.quick else [1024, 8192, 32768])
    for L in lengths:
        for d, nH, nKV in ((512, 16, 2), (256, 16, 8)):
            q = (torch.randn(L, nH, d, device="cuda") * d**-0.25).to(DT)
            k = (torch.randn(L, nKV, d, device="cuda") * d**-0.25).to(DT)
            v = torch.randn(L, nKV, d, device="cuda").to(DT)
            cu = torch.tensor([0, L], device="cuda", dtype=torch.int32)
            blocks = block_ids_from_ranges(L, image_ranges(L)).to("cuda", torch.int32)
            for name, wl, bl in (("causal", None, None), ("window1024", WINDOW - 1, None),
                                 ("window1024+images", WINDOW - 1, blocks)):  # fmt: skip
                pairs = allowed_pairs(L, wl, 0, bl)
                bench_case(rep, name, q, k, v, cu, wl, 0, bl, d, nH, pairs, args, t_start)
            del q, k, v
            torch.cuda.empty_cache()
    print("json:", rep.write())


if __name__ == "__main__":
    main()

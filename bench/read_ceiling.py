"""Read-only bandwidth ceiling at a given size (GPU only): what one kernel can stream.

The copy ceiling of bench/harness.py is measured on 2 GiB, where launch and ramp costs vanish.
A decode step reads far less (33.6 MB at batch 1, 8k context, Gemma 4 26B full layer), and a
single kernel that reads that much pays its own launch, first-byte latency and tail. This times
a Triton kernel that reads ``nbytes`` once (int32 loads, a sum per program written out so the
loads are kept), inside a CUDA graph over rotated buffers (harness.time_graph), for several
grid shapes, and returns the fastest: the best a one-kernel read of that size did here.
"""

from __future__ import annotations

import torch

from bench.harness import sets_to_rotate, time_graph

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the GPU image has Triton
    triton = None

if triton is not None:

    @triton.jit
    def _read_kernel(x_ptr, out_ptr, n, iters, BLOCK: tl.constexpr, CONTIG: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(iters):
            if CONTIG:  # program p reads blocks p * iters .. p * iters + iters - 1 (as a split-KV CTA)
                blk = pid * iters + i
            else:  # block-cyclic: program p reads blocks p, p + nprog, ...
                blk = i * nprog + pid
            offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0, cache_modifier=".cg")
        tl.store(out_ptr + pid, tl.sum(acc))


def read_time_us(nbytes: int, *, verbose: bool = False) -> tuple[float, str]:
    """Fastest median µs of one read of ``nbytes`` over the grid shapes tried, and that shape.

    Also tried: a device copy (``copy_``) of nbytes / 2, which moves nbytes in all.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n = nbytes // 4
    n_sets = sets_to_rotate(nbytes)
    bufs = [torch.randint(0, 1 << 20, (n,), dtype=torch.int32, device="cuda") for _ in range(n_sets)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = (float("inf"), "")

    def consider(t, shape):
        nonlocal best
        if verbose:
            print(f"  read {nbytes / 1e6:8.1f} MB: {t:8.1f} us {nbytes / t / 1e6:5.2f} TB/s  ({shape})", flush=True)
        if t < best[0]:
            best = (t, shape)

    for block, warps in ((4096, 8), (8192, 8)):
        blocks = -(-n // block)
        for contig in (False, True):
            for per_sm in (2, 4, 8, 0):  # 0: one block per program (no loop)
                if contig and per_sm == 0:
                    continue
                nprog = blocks if per_sm == 0 else min(blocks, sms * per_sm)
                iters = -(-blocks // nprog)
                nprog = -(-blocks // iters)
                out = torch.empty(nprog, dtype=torch.int32, device="cuda")

                def call(x, out=out, nprog=nprog, iters=iters, block=block, warps=warps, contig=contig):
                    _read_kernel[(nprog,)](x, out, n, iters, BLOCK=block, CONTIG=contig, num_warps=warps)

                t = time_graph([lambda x=x: call(x) for x in bufs], replays=20).median_us
                order = "contiguous" if contig else "cyclic"
                consider(t, f"Triton, {block * 4 // 1024} KB blocks x {nprog} programs, {order}")
    halves = [(b[: n // 2], b[n // 2 : 2 * (n // 2)]) for b in bufs]
    t = time_graph([lambda h=h: h[1].copy_(h[0]) for h in halves], replays=20).median_us
    consider(t, "copy_ of half the bytes")
    del bufs, halves
    torch.cuda.empty_cache()
    return best

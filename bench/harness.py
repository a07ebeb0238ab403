"""Timing harness shared by the benchmarks (GPU only).

- Each measured call runs inside a CUDA graph that replays it over several input sets in turn,
  so launch overhead is the graph's (as in a real decode step) and, for sizes that fit, the
  rotation across sets larger than the L2 keeps the timing honest about DRAM traffic.
- Medians over repeated replays; a warm-up replay first.
- Ceilings measured in the same process: device-to-device copy bandwidth (bytes read + written)
  and a large bf16 matmul.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    samples: int


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def sets_to_rotate(bytes_per_set: int, max_sets: int = 64) -> int:
    """Enough input sets that one pass over them is at least 3x the L2."""
    return int(max(1, min(max_sets, -(-3 * l2_bytes() // max(bytes_per_set, 1)))))


def time_graph(calls: Sequence[Callable[[], object]], *, replays: int = 30, inner: int = 1) -> Timing:
    """Median time of one call, from a CUDA graph holding ``calls`` repeated ``inner`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up outside capture (lazy init, autotuning)
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            for c in calls:
                c()
    per_replay = len(calls) * inner
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / per_replay)
    samples.sort()
    return Timing(
        median_us=statistics.median(samples),
        p10_us=samples[len(samples) // 10],
        p90_us=samples[(len(samples) * 9) // 10],
        samples=len(samples),
    )


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Run matmuls until the clocks have left idle (an idle H200 sits at 345 MHz)."""
    import time

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    warm_up_gpu()
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    # cudaMemcpy (copy_) and an SM elementwise kernel (mul) can differ; the ceiling is the faster.
    t_copy = time_graph([lambda: dst.copy_(src)], replays=20)
    t_kernel = time_graph([lambda: torch.mul(src, 1.0, out=dst)], replays=20)
    return 2 * nbytes / (min(t_copy.median_us, t_kernel.median_us) * 1e-6) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_graph([lambda: a @ b], replays=10)
    return 2 * n**3 / (t.median_us * 1e-6) / 1e12


@dataclass
class Report:
    bench: str
    device: str = field(default_factory=lambda: torch.cuda.get_device_name(0))
    torch_version: str = torch.__version__
    ceilings: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)

    def add(self, **row):
        self.rows.append(row)

    def write(self, path: str | None = None):
        path = path or os.path.join(os.environ.get("OUT", "bench/out"), f"{self.bench}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)
        return path

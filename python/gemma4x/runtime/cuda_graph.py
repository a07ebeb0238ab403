"""CUDA-graph replay of the decode forward, one graph per batch-size bucket.

A decode step launches a few hundred small kernels; replaying them from a graph removes
the per-kernel CPU cost. Each graph covers the first ``bucket`` cache slots with static
inputs (token, position per row) and a static fp32 logits output; all graphs share one
memory pool. Rows past the real batch are padding: they decode token 0 at position 0 into
slots no live sequence of the call uses (a later prefill overwrites and forgets those
entries). Attention reads the cache in place (``ops.attention_decode``) and takes each
sequence's length from its position on the device, so one graph serves every length and a
step reads only the rows its sequences can see; ``kv_len = max_seq_len`` only sizes the
split-KV launch.

Graphs are captured up front, when no sequence lives in the cache: warm-up and capture
runs write garbage there, which the first prefill of each slot overwrites.
"""

from __future__ import annotations

import torch

from gemma4x.runtime.kv_cache import KVCache


def _buckets(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch_size]


class CudaGraphDecoder:
    def __init__(self, model, cache: KVCache, *, max_batch_size: int, max_seq_len: int, warmup: int = 2):
        self.model = model
        self.cache = cache
        self.max_seq_len = max_seq_len
        self.buckets = _buckets(max_batch_size)
        device = cache.device
        n = self.buckets[-1]
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=device)
        # Pinned staging, so the per-step host->device input copy does not block.
        self._ids_host = torch.zeros(n, 1, dtype=torch.long, pin_memory=True)
        self._pos_host = torch.zeros(n, 1, dtype=torch.long, pin_memory=True)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        # Largest first: smaller graphs then fit in the memory the pool already holds.
        for b in reversed(self.buckets):
            self.graphs[b] = self._capture(b, pool, warmup)

    def _forward(self, b: int) -> torch.Tensor:
        view = self.cache.decode_view(b, kv_len=self.max_seq_len)
        h = self.model(self.ids[:b], self.pos[:b], view)
        return self.model.compute_logits(h[:, -1])

    @torch.inference_mode()
    def _capture(self, b: int, pool, warmup: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._forward(b)
        return graph, logits

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits ``[B, V]`` for rows 0..B-1 (slot i holds row i); valid until the next call."""
        B = len(tokens)
        b = next(x for x in self.buckets if x >= B)
        self._ids_host.zero_()
        self._pos_host.zero_()
        self._ids_host[:B, 0] = torch.tensor(tokens)
        self._pos_host[:B, 0] = torch.tensor(positions)
        # Safe to refill the staging buffers next step: the caller syncs on the sampled
        # tokens (.tolist()) after every replay, so this copy has finished by then.
        self.ids[:b].copy_(self._ids_host[:b], non_blocking=True)
        self.pos[:b].copy_(self._pos_host[:b], non_blocking=True)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:B]

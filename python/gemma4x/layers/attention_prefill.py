"""Routes prompt prefill attention to the sm_90a varlen kernel, everything else to the given op.

``with_prefill_kernel(ns)`` returns ``ns`` with its ``attention`` wrapped. The wrapper takes the
kernel path (:func:`gemma4x.ops.attention.attention_varlen`) when

- the queries are the prompt's own keys: ``k_pos is positions`` (``NoCache``, the KV cache's
  ``_PrefillView`` and KV-shared reuse layers all hand back the prompt's ``positions`` object)
  and ``Tq == Tk > 1``; the runtime's prefill positions are consecutive (``arange``), so the
  kernel's implicit positions give the same mask;
- the GPU is compute capability 9.0 (H100/H200), the extension has the sm_90a kernel, and the
  dtype / head dim are supported (bf16/fp16, head dim 256 or 512 for text layers).

Decode steps (``Tq == 1``), cached prefixes served by the KV cache views and every other GPU
keep the wrapped op (torch SDPA with an explicit mask), so non-SM90 GPUs fall back to SDPA.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def _prefill_kernel_applies(q: torch.Tensor, K: torch.Tensor, positions: torch.Tensor, k_pos: torch.Tensor) -> bool:
    if k_pos is not positions or q.dim() != 4 or K.dim() != 4:
        return False
    B, T, nH, _ = q.shape
    if T < 2 or K.shape[1] != T or K.shape[0] != B or nH % K.shape[2] != 0:
        return False
    from gemma4x.ops.attention import kernel_supported

    return kernel_supported(q[0])


def prefill_attention(fallback):
    """``attention(q, K, V, positions, k_pos, *, window_left, window_right, scale)`` with the prefill kernel."""

    def attention(q, K, V, positions, k_pos, *, window_left=None, window_right=0, scale=1.0):
        if not _prefill_kernel_applies(q, K, positions, k_pos):
            return fallback(q, K, V, positions, k_pos, window_left=window_left, window_right=window_right, scale=scale)
        from gemma4x.ops.attention import attention_varlen

        B, T, nH, d = q.shape
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        out = attention_varlen(
            q.reshape(B * T, nH, d), K.reshape(B * T, K.shape[2], d), V.reshape(B * T, V.shape[2], d), cu, cu,
            window_left=window_left, window_right=window_right, scale=scale, check_offsets=False,
        )  # fmt: skip
        return out.view(B, T, nH, d)

    attention.__wrapped__ = fallback
    return attention


def with_prefill_kernel(ns: SimpleNamespace) -> SimpleNamespace:
    """A copy of op namespace ``ns`` whose ``attention`` sends prompt prefill to the varlen kernel."""
    return SimpleNamespace(**{**vars(ns), "attention": prefill_attention(ns.attention)})

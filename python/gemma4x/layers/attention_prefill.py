"""Routes prompt prefill attention (tokens over themselves) to the sm_90a varlen kernel.

``with_prefill_kernel(ns)`` returns ``ns`` with its ``self_attention`` wrapped. The model calls
``self_attention`` only for :class:`~gemma4x.layers.attention.SelfKV` keys: the queries' own
tokens, row for row, at consecutive positions (the runtime's prompt positions are an ``arange``),
so the kernel's implicit positions give the same mask. The wrapper takes the kernel path
(:func:`gemma4x.ops.attention.attention_varlen`) when

- ``T > 1`` tokens and the K/V rows match the queries' (``Tq == Tk``, GQA group divides the heads);
- the GPU is compute capability 9.0 (H100/H200), the extension has the sm_90a kernel, and the
  dtype / head dim are supported (bf16/fp16, head dim 256 or 512 for text layers).

Everything else keeps the wrapped op (torch SDPA with an explicit mask), so non-SM90 GPUs fall
back to SDPA. Decode steps and cached prefixes never come here: they are not ``SelfKV``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def _prefill_kernel_applies(q: torch.Tensor, K: torch.Tensor) -> bool:
    if q.dim() != 4 or K.dim() != 4:
        return False
    B, T, nH, _ = q.shape
    if T < 2 or K.shape[1] != T or K.shape[0] != B or nH % K.shape[2] != 0:
        return False
    from gemma4x.ops.attention import kernel_supported

    return kernel_supported(q[0])


def prefill_self_attention(fallback):
    """``self_attention(q, K, V, positions, *, window_left, window_right, scale)`` with the prefill kernel."""

    def self_attention(q, K, V, positions, *, window_left=None, window_right=0, scale=1.0):
        if not _prefill_kernel_applies(q, K):
            return fallback(q, K, V, positions, window_left=window_left, window_right=window_right, scale=scale)
        from gemma4x.ops.attention import attention_varlen

        B, T, nH, d = q.shape
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        out = attention_varlen(
            q.reshape(B * T, nH, d), K.reshape(B * T, K.shape[2], d), V.reshape(B * T, V.shape[2], d), cu, cu,
            window_left=window_left, window_right=window_right, scale=scale, check_offsets=False,
        )  # fmt: skip
        return out.view(B, T, nH, d)

    self_attention.__wrapped__ = fallback
    return self_attention


def with_prefill_kernel(ns: SimpleNamespace) -> SimpleNamespace:
    """A copy of op namespace ``ns`` whose ``self_attention`` sends prompt prefill to the varlen kernel."""
    return SimpleNamespace(**{**vars(ns), "self_attention": prefill_self_attention(ns.self_attention)})

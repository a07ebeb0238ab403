"""Gemma 4 self-attention (spec §2.5).

::

    q = rope(q_norm(x @ Wq^T))                              # [B, T, nH, d]
    k = rope(k_norm(x @ Wk^T));  v = v_norm(x @ Wv^T)       # v_norm has no weight
        (attention_k_eq_v on full layers: no Wv, v = v_norm(x @ Wk^T), the raw K projection)
    keys = kv.update(layer, k, v, positions)                # cache write + visible history
        (KV-shared "reuse" layers: no k/v at all; keys = the producer's, same forward)
    o = softmax_fp32(q K^T * 1.0 + mask) V  ->  @ Wo^T      # mask from positions and window

The cache is behind ``KVStore``: the model never knows whether keys come from a ring
buffer, a dense slab or the current tokens only. ``keys`` is one of
- :class:`SelfKV`: the tokens attend over themselves (a prompt with nothing older, or no cache):
  ``ops.self_attention``, which the CUDA namespace sends to the prefill kernel;
- a plain ``(K, V, k_pos)`` (keys beyond the queries' own): ``ops.attention``;
- :class:`CachedKV`, a decode step's handle on the cache itself, which ``ops.attention_decode``
  reads in place up to each sequence's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import nn

from gemma4x.config import TextConfig
from gemma4x.layers.dispatch import ops_for
from gemma4x.layers.linear import FusedLinear, make_linear
from gemma4x.layers.norm import RMSNorm
from gemma4x.reference.attention_decode import dense_kv


@dataclass(frozen=True)
class CachedKV:
    """One layer's KV cache as a decode step sees it, read in place by ``ops.attention_decode``.

    ``k``, ``v``: ``[num_slots, R, nKV, d]``; ``ring_pos``: ``[num_slots, R]`` positions of a
    ring (sliding) layer's rows, or None for a full layer (row = position); ``slots``: ``[B]``
    cache slot of each row of the batch, or None for slots ``0..B-1``; ``kv_len``: a host-side
    bound on ``max(position) + 1`` (a CUDA graph passes the capacity: the kernel takes each
    sequence's true length from its positions on the device).
    """

    k: torch.Tensor
    v: torch.Tensor
    ring_pos: torch.Tensor | None
    slots: torch.Tensor | None
    kv_len: int

    def dense(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same keys as a plain ``(K, V, k_pos)`` (the first ``kv_len`` rows of full layers)."""
        return dense_kv(self.k, self.v, positions, self.slots, self.ring_pos, self.kv_len)


class SelfKV(NamedTuple):
    """Keys that are the queries' own tokens, row for row, at the same (consecutive) positions."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor


# What a layer attends over: its own tokens; K [B, Tk, nKV, d], V, k_pos [B, Tk]; or a decode
# step's cache handle.
KV = SelfKV | tuple[torch.Tensor, torch.Tensor, torch.Tensor] | CachedKV


class KVStore(Protocol):
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KV:
        """Store ``k, v [B, T, nKV, d]`` of tokens at ``positions [B, T]``; return what they may attend over."""
        ...


class NoCache:
    """A full-sequence forward without a cache: tokens attend over themselves only."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KV:
        return SelfKV(k, v, positions)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H, nH = cfg.hidden_size, cfg.num_attention_heads
        self.layer = layer
        self.head_dim = d = cfg.head_dims[layer]
        self.num_heads = nH
        self.num_kv_heads = nkv = cfg.num_kv_heads[layer]
        self.is_reuse = cfg.kv_sharing[layer] == "reuse"
        self.window_left, self.window_right = cfg.attention_window(layer)
        bias = cfg.attention_bias

        def linear(name: str, in_f: int, out_f: int):  # BF16, or NVFP4 when the checkpoint says so
            return make_linear(
                in_f, out_f, bias,
                nvfp4=cfg.is_nvfp4(f"layers.{layer}.self_attn.{name}"),
                input_scale=cfg.nvfp4_input_scales, group_size=cfg.nvfp4_group_size,
            )  # fmt: skip

        self.q_proj = linear("q_proj", H, nH * d)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        if not self.is_reuse:
            self.k_proj = linear("k_proj", H, nkv * d)
            self.v_proj = linear("v_proj", H, nkv * d) if cfg.has_v_proj[layer] else None
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = linear("o_proj", nH * d, H)
        self.fused_qkv: FusedLinear | None = None  # set by fuse_projections_()

    def fuse_projections_(self) -> bool:
        """Compute q, k (and v) with one GEMM on the GPU path (see ``FusedLinear``); False if not fusable."""
        if self.is_reuse:
            return False
        names = ("q_proj", "k_proj", "v_proj") if self.v_proj is not None else ("q_proj", "k_proj")
        self.fused_qkv = FusedLinear.fuse(self, names)
        return self.fused_qkv is not None

    def _project(self, x: torch.Tensor, native: bool):
        """Raw q, k, v ``[B, T, heads, d]`` (k, v None on KV-shared layers; v is k when Wk serves both)."""
        B, T, _ = x.shape
        d = self.head_dim
        fused = self.fused_qkv
        if fused is not None and not native and x.is_cuda and fused.valid():
            parts = fused(x)  # column slices of one GEMM output: qkv_norm_rope reads them in place
        else:
            parts = [self.q_proj(x)]
            if not self.is_reuse:
                parts.append(self.k_proj(x))
                if self.v_proj is not None:
                    parts.append(self.v_proj(x))
        q = parts[0].view(B, T, self.num_heads, d)
        if self.is_reuse:
            return q, None, None
        k = parts[1].view(B, T, self.num_kv_heads, d)
        v = parts[2].view(B, T, self.num_kv_heads, d) if len(parts) == 3 else k
        return q, k, v

    def _run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        kv: KVStore,
        shared: KV | None,
        native: bool,
    ) -> tuple[torch.Tensor, KV]:
        ops = ops_for(x, native)
        B, T, _ = x.shape
        q, k_raw, v_raw = self._project(x, native)  # k_raw, v_raw: None on KV-shared layers
        k_weight = None if self.is_reuse else self.k_norm.weight
        q, k, v = ops.qkv_norm_rope(q, k_raw, v_raw, self.q_norm.weight, k_weight, cos, sin, self.q_norm.eps)
        if self.is_reuse:
            if shared is None:
                raise RuntimeError(f"layer {self.layer} reuses KV but its producer stored none in this forward")
            keys = shared
        else:
            keys = kv.update(self.layer, k, v, positions)
        if isinstance(keys, CachedKV):
            if self.window_right != 0:
                raise RuntimeError(f"layer {self.layer}: decode over the cache is causal, window_right={self.window_right}")
            o = ops.attention_decode(
                q, keys.k, keys.v, positions, keys.slots, keys.ring_pos,
                window_left=self.window_left, scale=1.0, max_kv_len=keys.kv_len,
            )  # fmt: skip
        elif isinstance(keys, SelfKV):
            o = ops.self_attention(
                q, keys.k, keys.v, positions, window_left=self.window_left, window_right=self.window_right, scale=1.0
            )
        else:
            K, V, k_pos = keys
            o = ops.attention(
                q, K, V, positions, k_pos, window_left=self.window_left, window_right=self.window_right, scale=1.0
            )
        return self.o_proj(o.reshape(B, T, -1)), keys

    def forward(self, x, cos, sin, positions, kv: KVStore, shared: KV | None = None) -> tuple[torch.Tensor, KV]:
        """``x [B, T, H]`` -> (output ``[B, T, H]``, the ``(K, V, k_pos)`` attended over)."""
        return self._run(x, cos, sin, positions, kv, shared, native=False)

    def forward_native(self, x, cos, sin, positions, kv: KVStore, shared: KV | None = None) -> tuple[torch.Tensor, KV]:
        return self._run(x, cos, sin, positions, kv, shared, native=True)


@dataclass(frozen=True)
class LayerCacheSpec:
    """What KV cache one layer needs, so the runtime can allocate without knowing Gemma.

    ``kind``: ``"full"`` (every past position), ``"sliding"`` (a ring of ``window`` entries:
    the keys one query can see, itself included) or ``"none"`` (the layer reads layer
    ``source``'s K/V from the same forward and stores nothing).
    """

    kind: str
    num_kv_heads: int
    head_dim: int
    window: int | None
    source: int

    def __post_init__(self):
        if self.kind not in ("full", "sliding", "none"):
            raise ValueError(f"LayerCacheSpec kind must be 'full', 'sliding' or 'none', got {self.kind!r}")
        if self.kind == "sliding" and (self.window is None or self.window < 1):
            raise ValueError(f"a sliding LayerCacheSpec needs a window >= 1, got {self.window!r}")

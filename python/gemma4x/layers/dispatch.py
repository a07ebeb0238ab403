"""The one place that picks an op implementation for a layer's ``forward``.

``ops_for(x, native)`` returns a namespace with the same op names either way:
``gemma4x.ops`` kernels when ``x`` lives on CUDA, the extension is built and ``native`` is
False; the pure-PyTorch references otherwise (CPU, ``forward_native``). Ops that have no
CUDA kernel yet point at a PyTorch implementation in both namespaces, so layers never
branch on the device themselves. The reference attention is torch SDPA with an explicit mask
(HF's default), not the fp32 oracle ``reference.attention.attention``: same contract, and on
CPU it reproduces HF's bf16 results bit for bit. On CUDA, decode steps read the KV cache in
place (``ops.attention_decode``) and prompt prefill runs the sm_90a varlen kernel.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from gemma4x.layers.attention_prefill import with_prefill_kernel
from gemma4x.reference import activation as _act
from gemma4x.reference import attention as _attn
from gemma4x.reference import attention_decode as _attn_decode
from gemma4x.reference import linear as _linear
from gemma4x.reference import moe as _moe
from gemma4x.reference import norm as _norm
from gemma4x.reference import rope as _rope

REFERENCE = SimpleNamespace(
    linear=_linear.linear,
    rms_norm=_norm.rms_norm,
    fused_add_rms_norm=_norm.fused_add_rms_norm,
    moe_tail_norm=_norm.moe_tail_norm,
    residual_rms_norm=_norm.residual_rms_norm,
    apply_rope=_rope.apply_rope,
    qkv_norm_rope=_rope.qkv_norm_rope,
    attention=_attn.attention_sdpa,  # HF's default sdpa path: bitwise HF parity on CPU
    self_attention=_attn.self_attention_sdpa,
    attention_decode=_attn_decode.attention_decode_sdpa,  # decode over the cache: the same SDPA
    gelu_tanh=_act.gelu_tanh,
    geglu=_act.geglu,
    moe_router=_moe.moe_router,
    moe_experts=_moe.moe_experts,
)


def _cuda_namespace() -> SimpleNamespace:
    from gemma4x import ops  # imported lazily: CPU paths never need it

    return SimpleNamespace(
        linear=ops.gemv.linear,  # decode sizes: the skinny GEMM; larger: cuBLAS
        rms_norm=ops.rms_norm,
        fused_add_rms_norm=ops.fused_add_rms_norm,
        moe_tail_norm=ops.moe_tail_norm,
        residual_rms_norm=ops.residual_rms_norm,  # residual + rms_norm [* layer_scalar], one launch
        apply_rope=_rope.apply_rope,
        qkv_norm_rope=ops.qkv_norm_rope_or_reference,  # q/k/v norms + RoPE in one launch
        # Prompt prefill (tokens over themselves) goes to the sm_90a varlen kernel
        # (with_prefill_kernel, in ops_for); any other attention, and other GPUs, run SDPA with an
        # explicit mask.
        attention=_attn.attention_sdpa_single_query,
        self_attention=_attn.self_attention_sdpa,
        attention_decode=ops.attention_decode_or_sdpa,  # decode steps: in-place kernel over the cache
        gelu_tanh=_act.gelu_tanh,
        geglu=ops.geglu,  # gelu_tanh(gate) * up, one launch
        moe_router=ops.moe_router,
        moe_experts=ops.moe_experts,
    )


_CUDA: SimpleNamespace | None = None


def ops_for(x: torch.Tensor, native: bool = False) -> SimpleNamespace:
    """Op namespace for tensors like ``x``: CUDA kernels if usable and not ``native``, else references."""
    global _CUDA
    if native or not x.is_cuda:
        return REFERENCE
    if _CUDA is None:
        from gemma4x.ops import cuda_kernels_available

        _CUDA = with_prefill_kernel(_cuda_namespace()) if cuda_kernels_available() else REFERENCE
    return _CUDA


def unfused_tail(ns: SimpleNamespace) -> SimpleNamespace:
    """A copy of ``ns`` whose ``geglu`` and ``residual_rms_norm`` run as the separate ops they fuse.

    ``gelu_tanh(gate) * up`` and ``residual + rms_norm(x)`` (then ``* scalar``) with ``ns``'s own
    ``gelu_tanh`` / ``rms_norm``: the decode path before the fusion, for A/B tests and profiles.
    """

    def residual_rms_norm(residual, x, weight, eps, scalar=None):
        out = residual + ns.rms_norm(x, weight, eps)
        return out if scalar is None else out * scalar

    return SimpleNamespace(
        **{**vars(ns), "geglu": lambda gate, up: ns.gelu_tanh(gate) * up, "residual_rms_norm": residual_rms_norm}
    )

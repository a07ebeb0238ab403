"""Reference text RoPE (NeoX ``rotate_half`` over the whole head), as HF Gemma 4 computes it.

``inv_freq[i] = 1 / theta^(2i/d)`` in fp32; ``proportional`` keeps only the first
``int(p*d//2)`` frequencies (the exponent still divides by the full ``d``), zeroes the
rest (identity channels) and divides all by ``factor``. Then
``freqs = fp32(pos) * inv_freq``, ``emb = cat(freqs, freqs)``, ``cos/sin`` rounded to the
activation dtype, and ``rope(x) = x*cos + rotate_half(x)*sin`` with each op rounding to
``x.dtype`` (spec §2.4).
"""

from __future__ import annotations

import torch

from gemma4x.reference.norm import rms_norm


def rope_inv_freq(
    head_dim: int,
    theta: float,
    *,
    rope_type: str = "default",
    partial_rotary_factor: float = 1.0,
    factor: float = 1.0,
) -> torch.Tensor:
    """``[head_dim/2]`` fp32 inverse frequencies for ``default`` or ``proportional`` RoPE."""
    if rope_type == "default":
        # Python float ** fp32 tensor: computed in fp32, exactly as HF's default init.
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type != "proportional":
        raise ValueError(f"unsupported rope_type {rope_type!r} (expected 'default' or 'proportional')")
    rotated = int(partial_rotary_factor * head_dim // 2)
    inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / head_dim))
    nope = head_dim // 2 - rotated
    if nope > 0:
        inv = torch.cat((inv, torch.zeros(nope, dtype=torch.float32)))
    return inv / factor


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``positions.shape + [d]`` in ``dtype`` (angles in fp32)."""
    freqs = positions.float()[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., d/2:], x[..., :d/2])``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x*cos + rotate_half(x)*sin``; ``x`` is ``[..., T, heads, d]``, ``cos/sin`` ``[..., T, d]``."""
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    return (x * cos) + (rotate_half(x) * sin)


def qkv_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """An attention layer's inputs: ``rope(rms_norm(q, q_weight))``, ``rope(rms_norm(k, k_weight))``
    and ``rms_norm(v)`` (no scale), each ``[B, T, heads, d]``; ``k``/``v`` may be None (KV-shared
    layers) and come back None. The op chain of spec §2.5, rounding as HF does."""
    q = apply_rope(rms_norm(q, q_weight, eps), cos, sin)
    if k is not None:
        k = apply_rope(rms_norm(k, k_weight, eps), cos, sin)
    if v is not None:
        v = rms_norm(v, None, eps)
    return q, k, v

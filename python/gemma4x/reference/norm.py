"""Reference RMSNorm family, exactly as HF transformers' Gemma4RMSNorm computes it.

Gemma 4 RMSNorm: ``y = x * (mean(x^2) + eps)^-0.5 * w`` in fp32, rounded once to the
input dtype (plain ``w``, not ``1 + w`` as in Gemma 2/3). Every op here rounds at the
same points as the HF module graph it replaces, so a bf16 run matches HF bit for bit.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x * (mean(x^2, -1) + eps)^-0.5 [* weight]`` in fp32, rounded to ``x.dtype``."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``residual <- residual + x`` (rounded to the dtype, in place); returns ``rms_norm(residual)``."""
    residual.copy_(residual + x)
    return rms_norm(residual, weight, eps)


def residual_rms_norm(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scalar: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + rms_norm(x, weight, eps)``, then ``* scalar`` if given; each op rounds to the dtype.

    The dense Gemma 4 layer tail as HF computes it (``hidden_states + post_feedforward_layernorm(m)``,
    then ``* layer_scalar``); out of place.
    """
    out = residual + rms_norm(x, weight, eps)
    return out if scalar is None else out * scalar


def moe_tail_norm(
    x1: torch.Tensor,
    x2: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    scalar: torch.Tensor,
    eps1: float,
    eps2: float,
    eps3: float,
) -> torch.Tensor:
    """Gemma 4 MoE-block tail: ``(rms_w3(rms_w1(x1) + rms_w2(x2)) + residual) * scalar``.

    Each norm, the sum, the residual add and the scalar product round to the dtype, as
    the HF decoder layer does (post_feedforward_layernorm_1/_2, post_feedforward_layernorm,
    residual add, layer_scalar).
    """
    s = rms_norm(x1, w1, eps1) + rms_norm(x2, w2, eps2)
    return (rms_norm(s, w3, eps3) + residual) * scalar.to(x1.dtype)

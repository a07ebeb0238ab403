"""Gemma 4 RMSNorm layer: ``y = x * (mean(x^2) + eps)^-0.5 [* w]`` in fp32, rounded once.

Plain ``w`` (not ``1 + w``); ``with_scale=False`` has no weight (v_norm, router norm).
"""

from __future__ import annotations

import torch
from torch import nn

from gemma4x.layers.dispatch import ops_for


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_for(x).rms_norm(x, self.weight, self.eps)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return ops_for(x, native=True).rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, with_scale={self.weight is not None}"

"""Rotary embedding of one layer type: fp32 inverse frequencies -> per-position cos/sin.

``cos, sin = cos/sin(cat(f, f))`` with ``f = fp32(pos) * inv_freq`` rounded to the
activation dtype (spec §2.4); ``rope(x) = x*cos + rotate_half(x)*sin``.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma4x.config import RopeConfig
from gemma4x.layers.dispatch import ops_for
from gemma4x.reference.rope import rope_cos_sin, rope_inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope
        # Not a buffer: a module built on the meta device and materialised with
        # to_empty() would lose it. Recomputed once per device instead (head_dim/2 floats).
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            inv = rope_inv_freq(
                self.head_dim,
                self.rope.theta,
                rope_type=self.rope.rope_type,
                partial_rotary_factor=self.rope.partial_rotary_factor,
                factor=self.rope.factor,
            )
            self._inv_freq[device] = inv.to(device)
        return self._inv_freq[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``positions.shape + [head_dim]`` in ``dtype``."""
        return rope_cos_sin(positions, self.inv_freq(positions.device), dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return ops_for(x).apply_rope(x, cos, sin)

    def forward_native(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return ops_for(x, native=True).apply_rope(x, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, {self.rope}"

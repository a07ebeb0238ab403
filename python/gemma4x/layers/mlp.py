"""GeGLU MLP: ``down( gelu_tanh(gate(x)) * up(x) )`` with separate gate/up/down weights."""

from __future__ import annotations

import torch
from torch import nn

from gemma4x.layers.dispatch import ops_for
from gemma4x.layers.linear import Linear


class GegluMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def _run(self, x: torch.Tensor, native: bool) -> torch.Tensor:
        ops = ops_for(x, native)
        return self.down_proj(ops.gelu_tanh(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, native=False)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, native=True)

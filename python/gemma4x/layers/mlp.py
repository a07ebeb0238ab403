"""GeGLU MLP: ``down( gelu_tanh(gate(x)) * up(x) )`` with separate gate/up/down weights.

``nvfp4`` names the projections the checkpoint stores in NVFP4 (``{"gate_proj", ...}``).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from gemma4x.layers.dispatch import ops_for
from gemma4x.layers.linear import FusedLinear, make_linear


class GegluMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        nvfp4: Collection[str] = (),
        input_scale: bool = True,
        group_size: int = 16,
    ):
        super().__init__()
        H, I = hidden_size, intermediate_size

        def linear(name: str, in_f: int, out_f: int):
            return make_linear(in_f, out_f, nvfp4=name in nvfp4, input_scale=input_scale, group_size=group_size)

        self.gate_proj = linear("gate_proj", H, I)
        self.up_proj = linear("up_proj", H, I)
        self.down_proj = linear("down_proj", I, H)
        self.fused_gate_up: FusedLinear | None = None  # set by fuse_projections_()

    def fuse_projections_(self) -> bool:
        """Compute gate and up with one GEMM on the GPU path (see ``FusedLinear``); False if not fusable."""
        self.fused_gate_up = FusedLinear.fuse(self, ("gate_proj", "up_proj"))
        return self.fused_gate_up is not None

    def _run(self, x: torch.Tensor, native: bool) -> torch.Tensor:
        ops = ops_for(x, native)
        fused = self.fused_gate_up
        if fused is not None and not native and x.is_cuda and fused.valid():
            gate, up = fused(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops.geglu(gate, up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, native=False)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, native=True)

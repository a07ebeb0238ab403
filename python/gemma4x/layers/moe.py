"""Gemma 4 MoE pieces: the router and the routed GeGLU experts (spec §2.8).

Router: ``w, i = topk(softmax_fp32(bf16(bf16(rms(h)*scale)*H^-0.5) @ Wr^T))``, renormalised
over the top-k, times ``per_expert_scale[i]``. Experts: ``sum_j w_j * GeGLU_{i_j}(x)`` with
an fp32 sum over the k slots. Parameter names follow the checkpoint
(``router.proj.weight``, ``router.scale``, ``router.per_expert_scale``,
``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``).
"""

from __future__ import annotations

import torch
from torch import nn

from gemma4x.layers.dispatch import ops_for
from gemma4x.layers.linear import Linear


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.eps = eps
        self.proj = Linear(hidden_size, num_experts)
        self.scale = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts), requires_grad=False)

    def _run(self, h: torch.Tensor, native: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return ops_for(h, native).moe_router(
            h, self.proj.weight, self.scale, self.per_expert_scale, self.top_k, self.eps
        )

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [T, H]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]``)."""
        return self._run(h, native=False)

    def forward_native(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(h, native=True)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def _run(self, x, weights, idx, native: bool) -> torch.Tensor:
        return ops_for(x, native).moe_experts(x, idx, weights, self.gate_up_proj, self.down_proj)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, routing ``weights/idx [T, k]`` -> ``[T, H]`` in ``x.dtype``."""
        return self._run(x, weights, idx, native=False)

    def forward_native(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._run(x, weights, idx, native=True)

"""Scaled token embeddings and the Per-Layer Embedding (PLE) combiner.

Token embedding: ``E = W[ids] * s`` with ``s = sqrt(dim)`` rounded to the weight dtype
(e.g. 39.25 for 1536 in bf16), one rounding for the product (spec §2.2).

PLE (spec §2.3), ``L`` layers of width ``P``::

    tok = ScaledEmbedding_P(ids).view(T, L, P)                 # sqrt(P) scale
    ctx = rms_norm( (E @ Wproj^T) * H^-0.5 ).view(T, L, P)      # Python-float scale, norm over P
    PLI = (ctx + tok) * 2^-0.5
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gemma4x.layers.linear import Linear
from gemma4x.layers.norm import RMSNorm


class ScaledEmbedding(nn.Module):
    """``W[ids] * bf16(sqrt(scale_dim))``; ``scale_dim`` defaults to the row width.

    The packed PLE table (rows of ``L*P``) is scaled by ``sqrt(P)``, hence the separate knob.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, scale_dim: int | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.scale_dim = embedding_dim if scale_dim is None else scale_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # sqrt(dim) rounded to the weight dtype, as HF's `embed_scale.to(weight.dtype)`. A Python
        # float avoids a host->device copy; the product still rounds once (it is computed in fp32).
        scale = torch.tensor(math.sqrt(self.scale_dim), dtype=self.weight.dtype).item()
        return self.weight[ids] * scale

    def forward_native(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scale=sqrt({self.scale_dim})"


def per_layer_inputs(
    embeds: torch.Tensor,
    token_part: torch.Tensor,
    projection: Linear,
    norm: RMSNorm,
    num_layers: int,
    native: bool = False,
) -> torch.Tensor:
    """Combine PLE parts: ``embeds [.., H]``, ``token_part [.., L*P]`` -> ``[.., L, P]``."""
    lead = embeds.shape[:-1]
    ctx = projection(embeds) * (embeds.shape[-1] ** -0.5)
    ctx = ctx.reshape(*lead, num_layers, -1)
    ctx = norm.forward_native(ctx) if native else norm(ctx)
    return (ctx + token_part.reshape(*lead, num_layers, -1)) * (2.0**-0.5)

"""Reference linear layer, the pure-PyTorch twin of :func:`gemma4x.ops.gemv.skinny_gemm`.

    y = x @ W^T (+ b)      fp32 accumulation, one rounding to the activation dtype

as ``torch.nn.functional.linear`` computes it (the order of the fp32 sum is the kernel's own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias[N])`` -> ``[..., N]``."""
    return F.linear(x, weight, bias)

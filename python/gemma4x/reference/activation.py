"""Reference activations: tanh-approximated GELU and the GeGLU gate Gemma 4 uses everywhere.

``gelu_tanh(x) = 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3)))`` (PyTorch's
``gelu(approximate="tanh")``, which is what HF's ``gelu_pytorch_tanh`` calls);
``geglu(gate, up) = gelu_tanh(gate) * up``, each op rounding to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))`` in ``x.dtype``."""
    return F.gelu(x, approximate="tanh")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up``."""
    return gelu_tanh(gate) * up

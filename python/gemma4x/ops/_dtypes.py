"""dtype codes of the binding ABI (csrc/include/gemma4x/common/dtype.h holds the same table)."""

from __future__ import annotations

import torch

from gemma4x.ops._checks import _fmt_dtype

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(t: torch.Tensor, name: str, allowed=tuple(DTYPE_CODES)) -> int:
    if t.dtype not in allowed:
        names = ", ".join(_fmt_dtype(d) for d in allowed)
        raise TypeError(f"{name}: dtype {_fmt_dtype(t.dtype)} is not supported (expected one of {names})")
    return DTYPE_CODES[t.dtype]

"""Linear layers: BF16 ``y = x @ W^T (+ b)`` and NVFP4 (ModelOpt layout), with a factory.

``Linear`` keeps HF's ``nn.Linear`` layout (``weight [out, in]``) so checkpoint tensors load 1:1.

``NVFP4Linear`` holds one ModelOpt NVFP4 linear exactly as exported (names equal the
checkpoint's): ``weight`` uint8 ``[N, K/2]`` (two e2m1 codes per byte, low nibble = even k),
``weight_scale`` float8_e4m3fn ``[N, K/16]``, ``weight_scale_2`` fp32 scalar and, for W4A4
exports, ``input_scale`` fp32 scalar (the activation global scale; unused by the reference)::

    W = e2m1(weight) * fp32(weight_scale) * weight_scale_2        (reference.quant.nvfp4_dequantize)
    y = x @ W^T (+ b)                                             W cast to x.dtype, one rounding

``forward_native`` dequantizes and runs the matmul (the CPU path, and the oracle). ``forward``
on a compute capability 9.0 GPU runs the W4A16 path of :mod:`gemma4x.ops.nvfp4` on the weight
repacked once into the kernels' layout, which then replaces ``weight``/``weight_scale`` (one copy
on the GPU; the names still read as the checkpoint layout, rebuilt on demand: see
:mod:`gemma4x.layers.nvfp4_storage` and :meth:`~W4A16Storage.pack_w4a16_`): the decode kernel up to 64 tokens,
beyond it the W4A16 WGMMA kernel where it measured faster (``ops.nvfp4.dense_prefill_wgmma``),
else dequantise-into-bf16 + cuBLAS. Other GPUs (SM100 included, whose W4A4 ``ops.nvfp4_gemm``
needs quantized activations) and the CPU take ``forward_native``. Quantize-at-load
(:meth:`NVFP4Linear.from_linear`) uses the CUDA quantizer for CUDA weights (bit-identical).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gemma4x.layers.dispatch import ops_for
from gemma4x.layers.nvfp4_storage import W4A16Storage
from gemma4x.reference.quant import NVFP4_BLOCK, nvfp4_dequantize, nvfp4_quantize


def quant_param(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    """A parameter the loader fills in its own dtype (quantized storage, fp32 scales)."""
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.keep_dtype = True
    return p


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_for(x).linear(x, self.weight, self.bias)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class NVFP4Linear(W4A16Storage, nn.Module):
    _W4A16_PAIRS: ClassVar[dict[str, tuple[str, str, bool]]] = {"w4a16_weight": ("weight", "weight_scale", False)}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        input_scale: bool = True,
        group_size: int = NVFP4_BLOCK,
    ):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"NVFP4Linear: in_features={in_features} is not a multiple of {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.weight = quant_param((out_features, in_features // 2), torch.uint8)
        self.weight_scale = quant_param((out_features, in_features // group_size), torch.float8_e4m3fn)
        self.weight_scale_2 = quant_param((), torch.float32)
        self.input_scale = quant_param((), torch.float32) if input_scale else None
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: Linear, global_scale: torch.Tensor | None = None) -> NVFP4Linear:
        """Quantize a loaded BF16 ``Linear`` (weight-only: no ``input_scale``) with the reference quantizer."""
        w = linear.weight
        with torch.device("meta"):  # every tensor is replaced below
            out = cls(linear.in_features, linear.out_features, linear.bias is not None, input_scale=False)
        packed, scale, g = quantize_nvfp4(w, global_scale)
        out.weight = as_quant_param(packed)
        out.weight_scale = as_quant_param(scale)
        out.weight_scale_2 = as_quant_param(g.reshape(()))
        out.bias = linear.bias
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight, scale = self.checkpoint_pair("w4a16_weight")
        return nvfp4_dequantize(weight, scale, self.weight_scale_2, dtype, self.group_size)

    def _w4a16_applicable(self, device: torch.device) -> bool:
        if device.type != "cuda" or self.group_size != NVFP4_BLOCK or self.out_features % 16 or self.in_features % 64:
            return False
        from gemma4x.ops.nvfp4 import sm90_available

        return sm90_available(device)

    def w4a16_supported(self, x: torch.Tensor) -> bool:
        """True when ``forward`` takes the SM90 W4A16 path for inputs like ``x``."""
        return x.is_cuda and self._w4a16_applicable(x.device)

    def w4a16_packed(self) -> torch.Tensor:
        """The weight in the W4A16 kernels' layout (``[N/16, K/64, 576]``), packing the layer on the first call."""
        return self.w4a16_packed_pairs()[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4a16_supported(x):
            from gemma4x.ops.nvfp4 import w4a16_gemm

            out = w4a16_gemm(x, self.w4a16_packed(), self.weight_scale_2.reshape(1))
            return out if self.bias is None else out + self.bias
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        packed = ", w4a16-packed" if self.w4a16_is_packed else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, nvfp4{packed}"


def quantize_nvfp4(w: torch.Tensor, global_scale=None):
    """:func:`gemma4x.reference.quant.nvfp4_quantize`, on the GPU through the CUDA quantizer
    (bit-identical) when ``w`` is a CUDA tensor and the extension is built."""
    if w.is_cuda:
        from gemma4x.ops import cuda_kernels_available

        if cuda_kernels_available():
            from gemma4x.ops.nvfp4 import nvfp4_quantize as cuda_quantize

            return cuda_quantize(w, global_scale)
    return nvfp4_quantize(w, global_scale)


def as_quant_param(t: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    p.keep_dtype = True
    return p


class FusedLinear:
    """Plain ``Linear`` layers that read one input, computed as one GEMM.

    :meth:`fuse` concatenates their weights (and biases) along the output dimension into one
    new storage and rebinds each layer's weight to a view of it, so memory does not grow and the
    layers keep working on their own (``forward_native``, checkpoints). At decode a GEMM per
    layer costs a launch and, at one token, runs far below the memory bandwidth on a few MB of
    weights; one GEMM over q/k/v (or gate/up) streams the same bytes in one launch.

    Not a module: it owns no parameters of its own. If a layer is replaced (``quantize_``) or its
    weight is moved (``Module.to``), :meth:`valid` turns false and callers go back to the layers.
    """

    def __init__(self, owner: nn.Module, names: tuple[str, ...], weight: torch.Tensor, bias: torch.Tensor | None):
        self.owner = owner
        self.names = names
        self.weight = weight
        self.bias = bias
        self.sizes = [getattr(owner, n).out_features for n in names]
        self._views = [getattr(owner, n).weight for n in names]

    @classmethod
    @torch.no_grad()
    def fuse(cls, owner: nn.Module, names: tuple[str, ...]) -> FusedLinear | None:
        """Fuse ``owner``'s linears ``names`` (all plain ``Linear``, same device/dtype/bias-ness), else None."""
        mods = [getattr(owner, n, None) for n in names]
        if len(mods) < 2 or not all(type(m) is Linear for m in mods):
            return None
        first = mods[0].weight
        if any(m.weight.device != first.device or m.weight.dtype != first.dtype for m in mods):
            return None
        has_bias = mods[0].bias is not None
        if any((m.bias is not None) != has_bias for m in mods):
            return None
        weight = torch.cat([m.weight for m in mods])
        bias = torch.cat([m.bias for m in mods]) if has_bias else None
        row = 0
        for m in mods:
            n = m.out_features
            m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
            if has_bias:
                m.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
            row += n
        return cls(owner, names, weight, bias)

    def valid(self) -> bool:
        """The layers still are the ones fused, their weights still views of the fused storage."""
        row = 0
        for name, view in zip(self.names, self._views):
            m = getattr(self.owner, name, None)
            if m is None or getattr(m, "weight", None) is not view or view.data_ptr() != self.weight[row].data_ptr():
                return False
            row += view.shape[0]
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output, as column slices of one ``[..., sum(out)]`` GEMM output."""
        return list(ops_for(x).linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def make_linear(
    in_features: int,
    out_features: int,
    bias: bool = False,
    *,
    nvfp4: bool = False,
    input_scale: bool = True,
    group_size: int = NVFP4_BLOCK,
) -> Linear | NVFP4Linear:
    """A BF16 ``Linear``, or an ``NVFP4Linear`` when the checkpoint stores this module in NVFP4."""
    if nvfp4:
        return NVFP4Linear(in_features, out_features, bias, input_scale=input_scale, group_size=group_size)
    return Linear(in_features, out_features, bias)


__all__ = ["FusedLinear", "Linear", "NVFP4Linear", "as_quant_param", "make_linear", "quant_param", "quantize_nvfp4"]

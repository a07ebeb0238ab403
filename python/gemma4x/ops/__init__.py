"""gemma4x CUDA ops, registered as torch custom ops (``torch.ops.gemma4x.*``).

Each family module wraps kernels of ``gemma4x._C`` with validation, output allocation
and a fake implementation, so the ops trace under ``torch.compile(fullgraph=True)``
and can be captured in CUDA graphs. Importing this package never needs ``_C``.
"""

from gemma4x.ops._load import ExtensionUnavailableError, cuda_kernels_available
from gemma4x.ops.activation import geglu
from gemma4x.ops.attention import attention_varlen
from gemma4x.ops.attention_decode import attention_decode, attention_decode_or_sdpa
from gemma4x.ops.gemm import nvfp4_gemm, nvfp4_grouped_gemm
from gemma4x.ops.gemv import skinny_gemm
from gemma4x.ops.kv_cache import kv_cache_write
from gemma4x.ops.moe import moe_experts, moe_router
from gemma4x.ops.norm import fused_add_rms_norm, moe_tail_norm, residual_rms_norm, rms_norm
from gemma4x.ops.nvfp4 import nvfp4_quantize, w4a16_dequantize, w4a16_gemm, w4a16_moe_experts
from gemma4x.ops.nvfp4_prefill import w4a16_gemm_sm90, w4a16_moe_experts_prefill
from gemma4x.ops.rope import qkv_norm_rope, qkv_norm_rope_or_reference

__all__ = [
    "ExtensionUnavailableError",
    "attention_decode",
    "attention_decode_or_sdpa",
    "attention_varlen",
    "cuda_kernels_available",
    "fused_add_rms_norm",
    "geglu",
    "kv_cache_write",
    "moe_experts",
    "moe_router",
    "moe_tail_norm",
    "nvfp4_gemm",
    "nvfp4_grouped_gemm",
    "nvfp4_quantize",
    "qkv_norm_rope",
    "qkv_norm_rope_or_reference",
    "residual_rms_norm",
    "rms_norm",
    "skinny_gemm",
    "w4a16_dequantize",
    "w4a16_gemm",
    "w4a16_gemm_sm90",
    "w4a16_moe_experts",
    "w4a16_moe_experts_prefill",
]

// Host launcher of the fused attention-input kernel (per-head RMSNorm of q, k, v; RoPE of q, k).
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/common/dtype.h"
#include "gemma4x/rope/params.h"

namespace gemma4x::rope {

void qkv_norm_rope(const QkvNormRopeParams& params, DType dtype, cudaStream_t stream);

}  // namespace gemma4x::rope

// Host launchers of the RMSNorm family. Each validates its Params (names, shapes, alignment),
// picks the vector width and per-thread work, and launches on the caller's stream.
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/common/dtype.h"
#include "gemma4x/norm/params.h"

namespace gemma4x::norm {

void rms_norm(const RmsNormParams& params, DType dtype, cudaStream_t stream);
void fused_add_rms_norm(const FusedAddRmsNormParams& params, DType dtype, cudaStream_t stream);
void moe_tail_norm(const MoeTailNormParams& params, DType dtype, cudaStream_t stream);
void residual_rms_norm(const ResidualRmsNormParams& params, DType dtype, cudaStream_t stream);

}  // namespace gemma4x::norm

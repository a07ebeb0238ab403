// Host launchers of the MoE family. Each validates its Params (names, shapes, limits, alignment),
// picks the kernel instance and grid, and launches on the caller's stream.
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/common/dtype.h"
#include "gemma4x/moe/params.h"

namespace gemma4x::moe {

// Fused router: one launch for any T.
void moe_router(const MoeRouterParams& params, DType dtype, cudaStream_t stream);

// Decode experts path, two launches; requires P = T*k <= 64 and the limits below.
void moe_experts_decode(const MoeExpertsDecodeParams& params, DType dtype, cudaStream_t stream);

// Largest sizes the decode kernels take (the Python op sends anything larger to grouped_mm).
struct DecodeLimits {
  int max_pairs;
  int max_experts;
  int max_hidden;
  int max_inter;
};
DecodeLimits moe_decode_limits();

}  // namespace gemma4x::moe

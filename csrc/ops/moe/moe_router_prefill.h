// Host launchers of the many-token router (every arch): the normalised-rows kernel before the
// caller's router GEMM and the softmax/top-k kernel after it.
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/common/dtype.h"
#include "gemma4x/moe/prefill_params.h"

namespace gemma4x::moe {

// r = T(T(T(h * rsqrt(mean(h^2) + eps)) * scale) * input_scale), one launch.
void moe_router_rows(const RouterRowsParams& params, DType dtype, cudaStream_t stream);

// (w, idx) = top-k of softmax_fp32(logits) (ties to the lower id), w / sum(w) * per_expert_scale[idx].
void moe_router_topk(const RouterTopkParams& params, DType dtype, cudaStream_t stream);

}  // namespace gemma4x::moe

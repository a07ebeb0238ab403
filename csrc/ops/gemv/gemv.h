// Host launcher of the decode-size skinny GEMM (y = x @ W^T (+ bias), M <= 16).
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/common/dtype.h"
#include "gemma4x/gemv/params.h"

namespace gemma4x::gemv {

constexpr int kMaxTokens = 16;

void skinny_gemm(const SkinnyGemmParams& params, DType dtype, cudaStream_t stream);

}  // namespace gemma4x::gemv

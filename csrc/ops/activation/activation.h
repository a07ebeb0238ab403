// Host launchers of the activation family: validate Params, pick the vector width, launch on
// the caller's stream.
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/activation/params.h"
#include "gemma4x/common/dtype.h"

namespace gemma4x::activation {

void geglu(const GegluParams& params, DType dtype, cudaStream_t stream);

}  // namespace gemma4x::activation

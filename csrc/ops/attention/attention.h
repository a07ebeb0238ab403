// Host launcher of the prefill attention kernels. Defined in attention_varlen_sm90.cu, so it exists
// only in builds whose GEMMA4X_CUDA_ARCHS include an sm_90 target (the binding checks GEMMA4X_HAS_SM90).
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/attention/params.h"
#include "gemma4x/common/dtype.h"

namespace gemma4x::attention {

// Validates every argument, checks that the current GPU is compute capability 9.0 (the sm_90a code
// runs nowhere else), fills p.block_m and launches on `stream`. use_wgmma = false runs the
// mma.sync variant (the only one for head dim 72).
void attention_varlen(AttentionVarlenParams p, DType dtype, float scale, bool use_wgmma, cudaStream_t stream);

// Query rows per CTA for head dim d (the caller builds tile_cum with it); 0 if d is unsupported.
int attention_varlen_block_m(int head_dim);

}  // namespace gemma4x::attention

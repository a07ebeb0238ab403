// Host launchers of the NVFP4 family. Each validates its Params (names, shapes, alignment), picks
// the kernel instance and grid, and launches on the caller's stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "gemma4x/common/dtype.h"
#include "gemma4x/nvfp4/params.h"

namespace gemma4x::nvfp4 {

// Any arch (nvfp4.cu).
void quantize(const QuantizeParams& params, DType dtype, cudaStream_t stream);
void dequantize(const DequantizeParams& params, DType dtype, cudaStream_t stream);

// sm_90a only (w4a16_sm90.cu; the binding checks GEMMA4X_HAS_SM90 and the device).
void w4a16_gemv(const GemvParams& params, cudaStream_t stream);
void moe_decode(const MoeDecodeParams& params, bool pdl, cudaStream_t stream);
// Prefill sizes (w4a16_gemm_sm90.cu): TMA + warp-specialised RS WGMMA, dequantisation in registers.
void w4a16_gemm_sm90(const W4A16GemmParams& params, cudaStream_t stream);
size_t w4a16_moe_prefill_workspace_size(const W4A16MoePrefillParams& params);
void w4a16_moe_prefill(const W4A16MoePrefillParams& params, cudaStream_t stream);
// Limits of the W4A16 kernels (the Python wrappers hold the same numbers; a GPU test compares).
struct W4A16Limits {
  int max_tokens;
  int max_pairs;
  int max_experts;
};
W4A16Limits w4a16_limits();

}  // namespace gemma4x::nvfp4

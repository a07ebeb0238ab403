// Host launcher of the NVFP4 W4A4 GEMM. Defined in nvfp4_gemm_sm100.cu, so it exists only in
// builds whose GEMMA4X_CUDA_ARCHS include an sm_100 target (the binding checks GEMMA4X_HAS_SM100).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "gemma4x/gemm/params.h"

namespace gemma4x::gemm {

// Validates every argument, checks that the current GPU is compute capability 10.0 (the
// sm_100a code runs nowhere else), and launches on `stream`.
void nvfp4_gemm(const Nvfp4GemmParams& params, cudaStream_t stream);

// Scratch bytes the launch needs for an (M, N, K) problem (0 for the persistent scheduler today;
// queried so the caller allocates what a future CUTLASS asks for).
size_t nvfp4_gemm_workspace_size(int32_t M, int32_t N, int32_t K);

// The grouped (per-expert) GEMM: per-group arguments are built on the device from row_offsets,
// so the launch is graph-capturable with routing never read back. Same device check.
void nvfp4_grouped_gemm(const Nvfp4GroupedGemmParams& params, cudaStream_t stream);

// Scratch bytes for `groups` groups of an (N, K) grouped problem: argument arrays + CUTLASS's.
size_t nvfp4_grouped_gemm_workspace_size(int32_t groups, int32_t N, int32_t K);

// Throws unless the current GPU is compute capability 10.0 (sm_100a code runs nowhere else).
void check_sm100(const char* op);

}  // namespace gemma4x::gemm

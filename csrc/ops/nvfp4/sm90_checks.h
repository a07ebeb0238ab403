// Host-side checks shared by the SM90 W4A16 launchers (w4a16_sm90.cu, w4a16_gemm_sm90.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <stdexcept>
#include <string>

#include "gemma4x/common/check.h"

namespace gemma4x::nvfp4 {

// The kernels are compiled for sm_90a only: any other device gets a clear error, not a launch failure.
inline void check_sm90(const char* op) {
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0) {
    throw std::runtime_error(std::string(op) + ": compiled for sm_90a, needs a compute capability 9.0 GPU, got " +
                             std::to_string(major) + "." + std::to_string(minor));
  }
}

inline void check_ptr(const char* op, const char* name, const void* ptr, size_t align) {
  GEMMA4X_CHECK_ARG(ptr != nullptr, op, ": ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(is_aligned(ptr, align), op, ": ", name, " must be ", align, "-byte aligned");
}

}  // namespace gemma4x::nvfp4

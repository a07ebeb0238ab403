// Host-side queries of the current CUDA device.
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/common/check.h"

namespace gemma4x {

// SMs of the current device (persistent grids), cached per thread for the last device asked.
inline int device_sms() {
  static thread_local int cached_dev = -1, cached_sms = 0;
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev != cached_dev) {
    check_cuda(cudaDeviceGetAttribute(&cached_sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    cached_dev = dev;
  }
  return cached_sms;
}

}  // namespace gemma4x

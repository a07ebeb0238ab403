// Global-memory loads with explicit cache behaviour, shared by the bandwidth-bound decode kernels
// (gemv/, nvfp4/).
#pragma once

#include <cstdint>

namespace gemma4x {

// Data read exactly once (weights): 16 bytes through the non-coherent path, kept out of L1.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// The same for 2 bytes (returned zero-extended).
__device__ __forceinline__ uint32_t ld_stream_u16(const void* p) {
  uint16_t r;
  asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(r) : "l"(p));
  return r;
}

// Data re-read by other lanes or blocks (activations): 16 bytes through L1.
__device__ __forceinline__ uint4 ld_cached16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

}  // namespace gemma4x

// Register-level helpers shared by the row-wise kernels: fp32 conversion with explicit rounding,
// 16-byte vector loads/stores, and a block-wide sum.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gemma4x {

template <typename T>
struct Float;

template <>
struct Float<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Float<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Float<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

// Rounds an fp32 value to T and back: the point where a PyTorch op on T tensors would round.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return Float<T>::load(Float<T>::store(v));
}

// N elements of T moved as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_float(const T* src, float (&dst)[N]) {
  const Vec<T, N> packed = *reinterpret_cast<const Vec<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = Float<T>::load(packed.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* dst, const float (&src)[N]) {
  Vec<T, N> packed;
#pragma unroll
  for (int i = 0; i < N; ++i) packed.v[i] = Float<T>::store(src[i]);
  *reinterpret_cast<Vec<T, N>*>(dst) = packed;
}

// Sums NV values over the whole block; every thread receives the totals. `scratch` must hold
// NV * 32 floats and must not be reused by another block_sum without a barrier in between.
// blockDim.x must be a multiple of 32.
template <int NV>
__device__ __forceinline__ void block_sum(float (&v)[NV], float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) scratch[i * 32 + warp] = v[i];
  }
  __syncthreads();
  // Every warp reduces the partials itself: no second barrier and no broadcast slot. (Summing
  // them in a per-thread loop measured slower: a dependent chain as long as the warp count.)
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    v[i] = lane < num_warps ? scratch[i * 32 + lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
  }
}

}  // namespace gemma4x

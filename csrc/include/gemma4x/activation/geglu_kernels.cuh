// GeGLU, rounded as PyTorch's two ops round it: F.gelu(gate, approximate="tanh") (fp32 opmath,
// rounded to T) and then `* up` (fp32 product of the two T values, rounded to T).
//
// One thread owns one VEC-wide vector of a row (16 bytes of T when every pointer and stride
// allows it, else one element); blockIdx.x walks the columns and blockIdx.y the rows, looping
// when there are more than 65535 rows. At decode sizes (one row of 256..21504 columns) this is
// one memory round trip per thread over a handful of blocks.
#pragma once

#include "gemma4x/activation/params.h"
#include "gemma4x/common/vec.cuh"

namespace gemma4x::activation {

// 128 threads: an E2B MLP row (6144 bf16 = 768 vectors) spreads over 6 SMs, a 31B row (21504)
// over 21; larger blocks would put a decode row on fewer SMs, smaller ones add blocks for no gain.
constexpr int kGegluThreads = 128;
constexpr int kMaxGridRows = 65535;

// PyTorch's GeluCUDAKernelImpl (approximate="tanh") in opmath (fp32), expression for expression:
// nvcc contracts `x + kKappa * x_cube` into the same fma in both builds (default -fmad=true), and
// tanhf is libdevice's, as in PyTorch (no fast-math substitution).
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  constexpr float kKappa = 0.044715f;
  const float x_cube = x * x * x;
  const float inner = kBeta * (x + kKappa * x_cube);
  return 0.5f * x * (1.f + tanhf(inner));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kGegluThreads) geglu_kernel(const __grid_constant__ GegluParams p) {
  using V = Vec<T, VEC>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kGegluThreads + threadIdx.x) * VEC;
  if (col >= p.cols) return;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const V g = *reinterpret_cast<const V*>(static_cast<const T*>(p.gate) + row * p.gate_row_stride + col);
    const V u = *reinterpret_cast<const V*>(static_cast<const T*>(p.up) + row * p.up_row_stride + col);
    V o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float a = round_to<T>(gelu_tanh(Float<T>::load(g.v[k])));
      // __fmul_rn: for T = float nothing else stops a contraction with gelu's last product.
      o.v[k] = Float<T>::store(__fmul_rn(a, Float<T>::load(u.v[k])));
    }
    *reinterpret_cast<V*>(static_cast<T*>(p.out) + row * p.out_row_stride + col) = o;
  }
}

}  // namespace gemma4x::activation

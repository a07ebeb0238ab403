// y[M, N] = x[M, K] @ W[N, K]^T for M <= 16 tokens: the decode-time linear layers, where every
// weight byte is read once and the tensor cores idle. The goal is the memory bandwidth.
//
// A CTA owns 16 weight rows; its 8 warps split K (warp w takes the 32-column steps w, w + 8, ...)
// and their partial sums meet in shared memory. Per step a lane loads 16 contiguous bytes of
// each of its two rows (g and g + 8, g = lane / 4) and 16 bytes of its token's activations, and
// runs two mma.sync.m16n8k16 (weights as A, tokens as the 8 columns of B). The dot product does
// not care about the order of k, so the lane's 8 contiguous columns are taken as the k slots its
// A and B fragments own in the two mma (the same relabelling for A and B); no shuffle and no
// shared-memory staging is needed. Steps are loaded kDepth at a time ahead of the mma that
// consume them, so each warp keeps kDepth x 1 KB of weights in flight.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gemma4x/common/ldst.cuh"
#include "gemma4x/common/mma.cuh"
#include "gemma4x/common/vec.cuh"
#include "gemma4x/gemv/params.h"

namespace gemma4x::gemv {

constexpr int kWarps = 8;
constexpr int kRows = 16;    // weight rows per CTA (the mma's M)
constexpr int kStepK = 32;   // columns per warp step: 4 lanes x 8 contiguous values
constexpr int kDepth = 4;    // steps loaded ahead

// NT token tiles of 8: M <= 8 * NT.
template <typename T, int NT>
__global__ void __launch_bounds__(kWarps * 32) skinny_gemm_kernel(const __grid_constant__ SkinnyGemmParams p) {
  __shared__ float partial[kWarps][NT][32][4];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;  // A rows g and g + 8; B column (token) g
  const int q = lane & 3;   // which 8 of the step's 32 columns
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const T* w_lo = static_cast<const T*>(p.w) + (row0 + g) * p.k + q * 8;
  const T* w_hi = w_lo + static_cast<int64_t>(8) * p.k;
  const T* x_rows[NT];
  bool has_token[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    has_token[t] = g + 8 * t < p.m;
    x_rows[t] = static_cast<const T*>(p.x) + (has_token[t] ? (g + 8 * t) * p.x_stride : 0) + q * 8;
  }

  float acc[NT][4] = {};
  const int steps = p.k / kStepK;
  for (int s0 = warp; s0 < steps; s0 += kWarps * kDepth) {
    uint4 lo[kDepth], hi[kDepth], xv[kDepth][NT];
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int s = s0 + d * kWarps;
      if (s < steps) {
        lo[d] = ld_stream16(w_lo + s * kStepK);
        hi[d] = ld_stream16(w_hi + s * kStepK);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          xv[d][t] = has_token[t] ? __ldg(reinterpret_cast<const uint4*>(x_rows[t] + s * kStepK)) : make_uint4(0, 0, 0, 0);
        }
      }
    }
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (s0 + d * kWarps < steps) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          // Columns q*8 + {0,1 | 2,3} are the k slots {2q,2q+1 | 2q+8,2q+9} of the first mma,
          // columns q*8 + {4,5 | 6,7} those of the second.
          mma_m16n8k16<T>(acc[t], lo[d].x, hi[d].x, lo[d].y, hi[d].y, xv[d][t].x, xv[d][t].y);
          mma_m16n8k16<T>(acc[t], lo[d].z, hi[d].z, lo[d].w, hi[d].w, xv[d][t].z, xv[d][t].w);
        }
      }
    }
  }

#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][t][lane][i] = acc[t][i];
  }
  __syncthreads();
  if (warp >= NT) return;
  // Warp t finishes token tile t: c0, c1 are rows g, tokens 2q, 2q+1; c2, c3 rows g + 8.
  const int t = warp;
  float sum[4] = {};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
#pragma unroll
    for (int i = 0; i < 4; ++i) sum[i] += partial[w][t][lane][i];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + g + (i >= 2 ? 8 : 0);
    const int token = 8 * t + 2 * q + (i & 1);
    if (token < p.m) {
      float v = sum[i];
      if (p.bias != nullptr) v += Float<T>::load(static_cast<const T*>(p.bias)[row]);
      static_cast<T*>(p.y)[token * p.y_stride + row] = Float<T>::store(v);
    }
  }
}

}  // namespace gemma4x::gemv

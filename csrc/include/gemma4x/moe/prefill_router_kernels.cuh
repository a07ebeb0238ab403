// Router for many tokens (beyond the fused router's one-block-per-token range), in three steps:
//
//   rows   r = T(T(T(h * rsqrt(mean(h^2) + eps)) * scale) * input_scale)      one warp per token
//   (the caller's GEMM: logits = T(r @ W^T), cuBLAS through torch)
//   topk   p = softmax_fp32(logits); (w, idx) = top-k of p, ties to the lower expert id;
//          w = w / sum(w) * per_expert_scale[idx]                             one warp per token
//
// Each product rounds to T where HF's Gemma4TextRouter rounds it (the same points as the fused
// router in router_kernels.cuh).
#pragma once

#include <cstdint>

#include "gemma4x/common/vec.cuh"
#include "gemma4x/moe/prefill_params.h"

namespace gemma4x::moe {

template <typename T>
__global__ void __launch_bounds__(32 * kRouterRowsWarps) moe_router_rows_kernel(const __grid_constant__ RouterRowsParams p) {
  constexpr int VEC = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterRowsWarps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  const T* h = static_cast<const T*>(p.h) + t * p.h_row_stride;
  const int nv = p.hidden / VEC;
  float ss = 0.f;
  for (int v = lane; v < nv; v += 32) {
    float x[VEC];
    load_float<T, VEC>(h + v * VEC, x);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ss = fmaf(x[i], x[i], ss);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, offset);
  // pow(mean + eps, -0.5): PyTorch's CUDA pow evaluates the -0.5 power with rsqrt.
  const float inv = rsqrtf(ss * __frcp_rn(static_cast<float>(p.hidden)) + p.eps);
  const T* scale = static_cast<const T*>(p.scale);
  T* r = static_cast<T*>(p.r) + t * p.hidden;
  for (int v = lane; v < nv; v += 32) {  // the row again, from L1
    float x[VEC], s[VEC];
    load_float<T, VEC>(h + v * VEC, x);
    load_float<T, VEC>(scale + v * VEC, s);
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = round_to<T>(round_to<T>(round_to<T>(x[i] * inv) * s[i]) * p.input_scale);
    store_float<T, VEC>(r + v * VEC, x);
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kRouterTopkWarps) moe_router_topk_kernel(const __grid_constant__ RouterTopkParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouterTopkWarps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  const int E = p.experts;
  const T* logits = static_cast<const T*>(p.logits) + t * E;
  float prob[kRouterTopkPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kRouterTopkPerLane; ++j) {
    const int e = lane + 32 * j;
    prob[j] = e < E ? Float<T>::load(logits[e]) : -INFINITY;
    mx = fmaxf(mx, prob[j]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kRouterTopkPerLane; ++j) {
    prob[j] = lane + 32 * j < E ? expf(prob[j] - mx) : 0.f;
    sum += prob[j];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
#pragma unroll
  for (int j = 0; j < kRouterTopkPerLane; ++j) prob[j] = lane + 32 * j < E ? prob[j] / sum : -1.f;

  // k rounds of a warp argmax (ties to the lower id); lane s keeps the s-th pick. Probabilities
  // are >= 0, so -1 marks a taken or absent slot.
  float my_w = 0.f, wsum = 0.f;
  int my_e = 0;
  for (int s = 0; s < p.top_k; ++s) {
    float bv = -1.f;
    int bi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < kRouterTopkPerLane; ++j) {
      if (prob[j] > bv) {  // strict: the lower id (earlier j) wins a tie inside the lane
        bv = prob[j];
        bi = lane + 32 * j;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, offset);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, offset);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
#pragma unroll
    for (int j = 0; j < kRouterTopkPerLane; ++j)
      if (lane + 32 * j == bi) prob[j] = -1.f;
    wsum += bv;  // descending order, one after another
    if (lane == s) {
      my_w = bv;
      my_e = bi;
    }
  }
  if (lane < p.top_k) {
    const float pes = p.per_expert_scale_fp32 ? static_cast<const float*>(p.per_expert_scale)[my_e]
                                              : Float<T>::load(static_cast<const T*>(p.per_expert_scale)[my_e]);
    p.weights[t * p.top_k + lane] = my_w / wsum * pes;
    p.idx[t * p.top_k + lane] = my_e;
  }
}

}  // namespace gemma4x::moe

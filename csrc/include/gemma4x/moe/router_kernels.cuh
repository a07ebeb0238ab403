// Fused Gemma 4 router: scale-free RMSNorm, two scalings, the [E, H] logit GEMV, fp32 softmax,
// top-k, renormalisation and per-expert scale in one launch, every intermediate rounded where the
// HF module graph materialises it in the activation dtype.
//
// One thread-block cluster per token. Each of its C blocks normalises the token's row (a 5.6 KB
// L2 hit at H = 2816, cheaper than sharing it) and computes E / C logits, one warp per logit row
// at a time; the logits land in the leader block's shared memory through distributed shared
// memory, and after the cluster barrier the leader's first warp runs softmax and top-k on them
// (E <= 256: at most 8 logits per lane). At decode, C = 8 spreads the 720 KB router matrix over 8
// SMs instead of streaming it through one; at prefill C = 1 (every SM already has tokens).
#pragma once

#include <cooperative_groups.h>

#include <cfloat>

#include "gemma4x/common/vec.cuh"
#include "gemma4x/moe/params.h"
#include "gemma4x/common/pdl.cuh"

namespace gemma4x::moe {

constexpr int kRouterThreads = 512;     // 16 warps: one logit row per warp per step
constexpr int kRouterMaxExperts = 256;  // 8 logits per lane in the top-k warp
constexpr int kRouterMaxCluster = 8;    // portable cluster size limit
constexpr int kRouterRowRegs = 11;      // 16-byte vectors per lane of a prefetched logit row: H = 2816 bf16 exactly

// HF: pow(mean(x^2) + eps, -0.5), which PyTorch's CUDA pow evaluates with rsqrt (as the norm
// family does, see norm/rms_norm_kernels.cuh).
__device__ __forceinline__ float router_inv_rms(float sum_sq, int hidden, float eps) {
  return rsqrtf(sum_sq * __frcp_rn(static_cast<float>(hidden)) + eps);
}

// Warp argmax over (value, index) with ties to the lower index, as a stable descending sort does.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

// 16-byte moves through uint4: a plain copy of Vec<__nv_bfloat16, 8> compiles to eight 2-byte
// accesses (the element type's copy constructor), in global and shared memory alike.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> ld16(const void* p) {
  const uint4 r = *static_cast<const uint4*>(p);
  return *reinterpret_cast<const Vec<T, VEC>*>(&r);
}

template <typename T, int VEC>
__device__ __forceinline__ void st16(void* p, const Vec<T, VEC>& v) {
  *static_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

template <typename T, int VEC>
__device__ __forceinline__ float dot_vec(const Vec<T, VEC>& a, const Vec<T, VEC>& b, float acc) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc = fmaf(Float<T>::load(a.v[i]), Float<T>::load(b.v[i]), acc);
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kRouterThreads) moe_router_kernel(const __grid_constant__ MoeRouterParams p) {
  namespace cg = cooperative_groups;
  constexpr int VEC = 16 / sizeof(T);
  // r (the scaled, rounded router input) and scale, kept in T: r is exactly representable (every
  // step rounds to T), and 16-byte vectors laid out as the weight rows make each warp's reads one
  // conflict-free 512-byte sweep (fp32 scalars at a 32-byte lane stride were 8-way bank conflicts,
  // ~5 us per token).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float logits[kRouterMaxExperts];
  __shared__ float scratch[32];

  // The experts kernel may launch now (programmatic dependent launch); it waits for this grid's
  // completion before it reads the routing, so its blocks' launch latency hides behind ours.
  grid_dependency_trigger();

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int csize = static_cast<int>(cluster.num_blocks());
  const int64_t token = blockIdx.x / csize;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int H = p.hidden;
  const int nvec = H / VEC;
  const int per_block = p.experts / csize;
  uint4* r_smem = reinterpret_cast<uint4*>(smem_raw);  // nvec vectors of T
  uint4* s_smem = r_smem + nvec;

  // 0. Every global load that depends on nothing is issued first: this warp's first logit row
  // (into registers when a row fits kRouterRowRegs vectors per lane), the token row and the
  // scale. At decode the kernel is one memory round trip, not four.
  const T* W = static_cast<const T*>(p.proj_weight);
  const bool row_in_regs = warp < per_block && nvec <= 32 * kRouterRowRegs;
  Vec<T, VEC> w_first[kRouterRowRegs];
  if (row_in_regs) {
    const T* row = W + static_cast<int64_t>(rank * per_block + warp) * H;
#pragma unroll
    for (int m = 0; m < kRouterRowRegs; ++m) {
      w_first[m] = ld16<T, VEC>(row + min(lane + 32 * m, nvec - 1) * VEC);
    }
  }

  // 1. sum(h^2); the row and the scale wait in shared memory.
  const T* h = static_cast<const T*>(p.h) + token * p.h_row_stride;
  const T* scale = static_cast<const T*>(p.scale);
  float ss[1] = {0.f};
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    const Vec<T, VEC> hv = ld16<T, VEC>(h + v * VEC);
    st16<T, VEC>(s_smem + v, ld16<T, VEC>(scale + v * VEC));
    st16<T, VEC>(r_smem + v, hv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float f = Float<T>::load(hv.v[i]);
      ss[0] = fmaf(f, f, ss[0]);
    }
  }
  block_sum<1>(ss, scratch);
  const float inv = router_inv_rms(ss[0], H, p.eps);
  // 2. r = bf16(bf16(bf16(x * inv) * scale) * H^-0.5): three rounding points, as in HF. Each thread
  // rewrites the vectors it wrote above.
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
    Vec<T, VEC> hv = ld16<T, VEC>(r_smem + v);
    const Vec<T, VEC> sv = ld16<T, VEC>(s_smem + v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float y = round_to<T>(Float<T>::load(hv.v[i]) * inv);
      hv.v[i] = Float<T>::store(round_to<T>(y * Float<T>::load(sv.v[i])) * p.input_scale);
    }
    st16<T, VEC>(r_smem + v, hv);
  }
  __syncthreads();

  // 3. This block's E / C logits: one warp per row, fp32 accumulation, rounded as F.linear's output.
  float* leader_logits = cluster.map_shared_rank(logits, 0);
  for (int el = warp; el < per_block; el += nwarps) {
    const int e = rank * per_block + el;
    float acc = 0.f;
    if (el == warp && row_in_regs) {
#pragma unroll
      for (int m = 0; m < kRouterRowRegs; ++m) {
        const int v = lane + 32 * m;
        if (v < nvec) acc = dot_vec(w_first[m], ld16<T, VEC>(r_smem + v), acc);
      }
    } else {
      const T* row = W + static_cast<int64_t>(e) * H;
#pragma unroll 4
      for (int v = lane; v < nvec; v += 32) {
        acc = dot_vec(ld16<T, VEC>(row + v * VEC), ld16<T, VEC>(r_smem + v), acc);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) leader_logits[e] = round_to<T>(acc);
  }
  cluster.sync();  // every logit is in the leader's shared memory
  if (rank != 0 || warp != 0) return;

  // 4. Softmax in fp32 (PyTorch's warp softmax: exp(x - max) / sum), then top-k.
  constexpr int PER_LANE = kRouterMaxExperts / 32;
  const int E = p.experts;
  float prob[PER_LANE];
  float mx = -FLT_MAX;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int e = lane + 32 * j;
    prob[j] = e < E ? logits[e] : -FLT_MAX;
    mx = fmaxf(mx, prob[j]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    prob[j] = lane + 32 * j < E ? expf(prob[j] - mx) : 0.f;
    sum += prob[j];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) prob[j] = lane + 32 * j < E ? prob[j] / sum : -1.f;

  // k rounds of a warp argmax; lane s keeps the s-th pick. Probabilities are >= 0, so a taken
  // or absent slot is marked -1.
  float my_w = 0.f;
  int my_e = 0;
  float wsum = 0.f;
  for (int s = 0; s < p.top_k; ++s) {
    float bv = -1.f;
    int bi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      if (prob[j] > bv) {  // strict: the lower index (earlier j) wins a tie within the lane
        bv = prob[j];
        bi = lane + 32 * j;
      }
    }
    warp_argmax(bv, bi);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      if (lane + 32 * j == bi) prob[j] = -1.f;
    }
    wsum += bv;  // descending order, sequential: the order torch's sum of k values follows
    if (lane == s) {
      my_w = bv;
      my_e = bi;
    }
  }
  if (lane < p.top_k) {
    const float pes = p.per_expert_scale_fp32 ? static_cast<const float*>(p.per_expert_scale)[my_e]
                                              : Float<T>::load(static_cast<const T*>(p.per_expert_scale)[my_e]);
    p.weights[token * p.top_k + lane] = my_w / wsum * pes;
    p.idx[token * p.top_k + lane] = my_e;
  }
}

}  // namespace gemma4x::moe

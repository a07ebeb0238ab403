// Row-wise RMSNorm kernels with Gemma 4 rounding: fp32 math, every intermediate that PyTorch
// would materialise in T rounded to T at the same point.
//
// Register kernels (any layout): one block owns one row. Thread t holds vectors t, t + blockDim,
// ... (VPT of them, VEC elements each) in registers, packed as T, so each input byte is read once
// and the row written once. VEC is 16 bytes of T when the layout allows it, else 1 (odd hidden
// sizes, unaligned strides). VPT is the smallest that keeps blockDim <= 1024; every Gemma 4 hidden
// size (1536..5376) runs with VPT = 1. Weights are loaded before the first reduction so their
// latency overlaps the row loads (at decode sizes, a dependent weight fetch after each reduction
// costs a full memory round trip).
//
// Streaming kernel (MoE tail, many rows, 16-byte layout): a persistent block per SM keeps up to
// 8 rows in flight through a shared-memory ring filled by the bulk copy engine, so memory stays
// busy while the block reduces; weights stay in registers for all of its rows.
#pragma once

#include "gemma4x/common/bulk_copy.cuh"
#include "gemma4x/common/vec.cuh"
#include "gemma4x/norm/params.h"

namespace gemma4x::norm {

constexpr int kMaxThreads = 1024;

// At decode sizes a row is latency-bound, so every load should be in flight before the first
// reduction; ptxas nonetheless sinks the loads not needed by it (residual, weights) to their
// first use, behind the reduction. An L1 prefetch of those rows at kernel entry turns the late
// loads into cache hits. (Forcing all loads ahead of the reduction through a fake data
// dependency measured slower: 2.88 us against 2.69 us for one 2816-wide row on an H200.)
__device__ __forceinline__ void prefetch_l1(const void* p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

// HF: x * pow(mean(x^2) + eps, -0.5). On CUDA, PyTorch evaluates pow(., -0.5) with rsqrt (the
// MUFU approximation, within 2 ulp of fp32); we do the same. IEEE division and square root sit on
// the critical path of every row three times and measured ~1 us slower at decode sizes, while
// the fp32 difference is far below a bf16/fp16 ulp of the output.
__device__ __forceinline__ float inv_rms(float sum_sq, int hidden, float eps) {
  return rsqrtf(sum_sq * __frcp_rn(static_cast<float>(hidden)) + eps);
}

// The slice of a row one thread owns, packed in T.
template <typename T, int VEC, int VPT>
struct RowFrag {
  Vec<T, VEC> v[VPT];

  __device__ __forceinline__ static bool owns(int j, int nvec) { return threadIdx.x + j * blockDim.x < nvec; }
  __device__ __forceinline__ static int offset(int j) { return (threadIdx.x + j * blockDim.x) * VEC; }

  // Unowned slots reload the row's last vector instead of branching around the load: branches
  // made the compiler unpack each load inside its own guarded block, so the row's loads (x1,
  // x2, residual, three weights) waited on each other, four memory round trips instead of one.
  __device__ __forceinline__ static int clamped(int j, int nvec) {
    return min(static_cast<int>(threadIdx.x + j * blockDim.x), nvec - 1) * VEC;
  }
  __device__ __forceinline__ void load(const T* row, int nvec) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) v[j] = *reinterpret_cast<const Vec<T, VEC>*>(row + clamped(j, nvec));
  }
  __device__ __forceinline__ static void prefetch(const T* row, int nvec) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) prefetch_l1(row + clamped(j, nvec));
  }

  __device__ __forceinline__ void store(T* row, int nvec) const {
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (owns(j, nvec)) *reinterpret_cast<Vec<T, VEC>*>(row + offset(j)) = v[j];
    }
  }
  __device__ __forceinline__ float f(int j, int k) const { return Float<T>::load(v[j].v[k]); }

  __device__ __forceinline__ void set(int j, int k, float x) { v[j].v[k] = Float<T>::store(x); }

  // Sum of squares of this thread's elements (unowned slots are never read).
  __device__ __forceinline__ float sum_sq(int nvec) const {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (owns(j, nvec)) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) s += f(j, k) * f(j, k);
      }
    }
    return s;
  }
};

// y = (x * r) [* w], rounded to T, in the order HF multiplies.
template <typename T, int VEC, int VPT>
__device__ __forceinline__ void scale_row(RowFrag<T, VEC, VPT>& y, const RowFrag<T, VEC, VPT>& x, float r,
                                          const RowFrag<T, VEC, VPT>& w, bool has_weight) {
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) y.set(j, k, has_weight ? (x.f(j, k) * r) * w.f(j, k) : x.f(j, k) * r);
  }
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_kernel(const __grid_constant__ RmsNormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = p.hidden / VEC;
  RowFrag<T, VEC, VPT> x, w;
  const bool has_weight = p.weight != nullptr;
  if (has_weight) RowFrag<T, VEC, VPT>::prefetch(static_cast<const T*>(p.weight), nvec);
  x.load(static_cast<const T*>(p.x) + row * p.x_row_stride, nvec);
  if (has_weight) w.load(static_cast<const T*>(p.weight), nvec);
  float sum_sq[1] = {x.sum_sq(nvec)};
  block_sum<1>(sum_sq, scratch);
  scale_row(x, x, inv_rms(sum_sq[0], p.hidden, p.eps), w, has_weight);
  x.store(static_cast<T*>(p.out) + row * p.out_row_stride, nvec);
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxThreads)
    fused_add_rms_norm_kernel(const __grid_constant__ FusedAddRmsNormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = p.hidden / VEC;
  T* residual = static_cast<T*>(p.residual) + row * p.residual_row_stride;
  RowFrag<T, VEC, VPT> x, h, w;
  const bool has_weight = p.weight != nullptr;
  if (has_weight) RowFrag<T, VEC, VPT>::prefetch(static_cast<const T*>(p.weight), nvec);
  x.load(static_cast<const T*>(p.x) + row * p.x_row_stride, nvec);
  h.load(residual, nvec);
  if (has_weight) w.load(static_cast<const T*>(p.weight), nvec);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) h.set(j, k, h.f(j, k) + x.f(j, k));
  }
  h.store(residual, nvec);
  float sum_sq[1] = {h.sum_sq(nvec)};
  block_sum<1>(sum_sq, scratch);
  scale_row(h, h, inv_rms(sum_sq[0], p.hidden, p.eps), w, has_weight);
  h.store(static_cast<T*>(p.out) + row * p.out_row_stride, nvec);
}

// out = T(residual + T(rms(x) [* w])) [then T(out * scalar)]: the dense layer tail. The norm
// is rms_norm_kernel's, reduction order included (same VEC, VPT and block size from the same
// launcher), so its rounded value equals rms_norm's bit for bit. The add and the product use
// __fadd_rn / __fmul_rn: for T = float no rounding separates them from the norm's products, and
// a contracted fma would differ from the separate PyTorch ops this replaces.
template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxThreads)
    residual_rms_norm_kernel(const __grid_constant__ ResidualRmsNormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = p.hidden / VEC;
  using Frag = RowFrag<T, VEC, VPT>;
  const T* res_row = static_cast<const T*>(p.residual) + row * p.residual_row_stride;
  const bool has_weight = p.weight != nullptr;
  const bool has_scalar = p.scalar != nullptr;
  Frag::prefetch(res_row, nvec);
  if (has_weight) Frag::prefetch(static_cast<const T*>(p.weight), nvec);
  Frag x, res, w;
  x.load(static_cast<const T*>(p.x) + row * p.x_row_stride, nvec);
  res.load(res_row, nvec);
  if (has_weight) w.load(static_cast<const T*>(p.weight), nvec);
  const float scalar = has_scalar ? Float<T>::load(*static_cast<const T*>(p.scalar)) : 1.f;
  float sum_sq[1] = {x.sum_sq(nvec)};
  block_sum<1>(sum_sq, scratch);
  const float r = inv_rms(sum_sq[0], p.hidden, p.eps);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float n = round_to<T>(has_weight ? (x.f(j, k) * r) * w.f(j, k) : x.f(j, k) * r);
      const float s = __fadd_rn(res.f(j, k), n);
      x.set(j, k, has_scalar ? __fmul_rn(round_to<T>(s), scalar) : s);
    }
  }
  x.store(static_cast<T*>(p.out) + row * p.out_row_stride, nvec);
}

// One row of the MoE tail from fragments already in registers; writes `out`.
// scratch2 holds 64 floats, scratch1 32; both are reused only after a barrier.
template <typename T, int VEC, int VPT>
__device__ __forceinline__ void moe_tail_row(RowFrag<T, VEC, VPT>& a, const RowFrag<T, VEC, VPT>& b,
                                             const RowFrag<T, VEC, VPT>& res, const RowFrag<T, VEC, VPT>& w1,
                                             const RowFrag<T, VEC, VPT>& w2, const RowFrag<T, VEC, VPT>& w3,
                                             float scalar, const MoeTailNormParams& p, int nvec, T* out,
                                             float* scratch2, float* scratch1) {
  float sums[2] = {a.sum_sq(nvec), b.sum_sq(nvec)};
  block_sum<2>(sums, scratch2);
  const float r1 = inv_rms(sums[0], p.hidden, p.eps1);
  const float r2 = inv_rms(sums[1], p.hidden, p.eps2);
  // s = T(T(norm1) + T(norm2)), written over a: every value is representable in T.
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float n1 = round_to<T>((a.f(j, k) * r1) * w1.f(j, k));
      const float n2 = round_to<T>((b.f(j, k) * r2) * w2.f(j, k));
      a.set(j, k, n1 + n2);
    }
  }
  float sum_sq[1] = {a.sum_sq(nvec)};
  block_sum<1>(sum_sq, scratch1);
  const float r3 = inv_rms(sum_sq[0], p.hidden, p.eps3);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float n3 = round_to<T>((a.f(j, k) * r3) * w3.f(j, k));
      a.set(j, k, round_to<T>(n3 + res.f(j, k)) * scalar);
    }
  }
  a.store(out, nvec);
}

template <typename T, int VEC, int VPT>
__global__ void __launch_bounds__(kMaxThreads) moe_tail_norm_kernel(const __grid_constant__ MoeTailNormParams p) {
  __shared__ float scratch2[2 * 32];
  __shared__ float scratch1[32];
  const int64_t row = blockIdx.x;
  const int nvec = p.hidden / VEC;
  using Frag = RowFrag<T, VEC, VPT>;
  const T* res_row = static_cast<const T*>(p.residual) + row * p.residual_row_stride;
  Frag::prefetch(res_row, nvec);
  Frag::prefetch(static_cast<const T*>(p.w1), nvec);
  Frag::prefetch(static_cast<const T*>(p.w2), nvec);
  Frag::prefetch(static_cast<const T*>(p.w3), nvec);
  Frag a, b, res, w1, w2, w3;
  a.load(static_cast<const T*>(p.x1) + row * p.x1_row_stride, nvec);
  b.load(static_cast<const T*>(p.x2) + row * p.x2_row_stride, nvec);
  res.load(res_row, nvec);
  w1.load(static_cast<const T*>(p.w1), nvec);
  w2.load(static_cast<const T*>(p.w2), nvec);
  w3.load(static_cast<const T*>(p.w3), nvec);
  const float scalar = Float<T>::load(*static_cast<const T*>(p.scalar));
  moe_tail_row(a, b, res, w1, w2, w3, scalar, p, nvec, static_cast<T*>(p.out) + row * p.out_row_stride,
               scratch2, scratch1);
}

// Streaming MoE tail: a persistent block per SM with one producer warp and `stages` consumer
// groups of kRowWarps warps. The producer streams rows (x1, x2, residual) into a shared-memory
// ring through the bulk copy engine; group g owns ring slot g and reduces over a named barrier
// of its own, so groups never wait on each other and several rows are in flight and in compute
// on each SM at once. The three weight vectors are copied to shared memory once per block.
// Several warps per row: with one, a row's ~5k dependent instructions per lane made the group,
// not HBM, the bottleneck (measured 67% of copy bandwidth at hidden 5376; 88% with four).
// Rows of up to 512 vectors (hidden <= 4096 in bf16) take 2 warps each and 12 ring slots: short
// rows need more of them in flight to cover the per-row barrier latencies.
constexpr int kStreamConsumerWarps = 24;
constexpr int kStreamThreads = kStreamConsumerWarps * 32 + 32;
constexpr int kStreamMaxStages = kStreamConsumerWarps / 2;
constexpr int kStreamHeaderBytes = 256;  // barriers: full[12], empty[12], weights; rows 128-byte aligned

__host__ __device__ constexpr int stream_max_stages(int row_warps) { return kStreamConsumerWarps / row_warps; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Sum of NV values over one row group (ROW_WARPS warps, named barrier `bar_id`); `scratch` holds
// NV * ROW_WARPS floats and is not written again before another barrier of this group.
template <int ROW_WARPS, int NV>
__device__ __forceinline__ void group_sum(float (&v)[NV], float* scratch, int bar_id) {
  constexpr int kRowWarps = ROW_WARPS;
  const int lane = threadIdx.x & 31;
  const int warp_in_group = (threadIdx.x >> 5) % kRowWarps;
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) scratch[i * kRowWarps + warp_in_group] = v[i];
  }
  named_barrier_sync(bar_id, kRowWarps * 32);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kRowWarps; ++w) total += scratch[i * kRowWarps + w];
    v[i] = total;
  }
}

template <typename T, int VEC, int ROW_WARPS>
__global__ void __launch_bounds__(kStreamThreads, 1)
    moe_tail_norm_stream_kernel(const __grid_constant__ MoeTailNormParams p, int stages) {
  constexpr int kRowWarps = ROW_WARPS;
  constexpr int kRowThreads = kRowWarps * 32;
  constexpr int kMaxStages = stream_max_stages(ROW_WARPS);
  static_assert(VEC * sizeof(T) == 16, "the streaming kernel moves 16-byte vectors");
  static_assert(kStreamHeaderBytes >= (2 * kMaxStages + 1) * 8, "barrier header too small");
  using V = Vec<T, VEC>;
  extern __shared__ __align__(128) unsigned char smem[];
  // Two scratch sets per group: reduction 1 uses set 0, reduction 2 set 1; a row's barrier 2
  // separates its reads of set 0 from the next row's writes.
  __shared__ float scratch[kMaxStages][2][2 * kRowWarps];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + kMaxStages;
  uint64_t* weights_ready = empty + kMaxStages;
  T* weights = reinterpret_cast<T*>(smem + kStreamHeaderBytes);  // w1 | w2 | w3
  T* ring = weights + 3 * p.hidden;                              // slot s: x1 | x2 | residual

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int nvec = p.hidden / VEC;
  const uint32_t row_bytes = static_cast<uint32_t>(p.hidden) * sizeof(T);
  const int64_t my_rows = (p.rows - blockIdx.x + gridDim.x - 1) / gridDim.x;

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], kRowWarps);
    }
    mbarrier_init(weights_ready, 1);
    fence_barrier_init();
  }
  __syncthreads();

  if (warp == stages * kRowWarps) {  // producer
    if (lane == 0) {
      mbarrier_arrive_expect_tx(weights_ready, 3 * row_bytes);
      bulk_copy_g2s(weights, p.w1, row_bytes, weights_ready);
      bulk_copy_g2s(weights + p.hidden, p.w2, row_bytes, weights_ready);
      bulk_copy_g2s(weights + 2 * p.hidden, p.w3, row_bytes, weights_ready);
      for (int64_t i = 0; i < my_rows; ++i) {
        const int slot = static_cast<int>(i % stages);
        // A fresh barrier counts as "previous phase complete", so round 0 does not wait.
        mbarrier_wait_parity(&empty[slot], static_cast<uint32_t>(((i / stages) & 1) ^ 1));
        const int64_t row = blockIdx.x + i * gridDim.x;
        T* dst = ring + static_cast<int64_t>(slot) * 3 * p.hidden;
        mbarrier_arrive_expect_tx(&full[slot], 3 * row_bytes);
        bulk_copy_g2s(dst, static_cast<const T*>(p.x1) + row * p.x1_row_stride, row_bytes, &full[slot]);
        bulk_copy_g2s(dst + p.hidden, static_cast<const T*>(p.x2) + row * p.x2_row_stride, row_bytes, &full[slot]);
        bulk_copy_g2s(dst + 2 * p.hidden, static_cast<const T*>(p.residual) + row * p.residual_row_stride,
                      row_bytes, &full[slot]);
      }
    }
    return;
  }
  if (warp > stages * kRowWarps) return;

  const int group = warp / kRowWarps;
  const int tid = threadIdx.x - group * kRowThreads;
  const int bar_id = group + 1;  // 0 is __syncthreads
  const T* w1 = weights;
  const T* w2 = weights + p.hidden;
  const T* w3 = weights + 2 * p.hidden;
  const float scalar = Float<T>::load(*static_cast<const T*>(p.scalar));
  mbarrier_wait_parity(weights_ready, 0);

  for (int64_t i = group; i < my_rows; i += stages) {
    mbarrier_wait_parity(&full[group], static_cast<uint32_t>((i / stages) & 1));
    T* a = ring + static_cast<int64_t>(group) * 3 * p.hidden;
    const T* b = a + p.hidden;
    const T* res = a + 2 * p.hidden;

    float ss[2] = {0.f, 0.f};
    for (int v = tid; v < nvec; v += kRowThreads) {
      const V av = reinterpret_cast<const V*>(a)[v], bv = reinterpret_cast<const V*>(b)[v];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float x = Float<T>::load(av.v[k]), y = Float<T>::load(bv.v[k]);
        ss[0] += x * x;
        ss[1] += y * y;
      }
    }
    group_sum<kRowWarps, 2>(ss, scratch[group][0], bar_id);
    const float r1 = inv_rms(ss[0], p.hidden, p.eps1);
    const float r2 = inv_rms(ss[1], p.hidden, p.eps2);

    // s = T(T(norm1) + T(norm2)) overwrites x1 in the slot; each thread rereads only its own vectors.
    float ss3[1] = {0.f};
    for (int v = tid; v < nvec; v += kRowThreads) {
      V av = reinterpret_cast<const V*>(a)[v];
      const V bv = reinterpret_cast<const V*>(b)[v];
      const V wa = reinterpret_cast<const V*>(w1)[v], wb = reinterpret_cast<const V*>(w2)[v];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float n1 = round_to<T>((Float<T>::load(av.v[k]) * r1) * Float<T>::load(wa.v[k]));
        const float n2 = round_to<T>((Float<T>::load(bv.v[k]) * r2) * Float<T>::load(wb.v[k]));
        av.v[k] = Float<T>::store(n1 + n2);
        const float sv = Float<T>::load(av.v[k]);
        ss3[0] += sv * sv;
      }
      reinterpret_cast<V*>(a)[v] = av;
    }
    group_sum<kRowWarps, 1>(ss3, scratch[group][1], bar_id);
    const float r3 = inv_rms(ss3[0], p.hidden, p.eps3);

    T* out = static_cast<T*>(p.out) + (blockIdx.x + i * gridDim.x) * p.out_row_stride;
    for (int v = tid; v < nvec; v += kRowThreads) {
      const V sv = reinterpret_cast<const V*>(a)[v], rv = reinterpret_cast<const V*>(res)[v];
      const V wc = reinterpret_cast<const V*>(w3)[v];
      V ov;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float n3 = round_to<T>((Float<T>::load(sv.v[k]) * r3) * Float<T>::load(wc.v[k]));
        ov.v[k] = Float<T>::store(round_to<T>(n3 + Float<T>::load(rv.v[k])) * scalar);
      }
      reinterpret_cast<V*>(out)[v] = ov;
    }
    // The slot is refilled by the copy engine next: order this warp's reads and writes of it first.
    fence_proxy_async_shared();
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&empty[group]);
  }
}

}  // namespace gemma4x::norm

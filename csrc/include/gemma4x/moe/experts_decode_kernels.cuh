// Decode path of the routed GeGLU experts (P = T*k <= 64 (token, slot) pairs): two
// weight-streaming GEMV kernels, no global sort, no atomics, deterministic.
//
// Both kernels first group the pairs by expert inside every block: an [E] table of 64-bit pair
// masks filled with shared-memory atomicOr, compacted in expert-id order. Each used expert's rows
// are then read once per launch however many pairs picked it, and every weight row is a dot
// product against all of its pairs' inputs (x or act rows: at most 64 x 5.6 KB, L1/L2 resident).
//
// A (gate/up + GeGLU): a warp task is one intermediate index i of one used expert; the warp streams
//   gate row i and up row i (11 + 11 x 16-byte loads per lane at H = 2816, all in flight before
//   the first FMA), and each x vector it loads serves both rows. act[q, i] =
//   bf16(bf16(gelu_tanh(bf16(x.g))) * bf16(x.u)): F.grouped_mm's bf16 output, then F.gelu and a
//   bf16 product. Tasks are spread over a grid sized to one resident wave, warp-major (warp w of
//   block b takes tasks b + w*grid, ...) so every block, hence every SM, gets the same share within
//   one task.
// B (down + combine): a block owns 4 output rows h for every pair; its warps take the used experts
//   in turn, 8 lanes per row (11 x 16-byte loads at I = 704). ys[q, h] = w[q] * bf16(act_q . D_h)
//   in shared memory, then out[t, h] = bf16(sum_j ys[t*k + j, h]) with the slots summed in order:
//   the fp32 sum and single rounding of HF's grouped_mm path.
//
// Router -> A -> B are chained by programmatic dependent launch: each kernel launches while its
// predecessor runs, and B's weight loads are in flight before A has finished (H200, 1 token:
// experts 35.0 us with it, 39.0 us without).
//
// Measured on an H200 at the 26B-A4B shape (E=128, k=8, H=2816, I=704), kernels run alone: A 22 us
// for 63 MB (2.9 TB/s), B 16 us for 32 MB (2.0 TB/s) at 1 token. Both are latency-bound per block
// or per warp task: a warp's loads are in flight only between its tasks' compute phases, and B's
// short-lived blocks spend most of their life on setup (routing, groups, act staging). The next
// step is persistent blocks that issue task n+1's loads before computing task n.
#pragma once

#include <cstdint>

#include "gemma4x/common/vec.cuh"
#include "gemma4x/moe/params.h"
#include "gemma4x/common/pdl.cuh"

namespace gemma4x::moe {

constexpr int kDecodeMaxPairs = 64;    // one 64-bit mask per used expert
constexpr int kDecodeMaxExperts = 256;
// Kernel A holds a gate row and an up row slice plus the matching x slice in registers: 11 + 11 + 11
// 16-byte vectors per lane at H = 2816, ~150 registers. 128-thread blocks, 3 per SM (12 warps,
// ~130 KB of weights in flight) fit that budget (65536 / (3 * 128) = 170 registers).
constexpr int kGateUpThreads = 128;
constexpr int kGateUpMinBlocks = 3;
constexpr int kGateUpMinBlocksXSmem = 4;
constexpr int kGateUpMaxXSmem = 48 * 1024;  // x rows staged per block: T = 8 tokens at H = 2816 (45 KB)
constexpr int kDownThreads = 256;
constexpr int kDownMinBlocks = 4;  // 64 registers: 11 weight vectors per lane plus addressing (NVB <= 11)
constexpr int kDownRows = 4;   // output rows per block of kernel B, 8 lanes per row
constexpr int kDownLanes = 8;  // lanes per weight row in kernel B (I = 704: 11 vectors per lane)
static_assert(kDownRows * kDownLanes == 32, "kernel B maps one warp onto kDownRows rows");

// Weights are read exactly once: keep them out of L1 (x and act, re-read per pair, live there).
template <typename T>
__device__ __forceinline__ Vec<T, 8> load_stream(const T* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return *reinterpret_cast<const Vec<T, 8>*>(&r);
}

// Vector v of a weight row, zero past the row's nvec vectors. The load itself is clamped, never
// skipped: a branch per vector made ptxas wait on each guarded load in turn (one memory round trip
// per vector instead of one per row), the pattern the norm kernels avoid the same way.
template <typename T>
__device__ __forceinline__ Vec<T, 8> load_weights(const T* row, int v, int nvec) {
  Vec<T, 8> w = load_stream(row + min(v, nvec - 1) * 8);
  if (v >= nvec) {
#pragma unroll
    for (int i = 0; i < 8; ++i) w.v[i] = Float<T>::store(0.f);
  }
  return w;
}

template <typename T>
__device__ __forceinline__ Vec<T, 8> load_cached(const T* p) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  return *reinterpret_cast<const Vec<T, 8>*>(&r);
}

// acc + w . x over 8 elements in fp32.
template <typename T>
__device__ __forceinline__ float dot8(const Vec<T, 8>& w, const Vec<T, 8>& x, float acc) {
#pragma unroll
  for (int i = 0; i < 8; ++i) acc = fmaf(Float<T>::load(w.v[i]), Float<T>::load(x.v[i]), acc);
  return acc;
}

// bf16 -> fp32 of the weights is a shift or a mask; left to itself, ptxas hoists all 176 of them
// out of the per-pair loop (the weights are loop-invariant) and spills. A volatile conversion stays
// in the loop: one extra ALU op per weight element and pair, against a memory-bound budget.
template <>
__device__ __forceinline__ float dot8<__nv_bfloat16>(const Vec<__nv_bfloat16, 8>& w, const Vec<__nv_bfloat16, 8>& x,
                                                     float acc) {
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float lo, hi;
    asm volatile(
        "{\n.reg .b32 t;\nshl.b32 t, %2, 16;\nmov.b32 %0, t;\nand.b32 t, %2, 0xffff0000;\nmov.b32 %1, t;\n}"
        : "=f"(lo), "=f"(hi)
        : "r"(wp[i]));
    acc = fmaf(lo, __bfloat162float(x.v[2 * i]), acc);
    acc = fmaf(hi, __bfloat162float(x.v[2 * i + 1]), acc);
  }
  return acc;
}

// Same for fp16 (sm_100a hoisted the conversions and spilled up to 3 KB per thread).
template <>
__device__ __forceinline__ float dot8<__half>(const Vec<__half, 8>& w, const Vec<__half, 8>& x, float acc) {
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float lo, hi;
    asm volatile("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}"
                 : "=f"(lo), "=f"(hi)
                 : "r"(wp[i]));
    acc = fmaf(lo, __half2float(x.v[2 * i]), acc);
    acc = fmaf(hi, __half2float(x.v[2 * i + 1]), acc);
  }
  return acc;
}

// PyTorch's GeluCUDAKernelImpl (approximate="tanh") in opmath (fp32).
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  constexpr float kKappa = 0.044715f;
  const float x_cube = x * x * x;
  const float inner = kBeta * (x + kKappa * x_cube);
  return 0.5f * x * (1.f + tanhf(inner));
}

// The (token, slot) pairs grouped by expert: expert[u] is the u-th used expert in id order and
// mask[u] the pairs that chose it (bit q = pair q = t*k + j).
struct ExpertGroups {
  unsigned long long table[kDecodeMaxExperts];
  unsigned long long mask[kDecodeMaxPairs];
  int expert[kDecodeMaxPairs];
  int warp_used[kDecodeMaxExperts / 32];
  int count;
};

// Collective over the block of THREADS threads; ends with a barrier.
template <int THREADS>
__device__ __forceinline__ void build_expert_groups(const int64_t* idx, int pairs, int experts, ExpertGroups& g) {
  static_assert(THREADS >= kDecodeMaxPairs && kDecodeMaxExperts % THREADS == 0, "one pair per thread");
  constexpr int kChunks = kDecodeMaxExperts / THREADS;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) g.table[c * THREADS + tid] = 0;
  const int64_t e_pair = tid < pairs ? idx[tid] : -1;
  __syncthreads();
  if (e_pair >= 0 && e_pair < experts) atomicOr(&g.table[e_pair], 1ull << tid);
  __syncthreads();
  unsigned long long m[kChunks];
  unsigned used[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int e = c * THREADS + tid;
    m[c] = e < experts ? g.table[e] : 0;
    used[c] = __ballot_sync(0xffffffffu, m[c] != 0);
    if (lane == 0) g.warp_used[e / 32] = __popc(used[c]);
  }
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kDecodeMaxExperts / 32; ++w) total += g.warp_used[w];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int e = c * THREADS + tid;
    int offset = __popc(used[c] & ((1u << lane) - 1));
    for (int w = 0; w < e / 32; ++w) offset += g.warp_used[w];
    if (m[c] != 0) {
      g.expert[offset] = e;
      g.mask[offset] = m[c];
    }
  }
  if (tid == 0) g.count = total;
  __syncthreads();
}

// Row of gate_up (within one expert) holding gate row i, or up row i when `up` (params.h: the
// HF layout, or rows interleaved in blocks of 8).
__device__ __forceinline__ int64_t gate_up_row(int i, int inter, bool up, bool interleaved) {
  if (interleaved) return static_cast<int64_t>(i >> 3) * 16 + (up ? 8 : 0) + (i & 7);
  return static_cast<int64_t>(up ? inter : 0) + i;
}

// NVL: 16-byte vectors per lane covering one H row with a whole warp (H <= 32 * NVL * 8). Each
// lane's x vectors serve its gate and its up vectors alike.
//
// X_SMEM: the T token rows are staged in dynamic shared memory once per block (T*H*2 bytes, at most
// kGateUpMaxXSmem), so a warp holds only weights in registers (~110: 4 blocks, 16 warps per SM
// instead of 3 and 12); otherwise each lane keeps its x slice in registers, read through L1.
template <typename T, int NVL, bool X_SMEM>
__global__ void __launch_bounds__(kGateUpThreads, X_SMEM ? kGateUpMinBlocksXSmem : kGateUpMinBlocks)
    moe_decode_gate_up_kernel(const __grid_constant__ MoeExpertsDecodeParams p) {
  static_assert(sizeof(T) == 2, "16-byte vectors of 8 elements");
  extern __shared__ __align__(16) unsigned char x_raw[];
  __shared__ ExpertGroups g;
  // Launched programmatically behind the router: its routing must be complete before we read it.
  // Kernel B may then launch; it waits for this grid before reading act.
  grid_dependency_wait();
  grid_dependency_trigger();
  const int pairs = p.tokens * p.top_k;
  build_expert_groups<kGateUpThreads>(p.idx, pairs, p.experts, g);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int I = p.inter;
  const int nvec = p.hidden / 8;
  const T* x = static_cast<const T*>(p.x);
  const T* gate_up = static_cast<const T*>(p.gate_up);
  T* act = static_cast<T*>(p.act);
  const int64_t tasks = static_cast<int64_t>(g.count) * I;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (kGateUpThreads / 32);
  Vec<T, 8> wg[NVL], wu[NVL];
  const auto load_task = [&](int64_t task) {
    const int u = static_cast<int>(task / I);
    const int i = static_cast<int>(task - static_cast<int64_t>(u) * I);
    const T* expert_rows = gate_up + static_cast<int64_t>(g.expert[u]) * 2 * I * p.hidden;
    const bool il = p.gate_up_interleaved != 0;
    const T* gate_row = expert_rows + gate_up_row(i, I, false, il) * p.hidden;
    const T* up_row = expert_rows + gate_up_row(i, I, true, il) * p.hidden;
#pragma unroll
    for (int m = 0; m < NVL; ++m) {
      wg[m] = load_weights(gate_row, lane + 32 * m, nvec);
      wu[m] = load_weights(up_row, lane + 32 * m, nvec);
    }
  };
  const int64_t first = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x;
  if (first < tasks) load_task(first);  // in flight while the block stages x

  uint4* x_s = reinterpret_cast<uint4*>(x_raw);  // [T, nvec] when X_SMEM
  if constexpr (X_SMEM) {
    for (int c = threadIdx.x; c < p.tokens * nvec; c += blockDim.x) {
      const int t = c / nvec;
      x_s[c] = __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(t) * p.x_row_stride) + (c - t * nvec));
    }
    __syncthreads();
  }

  for (int64_t task = first; task < tasks; task += stride) {
    if (task != first) load_task(task);
    const int u = static_cast<int>(task / I);
    const int i = static_cast<int>(task - static_cast<int64_t>(u) * I);
    unsigned long long mask = g.mask[u];
    while (mask != 0) {
      const int q = __ffsll(static_cast<long long>(mask)) - 1;
      mask &= mask - 1;
      const int t = q / p.top_k;
      const T* xr = x + static_cast<int64_t>(t) * p.x_row_stride;
      const uint4* xr_s = x_s + t * nvec;
      float acc_g = 0.f, acc_u = 0.f;
#pragma unroll
      for (int m = 0; m < NVL; ++m) {
        const int v = min(lane + 32 * m, nvec - 1);
        Vec<T, 8> xv;
        if constexpr (X_SMEM) {
          const uint4 raw = xr_s[v];  // a warp reads 512 contiguous bytes: no bank conflict
          xv = *reinterpret_cast<const Vec<T, 8>*>(&raw);
        } else {
          xv = load_cached(xr + v * 8);
        }
        acc_g = dot8(wg[m], xv, acc_g);
        acc_u = dot8(wu[m], xv, acc_u);
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        acc_g += __shfl_xor_sync(0xffffffffu, acc_g, offset);
        acc_u += __shfl_xor_sync(0xffffffffu, acc_u, offset);
      }
      if (lane == 0) {
        const float a = round_to<T>(gelu_tanh(round_to<T>(acc_g))) * round_to<T>(acc_u);
        act[static_cast<int64_t>(q) * I + i] = Float<T>::store(a);
      }
    }
  }
}

// NVB: 16-byte vectors per lane covering one I row with 8 lanes (I <= 8 * NVB * 8). The block's
// act rows ([P, I], at most 64 x 2 KB) are staged in dynamic shared memory once, so a warp holds
// only its weight slice in registers (64 registers: 4 blocks, 32 warps per SM, where act in
// registers allowed 2 blocks, 2.7 waves of blocks at H = 2816). Measured alone on an H200, 1 token:
// 15.8 us against 16.4 us with act in registers; the block's setup, not occupancy, bounds it.
template <typename T, int NVB>
__global__ void __launch_bounds__(kDownThreads, NVB <= 11 ? kDownMinBlocks : 2)
    moe_decode_down_kernel(const __grid_constant__ MoeExpertsDecodeParams p) {
  static_assert(sizeof(T) == 2, "16-byte vectors of 8 elements");
  extern __shared__ __align__(16) unsigned char act_raw[];
  __shared__ ExpertGroups g;
  __shared__ float ys[kDecodeMaxPairs][kDownRows];
  const int pairs = p.tokens * p.top_k;
  // Pairs with an out-of-range expert id belong to no group: they stay 0.
  for (int o = threadIdx.x; o < pairs * kDownRows; o += blockDim.x) ys[o / kDownRows][o % kDownRows] = 0.f;
  build_expert_groups<kDownThreads>(p.idx, pairs, p.experts, g);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int r = lane / kDownLanes;
  const int sub = lane % kDownLanes;
  const int H = p.hidden;
  const int I = p.inter;
  const int nvec = I / 8;
  const int h0 = blockIdx.x * kDownRows;
  const bool row_ok = h0 + r < H;
  const int h = min(h0 + r, H - 1);
  const T* down = static_cast<const T*>(p.down);
  const auto row_of = [&](int u) { return down + (static_cast<int64_t>(g.expert[u]) * H + h) * I; };

  // The first task's weights (and the routing, complete before kernel A let us launch) are in
  // flight while kernel A finishes; act is its output.
  Vec<T, 8> w[NVB];
  if (warp < g.count) {
#pragma unroll
    for (int m = 0; m < NVB; ++m) w[m] = load_weights(row_of(warp), sub + kDownLanes * m, nvec);
  }
  grid_dependency_wait();
  const uint4* act = static_cast<const uint4*>(p.act);
  uint4* act_s = reinterpret_cast<uint4*>(act_raw);
  for (int c = threadIdx.x; c < pairs * nvec; c += blockDim.x) act_s[c] = act[c];
  __syncthreads();

  for (int u = warp; u < g.count; u += kDownThreads / 32) {
    if (u != warp) {
#pragma unroll
      for (int m = 0; m < NVB; ++m) w[m] = load_weights(row_of(u), sub + kDownLanes * m, nvec);
    }
    unsigned long long mask = g.mask[u];
    while (mask != 0) {
      const int q = __ffsll(static_cast<long long>(mask)) - 1;
      mask &= mask - 1;
      const uint4* ar = act_s + q * nvec;
      float acc = 0.f;
#pragma unroll
      for (int m = 0; m < NVB; ++m) {
        const uint4 a = ar[min(sub + kDownLanes * m, nvec - 1)];
        acc = dot8(w[m], *reinterpret_cast<const Vec<T, 8>*>(&a), acc);
      }
#pragma unroll
      for (int offset = kDownLanes / 2; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      if (sub == 0 && row_ok) ys[q][r] = p.weights[q] * round_to<T>(acc);
    }
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  for (int o = threadIdx.x; o < p.tokens * kDownRows; o += blockDim.x) {
    const int t = o / kDownRows;
    const int rr = o % kDownRows;
    if (h0 + rr >= H) continue;
    float s = 0.f;
    for (int j = 0; j < p.top_k; ++j) s += ys[t * p.top_k + j][rr];
    out[static_cast<int64_t>(t) * p.out_row_stride + h0 + rr] = Float<T>::store(s);
  }
}

}  // namespace gemma4x::moe

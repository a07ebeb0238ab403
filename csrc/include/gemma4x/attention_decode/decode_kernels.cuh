// Decode attention over a per-slot KV cache (flash-decoding), sm_80+ tensor-core MMA.
//
// One CTA owns one (sequence b, KV head, group of 16 query rows, KV split). The 16 query rows
// are the g = nH / nKV query heads sharing the KV head, times the Tq query tokens (row
// m = t * g + j), so each K/V row is read from HBM once for all of them. A CTA streams its
// share of cache rows in tiles of kN rows through a kStages-deep cp.async pipeline:
//
//   S[16, kN]  = Q K^T        warps split the kN keys      (mma.m16n8k16, fp32 accumulate)
//   online softmax in fp32    row max / sum exchanged through shared memory
//   O[16, D]  += P V          warps split the D columns    (P rounded to the input dtype)
//
// The rows a sequence may see come from its query positions on the device (no host sync, so
// a CUDA graph captured once serves every length): full layers read rows [lo, max_pos] only
// (lo = min_pos - window_left with a window), ring layers rows [0, min(R, max_pos + 1)) and
// mask by ring_pos. Splits divide that range evenly at run time; a split with no row writes
// lse = -inf (weight 0 in the combine kernel) and zeros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gemma4x/attention_decode/params.h"
#include "gemma4x/common/pdl.cuh"

namespace gemma4x::attention_decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kM = 16;       // query rows per CTA: one mma M tile
constexpr int kStages = 3;   // 2 tiles in flight while one is consumed: >= 64 KB per SM at D >= 256,
                             // above the ~36 KB per SM that 4.8 TB/s x ~1 us latency needs

// Keys per tile: 64 KB of K+V per stage at D = 256 and 512 (3 stages fit the 227 KB of smem);
// at least 8 keys per warp for the S = Q K^T n8 tiles.
template <int D>
struct Tile {
  static_assert(D % 64 == 0 && D >= 64 && D <= 512, "head_dim must be a multiple of 64 in [64, 512]");
  static constexpr int kN = D == 512 ? 32 : 64;
  static constexpr int kKeysPerWarp = kN / kWarps;         // 8 or 16
  static constexpr int kNTiles = kKeysPerWarp / 8;         // n8 tiles of S per warp
  static constexpr int kColsPerWarp = D / kWarps;          // columns of O per warp
  static constexpr int kOTiles = kColsPerWarp / 8;         // n8 tiles of O per warp
  static constexpr int kChunks = D / 8;                    // 16-byte chunks per row
  static constexpr int kPStride = kN + 8;                  // P row pad: conflict-free ldmatrix
  static constexpr int kQBytes = kM * D * 2;
  static constexpr int kKVBytes = kN * D * 2;              // one of K or V, one stage
  static constexpr int kPBytes = kM * kPStride * 2;
  static constexpr int kRedBytes = 2 * kWarps * kM * 4;
  static constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + kPBytes + kRedBytes;
  static_assert(kSmemBytes <= 227 * 1024, "decode attention tile does not fit shared memory");
  static_assert(kColsPerWarp % 16 == 0, "each warp takes O columns in pairs of n8 tiles");
  static_assert(kKeysPerWarp % 8 == 0, "each warp needs whole n8 tiles of keys");
};

// Rows of D elements in 16-byte chunks; chunk c of row r lives at chunk c ^ (r & 7), so the 8
// rows one ldmatrix reads at the same column fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; zero-fills (and reads nothing) when !valid.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

// The cache rows [lo, hi) sequence b may see, from its query positions.
__device__ __forceinline__ void visible_rows(const DecodeParams& p, int b, int& lo, int& hi) {
  int64_t max_pos = -1, min_pos = INT64_MAX;
  for (int t = 0; t < p.tq; ++t) {
    const int64_t qp = p.q_pos[static_cast<int64_t>(b) * p.tq + t];
    max_pos = qp > max_pos ? qp : max_pos;
    min_pos = qp < min_pos ? qp : min_pos;
  }
  const int64_t h = max_pos + 1 < p.rows ? max_pos + 1 : p.rows;
  hi = h < 0 ? 0 : static_cast<int>(h);
  lo = 0;
  if (p.ring_pos == nullptr && p.window_left >= 0 && min_pos >= 0) {
    const int64_t l = min_pos - p.window_left;
    lo = l <= 0 ? 0 : (l >= hi ? hi : static_cast<int>(l));
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) decode_attention_kernel(const __grid_constant__ DecodeParams p) {
  using Cfg = Tile<D>;
  constexpr int kN = Cfg::kN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + Cfg::kQBytes);
  T* sV = reinterpret_cast<T*>(smem + Cfg::kQBytes + kStages * Cfg::kKVBytes);
  T* sP = reinterpret_cast<T*>(smem + Cfg::kQBytes + 2 * kStages * Cfg::kKVBytes);
  float* sMax = reinterpret_cast<float*>(smem + Cfg::kQBytes + 2 * kStages * Cfg::kKVBytes + Cfg::kPBytes);
  float* sSum = sMax + kWarps * kM;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x;
  const int kvh = blockIdx.y / p.row_groups;
  const int rg = blockIdx.y % p.row_groups;
  const int b = blockIdx.z;
  const int g = p.num_heads / p.num_kv_heads;
  const int m_total = p.tq * g;

  grid_dependency_wait();  // q, the cache and the positions come from the kernels before
  const int64_t slot = p.slots != nullptr ? p.slots[b] : b;
  int lo, hi;
  visible_rows(p, b, lo, hi);
  if (slot < 0 || slot >= p.num_slots) hi = lo;  // a bad slot sees nothing rather than faulting
  const int num_tiles = (hi - lo + kN - 1) / kN;
  const int tiles_per_split = (num_tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = split * tiles_per_split;
  const int t_end = min(num_tiles, t_begin + tiles_per_split);
  const int my_tiles = max(0, t_end - t_begin);
  const int row0 = lo + t_begin * kN;               // first cache row of this split
  const int row_end = min(hi, lo + t_end * kN);     // one past its last

  const T* kbase = static_cast<const T*>(p.k) + slot * p.k_stride_slot + kvh * p.k_stride_head;
  const T* vbase = static_cast<const T*>(p.v) + slot * p.v_stride_slot + kvh * p.v_stride_head;

  // ---- Q tile (16 rows, zero rows past m_total), part of the first commit group.
  for (int i = tid; i < kM * Cfg::kChunks; i += kThreads) {
    const int r = i / Cfg::kChunks, c = i % Cfg::kChunks;
    const int m = rg * kM + r;
    const bool ok = m < m_total;
    const int t = ok ? m / g : 0, h = kvh * g + (ok ? m % g : 0);
    const T* src = static_cast<const T*>(p.q) + b * p.q_stride_b + t * p.q_stride_t + h * p.q_stride_h + c * 8;
    cp_async16(smem_addr(sQ + swz<D>(r, c)), ok ? src : static_cast<const T*>(p.q), ok);
  }

  auto load_tile = [&](int tile, int stage) {
    const int r_first = row0 + tile * kN;
    T* dk = sK + stage * (kN * D);
    T* dv = sV + stage * (kN * D);
#pragma unroll 4
    for (int i = tid; i < kN * Cfg::kChunks; i += kThreads) {
      const int r = i / Cfg::kChunks, c = i % Cfg::kChunks;
      const int row = r_first + r;
      const bool ok = row < row_end;
      const int64_t rr = ok ? row : 0;
      cp_async16(smem_addr(dk + swz<D>(r, c)), kbase + rr * p.k_stride_row + c * 8, ok);
      cp_async16(smem_addr(dv + swz<D>(r, c)), vbase + rr * p.v_stride_row + c * 8, ok);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    cp_async_commit();
  }
  // The combine kernel may become resident now (it fits beside this CTA) and wait for us there.
  grid_dependency_trigger();

  // The two query rows this thread holds in the m16n8 accumulator layout: lane/4 and lane/4 + 8.
  int64_t qpos[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = rg * kM + (lane >> 2) + 8 * i;
    qpos[i] = m < m_total ? p.q_pos[static_cast<int64_t>(b) * p.tq + m / g] : -1;  // -1: padding row, no key
  }
  const int64_t* rpos = p.ring_pos != nullptr ? p.ring_pos + slot * p.ring_stride_slot : nullptr;

  float o[Cfg::kOTiles][4];
#pragma unroll
  for (int n = 0; n < Cfg::kOTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  const uint32_t sQ_addr = smem_addr(sQ);
  const uint32_t sP_addr = smem_addr(sP);

  for (int it = 0; it < my_tiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile `it` visible to all; everyone is done with the stage refilled below
    {
      const int nt = it + kStages - 1;
      if (nt < my_tiles) load_tile(nt, nt % kStages);
      cp_async_commit();
    }
    const int stage = it % kStages;
    const uint32_t sK_addr = smem_addr(sK + stage * (kN * D));
    const uint32_t sV_addr = smem_addr(sV + stage * (kN * D));

    // ---- S = Q K^T for this warp's keys.
    float s[Cfg::kNTiles][4];
#pragma unroll
    for (int n = 0; n < Cfg::kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const int key0 = warp * Cfg::kKeysPerWarp;
#pragma unroll 8
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      {
        const int r = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = ks * 2 + (lane >> 4);
        ldsm_x4(a, sQ_addr + swz<D>(r, c) * 2);
      }
      if constexpr (Cfg::kNTiles == 2) {
        uint32_t bk[4];
        const int r = key0 + (lane & 7) + (lane >> 4) * 8;
        const int c = ks * 2 + ((lane >> 3) & 1);
        ldsm_x4(bk, sK_addr + swz<D>(r, c) * 2);
        Mma<T>::run(s[0], a, bk[0], bk[1]);
        Mma<T>::run(s[1], a, bk[2], bk[3]);
      } else {
        uint32_t bk[2];
        const int r = key0 + (lane & 7);
        const int c = ks * 2 + ((lane >> 3) & 1);
        ldsm_x2(bk, sK_addr + swz<D>(r, c) * 2);
        Mma<T>::run(s[0], a, bk[0], bk[1]);
      }
    }

    // ---- mask, scale to log2 units, row max over this warp's keys.
    const int tile_row = row0 + it * kN;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < Cfg::kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = tile_row + key0 + n * 8 + 2 * (lane & 3) + (e & 1);
        const int i = e >> 1;
        bool ok = row < row_end;
        int64_t kp = row;
        if (rpos != nullptr) kp = ok ? rpos[row] : -1;
        ok = ok && kp >= 0 && kp <= qpos[i] && (p.window_left < 0 || qpos[i] - kp <= p.window_left);
        s[n][e] = ok ? s[n][e] * p.scale_log2 : -INFINITY;
        mx[i] = fmaxf(mx[i], s[n][e]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    if ((lane & 3) == 0) {
      sMax[warp * kM + (lane >> 2)] = mx[0];
      sMax[warp * kM + (lane >> 2) + 8] = mx[1];
    }
    __syncthreads();

    // ---- online softmax: new running max, P = exp2(S - max) into smem, partial row sums.
    float alpha[2], m_use[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float m_tile = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m_tile = fmaxf(m_tile, sMax[w * kM + (lane >> 2) + 8 * i]);
      const float m_new = fmaxf(row_max[i], m_tile);
      m_use[i] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: exp2(-inf) = 0, no NaN
      alpha[i] = exp2f(row_max[i] - m_use[i]);
      row_max[i] = m_new;
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < Cfg::kNTiles; ++n) {
      const float p0 = exp2f(s[n][0] - m_use[0]), p1 = exp2f(s[n][1] - m_use[0]);
      const float p2 = exp2f(s[n][2] - m_use[1]), p3 = exp2f(s[n][3] - m_use[1]);
      sum[0] += p0 + p1;
      sum[1] += p2 + p3;
      const int col = key0 + n * 8 + 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(sP + (lane >> 2) * Cfg::kPStride + col) = Mma<T>::pack(p0, p1);
      *reinterpret_cast<uint32_t*>(sP + ((lane >> 2) + 8) * Cfg::kPStride + col) = Mma<T>::pack(p2, p3);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
    }
    if ((lane & 3) == 0) {
      sSum[warp * kM + (lane >> 2)] = sum[0];
      sSum[warp * kM + (lane >> 2) + 8] = sum[1];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float tot = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) tot += sSum[w * kM + (lane >> 2) + 8 * i];
      row_sum[i] = row_sum[i] * alpha[i] + tot;
    }
#pragma unroll
    for (int n = 0; n < Cfg::kOTiles; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // ---- O += P V for this warp's columns.
    const int col0 = warp * Cfg::kColsPerWarp;
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t a[4];
      {
        const int r = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = kk * 16 + (lane >> 4) * 8;
        ldsm_x4(a, sP_addr + (r * Cfg::kPStride + c) * 2);
      }
#pragma unroll
      for (int n = 0; n < Cfg::kOTiles; n += 2) {
        uint32_t bv[4];
        const int r = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int c = (col0 + n * 8) / 8 + (lane >> 4);
        ldsm_x4_trans(bv, sV_addr + swz<D>(r, c) * 2);
        Mma<T>::run(o[n], a, bv[0], bv[1]);
        Mma<T>::run(o[n + 1], a, bv[2], bv[3]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory

  // ---- epilogue: O / l into the output (one split) or the fp32 partials with their lse.
  const int col0 = warp * Cfg::kColsPerWarp + 2 * (lane & 3);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = rg * kM + (lane >> 2) + 8 * i;
    if (m >= m_total) continue;
    const int t = m / g, h = kvh * g + m % g;
    const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
    if (p.num_splits == 1) {
      T* dst = static_cast<T*>(p.out) + b * p.out_stride_b + t * p.out_stride_t + h * p.out_stride_h + col0;
#pragma unroll
      for (int n = 0; n < Cfg::kOTiles; ++n) {
        *reinterpret_cast<uint32_t*>(dst + n * 8) = Mma<T>::pack(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
      }
    } else {
      const int64_t row_id = ((static_cast<int64_t>(split) * p.batch + b) * p.tq + t) * p.num_heads + h;
      float* dst = p.o_part + row_id * D + col0;  // zeros from a split with no key
#pragma unroll
      for (int n = 0; n < Cfg::kOTiles; ++n) {
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
      }
      if (warp == 0 && (lane & 3) == 0) p.lse_part[row_id] = row_sum[i] > 0.f ? row_max[i] + log2f(row_sum[i]) : -INFINITY;
    }
  }
}

// Block-wide max / sum of one float per thread; every thread receives the result. `red` holds
// 32 floats; the trailing barrier lets the caller reuse it.
template <bool kMax>
__device__ __forceinline__ float block_allreduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, u) : v + u;
  }
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : (kMax ? -INFINITY : 0.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, u) : v + u;
  }
  __syncthreads();
  return v;
}

constexpr int kCombineThreads = 512;
constexpr int kMaxSplits = 1024;  // the launcher never picks more

// out[b, t, h] = sum_s w_s O_s / sum_s w_s with w_s = exp2(lse_s - max lse); zeros when no split
// saw a key. One CTA per (b, t, h) row: the lse of all splits are read at once, then
// kCombineThreads / (D / 4) groups of float4 columns sum disjoint splits in parallel (a serial
// chain over the splits measured ~0.4 us per split), and the groups add up in shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int kCols = D / 4;
  constexpr int kGroups = kCombineThreads / kCols;
  static_assert(kCombineThreads % kCols == 0, "whole groups of float4 columns");
  __shared__ float s_w[kMaxSplits];
  __shared__ float red[32];
  __shared__ float4 s_acc[kCombineThreads];
  if (p.flags & kFlagCombineTriggersEarly) grid_dependency_trigger();
  grid_dependency_wait();  // the partials of every split
  const int row = blockIdx.x;  // (b * Tq + t) * nH + h
  const int h = row % p.num_heads;
  const int bt = row / p.num_heads;
  const int t = bt % p.tq, b = bt / p.tq;
  const int tid = threadIdx.x;
  const int64_t rows_per_split = static_cast<int64_t>(p.batch) * p.tq * p.num_heads;
  float mx = -INFINITY;
  for (int s = tid; s < p.num_splits; s += kCombineThreads) {
    const float l = p.lse_part[s * rows_per_split + row];
    s_w[s] = l;
    mx = fmaxf(mx, l);
  }
  mx = block_allreduce<true>(mx, red);  // its barrier also publishes s_w
  float wsum = 0.f;
  for (int s = tid; s < p.num_splits; s += kCombineThreads) {
    const float w = mx == -INFINITY ? 0.f : exp2f(s_w[s] - mx);  // exp2(-inf) = 0: empty splits
    s_w[s] = w;
    wsum += w;
  }
  wsum = block_allreduce<false>(wsum, red);
  const int col = tid % kCols, grp = tid / kCols;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const float* src = p.o_part + static_cast<int64_t>(row) * D + col * 4;
#pragma unroll 4
  for (int s = grp; s < p.num_splits; s += kGroups) {
    const float w = s_w[s];
    const float4 v = *reinterpret_cast<const float4*>(src + s * rows_per_split * D);  // zeros when empty
    acc.x += w * v.x;
    acc.y += w * v.y;
    acc.z += w * v.z;
    acc.w += w * v.w;
  }
  s_acc[tid] = acc;
  __syncthreads();
  if (grp != 0) return;
#pragma unroll
  for (int g = 1; g < kGroups; ++g) {
    const float4 v = s_acc[g * kCols + col];
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  T* dst = static_cast<T*>(p.out) + b * p.out_stride_b + t * p.out_stride_t + h * p.out_stride_h + col * 4;
  uint2 packed;
  packed.x = Mma<T>::pack(acc.x * inv, acc.y * inv);
  packed.y = Mma<T>::pack(acc.z * inv, acc.w * inv);
  *reinterpret_cast<uint2*>(dst) = packed;
}

// The same merge spread over more CTAs, each with every load in flight at once: one CTA per
// (b, t, h) row and 64 output columns, 16 groups of 16 threads (one float4 column each) that
// take splits grp, grp + 16, ... The first kWidePer splits of every group are loaded (partials
// and lse together) before any of them is used, so a merge of up to 16 * kWidePer splits costs
// one L2 round trip plus a block max, where the kernel above chains several.
constexpr int kWideThreads = 256;
constexpr int kWideCols4 = 16;                         // float4 columns per CTA: 64 outputs
constexpr int kWideGroups = kWideThreads / kWideCols4;  // splits read side by side
constexpr int kWidePer = 8;                            // splits per thread per round

template <typename T, int D>
__global__ void __launch_bounds__(kWideThreads) decode_combine_wide_kernel(const __grid_constant__ DecodeParams p) {
  static_assert(D % (4 * kWideCols4) == 0, "whole CTAs of 64 columns");
  __shared__ float red[32];
  __shared__ float4 s_acc[kWideThreads];
  __shared__ float s_wsum[kWideGroups];
  if (p.flags & kFlagCombineTriggersEarly) grid_dependency_trigger();
  grid_dependency_wait();  // the partials of every split
  const int row = blockIdx.x;  // (b * Tq + t) * nH + h
  const int h = row % p.num_heads;
  const int bt = row / p.num_heads;
  const int t = bt % p.tq, b = bt / p.tq;
  const int tid = threadIdx.x, col4 = tid % kWideCols4, grp = tid / kWideCols4;
  const int c = (blockIdx.y * kWideCols4 + col4) * 4;  // first of this thread's 4 columns
  const int64_t rows_per_split = static_cast<int64_t>(p.batch) * p.tq * p.num_heads;
  const float* lse = p.lse_part + row;
  const float* src = p.o_part + static_cast<int64_t>(row) * D + c;
  const int n = p.num_splits;
  constexpr int kRound = kWideGroups * kWidePer;

  float4 v[kWidePer];
  float l[kWidePer];
#pragma unroll
  for (int j = 0; j < kWidePer; ++j) {
    const int s = grp + j * kWideGroups;
    l[j] = s < n ? lse[s * rows_per_split] : -INFINITY;
    v[j] = s < n ? *reinterpret_cast<const float4*>(src + s * rows_per_split * D) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kWidePer; ++j) mx = fmaxf(mx, l[j]);
  for (int s = grp + kRound; s < n; s += kWideGroups) mx = fmaxf(mx, lse[s * rows_per_split]);
  mx = block_allreduce<true>(mx, red);
  const float m_use = mx == -INFINITY ? 0.f : mx;  // no split saw a key: every weight is 0
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float wsum = 0.f;
#pragma unroll
  for (int j = 0; j < kWidePer; ++j) {
    const float w = exp2f(l[j] - m_use);  // exp2(-inf) = 0: empty or absent splits
    wsum += w;
    acc.x += w * v[j].x;
    acc.y += w * v[j].y;
    acc.z += w * v[j].z;
    acc.w += w * v[j].w;
  }
  for (int s0 = kRound; s0 < n; s0 += kRound) {  // more than 128 splits: further rounds
#pragma unroll
    for (int j = 0; j < kWidePer; ++j) {
      const int s = s0 + grp + j * kWideGroups;
      l[j] = s < n ? lse[s * rows_per_split] : -INFINITY;
      v[j] = s < n ? *reinterpret_cast<const float4*>(src + s * rows_per_split * D) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < kWidePer; ++j) {
      const float w = exp2f(l[j] - m_use);
      wsum += w;
      acc.x += w * v[j].x;
      acc.y += w * v[j].y;
      acc.z += w * v[j].z;
      acc.w += w * v[j].w;
    }
  }
  s_acc[tid] = acc;
  if (col4 == 0) s_wsum[grp] = wsum;
  __syncthreads();
  if (grp != 0) return;
  float total = s_wsum[0];
#pragma unroll
  for (int g = 1; g < kWideGroups; ++g) {
    const float4 u = s_acc[g * kWideCols4 + col4];
    acc.x += u.x;
    acc.y += u.y;
    acc.z += u.z;
    acc.w += u.w;
    total += s_wsum[g];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* dst = static_cast<T*>(p.out) + b * p.out_stride_b + t * p.out_stride_t + h * p.out_stride_h + c;
  uint2 packed;
  packed.x = Mma<T>::pack(acc.x * inv, acc.y * inv);
  packed.y = Mma<T>::pack(acc.z * inv, acc.w * inv);
  *reinterpret_cast<uint2*>(dst) = packed;
}

}  // namespace gemma4x::attention_decode

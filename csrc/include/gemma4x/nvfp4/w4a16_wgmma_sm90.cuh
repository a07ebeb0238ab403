// W4A16 prefill GEMM on SM90 (sm_90a): NVFP4 weights in the packed layout of params.h (the same
// bytes the decode kernels read; no second copy), bf16 activations, BF16 WGMMA.
//
//   Y^T[n, m] = g * sum_k W[n, k] * X[m, k]     n = output feature (wgmma M), m = token (wgmma N)
//
// Warp specialisation, persistent grid (one CTA per SM, 384 threads):
//  * warpgroup 0, one thread: the producer. Per 64-column k stage it issues two TMA copies into a
//    ring of kStages shared-memory stages guarded by full/empty mbarriers: the 8 packed 576-byte
//    units of the tile's 128 weight rows (one 4-D box, 64-byte swizzle, 4.5 KB) and the 64
//    columns of the tile's BN tokens (one 2-D box, 128-byte swizzle, the wgmma B layout).
//  * warpgroups 1 and 2: consumers, 64 weight rows each (warp w of a consumer: one 16-row unit).
//    Each turns its unit into the wgmma A fragments in registers and issues RS wgmma
//    (m64n128k16, BN / 128 of them per k16 step) with B (tokens, K-major) from shared memory.
//    The A registers are double-buffered across stages: stage s + 1 is dequantised while the
//    tensor cores still run stage s (wgmma.wait_group 1), then stage s is released.
//
// The packed unit orders its codes for mma.sync with a permuted K (lane 4g + t holds the 16
// columns of scale block t), while wgmma reads B in natural K order. A consumer thread (g, t)
// therefore reads, for k16 step j, the 16-byte chunk that lane 4g + j owns (rows g, g + 8,
// columns 16j .. 16j + 15) and takes its nibble pair t out of each word: the natural-order A
// fragment {row g / g + 8} x {columns 16j + 2t + {0, 1}, 16j + 8 + 2t + {0, 1}}. The four lanes of
// a quad read the same chunk (a broadcast), and the 64-byte TMA swizzle spreads the 8 quads of a
// warp over all 32 banks: one wavefront per 128 bytes, as a straight 16-byte-per-lane read.
//
// Dequantisation is exact (as in w4a16_kernels.cuh): an e2m1 pair becomes the bf16 pair
// e2m1 * 2^-126 with three integer ops, and one bf16x2 multiply by the block scale * 2^118
// (e4m3 -> f16 -> fp32 -> bf16, exact) gives e2m1 * s * 2^-8. The fp32
// accumulator is multiplied by g * 2^8 in the epilogue.
//
// Epilogues: kStore writes bf16(acc * g) to out[token, feature]; kGeglu takes weights packed with
// interleave_gate_up (16-row block b = gate rows 8b..8b+7, then up rows 8b..8b+7), so a thread
// holds gate and up of one intermediate row for the same tokens and writes
// act[token, i] = bf16(bf16(gelu_tanh(bf16(gate))) * bf16(up)) (the bf16 expert op's roundings).
//
// Groups (routed experts): tokens are rows of X sorted by expert (offsets[e] .. offsets[e+1]);
// weights [E][N/16][K/64][576]. Tiles are (expert, 128 weight rows, BN tokens); the token tiles of
// an expert may run into the next expert's rows, whose outputs are not stored. Tile counts live
// on the device only: each CTA builds the per-expert token-tile prefix in shared memory.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "gemma4x/common/bf16x2.cuh"
#include "gemma4x/common/bulk_copy.cuh"
#include "gemma4x/common/sm90_wgmma.cuh"
#include "gemma4x/common/tma.cuh"
#include "gemma4x/nvfp4/params.h"

namespace gemma4x::nvfp4::wgmma {

constexpr int kThreads = 384;       // producer warpgroup + 2 consumer warpgroups
constexpr int kStageK = 64;         // one packed unit; one 128-byte swizzle row of bf16 tokens
constexpr int kUnitRows64 = kUnitBytes / 64;  // a unit is 9 rows of 64 bytes in the W map
constexpr int kMaxGroups = 256;

enum class Epilogue : int32_t { kStore = 0, kGeglu = 1 };

// Tile = (128 * kMH weight rows) x (128 * kNB tokens); each consumer warpgroup holds kMH x kNB
// m64n128 fp32 accumulators (kMH * kNB <= 2: 128 registers). Weight half h of the tile is rows
// 128h .. 128h + 127, consumer c its rows 64c .. 64c + 63, warp w the 16-row unit 8h + 4c + w.
// Shared memory per k stage: the tokens' 64 columns (128 * kNB rows of 128 bytes) and the
// 8 * kMH units of 576 bytes. Bytes per k stage and MMA: 128x256 (kNB 2) 37 KB, 256x128 (kMH 2)
// 25 KB for the same flops; measured on H200 the 128x256 tile streams ~5.2 TB/s out of L2 across
// the chip at 576 TFLOP/s, so the 256x128 tile moves a third less per flop. Stages: as many as
// fit in ~220 KB.
template <int kMH_, int kNB_>
struct Config {
  static constexpr int kMH = kMH_;
  static constexpr int kNB = kNB_;
  static constexpr int kBN = 128 * kNB;
  static constexpr int kTileRows = 128 * kMH;
  static constexpr int kRowBlocks = kTileRows / kUnitRows;
  static constexpr int kXBytes = kBN * kStageK * 2;
  static constexpr int kWBytes = kRowBlocks * kUnitBytes;
  static constexpr int kWStride = (kWBytes + 1023) / 1024 * 1024;  // stages stay 1024-byte aligned
  static constexpr int kStageBytes = kXBytes + kWStride;
  static constexpr int kStages = (220 * 1024 / kStageBytes) < 8 ? (220 * 1024 / kStageBytes) : 8;
  static constexpr int kBarOffset = kStages * kStageBytes;
  static constexpr int kTableOffset = kBarOffset + 2 * kStages * 8;
  static constexpr int kSmemBytes = kTableOffset + (kMaxGroups + 1) * 4 + 1024;  // +1024: base alignment
  static_assert(kNB >= 1 && kMH >= 1 && kNB * kMH <= 2, "at most 2 m64n128 accumulators per thread");
  static_assert(kXBytes % 1024 == 0, "stages must stay 1024-byte aligned for the 128-byte swizzle");
  static_assert(kStages >= 4, "too few stages to cover the load latency");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};

struct GemmParams {
  const float* global_scale;  // per group: [G] (kStore) or [G, 2] gate/up (kGeglu)
  const int32_t* offsets;     // [G + 1] token rows of each group in X; nullptr: one group of `tokens`
  void* out;                  // kStore: [tokens, N] bf16; kGeglu: [tokens, N / 2] bf16
  int64_t out_row_stride;     // elements
  int32_t tokens;             // rows of X (dense: M)
  int32_t n;                  // weight rows per group (N % 16 == 0; kGeglu: 2I)
  int32_t k;                  // K % 64 == 0
  int32_t groups;             // 1 .. kMaxGroups
  Epilogue epilogue;
};

// The warpgroup and TMA primitives (tma_load_2d / 4d, setmaxnreg, wgmma fences, fence_acc) are
// common/sm90_wgmma.cuh and common/tma.cuh; these two name the forms this kernel uses.

// Shared-memory matrix descriptor of a K-major 128-byte-swizzled tile (rows of 128 bytes, 8-row
// groups 1024 bytes apart): leading byte offset 16 (unused), stride 1024.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) { return gmma_desc(addr, 16, 1024); }

// acc[64 x 128] += A (registers, 4 per thread) * B (shared memory, K-major), one bf16 k16 step.
__device__ __forceinline__ void wgmma_rs_m64n128(float (*a)[4], const uint32_t (&f)[4], uint64_t desc) {
  wgmma_rs_64x128<true>(a, f, desc, 1);
}

__device__ __forceinline__ uint4 lds16(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds8(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// Byte offset of unswizzled offset o inside a 64-byte-swizzled TMA box (16-byte chunk bits 4-5
// XOR address bits 7-8; the box starts 1024-byte aligned).
__device__ __forceinline__ uint32_t swz64(uint32_t o) { return o ^ ((o >> 3) & 0x30u); }

// The e2m1 pair at nibble position p of each 16-bit half, as bf16 e2m1 * 2^-126 (see the header).
__device__ __forceinline__ uint32_t e2m1_pair(uint32_t q, uint32_t shift) {
  const uint32_t t = q << shift;
  return (t & 0x80008000u) | ((t >> 6) & 0x01C001C0u);
}

// Two e4m3 scales (low byte, high byte) -> bf16x2 {s_lo, s_hi} * 2^118, exactly (e4m3 -> f16 ->
// fp32 are exact, the product is a power-of-2 shift, and 3 mantissa bits fit bf16; zero stays 0).
__device__ __forceinline__ uint32_t scales_bf16x2(uint32_t two_e4m3) {
  const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_e4m3), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * 0x1p118f, f.y * 0x1p118f);
  return *reinterpret_cast<const uint32_t*>(&b);
}

__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// The A fragments of one stage (4 k16 steps x 4 registers) for thread (g, t) of a warp whose
// unit starts at shared address `unit` (swizzled offsets precomputed in code_off / scale_off).
__device__ __forceinline__ void dequant_stage(uint32_t stage_w, const uint32_t (&code_off)[4], uint32_t scale_off,
                                              uint32_t shift, uint32_t (&a)[4][4]) {
  const uint2 sc = lds8(stage_w + scale_off);  // bytes 2j, 2j+1: block j of rows g, g+8
  uint32_t s_lo[4], s_hi[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t pair = ((j < 2 ? sc.x : sc.y) >> (16 * (j & 1))) & 0xFFFFu;
    const uint32_t s2 = scales_bf16x2(pair);
    s_lo[j] = __byte_perm(s2, 0, 0x1010);  // {s_g, s_g}
    s_hi[j] = __byte_perm(s2, 0, 0x3232);  // {s_g+8, s_g+8}
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 c = lds16(stage_w + code_off[j]);
    a[j][0] = bf16x2_mul(e2m1_pair(c.x, shift), s_lo[j]);  // row g,   k 2t, 2t+1
    a[j][1] = bf16x2_mul(e2m1_pair(c.z, shift), s_hi[j]);  // row g+8
    a[j][2] = bf16x2_mul(e2m1_pair(c.y, shift), s_lo[j]);  // row g,   k 2t+8, 2t+9
    a[j][3] = bf16x2_mul(e2m1_pair(c.w, shift), s_hi[j]);  // row g+8
  }
}

struct TileCoord {
  int group;
  int row0;    // first weight row
  int token0;  // first token row of X
  int ntok;    // valid tokens of the tile (<= BN)
};

template <class Cfg>
__device__ __forceinline__ TileCoord tile_coord(const GemmParams& p, const int* table, int t, int row_tiles) {
  constexpr int kBN = Cfg::kBN;
  const int nt = t / row_tiles;
  TileCoord c;
  c.row0 = (t - nt * row_tiles) * Cfg::kTileRows;
  int lo = 0, hi = p.groups - 1;  // largest g with table[g] <= nt
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid] <= nt) lo = mid;
    else hi = mid - 1;
  }
  c.group = lo;
  const int first = p.offsets ? p.offsets[lo] : 0;
  const int end = p.offsets ? p.offsets[lo + 1] : p.tokens;
  c.token0 = first + (nt - table[lo]) * kBN;
  c.ntok = min(kBN, end - c.token0);
  return c;
}

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    w4a16_wgmma_kernel(const __grid_constant__ GemmParams p, const __grid_constant__ CUtensorMap tm_w,
                       const __grid_constant__ CUtensorMap tm_x) {
  constexpr int kBN = Cfg::kBN, kNB = Cfg::kNB, kMH = Cfg::kMH, kStages = Cfg::kStages;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + Cfg::kBarOffset);
  uint64_t* empty = full + kStages;
  int* table = reinterpret_cast<int*>(smem + Cfg::kTableOffset);  // [G + 1] token-tile prefix

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], 8);  // one arrival per consumer warp
    }
    fence_barrier_init();
  }
  // Token-tile prefix over the groups (warp 0; up to 8 groups per lane, then a warp scan).
  if (tid < 32) {
    constexpr int kPer = kMaxGroups / 32;
    int cnt[kPer];
    int sum = 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int g = tid * kPer + i;
      int n = 0;
      if (g < p.groups) n = p.offsets ? p.offsets[g + 1] - p.offsets[g] : p.tokens;
      cnt[i] = (max(n, 0) + kBN - 1) / kBN;
      sum += cnt[i];
    }
    int incl = sum;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (tid >= d) incl += v;
    }
    int run = incl - sum;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int g = tid * kPer + i;
      if (g < p.groups) table[g] = run;
      run += cnt[i];
    }
    if (tid == 31) table[p.groups] = incl;  // the total
  }
  __syncthreads();
  const int row_tiles = (p.n + Cfg::kTileRows - 1) / Cfg::kTileRows;
  const int tiles = table[p.groups] * row_tiles;
  const int k_stages = p.k / kStageK;
  const int wg = tid / 128;

  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (tid == 0) {
      int it = 0;
      for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        const TileCoord c = tile_coord<Cfg>(p, table, t, row_tiles);
        for (int kb = 0; kb < k_stages; ++kb, ++it) {
          const int s = it % kStages;
          const uint32_t ph = (it / kStages) & 1;
          mbarrier_wait_parity(&empty[s], ph ^ 1);
          mbarrier_arrive_expect_tx(&full[s], Cfg::kXBytes + Cfg::kWBytes);
          unsigned char* st = smem + s * Cfg::kStageBytes;
          tma_load_2d(st, &tm_x, &full[s], kb * kStageK, c.token0);
          tma_load_4d(st + Cfg::kXBytes, &tm_w, &full[s], 0, kb * kUnitRows64, c.row0 / kUnitRows, c.group);
        }
      }
    }
  } else {
    setmaxnreg_inc<232>();
    const int cw = wg - 1;          // consumer: rows 64 cw .. 64 cw + 63 of each weight half
    const int ct = tid - 128 * wg;  // thread in the consumer
    const int warp = ct >> 5, lane = ct & 31;
    const int g = lane >> 2, tq = lane & 3;
    uint32_t code_off[kMH][4], scale_off[kMH];
#pragma unroll
    for (int h = 0; h < kMH; ++h) {
      const int unit = 8 * h + 4 * cw + warp;  // this warp's 16-row unit of half h in the stage
#pragma unroll
      for (int j = 0; j < 4; ++j) code_off[h][j] = Cfg::kXBytes + swz64(unit * kUnitBytes + 64 * g + 16 * j);
      scale_off[h] = Cfg::kXBytes + swz64(unit * kUnitBytes + kCodeBytes + 8 * g);
    }
    const uint32_t shift = 4 * tq;
    const uint32_t smem_base = smem_addr(smem);

    using H0 = std::integral_constant<int, 0>;
    using H1 = std::integral_constant<int, 1>;
    float acc[kMH][kNB * 16][4];
    uint32_t fa[2][4][4];
    int it = 0;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
      const TileCoord c = tile_coord<Cfg>(p, table, t, row_tiles);
      // A weight half with no valid row issues no wgmma (uniform over the CTA). (Skipping an empty
      // token half the same way makes ptxas serialise every wgmma: C7520.)
      const bool second_m = kMH == 2 && c.row0 + 128 < p.n;
#pragma unroll
      for (int h = 0; h < kMH; ++h)
#pragma unroll
        for (int j = 0; j < kNB * 16; ++j) acc[h][j][0] = acc[h][j][1] = acc[h][j][2] = acc[h][j][3] = 0.f;

      // One wgmma group: weight half h of k stage kb. A fragments into buffer fb, 4 x kNB wgmma,
      // commit, then wait for the previous group; when that group was the last of its stage,
      // the stage goes back to the producer.
      auto group = [&](uint32_t (&fb)[4][4], int kb, auto half) {
        constexpr int h = decltype(half)::value;
        const int s = it % kStages;
        const uint32_t st = smem_base + s * Cfg::kStageBytes;
        if (h == 0) mbarrier_wait_parity(&full[s], (it / kStages) & 1);
        const bool active = h == 0 || second_m;
        if (active) dequant_stage(st, code_off[h], scale_off[h], shift, fb);
        fence_acc<kNB * 16>(acc[h]);
        wgmma_fence();
        if (active) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            wgmma_rs_m64n128(acc[h], fb[j], desc_sw128(st + 32 * j));
            if constexpr (kNB == 2) wgmma_rs_m64n128(acc[h] + 16, fb[j], desc_sw128(st + 16384 + 32 * j));
          }
        }
        wgmma_commit();
        fence_acc<kNB * 16>(acc[h]);
        wgmma_wait<1>();
        // The group before this one is complete: release its stage if it was that stage's last.
        if (h == 0 && kb > 0) {
          __syncwarp();
          if (lane == 0) mbarrier_arrive(&empty[(it + kStages - 1) % kStages]);
        }
        if (h == kMH - 1) ++it;
      };
      int kb = 0;
      if constexpr (kMH == 2) {
        for (; kb < k_stages; ++kb) {
          group(fa[0], kb, H0{});
          group(fa[1], kb, H1{});
        }
        wgmma_wait<0>();
        fence_acc<kNB * 16>(acc[0]);
        fence_acc<kNB * 16>(acc[1 % kMH]);
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&empty[(it + kStages - 1) % kStages]);
      } else {
        // Stage-level double buffering. (A per-k16-step pipeline with six wgmma groups in flight
        // measured slower on H200 at 4096 tokens, 1303.8 against 1240.6 us; bench/RESULTS.md.)
        for (; kb + 1 < k_stages; kb += 2) {
          group(fa[0], kb, H0{});
          group(fa[1], kb + 1, H0{});
        }
        if (kb < k_stages) group(fa[0], kb, H0{});
        wgmma_wait<0>();
        fence_acc<kNB * 16>(acc[0]);
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&empty[(it + kStages - 1) % kStages]);
      }

      // Epilogue.
      __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
      const int ncols = min(c.ntok, kBN);
#pragma unroll
      for (int h = 0; h < kMH; ++h) {
        const int rb = c.row0 / kUnitRows + 8 * h + 4 * cw + warp;  // the warp's 16-row block
        if (rb * kUnitRows >= p.n) continue;
        if (p.epilogue == Epilogue::kStore) {
          const float gs = p.global_scale[c.group] * 256.f;
          const int r0 = rb * kUnitRows + g;
#pragma unroll
          for (int j = 0; j < kNB * 16; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = 8 * j + 2 * tq + e;
              if (col < ncols) {
                __nv_bfloat16* o = out + static_cast<int64_t>(c.token0 + col) * p.out_row_stride + r0;
                o[0] = __float2bfloat16_rn(acc[h][j][e] * gs);
                o[8] = __float2bfloat16_rn(acc[h][j][2 + e] * gs);
              }
            }
          }
        } else {
          const float g_gate = p.global_scale[2 * c.group] * 256.f;
          const float g_up = p.global_scale[2 * c.group + 1] * 256.f;
          const int i = rb * 8 + g;
#pragma unroll
          for (int j = 0; j < kNB * 16; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = 8 * j + 2 * tq + e;
              if (col < ncols) {
                const float gate = round_bf16(acc[h][j][e] * g_gate);
                const float up = round_bf16(acc[h][j][2 + e] * g_up);
                out[static_cast<int64_t>(c.token0 + col) * p.out_row_stride + i] =
                    __float2bfloat16_rn(round_bf16(gelu_tanh(gate)) * up);
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace gemma4x::nvfp4::wgmma

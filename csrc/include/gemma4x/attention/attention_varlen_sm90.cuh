// Prefill / vision attention over packed variable-length sequences (Hopper, sm_90a).
//
// One CTA computes a kBlockM x d output tile of one query head of one sequence. It walks the key
// tiles (kBlockN = 64 keys) that its mask can reach, classifying each one first:
//   skip    no (query, key) pair of the tile is allowed: no load, no math;
//   full    every pair is allowed: no per-element mask;
//   partial per-element mask (window edges, image blocks, sequence end).
// Online softmax in fp32 (exp2 with scale * log2 e folded), P rounded to the input type for P.V.
//
// Data movement: cp.async 16-byte copies into swizzled shared memory, K and V single-buffered
// and overlapped with the math (V(n) lands during S = Q K(n)^T, K(n-1) during O += P V(n)), the
// scheme of FlashAttention-2. The math runs either on warpgroup MMAs (kWgmma: S = Q K^T with both
// operands from shared memory, O += P V with P from registers and V transposed by the descriptor)
// or on warp-level mma.sync m16n8k16 with ldmatrix (any head dim that is a multiple of 16 after
// padding, e.g. 72 -> 80).
//
// Head dim 512: a 64 x 512 fp32 O tile is 256 registers per thread for one warpgroup, too many.
// kDSplit = 2 gives each of two warpgroups half of d: both compute a partial S over their half of
// d, exchange it through shared memory (named barrier per warp pair), sum it (identically in both,
// fp32 addition commutes), run the same softmax and each accumulates its half of O. No flop is
// repeated; the price is a 16 KB fp32 round trip through shared memory per warpgroup and key tile.
//
// Shared-memory layout of a [rows, HD] tile (HD % 64 == 0): HD/64 regions of [rows, 64] elements,
// 128-byte rows, 16-byte chunk c of row r stored at chunk c ^ (r % 8): the canonical 128B-swizzle
// layout of wgmma (K-major for Q and K, MN-major for V), also conflict-free for ldmatrix.
// HD = 80 (head dim 72 padded): plain rows padded by one chunk (176-byte pitch, conflict-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "gemma4x/attention/params.h"
#include "gemma4x/attention/varlen_common.cuh"
#include "gemma4x/common/bulk_copy.cuh"  // smem_addr, fence_proxy_async_shared
#include "gemma4x/common/ldmatrix.cuh"
#include "gemma4x/common/mma.cuh"
#include "gemma4x/common/sm90_wgmma.cuh"

namespace gemma4x::attention {

template <typename T, int HD_, int kBlockM_, int kDSplit_, bool kWgmma_, int kMinBlocks_>
struct AttnConfig {
  using Element = T;
  static constexpr int HD = HD_;  // padded head dim in shared memory / registers
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kKeyTile;
  static constexpr int kDSplit = kDSplit_;
  static constexpr bool kWgmma = kWgmma_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kWarpsM = kBlockM / 16;
  static constexpr int kWarps = kWarpsM * kDSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kHDw = HD / kDSplit;  // d columns each warp contracts (S) and owns (O)
  static constexpr bool kRegions = HD % 64 == 0;
  static constexpr int kChunks = HD / 8;                            // 16-byte chunks per row
  static constexpr int kPitch = kRegions ? 64 : (kChunks + 1) * 8;  // elements per smem row (padded layout)
  static constexpr int kQElems = kBlockM * (kRegions ? HD : kPitch);
  static constexpr int kKElems = kBlockN * (kRegions ? HD : kPitch);
  static constexpr int kSxFloats = kDSplit > 1 ? kWarps * 16 * kBlockN : 0;
  static constexpr int kSmemBytes = (kQElems + 2 * kKElems) * 2 + kSxFloats * 4 + 1024;  // +1024: alignment

  static_assert(HD % 16 == 0, "head dim must be padded to a multiple of 16");
  static_assert(kHDw % 16 == 0, "each warp's d slice must be a multiple of 16");
  static_assert(kDSplit == 1 || kDSplit == 2, "d is split in at most two halves");
  static_assert(kDSplit == 1 || kBlockM == 64, "the d split pairs two warpgroups over one 64-row tile");
  static_assert(!kWgmma || (kRegions && kHDw % 64 == 0), "wgmma needs the 128B-swizzle regions");
  static_assert(!kWgmma || kBlockM % 64 == 0, "a warpgroup owns 64 query rows");
  static_assert(kThreads <= 512, "CTA too large");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};

// ----------------------------------------------------------------------------------------------
// PTX helpers.

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// cp.async writes through the generic proxy, wgmma reads shared memory through the async proxy:
// the wgmma path puts fence_proxy_async_shared() between them.

// ----------------------------------------------------------------------------------------------

template <class Cfg>
struct SmemTile {
  // Element offset of 16-byte chunk `chunk` of row `row` in a tile of `rows` rows.
  __device__ __forceinline__ static int off(int row, int chunk, int rows) {
    if constexpr (Cfg::kRegions) {
      return (chunk >> 3) * rows * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
    } else {
      return row * Cfg::kPitch + (chunk << 3);
    }
  }
};

// Copy rows [row0, row0 + ROWS) of a [*, d] global matrix (row stride `stride`) into a swizzled
// tile; rows >= valid_rows and chunks >= d/8 are zero-filled.
template <class Cfg, int ROWS>
__device__ __forceinline__ void load_tile(typename Cfg::Element* smem, const typename Cfg::Element* gbase,
                                          int64_t stride, int valid_rows, int d_chunks) {
  constexpr int kTotal = ROWS * Cfg::kChunks;
  constexpr int kIters = (kTotal + Cfg::kThreads - 1) / Cfg::kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = it * Cfg::kThreads + threadIdx.x;
    if (kTotal % Cfg::kThreads != 0 && i >= kTotal) break;
    const int row = i / Cfg::kChunks;
    const int chunk = i % Cfg::kChunks;
    const bool valid = row < valid_rows && chunk < d_chunks;
    const typename Cfg::Element* src = valid ? gbase + row * stride + chunk * 8 : gbase;
    cp_async_16(smem_addr(smem + SmemTile<Cfg>::off(row, chunk, ROWS)), src, valid);
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_varlen_kernel(const __grid_constant__ AttentionVarlenParams p) {
  using T = typename Cfg::Element;
  constexpr bool kBf16 = MmaType<T>::kBf16;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHDw = Cfg::kHDw;
  constexpr int kNT = kBlockN / 8;        // n8 tiles of S per warp
  constexpr int kOT = kHDw / 8;           // n8 tiles of O per warp
  constexpr int64_t kBig = 1LL << 40;     // "unbounded" in 64-bit position arithmetic

  extern __shared__ char smem_raw[];
  char* smem_base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* sQ = reinterpret_cast<T*>(smem_base);
  T* sK = sQ + Cfg::kQElems;
  T* sV = sK + Cfg::kKElems;
  float* sX = reinterpret_cast<float*>(sV + Cfg::kKElems);
  __shared__ int s_qbmin, s_qbmax;

  const int h = blockIdx.x;
  const int tile = blockIdx.y;
  if (tile >= p.tile_cum[p.batch]) return;
  const VarlenTile qt = locate_varlen_tile<kBlockM>(p, tile);
  const int q_start = qt.q_start, k_start = qt.k_start, Lk = qt.Lk, m0 = qt.m0, rows_valid = qt.rows_valid;

  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const T* gQ = static_cast<const T*>(p.q) + (q_start + m0) * p.q_row_stride + h * p.q_head_stride;
  const T* gK = static_cast<const T*>(p.k) + k_start * p.k_row_stride + kvh * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + k_start * p.v_row_stride + kvh * p.v_head_stride;
  const int d_chunks = p.head_dim / 8;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp % Cfg::kWarpsM;  // 16-row slice of the tile
  const int dh = warp / Cfg::kWarpsM;  // d half (kDSplit == 2)
  const bool has_blocks = p.q_block != nullptr;
  const int64_t wl = p.window_left < 0 ? kBig : p.window_left;
  const int64_t wr = p.window_right < 0 ? kBig : p.window_right;

  // Block-id summary of this tile's queries.
  int qbmin, qbmax;
  summarise_query_blocks<true>(p, qt, has_blocks, s_qbmin, s_qbmax, qbmin, qbmax);

  const KeyTileWalk<kBlockN> keys(p, qt, has_blocks, wl, wr, qbmin, qbmax);
  auto classify = [&](int n) { return keys.classify(n); };
  auto next_tile = [&](int n) { return keys.next(n); };
  const int n_hi = keys.n_hi;

  // Rows of this thread (two per thread, m16n8 C layout): local rows r0, r0 + 8.
  const int r_loc0 = wm * 16 + (lane >> 2);
  int64_t qpos[2];
  int qblk[2];
  query_rows(p, qt, has_blocks, r_loc0, qpos, qblk);

  float acc_o[kOT][4];
#pragma unroll
  for (int j = 0; j < kOT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc_o[j][r] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  int n = n_hi >= 0 ? next_tile(n_hi) : -1;
  if (n >= 0) {
    load_tile<Cfg, kBlockM>(sQ, gQ, p.q_row_stride, rows_valid, d_chunks);
    load_tile<Cfg, kBlockN>(sK, gK + static_cast<int64_t>(n) * kBlockN * p.k_row_stride, p.k_row_stride,
                            Lk - n * kBlockN, d_chunks);
    cp_async_commit();
  }

  const uint32_t sQ_u = smem_addr(sQ), sK_u = smem_addr(sK), sV_u = smem_addr(sV);

  while (n >= 0) {
    const int kind = classify(n);
    cp_async_wait_all();
    if constexpr (Cfg::kWgmma) fence_proxy_async_shared();
    __syncthreads();  // K(n) (and Q) landed; every warp is done with V(n+1)
    load_tile<Cfg, kBlockN>(sV, gV + static_cast<int64_t>(n) * kBlockN * p.v_row_stride, p.v_row_stride,
                            Lk - n * kBlockN, d_chunks);
    cp_async_commit();

    // ---- S = Q K^T over this warp's d slice ----
    float s[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[j][r] = 0.f;

    if constexpr (Cfg::kWgmma) {
      // Warpgroup g = warp / 4 owns query rows 64 * (g % (kBlockM / 64)) ... and d half dh.
      const int row_base = (wm / 4) * 64;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kHDw / 16; ++ks) {
        const int col = dh * kHDw + ks * 16;
        const int region = col / 64, within = (col % 64) * 2;  // bytes inside the 128-byte row
        const uint32_t a_addr = sQ_u + (region * kBlockM * 64 + row_base * 64) * 2 + within;
        const uint32_t b_addr = sK_u + (region * kBlockN * 64) * 2 + within;
        wgmma_ss_64x64<kBf16>(s, gmma_desc(a_addr, 16, 1024), gmma_desc(b_addr, 16, 1024), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
    } else {
#pragma unroll
      for (int ks = 0; ks < kHDw / 16; ++ks) {
        const int chunk0 = (dh * kHDw + ks * 16) / 8;
        uint32_t a[4];
        ldmatrix_x4(sQ_u + 2 * SmemTile<Cfg>::off(wm * 16 + (lane & 15), chunk0 + (lane >> 4), kBlockM), a[0], a[1],
                    a[2], a[3]);
#pragma unroll
        for (int j2 = 0; j2 < kNT / 2; ++j2) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(sK_u + 2 * SmemTile<Cfg>::off(j2 * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                    chunk0 + ((lane >> 3) & 1), kBlockN),
                      b0, b1, b2, b3);
          mma_m16n8k16<T>(s[2 * j2], a, b0, b1);
          mma_m16n8k16<T>(s[2 * j2 + 1], a, b2, b3);
        }
      }
    }

    if constexpr (Cfg::kDSplit > 1) {
      // Exchange the partial S with the partner warp (same rows, other d half).
      float* mine = sX + warp * 16 * kBlockN;
      const float* theirs = sX + (warp ^ Cfg::kWarpsM) * 16 * kBlockN;
#pragma unroll
      for (int j = 0; j < kNT; ++j)
        *reinterpret_cast<float4*>(mine + (j * 32 + lane) * 4) = make_float4(s[j][0], s[j][1], s[j][2], s[j][3]);
      named_bar_sync(1 + wm, 64);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const float4 t = *reinterpret_cast<const float4*>(theirs + (j * 32 + lane) * 4);
        s[j][0] += t.x; s[j][1] += t.y; s[j][2] += t.z; s[j][3] += t.w;
      }
    }

    // ---- mask, online softmax, P as A fragments ----
    if (kind == TileClass::kPartial) {
      mask_partial_tile<kNT, kBlockN>(s, p, qt, has_blocks, n, lane, qpos, qblk, wl, wr);
    }
    float rescale[2];
    online_softmax<kNT>(s, row_max, row_sum, rescale, p);
    rescale_o<kOT>(acc_o, rescale);
    uint32_t pa[kNT / 2][4];
    pack_p<kBf16, kNT>(pa, s);

    const int n_next = next_tile(n - 1);
    cp_async_wait_all();
    if constexpr (Cfg::kWgmma) fence_proxy_async_shared();
    __syncthreads();  // V(n) landed; every warp is done with K(n)
    if (n_next >= 0) {
      load_tile<Cfg, kBlockN>(sK, gK + static_cast<int64_t>(n_next) * kBlockN * p.k_row_stride, p.k_row_stride,
                              Lk - n_next * kBlockN, d_chunks);
      cp_async_commit();
    }

    // ---- O += P V over this warp's d slice ----
    if constexpr (Cfg::kWgmma) {
      wgmma_fence();
#pragma unroll
      for (int rg = 0; rg < kHDw / 64; ++rg) {
        const int region = dh * (kHDw / 64) + rg;
#pragma unroll
        for (int t = 0; t < kNT / 2; ++t) {
          // MN-major B: 8-key groups 1024 bytes apart (SBO); one 64-column region per instruction.
          const uint32_t b_addr = sV_u + (region * kBlockN * 64 + t * 16 * 64) * 2;
          wgmma_rs_64x64_tb<kBf16>(&acc_o[rg * 8], pa[t], gmma_desc(b_addr, kBlockN * 128, 1024));
        }
      }
      wgmma_commit();
      wgmma_wait<0>();
    } else {
#pragma unroll
      for (int t = 0; t < kNT / 2; ++t) {
#pragma unroll
        for (int j2 = 0; j2 < kOT / 2; ++j2) {
          uint32_t b0, b1, b2, b3;
          const int chunk = (dh * kHDw) / 8 + j2 * 2 + (lane >> 4);
          ldmatrix_x4_trans(sV_u + 2 * SmemTile<Cfg>::off(t * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), chunk,
                                                          kBlockN),
                            b0, b1, b2, b3);
          mma_m16n8k16<T>(acc_o[2 * j2], pa[t], b0, b1);
          mma_m16n8k16<T>(acc_o[2 * j2 + 1], pa[t], b2, b3);
        }
      }
    }
    n = n_next;
  }

  // ---- epilogue: O / l, rows < rows_valid, columns < d ----
  float inv[2];
  row_inverse(row_sum, inv);
  T* gO = static_cast<T*>(p.out) + (q_start + m0) * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r_loc0 + 8 * i;
    if (r >= rows_valid) continue;
#pragma unroll
    for (int j = 0; j < kOT; ++j) {
      const int col = dh * kHDw + j * 8 + 2 * (lane & 3);
      if (col < p.head_dim) {
        *reinterpret_cast<uint32_t*>(gO + r * p.o_row_stride + col) =
            pack2<kBf16>(acc_o[j][2 * i] * inv[i], acc_o[j][2 * i + 1] * inv[i]);
      }
    }
  }
}

}  // namespace gemma4x::attention

// The per-CTA bookkeeping every prefill attention kernel of this family shares (the cp.async
// kernel of attention_varlen_sm90.cuh and the FlashAttention-3-structured kernels): which query
// tile a CTA owns, which key tiles its mask can reach and how each one is classified
// (tile_class.h), the per-element mask of partial tiles, the online softmax and P as MMA A
// fragments. Per thread, S / P / O fragments are the mma.sync m16n8 C layout (also the register
// order of a wgmma m64nN accumulator): rows lane / 4 and lane / 4 + 8 of the warp's 16, n8 tile j
// in s[j][0..3] (r = 0, 1 the first row, 2, 3 the second).
//
// These are inlined into kernels tuned by reading their SASS; each one here left the kernels' SASS
// as it was when the code was their own. The store of O stays in each kernel: as a shared
// function it changed their register assignment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "gemma4x/attention/params.h"
#include "gemma4x/attention/tile_class.h"

namespace gemma4x::attention {

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};
template <>
struct MmaType<__half> {
  static constexpr bool kBf16 = false;
};

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kBf16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

// ---- the CTA's query tile ----

// kBlockM query rows of one sequence. The sequences own tiles tile_cum[b] .. tile_cum[b + 1] - 1
// (empty sequences none), the heaviest (last) causal tiles first.
struct VarlenTile {
  int q_start, Lq;     // packed index of the sequence's first query, its query count
  int k_start, Lk;     // the same for its keys
  int m0, rows_valid;  // first query row of the tile inside the sequence, real rows of the tile
  int64_t off;         // query i has position i + off (keys before the queries: a cached prefix)
};

// `tile` (blockIdx.y) must be < tile_cum[batch]: grid.y is only an upper bound, so the kernel
// returns first for the tiles past the batch's last one.
template <int kBlockM>
__device__ __forceinline__ VarlenTile locate_varlen_tile(const AttentionVarlenParams& p, int tile) {
  // Sequence of this tile: the largest b with tile_cum[b] <= tile.
  int lo = 0, hi = p.batch;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (p.tile_cum[mid] <= tile) lo = mid; else hi = mid;
  }
  const int b = lo;
  const int q_start = p.cu_q[b], Lq = p.cu_q[b + 1] - q_start;
  const int k_start = p.cu_k[b], Lk = p.cu_k[b + 1] - k_start;
  const int n_m = (Lq + kBlockM - 1) / kBlockM;
  const int m_block = n_m - 1 - (tile - p.tile_cum[b]);  // heaviest (last) causal tiles first
  const int m0 = m_block * kBlockM;
  return VarlenTile{q_start, Lq, k_start, Lk, m0, min(kBlockM, Lq - m0), static_cast<int64_t>(Lk) - Lq};
}

// Block-id summary (min, max over ids >= 0) of the tile's real queries, through the __shared__
// s_qbmin / s_qbmax; qbmin = INT_MAX, qbmax = -1 without block ids. kInit: this call initialises
// them (else thread 0 set them to INT_MAX / -1 before a __syncthreads).
template <bool kInit>
__device__ __forceinline__ void summarise_query_blocks(const AttentionVarlenParams& p, const VarlenTile& t,
                                                       bool has_blocks, int& s_qbmin, int& s_qbmax, int& qbmin,
                                                       int& qbmax) {
  if (has_blocks) {
    if constexpr (kInit) {
      if (threadIdx.x == 0) { s_qbmin = INT_MAX; s_qbmax = -1; }
      __syncthreads();
    }
    if (threadIdx.x < t.rows_valid) {
      const int id = p.q_block[t.q_start + t.m0 + threadIdx.x];
      if (id >= 0) { atomicMin(&s_qbmin, id); atomicMax(&s_qbmax, id); }
    }
    __syncthreads();
  }
  qbmin = has_blocks ? s_qbmin : INT_MAX;
  qbmax = has_blocks ? s_qbmax : -1;
}

// ---- the key tiles a query tile's mask can reach ----

// Key tiles n_lo .. n_hi of kBlockN keys (n_hi < 0: none), walked from the last one down: next(n)
// is the first tile at or below n that is not skipped (-1 when none is left), classify(n) its
// TileClass from the summaries alone. Image blocks may reach past the right bound (and, unified,
// past the left bound). Windows are in 64-bit arithmetic, "unbounded" as 2^40.
template <int kBlockN>
struct KeyTileWalk {
  const AttentionVarlenParams& p;
  int k_start, Lk;
  bool blocks_right;
  int n_hi, n_lo;
  QueryTileSummary q;

  __device__ __forceinline__ KeyTileWalk(const AttentionVarlenParams& p_, const VarlenTile& t, bool has_blocks,
                                         int64_t wl, int64_t wr, int qbmin, int qbmax)
      : p(p_), k_start(t.k_start), Lk(t.Lk) {
    const int64_t p_lo = t.m0 + t.off, p_hi = t.m0 + t.rows_valid - 1 + t.off;
    blocks_right = has_blocks && qbmax >= 0;
    const bool blocks_left = blocks_right && p.unified;
    const int64_t s_max = blocks_right ? Lk - 1 : imin64(Lk - 1, p_hi + wr);
    const int64_t s_min = blocks_left ? 0 : imax64(0, p_lo - wl);
    n_hi = (Lk == 0 || s_max < s_min) ? -1 : static_cast<int>(s_max / kBlockN);
    n_lo = static_cast<int>(s_min / kBlockN);
    q = QueryTileSummary{p_lo, p_hi, wl, wr, qbmin, qbmax, p.unified != 0};
  }

  __device__ __forceinline__ int classify(int n) const {
    const int64_t s0 = static_cast<int64_t>(n) * kBlockN;
    const int64_t s1 = imin64(s0 + kBlockN, Lk) - 1;
    bool overlap = false;
    if (blocks_right) {
      // The kKeyTile-key summary chunks of packed keys k_start + s0 .. k_start + s1.
      const int c0 = (k_start + static_cast<int>(s0)) / kKeyTile;
      const int c1 = (k_start + static_cast<int>(s1)) / kKeyTile;
      if constexpr (kBlockN <= kKeyTile) {  // one or two chunks
        const int kmin = min(p.kb_min[c0], p.kb_min[c1]);
        const int kmax = max(p.kb_max[c0], p.kb_max[c1]);
        overlap = kmin <= q.qbmax && q.qbmin <= kmax;
      } else {
        int kmin = INT_MAX, kmax = -1;
        for (int cc = c0; cc <= c1; ++cc) {
          kmin = min(kmin, p.kb_min[cc]);
          kmax = max(kmax, p.kb_max[cc]);
        }
        overlap = kmin <= q.qbmax && q.qbmin <= kmax;
      }
    }
    return classify_key_tile(q, s0, s1, s0 + kBlockN <= Lk, overlap);
  }

  __device__ __forceinline__ int next(int n) const {
    for (; n >= n_lo; --n)
      if (classify(n) != TileClass::kSkip) return n;
    return -1;
  }

  __device__ __forceinline__ int first() const { return n_hi >= 0 ? next(n_hi) : -1; }
};

// ---- per-thread rows: mask, online softmax, P, epilogue ----

// Positions and block ids of this thread's two query rows r_loc0, r_loc0 + 8 of the tile. Pos:
// int64_t, or int where positions < 2^30, |p - s| < 2^30 and windows < 2^31.
template <typename Pos>
__device__ __forceinline__ void query_rows(const AttentionVarlenParams& p, const VarlenTile& t, bool has_blocks,
                                           int r_loc0, Pos (&qpos)[2], int (&qblk)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r_loc0 + 8 * i;
    if constexpr (std::is_same_v<Pos, int>) {
      qpos[i] = t.m0 + r + static_cast<int>(t.off);
    } else {
      qpos[i] = t.m0 + r + t.off;
    }
    qblk[i] = (has_blocks && r < t.rows_valid) ? p.q_block[t.q_start + t.m0 + r] : -1;
  }
}

// Per-element mask of partial key tile n: scores of disallowed (query, key) pairs become -inf.
// wl / wr: the window bounds in Pos arithmetic (unbounded: huge).
template <int kNT, int kBlockN, typename Pos>
__device__ __forceinline__ void mask_partial_tile(float (&s)[kNT][4], const AttentionVarlenParams& p,
                                                  const VarlenTile& t, bool has_blocks, int n, int lane,
                                                  const Pos (&qpos)[2], const int (&qblk)[2], Pos wl, Pos wr) {
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int kj = n * kBlockN + j * 8 + 2 * (lane & 3) + c;
      const int kb = (has_blocks && kj < t.Lk) ? p.k_block[t.k_start + kj] : -1;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const Pos dpos = qpos[i] - kj;  // p - s
        const bool left = dpos <= wl;
        const bool right = -dpos <= wr;
        const bool same = kb >= 0 && kb == qblk[i];
        const bool ok = kj < t.Lk && (p.unified ? ((left && right) || same) : (left && (right || same)));
        if (!ok) s[j][2 * i + c] = -INFINITY;
      }
    }
  }
}

// Online softmax of S (exp2 with scale * log2 e folded): S becomes P (fp32), rescale[i] is the
// factor for row i's O, row_max / row_sum are updated. A row masked so far (-inf) gets P = 0 and
// rescale 0 through explicit selects.
template <int kNT>
__device__ __forceinline__ void online_softmax(float (&s)[kNT][4], float (&row_max)[2], float (&row_sum)[2],
                                               float (&rescale)[2], const AttentionVarlenParams& p) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = row_max[i];
#pragma unroll
    for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float m_use = mx == -INFINITY ? 0.f : mx * p.scale_log2;
    rescale[i] = row_max[i] == -INFINITY ? 0.f : fast_exp2(row_max[i] * p.scale_log2 - m_use);
    row_max[i] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float x = s[j][2 * i + c];
        const float e = x == -INFINITY ? 0.f : fast_exp2(fmaf(x, p.scale_log2, -m_use));
        s[j][2 * i + c] = e;
        sum += e;
      }
    }
    row_sum[i] = row_sum[i] * rescale[i] + sum;
  }
}

template <int kOT>
__device__ __forceinline__ void rescale_o(float (&acc_o)[kOT][4], const float (&rescale)[2]) {
#pragma unroll
  for (int j = 0; j < kOT; ++j) {
    acc_o[j][0] *= rescale[0]; acc_o[j][1] *= rescale[0];
    acc_o[j][2] *= rescale[1]; acc_o[j][3] *= rescale[1];
  }
}

// P as MMA A fragments (the input type): k16 step t covers S n8 tiles 2t, 2t+1.
template <bool kBf16, int kNT>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kNT / 2][4], const float (&s)[kNT][4]) {
#pragma unroll
  for (int t = 0; t < kNT / 2; ++t) {
    pa[t][0] = pack2<kBf16>(s[2 * t][0], s[2 * t][1]);
    pa[t][1] = pack2<kBf16>(s[2 * t][2], s[2 * t][3]);
    pa[t][2] = pack2<kBf16>(s[2 * t + 1][0], s[2 * t + 1][1]);
    pa[t][3] = pack2<kBf16>(s[2 * t + 1][2], s[2 * t + 1][3]);
  }
}

// 1 / l of this thread's two rows, the row sums reduced over the quad of lanes that share a row;
// 0 for a row with no allowed key (its O is 0).
__device__ __forceinline__ void row_inverse(const float (&row_sum)[2], float (&inv)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = row_sum[i];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    inv[i] = l > 0.f ? 1.f / l : 0.f;
  }
}

}  // namespace gemma4x::attention

// NVFP4 weights x bf16 activations on SM90 (no FP4 tensor cores): weights stream from the packed
// layout (params.h) with 16-byte loads, are dequantised in registers and fed to bf16
// mma.sync.m16n8k16 as the A operand (16 weight rows), tokens are the 8 columns of B, fp32
// accumulation, the global scale applied once at the end.
//
// Dequantisation of one bf16 pair is three integer ops and one bf16 multiply:
//   bits = (t & 0x80008000) | ((t & 0x70007000) >> 6)        t = code word << 4p
// places an e2m1 code (sign, 2 exponent bits, 1 mantissa bit) into a bf16 whose exponent field is
// the code's exponent: that bf16 is exactly e2m1 * 2^-126 (the e2m1 subnormal 0.5 lands on the bf16
// subnormal). Multiplying by the block scale pre-multiplied by 2^118 (bf16 arithmetic keeps
// subnormal inputs) gives e2m1 * s * 2^-8 exactly: at most 2 x 4 significant bits, a normal bf16
// for every e4m3 scale. The accumulator is multiplied by weight_scale_2 * 2^8 at the end.
//
// Lane l = 4g + t of a warp owns, per 64-column unit, rows g and g+8 and the 16 columns of scale
// block t; the packed layout orders those 16 columns so that mma step j takes columns 4j..4j+3 of
// the block. The activations a lane needs for the unit are then 16 contiguous values of its token:
// two 16-byte loads, and one e4m3 scale per row and unit.
//
// Measured on an H200 (bench/ops/bench_nvfp4.py, bench/RESULTS.md, session 4): 31B MLP shapes at
// 1-8 tokens 2.4-2.5 TB/s of the 0.5625 B/param needed (cuBLAS bf16 2.1-2.5x slower), 26B MLP
// shapes ~5 us (latency: 3.3 MB of weights); routed experts at 1 token 14.7 us (2.3x the bf16
// kernels). The limit is instruction issue (ncu: ~120 warp instructions per 576-byte unit, of
// which the exact e2m1 decode is ~60), not bytes in flight: a copy-engine ring that kept far more
// bytes in flight measured slower, and with the decode removed the kernel reaches ~3.0 TB/s.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "gemma4x/common/bf16x2.cuh"
#include "gemma4x/common/ldst.cuh"
#include "gemma4x/common/mma.cuh"
#include "gemma4x/common/pdl.cuh"
#include "gemma4x/nvfp4/params.h"

namespace gemma4x::nvfp4 {

constexpr int kScaleExp = 118;  // block scales enter bf16 as s * 2^118 (448 * 2^118 < 2^127)
constexpr float kAccScale = 256.f;  // 2^(126 - 118): what the accumulator still owes


// Weights are read exactly once (ld_stream16 / ld_stream_u16: kept out of L1); activations are
// re-read by the 8 lanes sharing a column and by every row block (ld_cached16: through L1).
using gemma4x::ld_cached16;
using gemma4x::ld_stream16;
using gemma4x::ld_stream_u16;
using gemma4x::prefetch_l2;

__device__ __forceinline__ uint32_t e2m1x2_bits(uint32_t q, int p) {
  const uint32_t t = q << (4 * p);
  return (t & 0x80008000u) | ((t & 0x70007000u) >> 6);
}

using gemma4x::bf16x2_mul;

// Two e4m3 scales (rows g, g+8) -> two bf16x2 {s * 2^118, s * 2^118}.
__device__ __forceinline__ void scale_pair(uint32_t s2, uint32_t& sg, uint32_t& sg8) {
  const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(s2), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
  const __nv_bfloat162 a = __float2bfloat162_rn(f.x * 0x1p118f);
  const __nv_bfloat162 b = __float2bfloat162_rn(f.y * 0x1p118f);
  sg = *reinterpret_cast<const uint32_t*>(&a);
  sg8 = *reinterpret_cast<const uint32_t*>(&b);
}

using gemma4x::mma_bf16;  // c += A (16 x 16 bf16) * B (16 x 8 bf16), fp32

// One 16 x 64 unit against NT tiles of 8 columns. q: the lane's 16 code bytes (row g word 0/1,
// row g+8 word 0/1), sc: its two scales, xv: its 16 activations of each tile's column.
template <int NT>
__device__ __forceinline__ void unit_mma(const uint4& q, uint32_t sc, const uint4 (&xv)[NT][2], float (&acc)[NT][4]) {
  uint32_t sg, sg8;
  scale_pair(sc, sg, sg8);
  const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int w = j >> 1;
    const int pa = 2 * (j & 1);
    const uint32_t a0 = bf16x2_mul(e2m1x2_bits(qw[w], pa), sg);          // row g,   columns 4j, 4j+1
    const uint32_t a1 = bf16x2_mul(e2m1x2_bits(qw[2 + w], pa), sg8);     // row g+8
    const uint32_t a2 = bf16x2_mul(e2m1x2_bits(qw[w], pa + 1), sg);      // row g,   columns 4j+2, 4j+3
    const uint32_t a3 = bf16x2_mul(e2m1x2_bits(qw[2 + w], pa + 1), sg8); // row g+8
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4& x = xv[nt][w];
      const uint32_t b0 = (j & 1) ? x.z : x.x;
      const uint32_t b1 = (j & 1) ? x.w : x.y;
      mma_bf16(acc[nt], a0, a1, a2, a3, b0, b1);
    }
  }
}

// One batch: up to U units at w, w + w_step, ... (this lane's 16 code bytes; its 2 scale bytes sit
// at w + 512 - 14 lane) and their activations at xp[nt], xp[nt] + x_step, ...; all loaded, then
// computed in order. kGuard: only the first `count` are real (the last, partial batch).
template <int NT, int U, bool kGuard>
__device__ __forceinline__ void stream_batch(const uint8_t*& w, int64_t w_step, const __nv_bfloat16* (&xp)[NT],
                                             int x_step, int lane, int count, float (&acc)[NT][4]) {
  uint4 q[U];
  uint32_t sc[U];
  uint4 xv[U][NT][2];
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!kGuard || i < count) {
      q[i] = ld_stream16(w);
      sc[i] = ld_stream_u16(w + (kCodeBytes - 14 * lane));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        xv[i][nt][0] = ld_cached16(xp[nt]);
        xv[i][nt][1] = ld_cached16(xp[nt] + 8);
        xp[nt] += x_step;
      }
      w += w_step;
    }
  }
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!kGuard || i < count) unit_mma<NT>(q[i], sc[i], xv[i], acc);
  }
}

// Accumulates units u_begin, u_begin + u_step, ... (< u_end) of one 16-row block `blk` into acc,
// in that order. xr[nt]: the activation row of this lane's column in tile nt (K contiguous
// values). U units are in flight per lane before the first is used. The addresses advance by a
// fixed stride (one add per pointer and unit): recomputing them per unit from a clamped index
// cost ~17 of the ~120 instructions of a unit (SASS count, H200 build).
template <int NT, int U>
__device__ __forceinline__ void stream_units(const uint8_t* blk, int u_begin, int u_end, int u_step,
                                             const __nv_bfloat16* const (&xr)[NT], int lane, float (&acc)[NT][4]) {
  if (u_begin >= u_end) return;
  const int t = lane & 3;
  const uint8_t* w = blk + static_cast<int64_t>(u_begin) * kUnitBytes + 16 * lane;
  const int64_t w_step = static_cast<int64_t>(u_step) * kUnitBytes;
  const __nv_bfloat16* xp[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xp[nt] = xr[nt] + static_cast<int64_t>(u_begin) * kUnitK + 16 * t;
  const int x_step = u_step * kUnitK;
  int n = (u_end - u_begin + u_step - 1) / u_step;  // this lane's units
  for (; n >= U; n -= U) stream_batch<NT, U, false>(w, w_step, xp, x_step, lane, U, acc);
  if (n > 0) stream_batch<NT, U, true>(w, w_step, xp, x_step, lane, n, acc);
}

// Units in flight per lane: activation registers grow with NT (8 per tile and unit).
template <int NT>
constexpr int stream_depth() {
  return NT <= 2 ? 4 : NT == 4 ? 2 : 1;
}

// ---- dense: out[M, N] = x[M, K] @ W^T, M <= 64 -------------------------------------------------

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kGemvMaxSplits = 8;  // a portable thread-block cluster

// Block (rb, s) of a cluster of `splits` blocks: its warps take units s*4 + w, s*4 + w + 4*splits,
// ...; the warps' partial tiles are summed in shared memory, then block 0 of the cluster sums the
// blocks' tiles through distributed shared memory in rank order (deterministic), scales and stores.
template <int NT>
__global__ void __launch_bounds__(kGemvThreads) nvfp4_w4a16_gemv_kernel(const __grid_constant__ GemvParams p) {
  __shared__ float red[kGemvWarps][NT * 4 * 32];
  __shared__ float part[NT * 4 * 32];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int rb = blockIdx.x / p.splits;
  const int split = blockIdx.x % p.splits;
  const int units = p.k / kUnitK;
  const uint8_t* blk = p.packed + static_cast<int64_t>(rb) * units * kUnitBytes;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  const __nv_bfloat16* xr[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xr[nt] = x + static_cast<int64_t>(min(nt * 8 + (lane >> 2), p.m - 1)) * p.x_row_stride;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  grid_dependency_wait();
  stream_units<NT, stream_depth<NT>()>(blk, split * kGemvWarps + warp, units, p.splits * kGemvWarps, xr, lane, acc);
  grid_dependency_trigger();
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][(nt * 4 + c) * 32 + lane] = acc[nt][c];
  __syncthreads();
  for (int e = threadIdx.x; e < NT * 128; e += kGemvThreads) {
    float s = red[0][e];
#pragma unroll
    for (int w = 1; w < kGemvWarps; ++w) s += red[w][e];
    part[e] = s;
  }
  if (p.splits > 1) asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  else __syncthreads();
  if (split == 0) {
    const float gs = p.global_scale[0] * kAccScale;
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
    for (int e = threadIdx.x; e < NT * 128; e += kGemvThreads) {
      float s = part[e];
      for (int r = 1; r < p.splits; ++r) {
        uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(&part[e])), remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(r));
        float v;
        asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
        s += v;
      }
      const int l = e & 31;
      const int c = (e >> 5) & 3;
      const int nt = e >> 7;
      const int row = (l >> 2) + (c >= 2 ? 8 : 0);
      const int col = nt * 8 + 2 * (l & 3) + (c & 1);
      if (col < p.m) out[static_cast<int64_t>(col) * p.out_row_stride + rb * kUnitRows + row] = __float2bfloat16_rn(s * gs);
    }
  }
  // The other blocks' shared memory must outlive block 0's reads.
  if (p.splits > 1) asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// ---- routed experts at decode -----------------------------------------------------------------

constexpr int kMoeMaxPairs = 64;
constexpr int kMoeMaxExperts = 256;
constexpr int kGateUpWarps = 4;
constexpr int kDownWarps = 8;
// Units in flight per lane. At 26B-A4B shapes (a gate/up warp's 11 units of H = 2816 in batches of
// 4, a down warp's 11 of I = 704 in batches of 6), deeper batches measured slower on an H200:
// experts at 1 token 14.7 us with (4, 6), 16.7 with (6, 6), 17.4 with (4, 11) (bench/RESULTS.md).
constexpr int kGateUpDepth = 4;
constexpr int kDownDepth = 6;

// Index of the n-th set bit of m (n counted from 0), or -1.
__device__ __forceinline__ int nth_set_bit(unsigned long long m, int n) {
  for (int i = 0; i < n && m; ++i) m &= m - 1;
  return m ? __ffsll(static_cast<long long>(m)) - 1 : -1;
}

// The lowest (at most) 8 set bits of m.
__device__ __forceinline__ unsigned long long lowest8(unsigned long long m) {
  unsigned long long b = 0;
  for (int i = 0; i < 8 && m; ++i) {
    const unsigned long long low = m & (~m + 1);
    b |= low;
    m ^= low;
  }
  return b;
}

// PyTorch's gelu(approximate="tanh") in fp32.
__device__ __forceinline__ float gelu_tanh_f32(float x) {
  constexpr float kBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Gate/up + GeGLU. Block (q, b): pair q, 8 intermediate rows 8b..8b+7 (packed block b holds their
// gate rows then their up rows, so a lane ends with gate and up of one row in registers). Only the
// first pair of each expert (its leader) works; it serves every pair of that expert, 8 per mma
// tile. The 4 warps split H; warp 0 sums their tiles in a fixed order.
__global__ void __launch_bounds__(32 * kGateUpWarps) nvfp4_moe_gate_up_kernel(const __grid_constant__ MoeDecodeParams p) {
  __shared__ float red[kGateUpWarps][4 * 32];
  grid_dependency_wait();  // the routing comes from the previous kernel
  grid_dependency_trigger();
  const int blocks_i = p.inter / 8;
  const int q = blockIdx.x / blocks_i;
  const int b = blockIdx.x % blocks_i;
  const int pairs = p.tokens * p.top_k;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t e = p.idx[q];
  if (e < 0 || e >= p.experts) return;
  const int64_t e0 = lane < pairs ? p.idx[lane] : -1;
  const int64_t e1 = lane + 32 < pairs ? p.idx[lane + 32] : -1;
  const unsigned long long mask = static_cast<unsigned long long>(__ballot_sync(0xffffffffu, e0 == e)) |
                                  (static_cast<unsigned long long>(__ballot_sync(0xffffffffu, e1 == e)) << 32);
  if (__ffsll(static_cast<long long>(mask)) - 1 != q) return;  // uniform over the block

  const int units = p.hidden / kUnitK;
  const uint8_t* blk = p.gate_up + (e * blocks_i + b) * static_cast<int64_t>(units) * kUnitBytes;
  const float g_gate = p.gate_up_scale_2[2 * e] * kAccScale;
  const float g_up = p.gate_up_scale_2[2 * e + 1] * kAccScale;
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  __nv_bfloat16* act = static_cast<__nv_bfloat16*>(p.act);
  for (unsigned long long rest = mask; rest != 0;) {
    const unsigned long long batch = lowest8(rest);
    rest &= ~batch;
    const int cnt = __popcll(batch);
    const int my_pair = nth_set_bit(batch, min(lane >> 2, cnt - 1));
    const __nv_bfloat16* xr[1] = {x + static_cast<int64_t>(my_pair / p.top_k) * p.x_row_stride};
    float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
    stream_units<1, kGateUpDepth>(blk, warp, units, kGateUpWarps, xr, lane, acc);
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][c * 32 + lane] = acc[0][c];
    __syncthreads();
    if (warp == 0) {
      float s[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[c] = red[0][c * 32 + lane];
#pragma unroll
        for (int w = 1; w < kGateUpWarps; ++w) s[c] += red[w][c * 32 + lane];
      }
      const int i = 8 * b + (lane >> 2);
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int col = 2 * (lane & 3) + cc;
        if (col < cnt) {
          const int pair = nth_set_bit(batch, col);
          const float gate = round_bf16(s[cc] * g_gate);
          const float up = round_bf16(s[2 + cc] * g_up);
          act[static_cast<int64_t>(pair) * p.inter + i] = __float2bfloat16_rn(round_bf16(gelu_tanh_f32(gate)) * up);
        }
      }
    }
    __syncthreads();
  }
}

// Down + combine. Block b owns output rows 16b..16b+15 for every pair: the pairs are grouped by
// expert in shared memory (first pair of each expert = leader), warps take the groups in turn,
// one warp streams a group's whole 16 x I tile (I/64 units), ys[q][r] = w[q] * bf16(act_q . D_e),
// then out[t, r] = bf16(sum_j ys[t*k + j][r]) with the slots summed in order.
__global__ void __launch_bounds__(32 * kDownWarps) nvfp4_moe_down_kernel(const __grid_constant__ MoeDecodeParams p) {
  __shared__ int first[kMoeMaxExperts];
  __shared__ unsigned long long group_mask[kMoeMaxPairs];
  __shared__ int leaders[kMoeMaxPairs];
  __shared__ int n_leaders;
  __shared__ float ys[kMoeMaxPairs][kUnitRows];
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int pairs = p.tokens * p.top_k;
  for (int i = tid; i < kMoeMaxExperts; i += blockDim.x) first[i] = kMoeMaxPairs;
  for (int i = tid; i < kMoeMaxPairs * kUnitRows; i += blockDim.x) ys[i / kUnitRows][i % kUnitRows] = 0.f;
  if (tid < kMoeMaxPairs) group_mask[tid] = 0;
  __syncthreads();
  // The routing is complete: the gate/up kernel waited for it before letting this grid launch.
  const int64_t e_mine = tid < pairs ? p.idx[tid] : -1;
  const bool valid = e_mine >= 0 && e_mine < p.experts;
  if (valid) atomicMin(&first[e_mine], tid);
  __syncthreads();
  if (valid) atomicOr(&group_mask[first[e_mine]], 1ull << tid);
  __syncthreads();
  if (warp == 0) {
    const unsigned lo = __ballot_sync(0xffffffffu, lane < pairs && group_mask[lane] != 0);
    const unsigned hi = __ballot_sync(0xffffffffu, lane + 32 < pairs && group_mask[lane + 32] != 0);
    const unsigned long long lead = static_cast<unsigned long long>(lo) | (static_cast<unsigned long long>(hi) << 32);
    const int n = __popcll(lead);
    for (int i = lane; i < n; i += 32) leaders[i] = nth_set_bit(lead, i);
    if (lane == 0) n_leaders = n;
  }
  __syncthreads();

  const int units = p.inter / kUnitK;
  const int blocks_h = p.hidden / kUnitRows;
  // Warm L2 with this warp's first tile while the gate/up kernel finishes.
  if (warp < n_leaders) {
    const int64_t e = p.idx[leaders[warp]];
    const uint8_t* blk = p.down + (e * blocks_h + blockIdx.x) * static_cast<int64_t>(units) * kUnitBytes;
    for (int off = lane * 128; off < units * kUnitBytes; off += 32 * 128) prefetch_l2(blk + off);
  }
  grid_dependency_wait();  // act is the previous kernel's output

  const __nv_bfloat16* act = static_cast<const __nv_bfloat16*>(p.act);
  for (int gi = warp; gi < n_leaders; gi += kDownWarps) {
    const int q0 = leaders[gi];
    const int64_t e = p.idx[q0];
    const unsigned long long mask = group_mask[q0];
    const uint8_t* blk = p.down + (e * blocks_h + blockIdx.x) * static_cast<int64_t>(units) * kUnitBytes;
    const float g_down = p.down_scale_2[e] * kAccScale;
    for (unsigned long long rest = mask; rest != 0;) {
      const unsigned long long batch = lowest8(rest);
      rest &= ~batch;
      const int cnt = __popcll(batch);
      const int my_pair = nth_set_bit(batch, min(lane >> 2, cnt - 1));
      const __nv_bfloat16* xr[1] = {act + static_cast<int64_t>(my_pair) * p.inter};
      float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
      stream_units<1, kDownDepth>(blk, 0, units, 1, xr, lane, acc);
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int col = 2 * (lane & 3) + cc;
        if (col < cnt) {
          const int pair = nth_set_bit(batch, col);
          const float w = p.weights[pair];
          ys[pair][lane >> 2] = w * round_bf16(acc[0][cc] * g_down);
          ys[pair][(lane >> 2) + 8] = w * round_bf16(acc[0][2 + cc] * g_down);
        }
      }
    }
  }
  __syncthreads();
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  for (int o = tid; o < p.tokens * kUnitRows; o += blockDim.x) {
    const int t = o / kUnitRows;
    const int r = o % kUnitRows;
    float s = 0.f;
    for (int j = 0; j < p.top_k; ++j) s += ys[t * p.top_k + j][r];
    out[static_cast<int64_t>(t) * p.out_row_stride + blockIdx.x * kUnitRows + r] = __float2bfloat16_rn(s);
  }
}

}  // namespace gemma4x::nvfp4

// The four small kernels around the prefill path's two grouped GEMMs (bf16):
//
//   count     per block of pairs: each pair's rank inside its expert, per-expert block counts.
//   scan      one block: offsets (exclusive prefix sum) and, for the CUTLASS grouped GEMMs, every
//             per-expert argument (problem shapes, operand pointers, strides), so nothing goes
//             back to the host (graph-safe).
//   gather    xs[offsets[e] + rank] = x[t] for pair (t, j) with e = idx[t, j]; pos = that row.
//   prep      count + scan + gather in one launch for up to kFusedPrepMaxPairs pairs.
//   geglu     act = bf16(bf16(gelu_tanh(gate)) * up) over h1 = [gate | up] (GEMM1 output, bf16), or
//             over h1 with interleaved columns; not launched when GEMM1's epilogue does it (SM90,
//             interleaved gate_up: prefill_geglu_epilogue.cuh).
//   finalize  out[t] = bf16( sum_j fp32(w[t,j] * y[pos[t*k+j]]) ), the fp32 sum over the k slots.
//
// The rounding points are HF's grouped_mm path: GEMM outputs in bf16, F.gelu then the product in
// bf16, the weighted k-sum in fp32 rounded once.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "gemma4x/common/vec.cuh"
#include "gemma4x/moe/prefill_params.h"

namespace gemma4x::moe {

// Every arch file that includes this header gets its own copy of these kernels (static: internal
// linkage), compiled for that file's arch.
// Count pass: 2048 pairs per block, 8 per thread, all loaded before any is ranked. 16384 tokens
// x top-8 make 64 blocks, so the one-block scan reads 64 counts per expert.
constexpr int kCountThreads = 256;
constexpr int kCountChunk = 2048;
constexpr int kGatherThreads = 256;  // one warp per pair
constexpr int kGegluThreads = 256;
constexpr int kFinalizeThreads = 128;  // H = 2816: 352 vectors of 8, three per thread
constexpr int kPrepThreads = 256;      // fused prep: 8 warps, each ranks one contiguous segment of pairs
constexpr int kPrepWarps = kPrepThreads / 32;

using bf16 = __nv_bfloat16;

// PyTorch's GeluCUDAKernelImpl (approximate="tanh") in opmath (fp32).
__device__ __forceinline__ float prefill_gelu_tanh(float x) {
  constexpr float kBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}

// Pass 1, many blocks of kCountChunk pairs: each pair's rank among the block's pairs of the same
// expert (a shared-memory atomic; the order inside an expert is arbitrary and changes no result:
// GEMM rows are independent and the combine sums the k slots in slot order), and the block's
// per-expert counts in block_counts[block][e].
static __global__ void __launch_bounds__(kCountThreads) moe_prefill_count_kernel(const __grid_constant__ PrefillKernelParams p) {
  __shared__ int count[kPrefillMaxExperts];
  const int tid = threadIdx.x;
  for (int e = tid; e < p.experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  const int first = blockIdx.x * kCountChunk;
  int key[kCountChunk / kCountThreads];
#pragma unroll
  for (int u = 0; u < kCountChunk / kCountThreads; ++u) {  // all loads in flight first
    const int q = first + u * kCountThreads + tid;
    key[u] = -1;
    if (q < p.pairs) {
      const int64_t e = p.idx[q];
      key[u] = (e >= 0 && e < p.experts) ? static_cast<int>(e) : -1;
    }
  }
#pragma unroll
  for (int u = 0; u < kCountChunk / kCountThreads; ++u) {
    const int q = first + u * kCountThreads + tid;
    if (q < p.pairs) p.ws.pos[q] = key[u] >= 0 ? atomicAdd(&count[key[u]], 1) : -1;
  }
  __syncthreads();
  for (int e = tid; e < p.experts; e += blockDim.x) p.ws.block_counts[blockIdx.x * p.experts + e] = count[e];
}

// Expert e has `rows` rows from `offset`: offsets[e], and offsets[E] from the last expert.
__device__ __forceinline__ void write_offsets(const PrefillKernelParams& p, int e, int offset, int rows) {
  p.ws.offsets[e] = offset;
  if (e == p.experts - 1) p.ws.offsets[p.experts] = offset + rows;
}

// Every per-expert argument of the grouped GEMMs for expert e with `rows` rows from `offset`
// (offsets, problem shapes, operand pointers, strides). GEMM1 writes h1 [P, 2I], or act [P, I]
// directly when its epilogue computes the GeGLU (fused_geglu).
__device__ __forceinline__ void write_expert_args(const PrefillKernelParams& p, int e, int offset, int rows) {
  const int64_t H = p.hidden, I = p.inter;
  const PrefillLayout& w = p.ws;
  write_offsets(p, e, offset, rows);
  const int64_t row = offset;
  w.shapes1[3 * e + 0] = rows;
  w.shapes1[3 * e + 1] = static_cast<int>(2 * I);
  w.shapes1[3 * e + 2] = static_cast<int>(H);
  w.shapes2[3 * e + 0] = rows;
  w.shapes2[3 * e + 1] = static_cast<int>(H);
  w.shapes2[3 * e + 2] = static_cast<int>(I);
  w.a1[e] = static_cast<const bf16*>(w.xs) + row * H;
  w.b1[e] = static_cast<const bf16*>(p.gate_up) + e * 2 * I * H;
  w.d1[e] = p.fused_geglu ? static_cast<bf16*>(w.act) + row * I : static_cast<bf16*>(w.h1) + row * 2 * I;
  w.a2[e] = static_cast<const bf16*>(w.act) + row * I;
  w.b2[e] = static_cast<const bf16*>(p.down) + e * H * I;
  w.d2[e] = static_cast<bf16*>(w.xs) + row * H;  // y reuses xs: GEMM1 has consumed it
  w.stride_a1[e] = H;
  w.stride_b1[e] = H;
  w.stride_d1[e] = p.fused_geglu ? I : 2 * I;
  w.stride_a2[e] = I;
  w.stride_b2[e] = I;
  w.stride_d2[e] = H;
}

// Block-wide exclusive prefix sum of one int per thread (at most 256 threads): what the threads
// before this one hold. warp_sum: the block's shared [blockDim.x / 32] scratch.
__device__ __forceinline__ int block_exclusive_scan(int v, int lane, int warp, int* warp_sum) {
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += n;
  }
  if (lane == 31) warp_sum[warp] = incl;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_sum[w];
  return before + incl - v;
}

// Pass 2, one block: block_counts[b][e] becomes the rows of expert e in blocks before b; the
// exclusive prefix sum over experts gives offsets; then (kGemmArgs) every per-expert argument of
// the CUTLASS grouped GEMMs (problem shapes, operand pointers, strides), so nothing goes back to
// the host. Without kGemmArgs only offsets: the NVFP4 prefill GEMMs read nothing else.
template <bool kGemmArgs>
static __global__ void __launch_bounds__(kPrefillMaxExperts) moe_prefill_scan_kernel(const __grid_constant__ PrefillKernelParams p) {
  __shared__ int warp_sum[kPrefillMaxExperts / 32];
  const int e = threadIdx.x;
  const int lane = e & 31, warp = e >> 5;
  const int blocks = (p.pairs + kCountChunk - 1) / kCountChunk;
  int total = 0;
  if (e < p.experts) {
    int* col = p.ws.block_counts + e;
    for (int b0 = 0; b0 < blocks; b0 += 8) {
      int c[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) c[u] = b0 + u < blocks ? col[(b0 + u) * p.experts] : 0;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (b0 + u < blocks) col[(b0 + u) * p.experts] = total;
        total += c[u];
      }
    }
  }
  const int offset = block_exclusive_scan(total, lane, warp, warp_sum);  // E <= 256 = blockDim.x
  if (e < p.experts) {
    if constexpr (kGemmArgs) write_expert_args(p, e, offset, total);
    else write_offsets(p, e, offset, total);
  }
}

// One warp copies x[pair q's token] to xs[row] (16-byte vectors, four loads in flight per lane).
__device__ __forceinline__ void copy_x_row(const PrefillKernelParams& p, int q, int row, int lane) {
  using V = uint4;
  const V* __restrict__ src = reinterpret_cast<const V*>(static_cast<const bf16*>(p.x) + (q / p.top_k) * p.x_row_stride);
  V* __restrict__ dst = reinterpret_cast<V*>(static_cast<bf16*>(p.ws.xs) + static_cast<int64_t>(row) * p.hidden);
  const int nv = p.hidden / 8;
  for (int v0 = lane; v0 < nv; v0 += 32 * 4) {
    V t[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (v0 + 32 * u < nv) t[u] = __ldg(src + v0 + 32 * u);
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (v0 + 32 * u < nv) dst[v0 + 32 * u] = t[u];
  }
}

// One warp per pair: final row = offsets[e] + rows of e in earlier count blocks + rank, and the
// x row copied there (16-byte vectors, four loads in flight per lane before their stores).
static __global__ void __launch_bounds__(kGatherThreads) moe_prefill_gather_kernel(const __grid_constant__ PrefillKernelParams p) {
  const int q = static_cast<int>((blockIdx.x * static_cast<unsigned>(blockDim.x) + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (q >= p.pairs) return;
  const int rank = p.ws.pos[q];
  if (rank < 0) return;  // id out of range: pos stays -1, the combine skips it
  const int e = static_cast<int>(p.idx[q]);
  const int row = p.ws.offsets[e] + p.ws.block_counts[(q / kCountChunk) * p.experts + e] + rank;
  __syncwarp();
  if (lane == 0) p.ws.pos[q] = row;
  copy_x_row(p, q, row, lane);
}

// count + scan + gather in one launch, for P <= kFusedPrepMaxPairs. There is no grid-wide step:
// every block ranks all P pairs itself (P int64 ids from L2; the ranking is deterministic, so all
// blocks agree on every pair's row), block 0 writes the per-expert GEMM arguments, and block b
// writes pos and copies the x rows of pairs b*8 + warp, b*8 + warp + 8*gridDim.x, ...
//
// Ranking: warp w owns the contiguous pairs [w*S, (w+1)*S); in 32-pair steps __match_any_sync
// groups a step's lanes by expert, so the rank is (this warp's earlier pairs of e) + (lower lanes
// of this step with e). Pass 1 counts per (warp, expert), a scan over warps and experts gives
// each (warp, expert) its first row, pass 2 hands out the rows.
static __global__ void __launch_bounds__(kPrepThreads) moe_prefill_prep_kernel(const __grid_constant__ PrefillKernelParams p) {
  __shared__ int cursor[kPrepWarps][kPrefillMaxExperts];  // counts, then the next free row
  __shared__ int16_t key[kFusedPrepMaxPairs];             // expert of each pair, -1 if out of range
  __shared__ int row_of[kFusedPrepMaxPairs];
  __shared__ int warp_sum[kPrepThreads / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int P = p.pairs, E = p.experts;
  for (int i = tid; i < kPrepWarps * kPrefillMaxExperts; i += kPrepThreads) (&cursor[0][0])[i] = 0;
  for (int q = tid; q < P; q += kPrepThreads) {
    const int64_t e = p.idx[q];
    key[q] = (e >= 0 && e < E) ? static_cast<int16_t>(e) : int16_t{-1};
  }
  __syncthreads();
  const int seg = (P + kPrepWarps * 32 - 1) / (kPrepWarps * 32) * 32;  // pairs per warp, whole steps
  const int begin = warp * seg, end = min(P, begin + seg);
  const unsigned lower = (1u << lane) - 1u;
  for (int q0 = begin; q0 < end; q0 += 32) {  // pass 1: counts per (warp, expert)
    const int q = q0 + lane;
    const int e = q < end ? key[q] : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && (same & lower) == 0) cursor[warp][e] += __popc(same);  // one leader per expert
    __syncwarp();
  }
  __syncthreads();
  int total = 0;  // thread e: rows of expert e, and each warp's first row relative to the expert's
  if (tid < E) {
#pragma unroll
    for (int w = 0; w < kPrepWarps; ++w) {
      const int c = cursor[w][tid];
      cursor[w][tid] = total;
      total += c;
    }
  }
  const int offset = block_exclusive_scan(total, lane, warp, warp_sum);  // E <= 256 = kPrepThreads
  if (tid < E) {
#pragma unroll
    for (int w = 0; w < kPrepWarps; ++w) cursor[w][tid] += offset;
    if (blockIdx.x == 0) write_expert_args(p, tid, offset, total);
  }
  __syncthreads();
  for (int q0 = begin; q0 < end; q0 += 32) {  // pass 2: rows
    const int q = q0 + lane;
    const int e = q < end ? key[q] : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    int row = -1;
    if (e >= 0) row = cursor[warp][e] + __popc(same & lower);
    __syncwarp();
    if (e >= 0 && (same & lower) == 0) cursor[warp][e] += __popc(same);
    __syncwarp();
    if (q < end) row_of[q] = row;
  }
  __syncthreads();
  for (int q = blockIdx.x * kPrepWarps + warp; q < P; q += gridDim.x * kPrepWarps) {
    const int row = row_of[q];
    if (lane == 0) p.ws.pos[q] = row;
    if (row >= 0) copy_x_row(p, q, row, lane);
  }
}

// act[r, :] = bf16(bf16(gelu_tanh(gate)) * up) for the valid rows r < offsets[E]; 8 columns a thread.
static __global__ void __launch_bounds__(kGegluThreads) moe_prefill_geglu_kernel(const __grid_constant__ PrefillKernelParams p) {
  const int rows = p.ws.offsets[p.experts];
  const int per_row = p.inter / 8;
  const int64_t total = static_cast<int64_t>(rows) * per_row;
  const bf16* h1 = static_cast<const bf16*>(p.ws.h1);
  bf16* act = static_cast<bf16*>(p.ws.act);
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = v / per_row;
    const int c = static_cast<int>(v - r * per_row) * 8;
    float g[8], u[8], a[8];
    // HF layout: gate at column c, up at I + c; interleaved: gate block at 2c, up block at 2c + 8.
    const int64_t gc = p.interleaved ? 2 * c : c;
    const int64_t uc = p.interleaved ? 2 * c + 8 : p.inter + c;
    load_float<bf16, 8>(h1 + r * 2 * p.inter + gc, g);
    load_float<bf16, 8>(h1 + r * 2 * p.inter + uc, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = round_to<bf16>(prefill_gelu_tanh(g[i])) * u[i];
    store_float<bf16, 8>(act + r * p.inter + c, a);
  }
}

// out[t] = bf16(sum_j fp32(w[t,j] * y[pos[t,j]])), slots summed in order; one block per token.
static __global__ void __launch_bounds__(kFinalizeThreads) moe_prefill_finalize_kernel(const __grid_constant__ PrefillKernelParams p) {
  __shared__ int row[kPrefillMaxTopK];
  __shared__ float wt[kPrefillMaxTopK];
  const int t = blockIdx.x;
  const int k = p.top_k;
  if (threadIdx.x < k) {
    row[threadIdx.x] = p.ws.pos[t * k + threadIdx.x];
    wt[threadIdx.x] = p.weights[t * k + threadIdx.x];
  }
  __syncthreads();
  const bf16* y = static_cast<const bf16*>(p.ws.xs);
  bf16* out = static_cast<bf16*>(p.out) + static_cast<int64_t>(t) * p.out_row_stride;
  for (int c = threadIdx.x * 8; c < p.hidden; c += blockDim.x * 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
    for (int j = 0; j < k; ++j) {
      if (row[j] < 0) continue;
      float v[8];
      load_float<bf16, 8>(y + static_cast<int64_t>(row[j]) * p.hidden + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(wt[j], v[i]));
    }
    store_float<bf16, 8>(out + c, acc);
  }
}

}  // namespace gemma4x::moe

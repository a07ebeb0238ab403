// Decode experts in one persistent launch (P = T*k <= 64 pairs): every SM streams its share of
// the chosen experts' weights through a bulk-copy pipeline, gate/up + GeGLU first, then down +
// weighted combine, with one grid-wide barrier between the two phases.
//
// Why one launch: the two-kernel path (experts_decode_kernels.cuh) keeps a warp's weight loads in
// flight only between its tasks' compute phases, and kernel B's blocks wait for kernel A's to
// leave the SMs. Here a producer warp keeps S stages (up to 4 x 45 KB at H = 2816) of weights in
// flight per SM at all times, and it runs ahead across the phase boundary: the first S down
// chunks are in shared memory while the grid barrier (act complete) is still pending.
//
// Work split (G = gridDim.x blocks, one per SM, cooperative launch so all are resident):
//   gate/up: the flattened (used expert u, intermediate index i) space, U*I entries, is cut into
//     G equal contiguous ranges; a chunk is <= 4 consecutive i of one expert: their gate rows
//     and their up rows, two contiguous bulk copies. Consumer warp w owns chunk row w.
//   down: block b owns output rows [b*H/G, (b+1)*H/G) (<= 32) for every used expert, so the
//     weighted sum over the k slots stays inside the block; a chunk is those rows of one expert,
//     one contiguous bulk copy. 8 lanes per row, 4 rows per warp.
// Rounding as HF's grouped_mm path: g, u rounded to T; act = T(T(gelu(g)) * u); y = T(act . D_h);
// out = T(sum_j w_j * y_j) with the fp32 sum over slots in order j.
//
// Status (H200, 26B-A4B shape, experts alone, bench/ops/sweep_moe_decode.py): NOT the default.
// The pipeline itself is fast: with the math switched off (StreamArgs::mode = 1) the weights
// stream in 28.4 us at 1 token and 152.6 us at 8 tokens (4.04 TB/s, 95% of the copy ceiling),
// against 34.2 / 186.2 us for the whole two-kernel path. With the math the kernel takes 43.3 /
// 344 us: it is consumer-bound. Next steps: give each warp the gate row and the up row of one
// index (no cross-warp exchange, no named barrier per chunk), more consumer warps per SM (two
// warps per SMSP hide little of each warp's dependent FMA chain), and x / act in shared memory
// at 8 tokens (45 / 90 KB do not fit beside the stages: every pair waits on L2).
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "gemma4x/common/vec.cuh"
#include "gemma4x/moe/experts_decode_kernels.cuh"
#include "gemma4x/moe/params.h"
#include "gemma4x/common/pdl.cuh"

namespace gemma4x::moe {

constexpr int kStreamConsumerWarps = 8;
constexpr int kStreamThreads = (kStreamConsumerWarps + 1) * 32;  // + one producer warp
constexpr int kStreamConsumerThreads = kStreamConsumerWarps * 32;
constexpr int kStreamMaxStages = 4;
constexpr int kStreamIdxPerChunk = 4;  // gate/up chunk: 4 gate rows + 4 up rows, one per consumer warp
constexpr int kStreamMaxRows = 32;     // down rows per block: 8 warps x 4 rows
static_assert(2 * kStreamIdxPerChunk == kStreamConsumerWarps, "one gate/up row per consumer warp");
static_assert(kStreamMaxRows == kStreamConsumerWarps * kDownRows, "kernel B's row mapping");

// ---- mbarrier / bulk-copy primitives (sm_90) ---------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_fence_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// Blocks until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_addr(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// Weights are read once: evict them first, so act and x stay in L2.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// bytes (a multiple of 16) from 16-byte aligned global src to 16-byte aligned shared dst; completes
// on bar's transaction count.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                              uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}

// Named barrier over the consumer warps only (the producer warp never waits on it).
__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kStreamConsumerThreads) : "memory");
}

// act is written by other blocks of this launch: read through L2 (ld.global.cg), never a stale L1
// line. An intrinsic, not asm volatile, so the loads of a row overlap.
template <typename T>
__device__ __forceinline__ Vec<T, 8> load_l2(const T* p) {
  const uint4 r = __ldcg(reinterpret_cast<const uint4*>(p));
  return *reinterpret_cast<const Vec<T, 8>*>(&r);
}

template <typename T>
__device__ __forceinline__ Vec<T, 8> load_smem(const T* p) {
  const uint4 r = *reinterpret_cast<const uint4*>(p);
  return *reinterpret_cast<const Vec<T, 8>*>(&r);
}

// ---- work list -----------------------------------------------------------------------------------

struct StreamChunk {
  bool down;  // false: gate/up rows [start, start + n) of expert u; true: down rows [start, start + n)
  int u;
  int start;
  int n;
};

// The block's chunks in order; producer and consumers walk identical copies.
struct StreamChunks {
  int64_t pos, end;  // gate/up: flattened (u, i) range
  int inter, experts_used;
  int row_begin, row_end, rows_per_chunk;
  int du, dh;  // down cursor

  __device__ bool next(StreamChunk& c) {
    if (pos < end) {
      const int u = static_cast<int>(pos / inter);
      const int i = static_cast<int>(pos - static_cast<int64_t>(u) * inter);
      const int64_t left = end - pos;
      const int n = min(min(kStreamIdxPerChunk, inter - i), static_cast<int>(min(left, int64_t{kStreamIdxPerChunk})));
      pos += n;
      c = StreamChunk{false, u, i, n};
      return true;
    }
    if (row_end > row_begin && du < experts_used) {
      const int n = min(rows_per_chunk, row_end - dh);
      c = StreamChunk{true, du, dh, n};
      dh += n;
      if (dh >= row_end) {
        dh = row_begin;
        ++du;
      }
      return true;
    }
    return false;
  }
};

// Launch shape, chosen on the host (moe.cu: stream_config).
struct StreamArgs {
  int stages;       // pipeline depth, 2..kStreamMaxStages
  int stage_bytes;  // one chunk's buffer
  int act_smem;     // act ([P, I]) staged in shared memory after the barrier, else read through L2
  int piece_bytes;  // bulk copies are issued in pieces of at most this many bytes (multiple of 16)
  int mode;         // 0: compute; 1: stream the weights only, no math (a timing probe; output unset)
};

struct StreamShared {
  uint64_t full[kStreamMaxStages];
  uint64_t empty[kStreamMaxStages];
  unsigned long long table[kDecodeMaxExperts];  // expert -> mask of pairs
  unsigned long long mask[kDecodeMaxPairs];     // used expert u -> its pairs
  int expert[kDecodeMaxPairs];                  // used expert u -> expert id
  short u_of[kDecodeMaxExperts];                // expert id -> u
  int pair_off[kDecodeMaxPairs + 1];            // pairs of u: plist[pair_off[u] .. pair_off[u+1])
  int plist[kDecodeMaxPairs];
  int pair_expert[kDecodeMaxPairs];  // expert id of pair q (-1: out of range)
  float wq[kDecodeMaxPairs];
  float res[2][kStreamConsumerWarps][kDecodeMaxPairs];  // gate/up dots of one chunk, double-buffered
  float ys[kDecodeMaxPairs][kStreamMaxRows];            // w_q * T(act_q . D_h) for the block's rows
  int count;
};

// NVL: 16-byte vectors per lane of a gate/up row (a warp per row, H <= 32 * NVL * 8); NVB: per lane
// of a down row (8 lanes per row, I <= 8 * NVB * 8). A row's vectors are all loaded before the
// first FMA, so a chunk costs one shared-memory (and L1/L2 for x and act) round trip per pair.
template <typename T, int NVL, int NVB>
__global__ void __launch_bounds__(kStreamThreads, 1)
    moe_decode_stream_kernel(const __grid_constant__ MoeExpertsDecodeParams p, const StreamArgs a) {
  static_assert(sizeof(T) == 2, "16-byte vectors of 8 elements");
  namespace cg = cooperative_groups;
  extern __shared__ __align__(128) unsigned char stream_smem[];
  __shared__ StreamShared s;
  const int stages = a.stages;
  const int stage_bytes = a.stage_bytes;
  const int act_smem = a.act_smem;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int P = p.tokens * p.top_k;
  const int H = p.hidden;
  const int I = p.inter;

  if (tid == 0) {
    for (int i = 0; i < stages; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], kStreamConsumerWarps);
    }
    mbar_fence_init();
  }
  for (int e = tid; e < kDecodeMaxExperts; e += blockDim.x) s.table[e] = 0;
  for (int o = tid; o < kDecodeMaxPairs * kStreamMaxRows; o += blockDim.x) (&s.ys[0][0])[o] = 0.f;
  // Launched programmatically behind the router: the routing (and x) must be complete first.
  grid_dependency_wait();
  int64_t e_pair = -1;
  if (tid < P) {
    e_pair = p.idx[tid];
    s.wq[tid] = p.weights[tid];
  }
  __syncthreads();
  const bool valid = e_pair >= 0 && e_pair < p.experts;
  if (tid < P) s.pair_expert[tid] = valid ? static_cast<int>(e_pair) : -1;
  if (valid) atomicOr(&s.table[e_pair], 1ull << tid);
  __syncthreads();
  if (warp == 0) {  // compact the used experts in id order
    int base = 0;
    for (int c = 0; c * 32 < p.experts; ++c) {
      const int e = c * 32 + lane;
      const unsigned long long m = e < p.experts ? s.table[e] : 0ull;
      const unsigned ballot = __ballot_sync(0xffffffffu, m != 0);
      if (m != 0) {
        const int u = base + __popc(ballot & ((1u << lane) - 1));
        s.expert[u] = e;
        s.mask[u] = m;
        s.u_of[e] = static_cast<short>(u);
      }
      base += __popc(ballot);
    }
    // pair_off: exclusive prefix of the pair counts (U <= 64: two lanes' worth per lane).
    int c0 = lane < base ? __popcll(s.mask[lane]) : 0;
    int c1 = lane + 32 < base ? __popcll(s.mask[lane + 32]) : 0;
    int i0 = c0, i1 = c1;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int a = __shfl_up_sync(0xffffffffu, i0, o);
      const int b = __shfl_up_sync(0xffffffffu, i1, o);
      if (lane >= o) {
        i0 += a;
        i1 += b;
      }
    }
    const int total0 = __shfl_sync(0xffffffffu, i0, 31);
    s.pair_off[lane] = i0 - c0;
    s.pair_off[lane + 32] = total0 + i1 - c1;
    if (lane == 31) s.pair_off[64] = total0 + i1;
    if (lane == 0) s.count = base;
  }
  __syncthreads();
  if (tid < P && s.pair_expert[tid] >= 0) {
    const int u = s.u_of[s.pair_expert[tid]];
    s.plist[s.pair_off[u] + __popcll(s.mask[u] & ((1ull << tid) - 1))] = tid;
  }
  __syncthreads();

  const int U = s.count;
  const int G = gridDim.x;
  const int b = blockIdx.x;
  const int64_t n1 = static_cast<int64_t>(U) * I;
  StreamChunks chunks{};
  chunks.pos = n1 * b / G;
  chunks.end = n1 * (b + 1) / G;
  chunks.inter = I;
  chunks.experts_used = U;
  chunks.row_begin = static_cast<int>(static_cast<int64_t>(H) * b / G);
  chunks.row_end = static_cast<int>(static_cast<int64_t>(H) * (b + 1) / G);
  chunks.rows_per_chunk = min(kStreamMaxRows, stage_bytes / (I * static_cast<int>(sizeof(T))));
  chunks.du = 0;
  chunks.dh = chunks.row_begin;
  const int row_begin = chunks.row_begin;
  unsigned char* stage_base = stream_smem;
  T* act_s = reinterpret_cast<T*>(stream_smem + static_cast<size_t>(stages) * stage_bytes);
  const T* gate_up = static_cast<const T*>(p.gate_up);
  const T* down = static_cast<const T*>(p.down);
  T* act = static_cast<T*>(p.act);
  const T* x = static_cast<const T*>(p.x);
  cg::grid_group grid = cg::this_grid();

  if (warp == kStreamConsumerWarps) {
    // ---------------- producer ----------------
    const uint64_t policy = evict_first_policy();
    StreamChunk c;
    int n = 0;
    int first_down = -1;
    bool synced = false;
    while (chunks.next(c)) {
      if (c.down && first_down < 0) first_down = n;
      // A slot whose previous chunk is a down chunk frees only after the barrier.
      if (!synced && first_down >= 0 && n >= first_down + stages) {
        __syncwarp();
        grid.sync();
        synced = true;
      }
      const int slot = n % stages;
      if (lane == 0) {
        mbar_wait(&s.empty[slot], ((n / stages) & 1) ^ 1);
        unsigned char* dst = stage_base + static_cast<size_t>(slot) * stage_bytes;
        const auto copy = [&](unsigned char* to, const T* from, uint32_t bytes) {
          for (uint32_t o = 0; o < bytes; o += a.piece_bytes) {
            bulk_copy_g2s(to + o, reinterpret_cast<const unsigned char*>(from) + o, min(bytes - o, uint32_t(a.piece_bytes)),
                          &s.full[slot], policy);
          }
        };
        if (!c.down) {
          const uint32_t bytes = static_cast<uint32_t>(c.n) * H * sizeof(T);
          const T* g_rows = gate_up + (static_cast<int64_t>(s.expert[c.u]) * 2 * I + c.start) * H;
          mbar_arrive_expect_tx(&s.full[slot], 2 * bytes);
          copy(dst, g_rows, bytes);
          copy(dst + bytes, g_rows + static_cast<int64_t>(I) * H, bytes);
        } else {
          const uint32_t bytes = static_cast<uint32_t>(c.n) * I * sizeof(T);
          const T* d_rows = down + (static_cast<int64_t>(s.expert[c.u]) * H + c.start) * I;
          mbar_arrive_expect_tx(&s.full[slot], bytes);
          copy(dst, d_rows, bytes);
        }
      }
      __syncwarp();
      ++n;
    }
    if (!synced) grid.sync();
    return;
  }

  // ---------------- consumers ----------------
  const int ctid = tid;  // 0 .. kStreamConsumerThreads-1
  const int nvec_h = H / 8;
  const int nvec_i = I / 8;
  StreamChunk c;
  int n = 0;
  bool synced = false;
  bool have = chunks.next(c);
  while (true) {
    if (!synced && (!have || c.down)) {
      // Every block's act rows are written: the down phase may read them.
      grid.sync();
      synced = true;
      if (act_smem) {
        const uint4* src = static_cast<const uint4*>(p.act);
        uint4* dst = reinterpret_cast<uint4*>(act_s);
        const int total = P * nvec_i;
        for (int o0 = ctid; o0 < total; o0 += 4 * kStreamConsumerThreads) {
          uint4 v[4];
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            const int o = min(o0 + m * kStreamConsumerThreads, total - 1);
            v[m] = __ldcg(src + o);
          }
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            if (o0 + m * kStreamConsumerThreads < total) dst[o0 + m * kStreamConsumerThreads] = v[m];
          }
        }
        consumer_sync();
      }
    }
    if (!have) break;
    const int slot = n % stages;
    const T* st = reinterpret_cast<const T*>(stage_base + static_cast<size_t>(slot) * stage_bytes);
    const int np = s.pair_off[c.u + 1] - s.pair_off[c.u];
    const int* pl = s.plist + s.pair_off[c.u];
    mbar_wait(&s.full[slot], (n / stages) & 1);
    if (a.mode == 1) {  // timing probe: the weights arrive, nothing is computed
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[slot]);
    } else if (!c.down) {
      const int buf = n & 1;
      if (warp < 2 * c.n) {
        const T* row = st + static_cast<int64_t>(warp) * H;  // gate rows, then up rows
        Vec<T, 8> w[NVL];
#pragma unroll
        for (int m = 0; m < NVL; ++m) w[m] = load_smem(row + min(lane + 32 * m, nvec_h - 1) * 8);
        for (int j = 0; j < np; ++j) {
          const T* xr = x + static_cast<int64_t>(pl[j] / p.top_k) * p.x_row_stride;
          Vec<T, 8> xv[NVL];
#pragma unroll
          for (int m = 0; m < NVL; ++m) xv[m] = load_cached(xr + min(lane + 32 * m, nvec_h - 1) * 8);
          float acc = 0.f;
#pragma unroll
          for (int m = 0; m < NVL; ++m) {
            if (lane + 32 * m < nvec_h) acc = dot8(w[m], xv[m], acc);
          }
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
          if (lane == 0) s.res[buf][warp][j] = acc;
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[slot]);  // the stage is read; results are in s.res
      consumer_sync();
      for (int o = ctid; o < c.n * np; o += kStreamConsumerThreads) {
        const int r = o / np;
        const int j = o - r * np;
        const float g = round_to<T>(s.res[buf][r][j]);
        const float u = round_to<T>(s.res[buf][c.n + r][j]);
        act[static_cast<int64_t>(pl[j]) * I + c.start + r] = Float<T>::store(round_to<T>(gelu_tanh(g)) * u);
      }
    } else {
      const int r = warp * kDownRows + lane / kDownLanes;  // row of the chunk
      const int sub = lane % kDownLanes;
      const T* row = st + static_cast<int64_t>(min(r, c.n - 1)) * I;
      Vec<T, 8> w[NVB];
#pragma unroll
      for (int m = 0; m < NVB; ++m) w[m] = load_smem(row + min(sub + kDownLanes * m, nvec_i - 1) * 8);
      for (int j = 0; j < np; ++j) {
        const int q = pl[j];
        const int64_t base = static_cast<int64_t>(q) * I;
        Vec<T, 8> av[NVB];
        if (act_smem) {
#pragma unroll
          for (int m = 0; m < NVB; ++m) av[m] = load_smem(act_s + base + min(sub + kDownLanes * m, nvec_i - 1) * 8);
        } else {
#pragma unroll
          for (int m = 0; m < NVB; ++m) av[m] = load_l2(act + base + min(sub + kDownLanes * m, nvec_i - 1) * 8);
        }
        float acc = 0.f;
#pragma unroll
        for (int m = 0; m < NVB; ++m) {
          if (sub + kDownLanes * m < nvec_i) acc = dot8(w[m], av[m], acc);
        }
#pragma unroll
        for (int o = kDownLanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (sub == 0 && r < c.n) s.ys[q][c.start - row_begin + r] = s.wq[q] * round_to<T>(acc);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[slot]);
    }
    ++n;
    have = chunks.next(c);
  }

  // Weighted combine of the block's rows: fp32 sum over the slots in order, one rounding.
  consumer_sync();
  const int R = chunks.row_end - row_begin;
  T* out = static_cast<T*>(p.out);
  for (int o = ctid; o < p.tokens * R; o += kStreamConsumerThreads) {
    const int t = o / R;
    const int rr = o - t * R;
    float sum = 0.f;
    for (int j = 0; j < p.top_k; ++j) sum += s.ys[t * p.top_k + j][rr];
    out[static_cast<int64_t>(t) * p.out_row_stride + row_begin + rr] = Float<T>::store(sum);
  }
}

}  // namespace gemma4x::moe

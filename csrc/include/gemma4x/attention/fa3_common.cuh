// The FlashAttention-3 structure shared by attention_varlen_fa3_sm90.cuh (head dims 256 / 512) and
// attention_varlen_fa3_small_sm90.cuh (64 / 72): the shared-memory layout with its K / V rings
// and mbarriers, the TMA producer, Q held in registers, and the consumers' ping-pong of MMA turns.
// A config Cfg provides kBlockM, kBlockN, kStages, kQBytes, kKVBytes, kBarOffset and
// kConsumerThreads.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

#include "gemma4x/attention/varlen_common.cuh"
#include "gemma4x/common/bulk_copy.cuh"
#include "gemma4x/common/ldmatrix.cuh"
#include "gemma4x/common/sm90_wgmma.cuh"
#include "gemma4x/common/tma.cuh"

namespace gemma4x::attention {

// Named barriers (0 is __syncthreads): the consumers' MMA turns, and the partial-S exchange.
constexpr int kBarTurn0 = 1, kBarTurn1 = 2, kBarXchg0 = 3, kBarXchg1 = 4;

// Dynamic shared memory from a 1024-byte aligned base: Q, the kStages K stages, the kStages V
// stages, (the partial-S exchange sX of the d-split kernel), then the mbarriers: Q's, and per
// stage K full, K empty, V full, V empty. A "full" barrier completes on the producer's arrival
// plus the TMA transaction bytes, an "empty" one once every consumer thread released the stage.
template <class Cfg>
struct Fa3Smem {
  char* sQ;
  char* sK;
  char* sV;
  float* sX;
  uint64_t* bar_q;
  uint64_t* k_full;
  uint64_t* k_empty;
  uint64_t* v_full;
  uint64_t* v_empty;

  __device__ __forceinline__ explicit Fa3Smem(char* smem_raw) {
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    sQ = base;
    sK = sQ + Cfg::kQBytes;
    sV = sK + Cfg::kStages * Cfg::kKVBytes;
    sX = reinterpret_cast<float*>(sV + Cfg::kStages * Cfg::kKVBytes);
    bar_q = reinterpret_cast<uint64_t*>(base + Cfg::kBarOffset);
    k_full = bar_q + 1;
    k_empty = k_full + Cfg::kStages;
    v_full = k_empty + Cfg::kStages;
    v_empty = v_full + Cfg::kStages;
  }

  // One thread, before the __syncthreads that publishes the barriers.
  __device__ __forceinline__ void init_barriers() const {
    mbarrier_init(bar_q, 1);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(&k_full[s], 1);
      mbarrier_init(&v_full[s], 1);
      mbarrier_init(&k_empty[s], Cfg::kConsumerThreads);
      mbarrier_init(&v_empty[s], Cfg::kConsumerThreads);
    }
    fence_barrier_init();
  }
};

// The CTA-wide start of a kernel with a query tile: thread 0 initialises the mbarriers and the
// block-id summary's __shared__ minimum / maximum, the CTA synchronises, and every thread gets the
// summary (summarise_query_blocks).
template <class Cfg>
__device__ __forceinline__ void fa3_start(const Fa3Smem<Cfg>& sm, const AttentionVarlenParams& p,
                                          const VarlenTile& qt, bool has_blocks, int& s_qbmin, int& s_qbmax,
                                          int& qbmin, int& qbmax) {
  if (threadIdx.x == 0) {
    sm.init_barriers();
    s_qbmin = INT_MAX;
    s_qbmax = -1;
  }
  __syncthreads();
  summarise_query_blocks<false>(p, qt, has_blocks, s_qbmin, s_qbmax, qbmin, qbmax);
}

// The producer (one thread): Q once, then K(n) and V(n) of every key tile the walk visits, the
// it-th into stage it % kStages once the consumers released that stage's previous tile. Each tile
// is kRegions TMA boxes of {64 columns, 1 head, rows}; kRegionUnroll: the unroll of that loop.
template <class Cfg, int kRegions, int kRegionUnroll>
__device__ __forceinline__ void fa3_produce(const Fa3Smem<Cfg>& sm, const KeyTileWalk<Cfg::kBlockN>& keys, int n_first,
                                            const CUtensorMap& tm_q, const CUtensorMap& tm_k, const CUtensorMap& tm_v,
                                            int h, int kvh, int q_row, int k_start) {
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  mbarrier_arrive_expect_tx(sm.bar_q, Cfg::kQBytes);
#pragma unroll kRegionUnroll
  for (int r = 0; r < kRegions; ++r) tma_load_3d(sm.sQ + r * kBlockM * 128, &tm_q, sm.bar_q, r * 64, h, q_row);
  int it = 0;
#pragma unroll 1
  for (int n = n_first; n >= 0; n = keys.next(n - 1), ++it) {
    const int s = it % kStages;
    const uint32_t ph = (it / kStages) & 1;
    const int row = k_start + n * kBlockN;
    mbarrier_wait_parity(&sm.k_empty[s], ph ^ 1);
    mbarrier_arrive_expect_tx(&sm.k_full[s], Cfg::kKVBytes);
    char* dk = sm.sK + s * Cfg::kKVBytes;
#pragma unroll kRegionUnroll
    for (int r = 0; r < kRegions; ++r) tma_load_3d(dk + r * kBlockN * 128, &tm_k, &sm.k_full[s], r * 64, kvh, row);
    mbarrier_wait_parity(&sm.v_empty[s], ph ^ 1);
    mbarrier_arrive_expect_tx(&sm.v_full[s], Cfg::kKVBytes);
    char* dv = sm.sV + s * Cfg::kKVBytes;
#pragma unroll kRegionUnroll
    for (int r = 0; r < kRegions; ++r) tma_load_3d(dv + r * kBlockN * 128, &tm_v, &sm.v_full[s], r * 64, kvh, row);
  }
}

// Q's A fragments of this warp's 16 rows (row = the warp's first row + (lane & 15)) for kFrags k16
// slices from column col0: ldmatrix x4 of rows (lane & 15), 16-byte chunks (lane >> 4) of each
// slice (the swizzled layout: chunk c of row r at c ^ (r % 8) inside the row's 128 bytes).
template <int kBlockM, int kFrags>
__device__ __forceinline__ void load_q_frags(uint32_t (&qa)[kFrags][4], uint32_t sQ_u, int row, int col0, int lane) {
#pragma unroll
  for (int ks = 0; ks < kFrags; ++ks) {
    const int chunk = (col0 + ks * 16) / 8 + (lane >> 4);
    const uint32_t addr = sQ_u + (chunk >> 3) * kBlockM * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
    ldmatrix_x4(addr, qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3]);
  }
}

// Ping-pong of two consumers' MMA turns (kPingPong, else no-ops): consumer c issues its MMAs
// after sync(c) on its turn barrier and then pass(c)es the turn to the other one. Both walk the
// same key tiles, so their turn counts match; consumer 1 start()s by handing the first turn to
// consumer 0 and skips its very last hand-over (pass_last), which leaves both barriers balanced
// at exit. Static functions of c: a consumer index that is not otherwise used by the no-op forms
// leaves the kernels' code as it was without them (checked in SASS).
template <bool kPingPong, int kThreads>
struct MmaTurns {
  __device__ __forceinline__ static void start(int c) {
    if constexpr (kPingPong) {
      if (c == 1) named_bar_arrive(kBarTurn0, kThreads);
    }
  }
  __device__ __forceinline__ static void sync(int c) {
    if constexpr (kPingPong) named_bar_sync(c == 0 ? kBarTurn0 : kBarTurn1, kThreads);
  }
  __device__ __forceinline__ static void pass(int c) {
    if constexpr (kPingPong) named_bar_arrive(c == 0 ? kBarTurn1 : kBarTurn0, kThreads);
  }
  __device__ __forceinline__ static void pass_last(int c) {
    if constexpr (kPingPong) {
      if (c == 0) pass(c);
    }
  }
};

// The consumers' walk over the key tiles n_first, keys.next(n_first - 1), ..., the it-th in stage
// it % kStages: S(first) alone, then per tile S(nn) = Q K(nn)^T issued before O += P(n) V(n), and
// the softmax of S(nn) running while P(n) V(n) is on the tensor cores (wgmma.wait_group 1); last,
// P(last) V(last) alone. The loop body has no conditional MMA, so ptxas keeps the wgmma pipeline
// asynchronous. The kernel's parts: issue_qk(stage) / issue_pv(stage) issue (and commit) the
// MMAs; after_s() runs once S is in registers (the d-split exchange), softmax(n) turns S(n) into P
// and sets rescale, after_softmax() runs before the wait for P V, convert_p() packs P.
template <class Cfg, bool kPingPong, int kNT, int kOT, class IssueQK, class IssuePV, class AfterS, class Softmax,
          class AfterSoftmax, class ConvertP>
__device__ __forceinline__ void fa3_consume(const Fa3Smem<Cfg>& sm, const KeyTileWalk<Cfg::kBlockN>& keys,
                                            int n_first, int c, float (&s)[kNT][4], float (&acc_o)[kOT][4],
                                            const float (&rescale)[2], IssueQK&& issue_qk, IssuePV&& issue_pv,
                                            AfterS&& after_s, Softmax&& softmax, AfterSoftmax&& after_softmax,
                                            ConvertP&& convert_p) {
  constexpr int kStages = Cfg::kStages;
  using Turns = MmaTurns<kPingPong, Cfg::kConsumerThreads>;
  // Prologue: S(first).
  mbarrier_wait_parity(&sm.k_full[0], 0);
  Turns::sync(c);
  issue_qk(0);
  Turns::pass(c);
  wgmma_wait<0>();
  fence_acc<kNT>(s);
  mbarrier_arrive(&sm.k_empty[0]);
  after_s();
  softmax(n_first);
  convert_p();
  int n = n_first, it = 0;
  int nn = keys.next(n - 1);
#pragma unroll 1
  while (nn >= 0) {
    const int st = it % kStages, st1 = (it + 1) % kStages;
    const uint32_t ph = (it / kStages) & 1, ph1 = ((it + 1) / kStages) & 1;
    Turns::sync(c);
    mbarrier_wait_parity(&sm.k_full[st1], ph1);
    issue_qk(st1);
    mbarrier_wait_parity(&sm.v_full[st], ph);
    issue_pv(st);
    Turns::pass(c);
    wgmma_wait<1>();
    fence_acc<kNT>(s);
    mbarrier_arrive(&sm.k_empty[st1]);
    after_s();
    softmax(nn);
    after_softmax();
    wgmma_wait<0>();
    fence_acc<kOT>(acc_o);
    mbarrier_arrive(&sm.v_empty[st]);
    rescale_o<kOT>(acc_o, rescale);
    convert_p();
    n = nn;
    ++it;
    nn = keys.next(n - 1);
  }
  // Last tile: O += P V alone; consumer 1 skips its last hand-over (MmaTurns).
  const int st = it % kStages;
  Turns::sync(c);
  mbarrier_wait_parity(&sm.v_full[st], (it / kStages) & 1);
  issue_pv(st);
  Turns::pass_last(c);
  wgmma_wait<0>();
  fence_acc<kOT>(acc_o);
  mbarrier_arrive(&sm.v_empty[st]);
}

}  // namespace gemma4x::attention

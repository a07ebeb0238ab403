// Prefill / vision attention at head dims 64 and 72, FlashAttention-3 structure (Hopper, sm_90a).
//
// The schedule of attention_varlen_fa3_sm90.cuh (TMA producer warpgroup that gives its registers
// away, K/V rings guarded by full/empty mbarriers, consumer warpgroups that issue S(n+1) = Q K^T
// before O += P(n) V(n) and keep P in registers) with the shapes small head dims want:
//  * kBlockN = 128 keys per stage: S is one m64n128 wgmma chain (64 fp32 registers), which halves
//    the shared-memory reads per flop of the m64n64 form and the per-tile fixed costs.
//  * two consumers (128 query rows, optional ping-pong of their MMA turns, 240 registers each)
//    or three (192 rows, 160 registers each, running free).
//  * head dim 72 is padded inside the kernel only. Every tile is stored as [rows, 64] regions with
//    128-byte rows and the 128-byte swizzle; d = 72 takes two regions and the second is loaded by
//    a TMA box of 64 columns at column 64 of a tensor map whose inner dimension is 72: columns
//    72..127 lie outside the tensor and the TMA unit writes zeros there. So S = Q K^T runs five
//    k16 steps (d 0..79; columns 72..79 are 0 in Q and K) and O += P V one m64n72k16 wgmma per
//    16 keys whose MN-major B spans region 0 (n 0..63) and the first 8 columns of region 1 (the
//    descriptor's leading byte offset is the region stride). Global memory is read at 144-byte
//    rows and never padded.
//
// Measured (bench/RESULTS.md, H200, d 72, 4k patches: 340 TFLOP/s, cuDNN 366; ncu): tensor pipe
// ~43% and MUFU (exp2) ~38% busy, the consumers mostly stalled on fixed-latency dependencies
// (the softmax's max / sum chains), almost never on the wgmmas. Neither keeping the softmax
// overlapped with P V (kSplitWait), nor a third K/V stage, nor a quarter of the exponentials on
// the FMA pipe, nor 192-row tiles changed that by more than 2%.
// Contract, tile classification and mask: those of attention_varlen_sm90.cuh (params.h), so
// windows, image blocks and cached prefixes work at these head dims too; the block-id summaries
// (64-key chunks) are combined over the two or three chunks a 128-key tile touches.
#pragma once

#include "gemma4x/attention/fa3_common.cuh"

namespace gemma4x::attention {

template <typename T, int D_, int kStages_, int kConsumers_, bool kPingPong_, bool kQRegs_, bool kSplitWait_>
struct Fa3SmallConfig {
  using Element = T;
  static constexpr int D = D_;                    // real head dim (64 or 72)
  static constexpr int kRegions = (D + 63) / 64;  // 64-column smem regions (the last one zero-padded)
  static constexpr int kKSteps = (D + 15) / 16;   // k16 steps of S = Q K^T (d padded to 16)
  static constexpr int kOT = D / 8;               // n8 tiles of O per warp
  static constexpr int kBlockN = 128;             // keys per stage
  static constexpr int kStages = kStages_;
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr bool kPingPong = kPingPong_ && kConsumers == 2;
  // Q's k16 slices held in registers (4 kKSteps registers) as the A operand of S = Q K^T (RS
  // wgmma) instead of re-read from shared memory by every k16 step (SS): a third less
  // shared-memory traffic for S; measured 0-3% faster.
  static constexpr bool kQRegs = kQRegs_;
  // Keep the wait for P(n) V(n) below the softmax of S(n+1) (see the main loop); otherwise ptxas
  // moves it above. It keeps P(n)'s 32 registers reserved through the softmax: with Q in
  // registers too, or 160-register consumers, ptxas then serialises the wgmmas (C7512), so
  // those configs leave it off.
  static constexpr bool kSplitWait = kSplitWait_;
  static constexpr int kQBytes = kBlockM * 128 * kRegions;
  static constexpr int kKVBytes = kBlockN * 128 * kRegions;
  static constexpr int kBarOffset = kQBytes + 2 * kStages * kKVBytes;
  static constexpr int kNumBars = 1 + 4 * kStages;
  static constexpr int kSmemBytes = kBarOffset + kNumBars * 8 + 1024;  // +1024: alignment of the base
  // 128 * 24 + 256 * 240 = 128 * 24 + 384 * 160 = 64512 <= 65536 registers of the SM.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;

  static_assert(D == 64 || D == 72, "the small-head-dim kernel serves head dims 64 and 72");
  static_assert(kConsumers == 2 || kConsumers == 3, "two or three consumer warpgroups");
  static_assert(!kQRegs || kConsumers == 2, "160 registers (3 consumers) leave no room for Q");
  static_assert(kKVBytes % 1024 == 0 && kQBytes % 1024 == 0, "128B-swizzle regions are 1024-byte aligned");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
};

// Pins two pairs of fp32 registers at this point of the program (see fence_acc).
__device__ __forceinline__ void fence_scalars(float (&a)[2], float (&b)[2]) {
  asm volatile("" : "+f"(a[0]), "+f"(a[1]), "+f"(b[0]), "+f"(b[1])::"memory");
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    attention_varlen_fa3_small_kernel(const __grid_constant__ AttentionVarlenParams p,
                                      const __grid_constant__ CUtensorMap tm_q,
                                      const __grid_constant__ CUtensorMap tm_k,
                                      const __grid_constant__ CUtensorMap tm_v) {
  using T = typename Cfg::Element;
  constexpr bool kBf16 = MmaType<T>::kBf16;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  constexpr int kRegions = Cfg::kRegions;
  constexpr int kNT = kBlockN / 8;  // n8 tiles of S per warp
  constexpr int kOT = Cfg::kOT;     // n8 tiles of O per warp
  constexpr int64_t kBig = 1LL << 40;

  extern __shared__ char smem_raw[];
  const Fa3Smem<Cfg> sm(smem_raw);
  char *sQ = sm.sQ, *sK = sm.sK, *sV = sm.sV;
  __shared__ int s_qbmin, s_qbmax;

  const int h = blockIdx.x;
  const int tile = blockIdx.y;
  if (tile >= p.tile_cum[p.batch]) return;
  const VarlenTile qt = locate_varlen_tile<kBlockM>(p, tile);
  const int q_start = qt.q_start, k_start = qt.k_start, m0 = qt.m0, rows_valid = qt.rows_valid;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const bool has_blocks = p.q_block != nullptr;
  const int64_t wl = p.window_left < 0 ? kBig : p.window_left;
  const int64_t wr = p.window_right < 0 ? kBig : p.window_right;

  int qbmin, qbmax;
  fa3_start(sm, p, qt, has_blocks, s_qbmin, s_qbmax, qbmin, qbmax);

  const KeyTileWalk<kBlockN> keys(p, qt, has_blocks, wl, wr, qbmin, qbmax);
  const int n_first = keys.first();
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x == 0 && n_first >= 0) {
      fa3_produce<Cfg, kRegions, kRegions>(sm, keys, n_first, tm_q, tm_k, tm_v, h, kvh, q_start + m0, k_start);
    }
  } else {
    // ---------------- consumers ----------------
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int c = wg - 1;  // consumer index
    const int tid = threadIdx.x - 128 * wg;
    const int warp = tid >> 5, lane = tid & 31;
    const int row_base = 64 * c;  // this consumer's query rows in the tile
    const int r_loc0 = row_base + warp * 16 + (lane >> 2);
    // Per-element mask in 32-bit arithmetic (positions < 2^30, |p - s| < 2^30; windows < 2^31).
    int qpos[2];
    int qblk[2];
    const int wl32 = p.window_left < 0 ? INT_MAX : p.window_left;
    const int wr32 = p.window_right < 0 ? INT_MAX : p.window_right;
    query_rows(p, qt, has_blocks, r_loc0, qpos, qblk);

    float acc_o[kOT][4];
#pragma unroll
    for (int j = 0; j < kOT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc_o[j][r] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    float s[kNT][4];
    uint32_t pa[kNT / 2][4];
    float rescale[2];

    const uint32_t sQ_u = smem_addr(sQ), sK_u = smem_addr(sK), sV_u = smem_addr(sV);
    constexpr int kQFrags = Cfg::kQRegs ? Cfg::kKSteps : 1;
    uint32_t qa[kQFrags][4];  // kQRegs: A fragments of this warp's 16 rows of Q, one per k16 slice

    // S = Q K(stage)^T over d padded to 16 (issued, not waited for).
    auto issue_qk = [&](int stage) {
      const uint32_t kb = sK_u + stage * Cfg::kKVBytes;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
        const int region = ks / 4, within = (ks % 4) * 32;
        const uint32_t a_addr = sQ_u + region * kBlockM * 128 + row_base * 128 + within;
        const uint32_t b_addr = kb + region * kBlockN * 128 + within;
        if constexpr (Cfg::kQRegs) {
          wgmma_rs_64x128<kBf16>(s, qa[ks], gmma_desc(b_addr, 16, 1024), ks > 0);
        } else {
          wgmma_ss_64x128<kBf16>(s, gmma_desc(a_addr, 16, 1024), gmma_desc(b_addr, 16, 1024), ks > 0);
        }
      }
      wgmma_commit();
    };
    // O += P V(stage), one wgmma of n = d per 16 keys (issued, not waited for). MN-major B:
    // 8-key groups 1024 bytes apart (SBO), the 64-column regions kBlockN * 128 bytes apart (LBO).
    auto issue_pv = [&](int stage) {
      const uint32_t vb = sV_u + stage * Cfg::kKVBytes;
      fence_acc<kOT>(acc_o);
      wgmma_fence();
#pragma unroll
      for (int t = 0; t < kNT / 2; ++t) {
        const uint64_t desc = gmma_desc(vb + t * 16 * 128, kBlockN * 128, 1024);
        if constexpr (Cfg::D == 72) {
          wgmma_rs_64x72_tb<kBf16>(acc_o, pa[t], desc);
        } else {
          wgmma_rs_64x64_tb<kBf16>(acc_o, pa[t], desc);
        }
      }
      wgmma_commit();
    };
    // Mask (partial tiles) and online softmax of S(n): S becomes P (fp32), rescale[] the factor
    // for O, row_max / row_sum updated. exp2(-inf) is +0 (ex2.approx), so masked scores need no
    // select after the exponential.
    auto softmax = [&](int n) {
      if (keys.classify(n) == TileClass::kPartial) {
        mask_partial_tile<kNT, kBlockN>(s, p, qt, has_blocks, n, lane, qpos, qblk, wl32, wr32);
      }
      float m_use[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = row_max[i];
#pragma unroll
        for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        m_use[i] = mx == -INFINITY ? 0.f : mx * p.scale_log2;
        rescale[i] = fast_exp2(row_max[i] * p.scale_log2 - m_use[i]);  // row_max -inf: 0
        row_max[i] = mx;
      }
      float sum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float e = fast_exp2(fmaf(s[j][r], p.scale_log2, -m_use[r / 2]));  // exp2(-inf) = +0
          s[j][r] = e;
          sum[r / 2] += e;
        }
#pragma unroll
      for (int i = 0; i < 2; ++i) row_sum[i] = row_sum[i] * rescale[i] + sum[i];
    };
    auto convert_p = [&]() { pack_p<kBf16, kNT>(pa, s); };
    // Ping-pong (two consumers): see MmaTurns.
    constexpr bool kPingPong = Cfg::kPingPong;
    using Turns = MmaTurns<kPingPong, Cfg::kConsumerThreads>;

    if (n_first >= 0) {
      Turns::start(c);
      mbarrier_wait_parity(sm.bar_q, 0);
      if constexpr (Cfg::kQRegs) {
        load_q_frags<kBlockM>(qa, sQ_u, row_base + warp * 16 + (lane & 15), 0, lane);
      }
      // The wait for P(n) V(n) comes after the softmax of S(n + 1) in the program, but ptxas hoists
      // it above the softmax, to the top of their common basic block (seen in SASS), and the
      // softmax then no longer overlaps the MMA. A branch before the wait (never taken: the
      // launcher checks scale > 0) ends the block and keeps the wait below (kSplitWait).
      auto after_softmax = [&]() {
        fence_acc<kNT>(s);
        fence_scalars(row_sum, rescale);
        if constexpr (Cfg::kSplitWait) {
          if (p.scale_log2 <= 0.f) __trap();
        }
      };
      fa3_consume<Cfg, kPingPong>(sm, keys, n_first, c, s, acc_o, rescale, issue_qk, issue_pv, [] {}, softmax,
                                  after_softmax, convert_p);
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
        const int col = j * 8 + 2 * (lane & 3);
        *reinterpret_cast<uint32_t*>(gO + r * p.o_row_stride + col) =
            pack2<kBf16>(acc_o[j][2 * i] * inv[i], acc_o[j][2 * i + 1] * inv[i]);
      }
    }
  }
}

}  // namespace gemma4x::attention

// Prefill attention over packed varlen sequences, FlashAttention-3 structure (Hopper, sm_90a).
//
// Same contract and tile classification as attention_varlen_sm90.cuh (skip / full / partial key
// tiles, heaviest query tiles first); a different schedule:
//  * warp specialisation: warpgroup 0 is the producer (one thread issues every load as a TMA
//    bulk-tensor copy, cp.async.bulk.tensor, from tensor maps built on the host) and gives its
//    registers away (setmaxnreg); warpgroups 1 and 2 are consumers with 232 (240) registers each.
//  * K and V live in rings of kStages shared-memory stages, each guarded by a "full" mbarrier
//    (transaction bytes of the TMA copies) and an "empty" one (the 256 consumer threads arrive
//    once their MMAs on the stage completed).
//  * intra-warpgroup overlap: the next S = Q K^T is issued before the current P V, and the
//    softmax of the next tile runs while that P V is still on the tensor cores (wgmma.wait_group 1).
//    P stays in registers as the A operand of the P V wgmma (RS form).
//  * kDSplit == 1 (head dim 256): 128-row CTA, each consumer owns 64 query rows and all of d;
//    the two consumers take turns issuing their MMAs (ping-pong through two named barriers) so
//    one warpgroup's softmax overlaps the other's MMAs.
//  * kDSplit == 2 (head dim 512): a 64 x 512 fp32 O tile does not fit one warpgroup's registers,
//    so the two consumers share 64 query rows and own one half of d each; they exchange partial
//    S tiles through shared memory (as the cp.async kernel does). 32-key stages keep two K/V
//    stages beside the 64 KB Q tile.
//
// Shared-memory tiles use the layout of the cp.async kernel: [rows, d] as d/64 regions of
// [rows][64] elements, 128-byte rows with the 128-byte swizzle, which is what a TMA box of
// {64 columns, 1 head, rows} with CU_TENSOR_MAP_SWIZZLE_128B writes. Rows past the end of the
// packed tensor are zero-filled by the TMA unit; rows of a neighbouring sequence inside a tile
// are masked like any key past the sequence end (their P is exactly 0).
#pragma once

#include <cuda.h>  // CUtensorMap

#include "gemma4x/attention/fa3_common.cuh"

namespace gemma4x::attention {

template <typename T, int HD_, int kBlockN_, int kStages_, int kDSplit_, int kQRegFrags_ = 0, bool kPingPong_ = true>
struct Fa3Config {
  using Element = T;
  static constexpr int HD = HD_;
  static constexpr int kBlockN = kBlockN_;  // keys per stage
  static constexpr int kStages = kStages_;
  static constexpr int kDSplit = kDSplit_;
  static constexpr int kBlockM = kDSplit == 1 ? 128 : 64;
  static constexpr int kThreads = 384;  // producer warpgroup + 2 consumer warpgroups
  static constexpr int kConsumerThreads = 256;
  static constexpr int kHDw = HD / kDSplit;  // d columns each consumer contracts (S) and owns (O)
  // The first kQRegFrags k16 slices of Q are held in registers (4 per slice) as the A operand of
  // S = Q K^T (RS wgmma) instead of being read from shared memory by every SS wgmma: an
  // m64n32k16 SS wgmma reads 3 KB of shared memory per 65 kFLOP, more than the 128 B/clk
  // shared-memory port delivers at peak math; the RS form reads 1 KB.
  static constexpr int kQRegFrags = kQRegFrags_;
  // kDSplit == 1: the consumers take turns issuing their MMAs (else they run free).
  static constexpr bool kPingPong = kDSplit == 1 && kPingPong_;
  static constexpr bool kQRegs = kQRegFrags > 0;
  static constexpr int kQBytes = kBlockM * HD * 2;
  static constexpr int kKVBytes = kBlockN * HD * 2;
  static constexpr int kSxBytes = kDSplit > 1 ? kConsumerThreads * kBlockN / 2 * 4 : 0;
  static constexpr int kBarOffset = kQBytes + 2 * kStages * kKVBytes + kSxBytes;
  static constexpr int kNumBars = 1 + 4 * kStages;
  static constexpr int kSmemBytes = kBarOffset + kNumBars * 8 + 1024;  // +1024: alignment of the base
  // 128 * 40 + 256 * 232 = 64512 <= 65536 registers of the SM (24 / 240 with Q in registers).
  static constexpr int kProducerRegs = kQRegs ? 24 : 40, kConsumerRegs = kQRegs ? 240 : 232;

  static_assert(HD % 64 == 0 && kHDw % 64 == 0, "TMA boxes and wgmma use 64-column regions");
  static_assert(kBlockN == 32 || kBlockN == 64, "S is one m64n32 / m64n64 wgmma chain");
  static_assert(kKeyTile % kBlockN == 0, "a key tile lies inside one 64-key block summary chunk pair");
  static_assert(kDSplit == 1 || kDSplit == 2, "d is split in at most two halves");
  static_assert(kHDw <= 256, "a consumer holds at most 64 x 256 fp32 accumulators (128 registers)");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory over the sm_90 limit");
  static_assert(!kQRegs || (kBlockN == 32 && kQRegFrags <= kHDw / 16), "Q fragments beside O, S and P");
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    attention_varlen_fa3_kernel(const __grid_constant__ AttentionVarlenParams p,
                                const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                                const __grid_constant__ CUtensorMap tm_v) {
  using T = typename Cfg::Element;
  constexpr bool kBf16 = MmaType<T>::kBf16;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kHDw = Cfg::kHDw;
  constexpr int kDSplit = Cfg::kDSplit;
  constexpr int kNT = kBlockN / 8;  // n8 tiles of S per warp
  constexpr int kOT = kHDw / 8;     // n8 tiles of O per warp
  constexpr int64_t kBig = 1LL << 40;

  extern __shared__ char smem_raw[];
  const Fa3Smem<Cfg> sm(smem_raw);
  char *sQ = sm.sQ, *sK = sm.sK, *sV = sm.sV;
  float* sX = sm.sX;
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
      fa3_produce<Cfg, Cfg::HD / 64, 1>(sm, keys, n_first, tm_q, tm_k, tm_v, h, kvh, q_start + m0, k_start);
    }
  } else {
    // ---------------- consumers ----------------
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int c = wg - 1;                 // consumer index
    const int tid = threadIdx.x - 128 * wg;
    const int warp = tid >> 5, lane = tid & 31;
    const int row_base = kDSplit == 1 ? 64 * c : 0;  // this consumer's query rows in the tile
    const int dh = kDSplit == 1 ? 0 : c;             // this consumer's d half
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
    constexpr int kQFrags = Cfg::kQRegs ? Cfg::kQRegFrags : 1;
    uint32_t qa[kQFrags][4];  // kQRegs: A fragments of this warp's 16 rows of Q over the d slice

    // S = Q K(stage)^T over this consumer's d slice (issued, not waited for).
    auto issue_qk = [&](int stage) {
      const uint32_t kb = sK_u + stage * Cfg::kKVBytes;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kHDw / 16; ++ks) {
        const int col = dh * kHDw + ks * 16;
        const int region = col / 64, within = (col % 64) * 2;
        const uint32_t a_addr = sQ_u + region * kBlockM * 128 + row_base * 128 + within;
        const uint32_t b_addr = kb + region * kBlockN * 128 + within;
        if (Cfg::kQRegs && ks < kQFrags) {
          wgmma_rs_64x32<kBf16>(s, qa[ks < kQFrags ? ks : 0], gmma_desc(b_addr, 16, 1024), ks > 0);
        } else if constexpr (kBlockN == 64) {
          wgmma_ss_64x64<kBf16>(s, gmma_desc(a_addr, 16, 1024), gmma_desc(b_addr, 16, 1024), ks > 0);
        } else {
          wgmma_ss_64x32<kBf16>(s, gmma_desc(a_addr, 16, 1024), gmma_desc(b_addr, 16, 1024), ks > 0);
        }
      }
      wgmma_commit();
    };
    // O += P V(stage) over this consumer's d slice (issued, not waited for).
    auto issue_pv = [&](int stage) {
      const uint32_t vb = sV_u + stage * Cfg::kKVBytes;
      fence_acc<kOT>(acc_o);
      wgmma_fence();
#pragma unroll
      for (int rg = 0; rg < kHDw / 64; ++rg) {
        const int region = dh * (kHDw / 64) + rg;
#pragma unroll
        for (int t = 0; t < kNT / 2; ++t) {
          // MN-major B: 8-key groups 1024 bytes apart (SBO); one 64-column region per instruction.
          const uint32_t b_addr = vb + region * kBlockN * 128 + t * 16 * 128;
          wgmma_rs_64x64_tb<kBf16>(&acc_o[rg * 8], pa[t], gmma_desc(b_addr, kBlockN * 128, 1024));
        }
      }
      wgmma_commit();
    };
    // The partner consumer holds the other d half of the same S rows: sum the two partials.
    auto exchange = [&]() {
      if constexpr (kDSplit > 1) {
        float* mine = sX + (c * 4 + warp) * 32 * 4 * kNT;
        const float* theirs = sX + ((1 - c) * 4 + warp) * 32 * 4 * kNT;
#pragma unroll
        for (int j = 0; j < kNT; ++j)
          *reinterpret_cast<float4*>(mine + (j * 32 + lane) * 4) = make_float4(s[j][0], s[j][1], s[j][2], s[j][3]);
        named_bar_sync(kBarXchg0, Cfg::kConsumerThreads);
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const float4 t = *reinterpret_cast<const float4*>(theirs + (j * 32 + lane) * 4);
          s[j][0] += t.x; s[j][1] += t.y; s[j][2] += t.z; s[j][3] += t.w;
        }
        named_bar_sync(kBarXchg1, Cfg::kConsumerThreads);  // both read before the next write
      }
    };
    // Mask (partial tiles) and online softmax of S(n): S becomes P (fp32), rescale[] the factor
    // for O, row_max / row_sum updated.
    auto softmax = [&](int n) {
      if (keys.classify(n) == TileClass::kPartial) {
        mask_partial_tile<kNT, kBlockN>(s, p, qt, has_blocks, n, lane, qpos, qblk, wl32, wr32);
      }
      online_softmax<kNT>(s, row_max, row_sum, rescale, p);
    };
    auto convert_p = [&]() { pack_p<kBf16, kNT>(pa, s); };
    // Ping-pong (kDSplit == 1): see MmaTurns.
    constexpr bool kPingPong = Cfg::kPingPong;
    using Turns = MmaTurns<kPingPong, Cfg::kConsumerThreads>;

    if (n_first >= 0) {
      Turns::start(c);
      mbarrier_wait_parity(sm.bar_q, 0);
      if constexpr (Cfg::kQRegs) {
        load_q_frags<kBlockM>(qa, sQ_u, row_base + warp * 16 + (lane & 15), dh * kHDw, lane);
      }
      fa3_consume<Cfg, kPingPong>(sm, keys, n_first, c, s, acc_o, rescale, issue_qk, issue_pv, exchange, softmax,
                                  [] {}, convert_p);
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
        *reinterpret_cast<uint32_t*>(gO + r * p.o_row_stride + col) =
            pack2<kBf16>(acc_o[j][2 * i] * inv[i], acc_o[j][2 * i + 1] * inv[i]);
      }
    }
  }
}

}  // namespace gemma4x::attention

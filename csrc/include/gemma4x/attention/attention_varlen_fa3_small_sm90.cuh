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

#include "gemma4x/attention/attention_varlen_fa3_sm90.cuh"

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
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kRegions = Cfg::kRegions;
  constexpr int kNT = kBlockN / 8;  // n8 tiles of S per warp
  constexpr int kOT = Cfg::kOT;     // n8 tiles of O per warp
  constexpr int64_t kBig = 1LL << 40;

  extern __shared__ char smem_raw[];
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  char* sQ = base;
  char* sK = sQ + Cfg::kQBytes;
  char* sV = sK + kStages * Cfg::kKVBytes;
  uint64_t* bar_q = reinterpret_cast<uint64_t*>(base + Cfg::kBarOffset);
  uint64_t* k_full = bar_q + 1;
  uint64_t* k_empty = k_full + kStages;
  uint64_t* v_full = k_empty + kStages;
  uint64_t* v_empty = v_full + kStages;
  __shared__ int s_qbmin, s_qbmax;

  const int h = blockIdx.x;
  const int tile = blockIdx.y;
  if (tile >= p.tile_cum[p.batch]) return;
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
  const int rows_valid = min(kBlockM, Lq - m0);
  const int64_t off = static_cast<int64_t>(Lk) - Lq;
  const int kvh = h / (p.num_heads / p.num_kv_heads);
  const bool has_blocks = p.q_block != nullptr;
  const int64_t wl = p.window_left < 0 ? kBig : p.window_left;
  const int64_t wr = p.window_right < 0 ? kBig : p.window_right;

  if (threadIdx.x == 0) {
    mbarrier_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&k_full[s], 1);
      mbarrier_init(&v_full[s], 1);
      mbarrier_init(&k_empty[s], Cfg::kConsumerThreads);
      mbarrier_init(&v_empty[s], Cfg::kConsumerThreads);
    }
    fence_barrier_init();
    s_qbmin = INT_MAX;
    s_qbmax = -1;
  }
  __syncthreads();
  if (has_blocks) {
    if (threadIdx.x < rows_valid) {
      const int id = p.q_block[q_start + m0 + threadIdx.x];
      if (id >= 0) { atomicMin(&s_qbmin, id); atomicMax(&s_qbmax, id); }
    }
    __syncthreads();
  }
  const int qbmin = has_blocks ? s_qbmin : INT_MAX;
  const int qbmax = has_blocks ? s_qbmax : -1;

  const int64_t p_lo = m0 + off, p_hi = m0 + rows_valid - 1 + off;
  const bool blocks_right = has_blocks && qbmax >= 0;
  const bool blocks_left = blocks_right && p.unified;
  const int64_t s_max = blocks_right ? Lk - 1 : imin64(Lk - 1, p_hi + wr);
  const int64_t s_min = blocks_left ? 0 : imax64(0, p_lo - wl);
  const int n_hi = (Lk == 0 || s_max < s_min) ? -1 : static_cast<int>(s_max / kBlockN);
  const int n_lo = static_cast<int>(s_min / kBlockN);

  const QueryTileSummary tile_q{p_lo, p_hi, wl, wr, qbmin, qbmax, p.unified != 0};
  auto classify = [&](int n) -> int {
    const int64_t s0 = static_cast<int64_t>(n) * kBlockN;
    const int64_t s1 = imin64(s0 + kBlockN, Lk) - 1;
    bool overlap = false;
    if (blocks_right) {
      // The 64-key summary chunks of packed keys k_start + s0 .. k_start + s1 (two or three).
      const int c0 = (k_start + static_cast<int>(s0)) / kKeyTile;
      const int c1 = (k_start + static_cast<int>(s1)) / kKeyTile;
      int kmin = INT_MAX, kmax = -1;
      for (int cc = c0; cc <= c1; ++cc) {
        kmin = min(kmin, p.kb_min[cc]);
        kmax = max(kmax, p.kb_max[cc]);
      }
      overlap = kmin <= qbmax && qbmin <= kmax;
    }
    return classify_key_tile(tile_q, s0, s1, s0 + kBlockN <= Lk, overlap);
  };
  auto next_tile = [&](int n) -> int {
    for (; n >= n_lo; --n)
      if (classify(n) != TileClass::kSkip) return n;
    return -1;
  };
  const int n_first = n_hi >= 0 ? next_tile(n_hi) : -1;
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x == 0 && n_first >= 0) {
      mbarrier_arrive_expect_tx(bar_q, Cfg::kQBytes);
#pragma unroll
      for (int r = 0; r < kRegions; ++r) tma_load_3d(sQ + r * kBlockM * 128, &tm_q, bar_q, r * 64, h, q_start + m0);
      int it = 0;
#pragma unroll 1
      for (int n = n_first; n >= 0; n = next_tile(n - 1), ++it) {
        const int s = it % kStages;
        const uint32_t ph = (it / kStages) & 1;
        const int row = k_start + n * kBlockN;
        mbarrier_wait_parity(&k_empty[s], ph ^ 1);
        mbarrier_arrive_expect_tx(&k_full[s], Cfg::kKVBytes);
        char* dk = sK + s * Cfg::kKVBytes;
#pragma unroll
        for (int r = 0; r < kRegions; ++r) tma_load_3d(dk + r * kBlockN * 128, &tm_k, &k_full[s], r * 64, kvh, row);
        mbarrier_wait_parity(&v_empty[s], ph ^ 1);
        mbarrier_arrive_expect_tx(&v_full[s], Cfg::kKVBytes);
        char* dv = sV + s * Cfg::kKVBytes;
#pragma unroll
        for (int r = 0; r < kRegions; ++r) tma_load_3d(dv + r * kBlockN * 128, &tm_v, &v_full[s], r * 64, kvh, row);
      }
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
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r_loc0 + 8 * i;
      qpos[i] = m0 + r + static_cast<int>(off);
      qblk[i] = (has_blocks && r < rows_valid) ? p.q_block[q_start + m0 + r] : -1;
    }

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
      if (classify(n) == TileClass::kPartial) {
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) {
            const int kj = n * kBlockN + j * 8 + 2 * (lane & 3) + cc;
            const int kb = (has_blocks && kj < Lk) ? p.k_block[k_start + kj] : -1;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const int dpos = qpos[i] - kj;
              const bool left = dpos <= wl32;
              const bool right = -dpos <= wr32;
              const bool same = kb >= 0 && kb == qblk[i];
              const bool ok = kj < Lk && (p.unified ? ((left && right) || same) : (left && (right || same)));
              if (!ok) s[j][2 * i + cc] = -INFINITY;
            }
          }
        }
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
    auto convert_p = [&]() {
#pragma unroll
      for (int t = 0; t < kNT / 2; ++t) {
        pa[t][0] = pack2<kBf16>(s[2 * t][0], s[2 * t][1]);
        pa[t][1] = pack2<kBf16>(s[2 * t][2], s[2 * t][3]);
        pa[t][2] = pack2<kBf16>(s[2 * t + 1][0], s[2 * t + 1][1]);
        pa[t][3] = pack2<kBf16>(s[2 * t + 1][2], s[2 * t + 1][3]);
      }
    };
    // Ping-pong (two consumers): as in attention_varlen_fa3_kernel.
    constexpr bool kPingPong = Cfg::kPingPong;
    auto turn_sync = [&]() {
      if constexpr (kPingPong) named_bar_sync(c == 0 ? kBarTurn0 : kBarTurn1, Cfg::kConsumerThreads);
    };
    auto turn_pass = [&]() {
      if constexpr (kPingPong) named_bar_arrive(c == 0 ? kBarTurn1 : kBarTurn0, Cfg::kConsumerThreads);
    };

    if (n_first >= 0) {
      if (kPingPong && c == 1) named_bar_arrive(kBarTurn0, Cfg::kConsumerThreads);
      mbarrier_wait_parity(bar_q, 0);
      if constexpr (Cfg::kQRegs) {
        // ldmatrix x4 of rows (lane & 15), 16-byte chunks (lane >> 4) of each k16 slice (the
        // swizzled layout: chunk c of row r at c ^ (r % 8) inside the row's 128 bytes).
        const int row = row_base + warp * 16 + (lane & 15);
#pragma unroll
        for (int ks = 0; ks < kQFrags; ++ks) {
          const int chunk = ks * 2 + (lane >> 4);
          const uint32_t addr =
              sQ_u + (chunk >> 3) * kBlockM * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
          ldmatrix_x4(addr, qa[ks][0], qa[ks][1], qa[ks][2], qa[ks][3]);
        }
      }
      // Prologue: S(first).
      mbarrier_wait_parity(&k_full[0], 0);
      turn_sync();
      issue_qk(0);
      turn_pass();
      wgmma_wait<0>();
      fence_acc<kNT>(s);
      mbarrier_arrive(&k_empty[0]);
      softmax(n_first);
      convert_p();
      int n = n_first, it = 0;
      int nn = next_tile(n - 1);
#pragma unroll 1
      while (nn >= 0) {
        const int st = it % kStages, st1 = (it + 1) % kStages;
        const uint32_t ph = (it / kStages) & 1, ph1 = ((it + 1) / kStages) & 1;
        turn_sync();
        mbarrier_wait_parity(&k_full[st1], ph1);
        issue_qk(st1);
        mbarrier_wait_parity(&v_full[st], ph);
        issue_pv(st);
        turn_pass();
        wgmma_wait<1>();
        fence_acc<kNT>(s);
        mbarrier_arrive(&k_empty[st1]);
        softmax(nn);
        fence_acc<kNT>(s);
        fence_scalars(row_sum, rescale);
        // ptxas hoists the wait for P(n) V(n) above the softmax, to the top of their common basic
        // block (seen in SASS), and the softmax then no longer overlaps the MMA. A branch here
        // (never taken: the launcher checks scale > 0) ends the block and keeps the wait below.
        if constexpr (Cfg::kSplitWait) {
          if (p.scale_log2 <= 0.f) __trap();
        }
        wgmma_wait<0>();
        fence_acc<kOT>(acc_o);
        mbarrier_arrive(&v_empty[st]);
#pragma unroll
        for (int j = 0; j < kOT; ++j) {
          acc_o[j][0] *= rescale[0]; acc_o[j][1] *= rescale[0];
          acc_o[j][2] *= rescale[1]; acc_o[j][3] *= rescale[1];
        }
        convert_p();
        n = nn;
        ++it;
        nn = next_tile(n - 1);
      }
      const int st = it % kStages;
      turn_sync();
      mbarrier_wait_parity(&v_full[st], (it / kStages) & 1);
      issue_pv(st);
      if (c == 0) turn_pass();
      wgmma_wait<0>();
      fence_acc<kOT>(acc_o);
      mbarrier_arrive(&v_empty[st]);
    }

    // ---- epilogue: O / l, rows < rows_valid, columns < d ----
    float inv[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = row_sum[i];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      inv[i] = l > 0.f ? 1.f / l : 0.f;
    }
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

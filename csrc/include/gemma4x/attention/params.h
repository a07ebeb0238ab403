// Parameters of the prefill attention family (spec §2.5, masks §2.11). Pointers are device
// pointers; strides are in elements (the head dimension is contiguous).
// Symbols: B sequences, Nq / Nk packed query / key tokens, nH query heads, nKV KV heads, d head dim.
#pragma once

#include <cstdint>

namespace gemma4x::attention {

// Window bound meaning "no bound" (None in Python). Positions and windows fit in 31 bits.
constexpr int32_t kNoWindow = -1;

// out[t, h] = softmax_j(scale * q[t, h] . k[j, h / (nH/nKV)]) v[j, .] over the allowed keys j of
// t's sequence. Sequence b owns queries cu_q[b]..cu_q[b+1] and keys cu_k[b]..cu_k[b+1]; query i has
// position p = Lk - Lq + i, key j has position s = j. left_ok = p - s <= window_left,
// right_ok = s - p <= window_right, same = q_block[t] == k_block[j] >= 0, and
//   allowed = left_ok && (right_ok || same)        unified == 0 (Gemma4)
//   allowed = (left_ok && right_ok) || same        unified == 1 (gemma4_unified)
// A query with no allowed key gets zeros.
struct AttentionVarlenParams {
  const void* q;        // [Nq, nH, d]
  const void* k;        // [Nk, nKV, d]
  const void* v;        // [Nk, nKV, d]
  void* out;            // [Nq, nH, d]
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride;
  const int32_t* cu_q;       // [B+1]
  const int32_t* cu_k;       // [B+1]
  const int32_t* tile_cum;   // [B+1] prefix sums of ceil(Lq_b / kBlockM) for the launched config
  const int32_t* q_block;    // [Nq] or null (no block ids)
  const int32_t* k_block;    // [Nk] or null
  const int32_t* kb_min;     // [ceil(Nk/64)] min block id >= 0 of packed keys [64c, 64c+64), INT_MAX if none
  const int32_t* kb_max;     // [ceil(Nk/64)] max block id, -1 if none
  int32_t batch, num_heads, num_kv_heads, head_dim;
  int32_t total_q, total_k;
  int32_t tiles_bound;       // grid.y: ceil(Nq / kBlockM) + B >= tile_cum[B]
  int32_t window_left, window_right;  // kNoWindow = unbounded
  int32_t unified;
  int32_t block_m;           // rows per tile tile_cum was built with; the launcher checks it against the config
  float scale_log2;          // scale * log2(e)
};

// Key tile of every config; the block summaries kb_min/kb_max are built with this granularity.
constexpr int kKeyTile = 64;

}  // namespace gemma4x::attention

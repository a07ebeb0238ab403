// Parameters of the decode-attention kernels (queries of a few tokens per sequence attending
// over a per-slot KV cache). Pointers are device pointers; strides are in elements.
#pragma once

#include <cstdint>

namespace gemma4x::attention_decode {

struct DecodeParams {
  // Queries [B, Tq, nH, D] (last dim contiguous).
  const void* q;
  int64_t q_stride_b, q_stride_t, q_stride_h;
  // Caches [num_slots, rows, nKV, D] (last dim contiguous). Full layers: row = position.
  // Ring layers: row r holds position ring_pos[slot, r] (-1 = empty).
  const void* k;
  int64_t k_stride_slot, k_stride_row, k_stride_head;
  const void* v;
  int64_t v_stride_slot, v_stride_row, v_stride_head;
  const int64_t* q_pos;     // [B, Tq] contiguous: absolute position of each query
  const int64_t* slots;     // [B] cache slot of each sequence, or nullptr = slot b
  const int64_t* ring_pos;  // [num_slots, rows] with row stride ring_stride_slot, or nullptr (full layer)
  int64_t ring_stride_slot;
  // Output [B, Tq, nH, D], written directly when num_splits == 1.
  void* out;
  int64_t out_stride_b, out_stride_t, out_stride_h;
  // Split-KV partials (num_splits > 1): o_part [splits, B, Tq, nH, D] fp32, normalised per split,
  // lse_part [splits, B, Tq, nH] fp32 in log2 units (-inf = the split saw no key).
  float* o_part;
  float* lse_part;
  int32_t batch, tq, num_heads, num_kv_heads, head_dim;
  int32_t num_slots, rows;
  int32_t num_splits;
  int32_t row_groups;   // ceil(Tq * nH / nKV / 16): 16 query rows per CTA
  int32_t window_left;  // keys with q_pos - k_pos <= window_left; < 0 = unbounded
  float scale_log2;     // softmax scale * log2(e)
  int32_t flags;        // kFlag* bits below, set by the launcher
};

// The combine kernel lets the next kernel on the stream launch (PDL) as soon as it starts, so
// that kernel's CTAs are resident and waiting when the combine ends.
constexpr int32_t kFlagCombineTriggersEarly = 1;

}  // namespace gemma4x::attention_decode

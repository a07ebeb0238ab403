// Parameters of the KV-cache write. Plain data: no torch.
#pragma once

#include <cstdint>

namespace gemma4x::kv_cache {

// One decode step's K/V rows into the per-slot cache, one launch for K, V and the ring's positions:
//   row = ring ? pos % rows : pos
//   k_cache[slot, row] = k[b];  v_cache[slot, row] = v[b];  ring_pos[slot, row] = pos  (ring layers)
// for b in [0, batch), slot = slots ? slots[b] : b, pos = positions[b * positions_stride].
// Entries whose slot or row falls outside the cache are skipped (never written out of bounds).
struct KvCacheWriteParams {
  void* k_cache;              // [num_slots, rows, row_bytes] bytes, contiguous
  void* v_cache;              // same shape
  int64_t* ring_pos;          // [num_slots, rows] or nullptr (full-attention layer: row = position)
  const void* k;              // batch rows of row_bytes, k_stride_bytes apart
  const void* v;
  int64_t k_stride_bytes;
  int64_t v_stride_bytes;
  const int64_t* slots;       // [batch] or nullptr (slot = b)
  const int64_t* positions;   // positions[b * positions_stride]
  int64_t positions_stride;
  int64_t num_slots;
  int64_t rows;
  int64_t row_bytes;          // nKV * head_dim * element size; a multiple of 16
  int32_t batch;
};

}  // namespace gemma4x::kv_cache

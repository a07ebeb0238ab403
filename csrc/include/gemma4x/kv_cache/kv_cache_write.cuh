// The decode step's KV-cache write: K, V and the ring position of every sequence in one launch,
// replacing the 3-4 indexing kernels (modulo, two index_puts, ring positions) per layer and step.
#pragma once

#include <cuda_runtime.h>

#include "gemma4x/kv_cache/params.h"

namespace gemma4x::kv_cache {

// One block per sequence; 16-byte vectors, K and V interleaved so both rows stream at once.
__global__ void kv_cache_write_kernel(KvCacheWriteParams p) {
  const int b = blockIdx.x;
  const int64_t slot = p.slots != nullptr ? p.slots[b] : b;
  const int64_t pos = p.positions[b * p.positions_stride];
  if (slot < 0 || slot >= p.num_slots || pos < 0) return;
  const int64_t row = p.ring_pos != nullptr ? pos % p.rows : pos;
  if (row >= p.rows) return;

  const int64_t vectors = p.row_bytes / 16;
  const int64_t dst = (slot * p.rows + row) * vectors;
  const uint4* k_src = reinterpret_cast<const uint4*>(static_cast<const char*>(p.k) + b * p.k_stride_bytes);
  const uint4* v_src = reinterpret_cast<const uint4*>(static_cast<const char*>(p.v) + b * p.v_stride_bytes);
  uint4* k_dst = static_cast<uint4*>(p.k_cache) + dst;
  uint4* v_dst = static_cast<uint4*>(p.v_cache) + dst;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    const uint4 kv = k_src[i];
    const uint4 vv = v_src[i];
    k_dst[i] = kv;
    v_dst[i] = vv;
  }
  if (p.ring_pos != nullptr && threadIdx.x == 0) p.ring_pos[slot * p.rows + row] = pos;
}

}  // namespace gemma4x::kv_cache

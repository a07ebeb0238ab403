#include "kv_cache.h"

#include <algorithm>

#include "gemma4x/common/check.h"
#include "gemma4x/kv_cache/kv_cache_write.cuh"

namespace gemma4x::kv_cache {

void kv_cache_write(const KvCacheWriteParams& p, cudaStream_t stream) {
  constexpr const char* op = "kv_cache_write";
  GEMMA4X_CHECK_ARG(p.batch >= 0, op, ": batch must be >= 0, got ", p.batch);
  GEMMA4X_CHECK_ARG(p.num_slots > 0 && p.rows > 0, op, ": the cache must have slots and rows, got ", p.num_slots,
                    " x ", p.rows);
  GEMMA4X_CHECK_ARG(p.row_bytes > 0 && p.row_bytes % 16 == 0, op, ": row bytes ", p.row_bytes,
                    " must be a positive multiple of 16");
  GEMMA4X_CHECK_ARG(p.k_stride_bytes % 16 == 0 && p.v_stride_bytes % 16 == 0, op,
                    ": k/v row strides must be multiples of 16 bytes, got ", p.k_stride_bytes, " and ",
                    p.v_stride_bytes);
  for (const void* ptr : {static_cast<const void*>(p.k_cache), static_cast<const void*>(p.v_cache), p.k, p.v}) {
    GEMMA4X_CHECK_ARG(ptr != nullptr && is_aligned(ptr, 16), op, ": k_cache, v_cache, k and v must be 16-byte aligned");
  }
  GEMMA4X_CHECK_ARG(p.positions != nullptr, op, ": positions is a null pointer");
  if (p.batch == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, p.row_bytes / 16)));
  kv_cache_write_kernel<<<p.batch, threads, 0, stream>>>(p);
  check_launch("kv_cache_write");
}

}  // namespace gemma4x::kv_cache

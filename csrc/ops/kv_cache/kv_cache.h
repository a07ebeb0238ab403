// Host launcher of the KV-cache write (all archs).
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/kv_cache/params.h"

namespace gemma4x::kv_cache {

// Validates the shape arguments and pointer alignment, then launches on `stream`.
void kv_cache_write(const KvCacheWriteParams& params, cudaStream_t stream);

}  // namespace gemma4x::kv_cache

// Host launcher of decode attention over a per-slot KV cache (see decode_kernels.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/attention_decode/params.h"
#include "gemma4x/common/dtype.h"

namespace gemma4x::attention_decode {

// KV splits the launch will use for this shape on the current device; the caller sizes the
// fp32 partials [splits, B, Tq, nH, D] and lse [splits, B, Tq, nH] with it (1 = none needed).
// `max_rows` bounds the cache rows any sequence can see (the graph-captured case passes the
// cache capacity: the split count is fixed at launch, the rows per split follow the lengths).
int num_splits(int batch, int tq, int num_heads, int num_kv_heads, int head_dim, int max_rows, DType dtype);

void decode_attention(const DecodeParams& params, DType dtype, cudaStream_t stream);

// Benchmark knobs (process-wide, read at launch, so a captured graph keeps what was set when it
// was captured). `variant` is a kVariant* bitmask; 0 is the shipped launch, and the bits turn its
// session-3 changes off one by one (kVariantMain: all off, the session-2 launch) or force a path.
// `splits` > 0 overrides the split count (still capped at the tiles and kMaxSplits), 0 = the
// heuristic. The environment variable GEMMA4X_ATTN_DECODE_VARIANT sets the initial variant.
constexpr int kVariantNoEarlyTrigger = 1;  // the combine does not let the next kernel launch early (PDL)
constexpr int kVariantOldCombine = 2;      // decode_combine_kernel always (no decode_combine_wide_kernel)
constexpr int kVariantSkipCombine = 4;     // timing only: no combine launch (the output is not written)
constexpr int kVariantNoSplitRounding = 8;  // keep the wave-filling split count even if some splits get no tile
constexpr int kVariantWideCombine = 16;     // decode_combine_wide_kernel whatever the grid (tests)
constexpr int kVariantMain = kVariantNoEarlyTrigger | kVariantOldCombine | kVariantNoSplitRounding;
constexpr int kNumVariants = 32;
void set_tuning(int variant, int splits);
int tuning_variant();
int tuning_splits();

}  // namespace gemma4x::attention_decode

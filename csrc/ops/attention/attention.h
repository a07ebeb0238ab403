// Host launcher of the prefill attention kernels. Defined in attention_varlen_sm90.cu, so it exists
// only in builds whose GEMMA4X_CUDA_ARCHS include an sm_90 target (the binding checks GEMMA4X_HAS_SM90).
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime_api.h>

#include "gemma4x/attention/params.h"
#include "gemma4x/common/dtype.h"

namespace gemma4x::attention {

// Validates every argument, checks that the current GPU is compute capability 9.0 (the sm_90a code
// runs nowhere else) and launches on `stream`. `variant` bit 0: warpgroup MMAs (head dims 64/256/512;
// head dim 72 always runs mma.sync); bit 1: 64-row tiles, several CTAs per SM (head dims 256/64/72);
// bit 2: the FlashAttention-3-structured kernels (attention_varlen_fa3_sm90.cu at head dims 256/512,
// attention_varlen_fa3_small_sm90.cu at 64/72; bit 0 is ignored, bit 1 picks the alternative
// schedule; bit 3 is ignored at 256/512 and picks the 192-row tile (alone) or the partly
// polynomial exponential (with bit 1) at 64/72).
void attention_varlen(AttentionVarlenParams p, DType dtype, float scale, int variant, cudaStream_t stream);

// Query rows per CTA for (head dim, variant) (the caller builds tile_cum with it); 0 if unsupported.
int attention_varlen_block_m(int head_dim, int variant);

// The FlashAttention-3-structured kernel (attention_varlen_fa3_sm90.cu); called by attention_varlen
// for variant bit 2 at head dims 256/512 after its checks.
void attention_varlen_fa3(const AttentionVarlenParams& p, DType dtype, int variant, cudaStream_t stream);
int attention_varlen_fa3_block_m(int head_dim, int variant);

// The same for head dims 64/72 (attention_varlen_fa3_small_sm90.cu).
void attention_varlen_fa3_small(const AttentionVarlenParams& p, DType dtype, int variant, cudaStream_t stream);
int attention_varlen_fa3_small_block_m(int head_dim, int variant);

// TMA tensor map over a [rows, heads, d] tensor with strides (row, head) in elements: dims (d, heads,
// rows), box {64, 1, box_rows}, 128-byte swizzle, zero fill outside the tensor (rows past the last,
// columns past d when a box starts at column 64 of d = 72). Throws on strides the TMA cannot take.
CUtensorMap make_attention_tensor_map(const char* name, const void* ptr, bool bf16, int d, int heads, int rows,
                                      int64_t row_stride, int64_t head_stride, int box_rows);

}  // namespace gemma4x::attention

// Parameters of the NVFP4 W4A4 GEMM family. Plain data: no torch, no CUTLASS types.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gemma4x::gemm {

// out[M, N] (bf16, row-major) = alpha * (A [M, K] e2m1, K-major) x (B [N, K] e2m1, K-major)^T,
// each operand scaled per 16 K-elements by an e4m3 block scale.
//   a, b:             packed e2m1, two codes per byte (even k in the low nibble): [M, K/2], [N, K/2]
//   a_scale, b_scale: e4m3 block scales in CUTLASS's SM100 order (rows padded to 128, K/16 to 4),
//                     as python/gemma4x/reference/quant.py:nvfp4_swizzle_scales writes them
//   alpha:            one fp32 on the device: input_scale * weight_scale_2
//   workspace:        workspace_bytes of scratch for the tile scheduler (see nvfp4_gemm_workspace_size)
struct Nvfp4GemmParams {
  const void* a;
  const void* a_scale;
  const void* b;
  const void* b_scale;
  const float* alpha;
  void* out;
  void* workspace;
  size_t workspace_bytes;
  int32_t M;
  int32_t N;
  int32_t K;
};

// Shape rules of the kernel (the Python wrapper holds the same numbers).
// K: rows of A and B are TMA-loaded, 16-byte aligned (32 codes), and the scale rows are read in
// atoms of 4 blocks (64 codes); 64 covers both. N: bf16 output rows are stored 16 bytes at a time.
constexpr int kNvfp4GemmKMultiple = 64;
constexpr int kNvfp4GemmNMultiple = 8;

}  // namespace gemma4x::gemm

namespace gemma4x::gemm {

// Grouped NVFP4 W4A4 GEMM over experts: rows of A are sorted by expert, and expert e owns rows
// [row_offsets[e], row_offsets[e+1]) of A and of out. Every group shares N and K.
//   out[r, N] (bf16) = alpha[e] * (A[r] e2m1 * SFA) x (B[e] [N, K] e2m1 * SFB[e])^T   for r in group e
//   a:           packed e2m1 [M_total, K/2], rows in expert order
//   a_scale:     each group's block scales swizzled on its own (rows padded to 128, K/16 to 4) and
//                concatenated in expert order: group e starts at
//                sum_{j<e} round_up(M_j, 128) * round_up(K/16, 4)   (grouped_scale_offset)
//   row_offsets: int32 [groups + 1] on the device (never read by the host: graph-capturable)
//   b, b_scale:  [groups, N, K/2] packed e2m1 and [groups, swizzled(N, K/16)] e4m3
//   alpha:       fp32 [groups] on the device, input_scale * weight_scale_2 per expert
//   workspace:   workspace_bytes (nvfp4_grouped_gemm_workspace_size) for the per-group argument
//                arrays the device fills and for CUTLASS's scheduler
struct Nvfp4GroupedGemmParams {
  const void* a;
  const void* a_scale;
  const int32_t* row_offsets;
  const void* b;
  const void* b_scale;
  const float* alpha;
  void* out;
  void* workspace;
  size_t workspace_bytes;
  int32_t groups;
  int32_t N;
  int32_t K;
};

// Scale-factor bytes of one group of `rows` rows: the unit of a_scale's per-group offsets.
// Host and device share this one rule (the probe test compiles it on the host).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t grouped_scale_bytes(int64_t rows, int32_t K) {
  const int64_t padded_rows = (rows + 127) / 128 * 128;
  const int64_t padded_blocks = (K / 16 + 3) / 4 * 4;
  return padded_rows * padded_blocks;
}

}  // namespace gemma4x::gemm

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

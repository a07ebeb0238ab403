// Parameters of the skinny GEMM y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for decode sizes (M <= 16).
#pragma once

#include <cstdint>

namespace gemma4x::gemv {

struct SkinnyGemmParams {
  const void* x;       // [M, K], rows `x_stride` elements apart, K contiguous
  int64_t x_stride;
  const void* w;       // [N, K], contiguous
  const void* bias;    // [N] or nullptr
  void* y;             // [M, N], rows `y_stride` elements apart, N contiguous
  int64_t y_stride;
  int32_t m;
  int32_t n;
  int32_t k;
};

}  // namespace gemma4x::gemv

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
  // Split-K over CTAs (gridDim.y = splits > 1): each CTA adds its fp32 tile to `partials`
  // [splits, N/16, 16 * 8 * tiles], and the last CTA of a row block (counted in `counters`
  // [N/16], zero on entry and left zero) sums them in split order and writes y.
  int32_t splits;
  float* partials;
  int32_t* counters;
};

}  // namespace gemma4x::gemv

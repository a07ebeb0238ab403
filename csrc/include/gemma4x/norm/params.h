// Parameters of the RMSNorm family. Pointers are device pointers; strides are in elements
// between consecutive rows (the hidden dimension itself is contiguous).
#pragma once

#include <cstdint>

namespace gemma4x::norm {

// out = rms(x) [* weight]
struct RmsNormParams {
  const void* x;
  int64_t x_row_stride;
  const void* weight;  // [hidden] or nullptr (Gemma 4's scale-free norms: v_norm, router norm)
  void* out;
  int64_t out_row_stride;
  int64_t rows;
  int32_t hidden;
  float eps;
};

// residual <- residual + x (rounded); out = rms(residual) [* weight]
struct FusedAddRmsNormParams {
  const void* x;
  int64_t x_row_stride;
  void* residual;
  int64_t residual_row_stride;
  const void* weight;  // [hidden] or nullptr
  void* out;
  int64_t out_row_stride;
  int64_t rows;
  int32_t hidden;
  float eps;
};

// out = (rms_w3(rms_w1(x1) + rms_w2(x2)) + residual) * scalar: the Gemma 4 MoE-block tail
// (post_feedforward_layernorm_1/_2, their sum, post_feedforward_layernorm, residual, layer_scalar).
struct MoeTailNormParams {
  const void* x1;
  int64_t x1_row_stride;
  const void* x2;
  int64_t x2_row_stride;
  const void* residual;
  int64_t residual_row_stride;
  const void* w1;
  const void* w2;
  const void* w3;
  const void* scalar;  // one element
  void* out;
  int64_t out_row_stride;
  int64_t rows;
  int32_t hidden;
  float eps1;
  float eps2;
  float eps3;
};

// out = residual + rms(x) [* weight], then [* scalar]: the dense Gemma 4 layer tail
// (h1 + post_feedforward_layernorm(m), times layer_scalar), each step rounded to T. Out of place.
struct ResidualRmsNormParams {
  const void* x;
  int64_t x_row_stride;
  const void* residual;
  int64_t residual_row_stride;
  const void* weight;  // [hidden] or nullptr
  const void* scalar;  // one element, or nullptr for no product
  void* out;
  int64_t out_row_stride;
  int64_t rows;
  int32_t hidden;
  float eps;
};

}  // namespace gemma4x::norm

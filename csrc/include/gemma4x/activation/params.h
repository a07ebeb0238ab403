// Parameters of the activation family. Pointers are device pointers; strides are in elements
// between consecutive rows (the last dimension itself is contiguous).
#pragma once

#include <cstdint>

namespace gemma4x::activation {

// out = T(T(gelu_tanh(gate)) * up), elementwise over [rows, cols]. gate and up may be column
// slices of one [rows, 2 * cols] buffer (the fused gate/up GEMM output): only their row strides
// and base pointers differ.
struct GegluParams {
  const void* gate;
  int64_t gate_row_stride;
  const void* up;
  int64_t up_row_stride;
  void* out;
  int64_t out_row_stride;
  int64_t rows;
  int64_t cols;
};

}  // namespace gemma4x::activation

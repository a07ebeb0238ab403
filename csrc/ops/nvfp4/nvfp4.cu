#include "nvfp4.h"

#include "gemma4x/common/check.h"
#include "gemma4x/nvfp4/quant_kernels.cuh"

namespace gemma4x::nvfp4 {

void quantize(const QuantizeParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "nvfp4_quantize";
  GEMMA4X_CHECK_ARG(p.k > 0 && p.k % 16 == 0, op, ": K must be a positive multiple of 16, got ", p.k);
  GEMMA4X_CHECK_ARG(p.rows >= 0, op, ": rows must be >= 0, got ", p.rows);
  GEMMA4X_CHECK_ARG(p.rows_per_scale > 0 && (p.rows == 0 || p.rows % p.rows_per_scale == 0), op,
                    ": rows_per_scale must be a positive divisor of rows=", p.rows, ", got ", p.rows_per_scale);
  if (p.rows == 0) return;
  GEMMA4X_CHECK_ARG(p.w && p.global_scale && p.codes && p.scales, op, ": null pointer");
  GEMMA4X_CHECK_ARG(is_aligned(p.w, 16) && is_aligned(p.codes, 8), op,
                    ": w must be 16-byte and codes 8-byte aligned");
  const int64_t blocks = p.rows * (p.k / 16);
  const int64_t grid = (blocks + kQuantizeThreads - 1) / kQuantizeThreads;
  GEMMA4X_CHECK_ARG(grid < (int64_t{1} << 31), op, ": tensor too large (", blocks, " blocks)");
  switch (dtype) {
    case DType::kFloat32:
      nvfp4_quantize_kernel<float><<<static_cast<unsigned>(grid), kQuantizeThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      nvfp4_quantize_kernel<__half><<<static_cast<unsigned>(grid), kQuantizeThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      nvfp4_quantize_kernel<__nv_bfloat16><<<static_cast<unsigned>(grid), kQuantizeThreads, 0, stream>>>(p);
      break;
  }
  check_launch("nvfp4_quantize_kernel");
}

void dequantize(const DequantizeParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "nvfp4_w4a16_dequantize";
  GEMMA4X_CHECK_ARG(p.rows > 0 && p.rows % kUnitRows == 0, op, ": rows must be a positive multiple of ", kUnitRows,
                    ", got ", p.rows);
  GEMMA4X_CHECK_ARG(p.k > 0 && p.k % kUnitK == 0, op, ": K must be a positive multiple of ", kUnitK, ", got ", p.k);
  GEMMA4X_CHECK_ARG(!p.interleave8 || p.rows % 16 == 0, op, ": interleaved gate/up needs rows % 16 == 0");
  GEMMA4X_CHECK_ARG(p.batches >= 0, op, ": batches must be >= 0");
  if (p.batches == 0) return;
  GEMMA4X_CHECK_ARG(p.packed && p.global_scale && p.out, op, ": null pointer");
  GEMMA4X_CHECK_ARG(is_aligned(p.packed, 16) && is_aligned(p.out, 16), op, ": packed and out must be 16-byte aligned");
  const int64_t threads = p.batches * (p.rows / kUnitRows) * (p.k / kUnitK) * 32;
  const int64_t grid = (threads + kDequantizeThreads - 1) / kDequantizeThreads;
  GEMMA4X_CHECK_ARG(grid < (int64_t{1} << 31), op, ": tensor too large");
  switch (dtype) {
    case DType::kFloat32:
      nvfp4_dequantize_kernel<float><<<static_cast<unsigned>(grid), kDequantizeThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      nvfp4_dequantize_kernel<__half><<<static_cast<unsigned>(grid), kDequantizeThreads, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      nvfp4_dequantize_kernel<__nv_bfloat16><<<static_cast<unsigned>(grid), kDequantizeThreads, 0, stream>>>(p);
      break;
  }
  check_launch("nvfp4_dequantize_kernel");
}

}  // namespace gemma4x::nvfp4

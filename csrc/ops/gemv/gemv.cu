#include "gemv.h"

#include "gemma4x/common/check.h"
#include "gemma4x/gemv/skinny_gemm_kernels.cuh"

namespace gemma4x::gemv {
namespace {

constexpr const char* kOp = "skinny_gemm";

template <typename T>
void launch(const SkinnyGemmParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.n / kRows));
  if (p.m <= 8) {
    skinny_gemm_kernel<T, 1><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    skinny_gemm_kernel<T, 2><<<grid, kWarps * 32, 0, stream>>>(p);
  }
}

}  // namespace

void skinny_gemm(const SkinnyGemmParams& p, DType dtype, cudaStream_t stream) {
  GEMMA4X_CHECK_ARG(dtype == DType::kBFloat16 || dtype == DType::kFloat16, kOp,
                    ": dtype must be bfloat16 or float16, got ", dtype_name(dtype));
  GEMMA4X_CHECK_ARG(p.m >= 0 && p.m <= kMaxTokens, kOp, ": M (tokens) must be in [0, ", kMaxTokens, "], got ", p.m);
  GEMMA4X_CHECK_ARG(p.n > 0 && p.n % kRows == 0, kOp, ": N must be a positive multiple of ", kRows, ", got ", p.n);
  GEMMA4X_CHECK_ARG(p.k > 0 && p.k % kStepK == 0, kOp, ": K must be a positive multiple of ", kStepK, ", got ", p.k);
  GEMMA4X_CHECK_ARG(p.w != nullptr && is_aligned(p.w, 16), kOp, ": w must be a 16-byte aligned device pointer");
  GEMMA4X_CHECK_ARG(p.x != nullptr && is_aligned(p.x, 16) && p.x_stride % 8 == 0 && p.x_stride >= p.k, kOp,
                    ": x must be 16-byte aligned with a row stride >= K that is a multiple of 8, got stride ",
                    p.x_stride);
  GEMMA4X_CHECK_ARG(p.y != nullptr && p.y_stride >= p.n, kOp, ": y row stride must be >= N, got ", p.y_stride);
  if (p.m == 0) return;
  if (dtype == DType::kBFloat16) {
    launch<__nv_bfloat16>(p, stream);
  } else {
    launch<__half>(p, stream);
  }
  check_launch("skinny_gemm_kernel");
}

}  // namespace gemma4x::gemv

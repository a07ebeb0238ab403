#include <algorithm>

#include "activation.h"
#include "gemma4x/activation/geglu_kernels.cuh"
#include "gemma4x/common/check.h"

namespace gemma4x::activation {
namespace {

void check_rows(const char* name, const void* ptr, int64_t row_stride, const GegluParams& p, bool written) {
  GEMMA4X_CHECK_ARG(ptr != nullptr, "geglu: ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(row_stride >= 0, "geglu: ", name, " row stride must be >= 0, got ", row_stride);
  GEMMA4X_CHECK_ARG(!written || p.rows <= 1 || row_stride >= p.cols, "geglu: ", name, " row stride ", row_stride,
                    " is smaller than the row length ", p.cols, " (written rows would overlap)");
}

template <typename T>
void launch_typed(const GegluParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  bool vec = p.cols % kVec == 0;
  for (const auto& [ptr, stride] : {std::pair{p.gate, p.gate_row_stride}, {p.up, p.up_row_stride},
                                    {static_cast<const void*>(p.out), p.out_row_stride}}) {
    vec = vec && is_aligned(ptr, 16) && stride % kVec == 0;
  }
  const int per_block = kGegluThreads * (vec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>((p.cols + per_block - 1) / per_block),
                  static_cast<unsigned>(std::min<int64_t>(p.rows, kMaxGridRows)));
  if (vec) {
    geglu_kernel<T, kVec><<<grid, kGegluThreads, 0, stream>>>(p);
  } else {
    geglu_kernel<T, 1><<<grid, kGegluThreads, 0, stream>>>(p);
  }
}

}  // namespace

void geglu(const GegluParams& p, DType dtype, cudaStream_t stream) {
  GEMMA4X_CHECK_ARG(p.rows >= 0, "geglu: rows must be >= 0, got ", p.rows);
  GEMMA4X_CHECK_ARG(p.cols >= 0, "geglu: cols must be >= 0, got ", p.cols);
  // Column offsets are formed in 64 bits, but 2^31 columns keep grid.x far inside its limit.
  GEMMA4X_CHECK_ARG(p.cols <= 0x7fffffff, "geglu: cols must be < 2^31, got ", p.cols);
  if (p.rows == 0 || p.cols == 0) return;
  check_rows("gate", p.gate, p.gate_row_stride, p, false);
  check_rows("up", p.up, p.up_row_stride, p, false);
  check_rows("out", p.out, p.out_row_stride, p, true);
  switch (dtype) {
    case DType::kFloat32: launch_typed<float>(p, stream); break;
    case DType::kFloat16: launch_typed<__half>(p, stream); break;
    case DType::kBFloat16: launch_typed<__nv_bfloat16>(p, stream); break;
  }
  check_launch("geglu_kernel");
}

}  // namespace gemma4x::activation

#include "norm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>

#include "gemma4x/common/check.h"
#include "gemma4x/norm/rms_norm_kernels.cuh"

namespace gemma4x::norm {
namespace {

// Kernel families as types, so one dispatcher serves all of them.
struct RmsNormKernel {
  template <typename T, int VEC, int VPT>
  static constexpr auto kernel = rms_norm_kernel<T, VEC, VPT>;
};
struct FusedAddRmsNormKernel {
  template <typename T, int VEC, int VPT>
  static constexpr auto kernel = fused_add_rms_norm_kernel<T, VEC, VPT>;
};
struct MoeTailNormKernel {
  template <typename T, int VEC, int VPT>
  static constexpr auto kernel = moe_tail_norm_kernel<T, VEC, VPT>;
};
struct ResidualRmsNormKernel {
  template <typename T, int VEC, int VPT>
  static constexpr auto kernel = residual_rms_norm_kernel<T, VEC, VPT>;
};

// Vectors per thread beyond 16 would spill the register-resident row; such rows (over 16384
// elements unaligned, 131072 aligned bf16) are far outside Gemma 4 and are refused up front.
constexpr int kMaxVpt = 16;

// GEMMA4X_NORM_VPT raises the vectors per thread of the register kernels (fewer, busier
// threads per row); benchmarks sweep it, nothing else should need it.
int vpt_floor() {
  static const int v = [] {
    const char* env = std::getenv("GEMMA4X_NORM_VPT");
    return env != nullptr ? std::atoi(env) : 1;
  }();
  return v;
}

template <typename Kernel, typename T, int VEC, typename Params>
void launch_with_vec(const Params& p, cudaStream_t stream) {
  const int nvec = p.hidden / VEC;
  const int floor = vpt_floor();
  const auto threads_for = [nvec](int vpt) { return ((nvec + vpt - 1) / vpt + 31) / 32 * 32; };
  const auto fits = [&](int vpt) { return nvec <= vpt * kMaxThreads && vpt >= floor; };
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (fits(1)) {
    Kernel::template kernel<T, VEC, 1><<<grid, threads_for(1), 0, stream>>>(p);
  } else if (fits(2)) {
    Kernel::template kernel<T, VEC, 2><<<grid, threads_for(2), 0, stream>>>(p);
  } else if (fits(4)) {
    Kernel::template kernel<T, VEC, 4><<<grid, threads_for(4), 0, stream>>>(p);
  } else if (fits(8)) {
    Kernel::template kernel<T, VEC, 8><<<grid, threads_for(8), 0, stream>>>(p);
  } else {
    Kernel::template kernel<T, VEC, kMaxVpt><<<grid, threads_for(kMaxVpt), 0, stream>>>(p);
  }
}

template <typename Kernel, typename T, typename Params>
void launch_typed(const Params& p, bool vectorizable, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (vectorizable && p.hidden % kVec == 0) {
    launch_with_vec<Kernel, T, kVec>(p, stream);
  } else {
    launch_with_vec<Kernel, T, 1>(p, stream);
  }
}

template <typename Kernel, typename Params>
void launch(const Params& p, DType dtype, bool vectorizable, cudaStream_t stream, const char* name) {
  switch (dtype) {
    case DType::kFloat32: launch_typed<Kernel, float>(p, vectorizable, stream); break;
    case DType::kFloat16: launch_typed<Kernel, __half>(p, vectorizable, stream); break;
    case DType::kBFloat16: launch_typed<Kernel, __nv_bfloat16>(p, vectorizable, stream); break;
  }
  check_launch(name);
}

void check_shape(const char* op, int64_t rows, int32_t hidden, DType dtype) {
  GEMMA4X_CHECK_ARG(rows >= 0, op, ": rows must be >= 0, got ", rows);
  GEMMA4X_CHECK_ARG(rows <= 0x7fffffff, op, ": rows must be < 2^31, got ", rows);
  GEMMA4X_CHECK_ARG(hidden > 0, op, ": hidden size must be > 0, got ", hidden);
  const int64_t max_hidden = int64_t{kMaxVpt} * kMaxThreads;  // unvectorized worst case
  const int64_t max_hidden_vec = max_hidden * (16 / dtype_size(dtype));
  GEMMA4X_CHECK_ARG(hidden <= max_hidden || (hidden % (16 / dtype_size(dtype)) == 0 && hidden <= max_hidden_vec), op,
                    ": hidden size ", hidden, " exceeds the register-resident row limit (", max_hidden,
                    ", or ", max_hidden_vec, " when a multiple of ", 16 / dtype_size(dtype), ")");
}

void check_eps(const char* op, const char* name, float eps) {
  GEMMA4X_CHECK_ARG(std::isfinite(eps) && eps >= 0.f, op, ": ", name, " must be finite and >= 0, got ", eps);
}

// Read-only rows may overlap (a broadcast input has stride 0); written rows may not.
enum class Access { kRead, kWrite };

void check_row(const char* op, const char* name, const void* ptr, int64_t row_stride, int64_t rows, int32_t hidden,
               Access access) {
  GEMMA4X_CHECK_ARG(rows == 0 || ptr != nullptr, op, ": ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(row_stride >= 0, op, ": ", name, " row stride must be >= 0, got ", row_stride);
  GEMMA4X_CHECK_ARG(access == Access::kRead || rows <= 1 || row_stride >= hidden, op, ": ", name, " row stride ",
                    row_stride, " is smaller than the hidden size ", hidden, " (written rows would overlap)");
}

// Every row pointer and stride must allow 16-byte accesses for the vector path.
bool rows_vectorizable(DType dtype, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  const int vec = 16 / dtype_size(dtype);
  for (const auto& [ptr, stride] : rows) {
    if (ptr != nullptr && (!is_aligned(ptr, 16) || stride % vec != 0)) return false;
  }
  return true;
}

}  // namespace

void rms_norm(const RmsNormParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "rms_norm";
  check_shape(op, p.rows, p.hidden, dtype);
  check_eps(op, "eps", p.eps);
  check_row(op, "x", p.x, p.x_row_stride, p.rows, p.hidden, Access::kRead);
  check_row(op, "out", p.out, p.out_row_stride, p.rows, p.hidden, Access::kWrite);
  if (p.rows == 0) return;
  const bool vec = rows_vectorizable(dtype, {{p.x, p.x_row_stride}, {p.out, p.out_row_stride}, {p.weight, 0}});
  launch<RmsNormKernel>(p, dtype, vec, stream, op);
}

void fused_add_rms_norm(const FusedAddRmsNormParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "fused_add_rms_norm";
  check_shape(op, p.rows, p.hidden, dtype);
  check_eps(op, "eps", p.eps);
  check_row(op, "x", p.x, p.x_row_stride, p.rows, p.hidden, Access::kRead);
  check_row(op, "residual", p.residual, p.residual_row_stride, p.rows, p.hidden, Access::kWrite);
  check_row(op, "out", p.out, p.out_row_stride, p.rows, p.hidden, Access::kWrite);
  if (p.rows == 0) return;
  const bool vec = rows_vectorizable(dtype, {{p.x, p.x_row_stride},
                                             {p.residual, p.residual_row_stride},
                                             {p.out, p.out_row_stride},
                                             {p.weight, 0}});
  launch<FusedAddRmsNormKernel>(p, dtype, vec, stream, op);
}

// Bit-identical to rms_norm followed by the add (and product) as PyTorch ops when rms_norm would
// pick the same vector width: both launch through launch<>, so the reduction order is the same.
// The vector path needs x, residual, out and weight 16-byte aligned; a misaligned residual alone
// (never in the model) sends the whole row to the scalar path, whose fp32 sum may round the norm
// differently from rms_norm's vector path in rare cases.
void residual_rms_norm(const ResidualRmsNormParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "residual_rms_norm";
  check_shape(op, p.rows, p.hidden, dtype);
  check_eps(op, "eps", p.eps);
  check_row(op, "x", p.x, p.x_row_stride, p.rows, p.hidden, Access::kRead);
  check_row(op, "residual", p.residual, p.residual_row_stride, p.rows, p.hidden, Access::kRead);
  check_row(op, "out", p.out, p.out_row_stride, p.rows, p.hidden, Access::kWrite);
  if (p.rows == 0) return;
  const bool vec = rows_vectorizable(dtype, {{p.x, p.x_row_stride},
                                             {p.residual, p.residual_row_stride},
                                             {p.out, p.out_row_stride},
                                             {p.weight, 0}});
  launch<ResidualRmsNormKernel>(p, dtype, vec, stream, op);
}

namespace {

struct DeviceLimits {
  int sms;
  int smem_optin;
};

DeviceLimits device_limits() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  DeviceLimits d{};
  check_cuda(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  return d;
}

// The streaming MoE-tail kernel pays off once every SM has several rows to pipeline; below that,
// one block per row with everything in registers has the shorter critical path. It needs the
// 16-byte layout and the bulk copy engine (sm_90+), and at least two ring slots besides the
// weights in shared memory.
template <typename T>
bool try_launch_moe_tail_stream(const MoeTailNormParams& p, bool vectorizable, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (!vectorizable || p.hidden % kVec != 0) return false;
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  if (major < 9) return false;
  const DeviceLimits limits = device_limits();
  if (p.rows <= 2 * limits.sms) return false;
  const size_t row_bytes = static_cast<size_t>(p.hidden) * sizeof(T);
  const int row_warps = p.hidden / kVec <= 512 ? 2 : 4;
  const size_t budget = static_cast<size_t>(limits.smem_optin) - 1024 - kStreamHeaderBytes - 3 * row_bytes;
  const int stages =
      static_cast<int>(std::min<size_t>(stream_max_stages(row_warps), budget / (3 * row_bytes)));
  if (stages < 2) return false;
  const size_t smem = kStreamHeaderBytes + (3 + size_t{3} * stages) * row_bytes;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(p.rows, limits.sms)));
  const auto launch = [&](auto kernel, int row_threads) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute(moe_tail_norm_stream_kernel)");
    kernel<<<grid, stages * row_threads + 32, smem, stream>>>(p, stages);
  };
  if (row_warps == 2) {
    launch(moe_tail_norm_stream_kernel<T, kVec, 2>, 64);
  } else {
    launch(moe_tail_norm_stream_kernel<T, kVec, 4>, 128);
  }
  return true;
}

bool try_launch_moe_tail_stream(const MoeTailNormParams& p, DType dtype, bool vectorizable, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return try_launch_moe_tail_stream<float>(p, vectorizable, stream);
    case DType::kFloat16: return try_launch_moe_tail_stream<__half>(p, vectorizable, stream);
    case DType::kBFloat16: return try_launch_moe_tail_stream<__nv_bfloat16>(p, vectorizable, stream);
  }
  return false;
}

}  // namespace

void moe_tail_norm(const MoeTailNormParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "moe_tail_norm";
  check_shape(op, p.rows, p.hidden, dtype);
  check_eps(op, "eps1", p.eps1);
  check_eps(op, "eps2", p.eps2);
  check_eps(op, "eps3", p.eps3);
  check_row(op, "x1", p.x1, p.x1_row_stride, p.rows, p.hidden, Access::kRead);
  check_row(op, "x2", p.x2, p.x2_row_stride, p.rows, p.hidden, Access::kRead);
  check_row(op, "residual", p.residual, p.residual_row_stride, p.rows, p.hidden, Access::kRead);
  check_row(op, "out", p.out, p.out_row_stride, p.rows, p.hidden, Access::kWrite);
  for (const auto& [name, ptr] : {std::pair{"w1", p.w1}, {"w2", p.w2}, {"w3", p.w3}, {"scalar", p.scalar}}) {
    GEMMA4X_CHECK_ARG(p.rows == 0 || ptr != nullptr, op, ": ", name, " is a null pointer");
  }
  if (p.rows == 0) return;
  const bool vec = rows_vectorizable(dtype, {{p.x1, p.x1_row_stride},
                                             {p.x2, p.x2_row_stride},
                                             {p.residual, p.residual_row_stride},
                                             {p.out, p.out_row_stride},
                                             {p.w1, 0},
                                             {p.w2, 0},
                                             {p.w3, 0}});
  if (try_launch_moe_tail_stream(p, dtype, vec, stream)) {
    check_launch("moe_tail_norm_stream_kernel");
    return;
  }
  launch<MoeTailNormKernel>(p, dtype, vec, stream, op);
}

}  // namespace gemma4x::norm

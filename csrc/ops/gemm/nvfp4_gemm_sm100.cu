#include <string>

#include "gemma4x/common/check.h"
#include "gemma4x/gemm/nvfp4_gemm_sm100.cuh"
#include "nvfp4_gemm.h"

namespace gemma4x::gemm {
namespace {

constexpr const char* kOp = "nvfp4_gemm";

void check_shape(int32_t M, int32_t N, int32_t K) {
  GEMMA4X_CHECK_ARG(M >= 0, kOp, ": M must be >= 0, got ", M);
  GEMMA4X_CHECK_ARG(N > 0, kOp, ": N must be > 0, got ", N);
  GEMMA4X_CHECK_ARG(K > 0, kOp, ": K must be > 0, got ", K);
  GEMMA4X_CHECK_ARG(K % kNvfp4GemmKMultiple == 0, kOp, ": K = ", K, " must be a multiple of ", kNvfp4GemmKMultiple);
  GEMMA4X_CHECK_ARG(N % kNvfp4GemmNMultiple == 0, kOp, ": N = ", N, " must be a multiple of ", kNvfp4GemmNMultiple,
                    " (16-byte output rows)");
}

void check_pointer(const char* name, const void* p, size_t alignment) {
  GEMMA4X_CHECK_ARG(p != nullptr, kOp, ": ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(is_aligned(p, alignment), kOp, ": ", name, " must be ", alignment, "-byte aligned, got address ",
                    reinterpret_cast<uintptr_t>(p));
}

// Strides, in elements, of a packed row-major [rows, cols] matrix as CUTLASS's (row, col, batch)
// stride types spell them: the column stride is the static 1, the others are runtime values.
template <typename Stride>
Stride packed_rows(int32_t rows, int32_t cols) {
  Stride s{};
  cute::get<0>(s) = static_cast<int64_t>(cols);
  cute::get<2>(s) = static_cast<int64_t>(rows) * cols;
  return s;
}

typename sm100::Gemm::Arguments make_arguments(const Nvfp4GemmParams& p) {
  using namespace sm100;
  using StrideA = typename GemmKernel::StrideA;
  using StrideB = typename GemmKernel::StrideB;
  using StrideD = typename GemmKernel::StrideD;
  const auto problem = cute::make_shape(p.M, p.N, p.K, 1);
  static_assert(cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(StrideA{}))>>, "A must be K-major");
  static_assert(cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(StrideB{}))>>, "B must be K-major");
  static_assert(cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(StrideD{}))>>, "D must be row-major");
  const auto stride_a = packed_rows<StrideA>(p.M, p.K);
  const auto stride_b = packed_rows<StrideB>(p.N, p.K);
  const auto stride_d = packed_rows<StrideD>(p.M, p.N);

  using DataType = typename ElementAB::DataType;
  using ScaleType = typename ElementAB::ScaleFactorType;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.M, p.N, p.K, 1},
      {static_cast<const DataType*>(p.a), stride_a, static_cast<const DataType*>(p.b), stride_b,
       static_cast<const ScaleType*>(p.a_scale), SfConfig::tile_atom_to_shape_SFA(problem),
       static_cast<const ScaleType*>(p.b_scale), SfConfig::tile_atom_to_shape_SFB(problem)},
      {{}, nullptr, stride_d, static_cast<ElementD*>(p.out), stride_d}};
  args.epilogue.thread.alpha_ptr = p.alpha;  // read on the device: graph-capturable, no sync
  args.epilogue.thread.beta = 0.f;
  return args;
}

}  // namespace

// sm_100a code is arch-specific: it runs on compute capability 10.0 only (not 10.3, not 12.x).
void check_sm100(const char* op) {
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 10 || minor != 0) {
    throw std::runtime_error(std::string(op) + ": the NVFP4 block-scaled GEMMs are built for sm_100a and need a " +
                             "compute capability 10.0 GPU (B200/GB200); device " + std::to_string(dev) + " is " +
                             std::to_string(major) + "." + std::to_string(minor));
  }
}

size_t nvfp4_gemm_workspace_size(int32_t M, int32_t N, int32_t K) {
  check_shape(M, N, K);
  Nvfp4GemmParams p{};
  p.M = M;
  p.N = N;
  p.K = K;
  return sm100::Gemm::get_workspace_size(make_arguments(p));
}

void nvfp4_gemm(const Nvfp4GemmParams& p, cudaStream_t stream) {
  check_shape(p.M, p.N, p.K);
  if (p.M == 0) return;
  // TMA needs 16-byte aligned global addresses; e4m3 scale atoms are 512 contiguous bytes but
  // the TMA box only needs 16.
  check_pointer("a", p.a, 16);
  check_pointer("b", p.b, 16);
  check_pointer("a_scale", p.a_scale, 16);
  check_pointer("b_scale", p.b_scale, 16);
  check_pointer("out", p.out, 16);
  check_pointer("alpha", p.alpha, 4);
  check_sm100(kOp);

  sm100::Gemm gemm;
  const auto args = make_arguments(p);
  const size_t need = sm100::Gemm::get_workspace_size(args);
  GEMMA4X_CHECK_ARG(p.workspace_bytes >= need, kOp, ": workspace has ", p.workspace_bytes, " bytes, the launch needs ",
                    need);
  GEMMA4X_CHECK_ARG(need == 0 || p.workspace != nullptr, kOp, ": workspace is a null pointer");
  const cutlass::Status ok = gemm.can_implement(args);
  GEMMA4X_CHECK_ARG(ok == cutlass::Status::kSuccess, kOp, ": CUTLASS cannot run M=", p.M, " N=", p.N, " K=", p.K,
                    " (", cutlassGetStatusString(ok), ")");
  cutlass::Status st = gemm.initialize(args, p.workspace, stream);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(kOp) + ": initialize failed (" + cutlassGetStatusString(st) + ")");
  }
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(kOp) + ": launch failed (" + cutlassGetStatusString(st) + ")");
  }
  check_launch("nvfp4_gemm (CUTLASS sm100 block-scaled)");
}

}  // namespace gemma4x::gemm

#include <string>

#include "gemma4x/common/check.h"
#include "gemma4x/gemm/nvfp4_grouped_gemm_sm100.cuh"
#include "nvfp4_gemm.h"

namespace gemma4x::gemm {
namespace {

using namespace sm100_grouped;

constexpr const char* kOp = "nvfp4_grouped_gemm";
constexpr size_t kArrayAlign = 128;

// A packed row-major [rows, cols] matrix's stride in CUTLASS's (row, col[, batch]) spelling: the
// column stride is the static 1; only the row stride is a runtime value.
template <typename Stride>
__host__ __device__ Stride packed_row_stride(int32_t cols) {
  Stride s{};
  cute::get<0>(s) = static_cast<int64_t>(cols);
  return s;
}

size_t align_up(size_t x) { return (x + kArrayAlign - 1) / kArrayAlign * kArrayAlign; }

// Lays the per-group arrays out in `base` (nullptr: only measures); returns the bytes used.
size_t carve(void* base, int32_t groups, GroupArrays* arrays) {
  size_t off = 0;
  auto take = [&](auto*& field, size_t elem) {
    using T = std::remove_reference_t<decltype(*field)>;
    field = base ? reinterpret_cast<T*>(static_cast<char*>(base) + off) : nullptr;
    off = align_up(off + elem * groups);
  };
  GroupArrays g{};
  take(g.problems, sizeof(*g.problems));
  take(g.a, sizeof(*g.a));
  take(g.b, sizeof(*g.b));
  take(g.sfa, sizeof(*g.sfa));
  take(g.sfb, sizeof(*g.sfb));
  take(g.d, sizeof(*g.d));
  take(g.alpha, sizeof(*g.alpha));
  take(g.stride_a, sizeof(*g.stride_a));
  take(g.stride_b, sizeof(*g.stride_b));
  take(g.stride_d, sizeof(*g.stride_d));
  take(g.layout_sfa, sizeof(*g.layout_sfa));
  take(g.layout_sfb, sizeof(*g.layout_sfb));
  if (arrays) *arrays = g;
  return off;
}

// One thread per expert turns row_offsets into CUTLASS's per-group arguments, on the device, so a
// captured graph replays with whatever routing the step produced. Groups with no rows get M = 0:
// the grouped tile scheduler gives them no tiles.
__global__ void fill_group_arrays(GroupArrays g, Nvfp4GroupedGemmParams p) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.groups) return;
  const int32_t row0 = p.row_offsets[e];
  const int32_t M = p.row_offsets[e + 1] - row0;
  int64_t sfa_offset = 0;
  for (int j = 0; j < e; ++j) sfa_offset += grouped_scale_bytes(p.row_offsets[j + 1] - p.row_offsets[j], p.K);
  const int64_t sfb_bytes = grouped_scale_bytes(p.N, p.K);

  g.problems[e] = {M, p.N, p.K};
  g.a[e] = reinterpret_cast<PtrA>(static_cast<const uint8_t*>(p.a) + int64_t(row0) * (p.K / 2));
  g.b[e] = reinterpret_cast<PtrB>(static_cast<const uint8_t*>(p.b) + int64_t(e) * p.N * (p.K / 2));
  g.sfa[e] = reinterpret_cast<PtrSF>(static_cast<const uint8_t*>(p.a_scale) + sfa_offset);
  g.sfb[e] = reinterpret_cast<PtrSF>(static_cast<const uint8_t*>(p.b_scale) + int64_t(e) * sfb_bytes);
  g.d[e] = reinterpret_cast<PtrD>(static_cast<cutlass::bfloat16_t*>(p.out) + int64_t(row0) * p.N);
  g.alpha[e] = p.alpha + e;
  g.stride_a[e] = packed_row_stride<StrideA>(p.K);
  g.stride_b[e] = packed_row_stride<StrideB>(p.K);
  g.stride_d[e] = packed_row_stride<StrideD>(p.N);
  g.layout_sfa[e] = SfConfig::tile_atom_to_shape_SFA(cute::make_shape(M, p.N, p.K, 1));
  g.layout_sfb[e] = SfConfig::tile_atom_to_shape_SFB(cute::make_shape(M, p.N, p.K, 1));
}

void check_shape(int32_t groups, int32_t N, int32_t K) {
  GEMMA4X_CHECK_ARG(groups > 0, kOp, ": groups must be > 0, got ", groups);
  GEMMA4X_CHECK_ARG(N > 0 && N % kNvfp4GemmNMultiple == 0, kOp, ": N = ", N, " must be a positive multiple of ",
                    kNvfp4GemmNMultiple);
  GEMMA4X_CHECK_ARG(K > 0 && K % kNvfp4GemmKMultiple == 0, kOp, ": K = ", K, " must be a positive multiple of ",
                    kNvfp4GemmKMultiple);
}

Arguments make_arguments(const Nvfp4GroupedGemmParams& p, const GroupArrays& g, int sm_count) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = 0;
  hw.sm_count = sm_count;
  FusionArguments fusion{};
  fusion.alpha = 0.f;
  fusion.alpha_ptr = nullptr;
  fusion.alpha_ptr_array = g.alpha;
  fusion.dAlpha = {cute::_0{}, cute::_0{}, 1};  // one alpha per group
  fusion.beta = 0.f;
  fusion.beta_ptr = nullptr;
  fusion.beta_ptr_array = nullptr;
  fusion.dBeta = {cute::_0{}, cute::_0{}, 0};
  // Problem shapes live on the device only (nullptr host copy): routing is never read back.
  return Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                   {p.groups, g.problems, nullptr},
                   {g.a, g.stride_a, g.b, g.stride_b, g.sfa, g.layout_sfa, g.sfb, g.layout_sfb},
                   {fusion, nullptr, g.stride_d, g.d, g.stride_d},
                   hw};
}

int current_sm_count() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms;
}

}  // namespace

size_t nvfp4_grouped_gemm_workspace_size(int32_t groups, int32_t N, int32_t K) {
  check_shape(groups, N, K);
  GroupArrays g{};
  const size_t arrays = carve(nullptr, groups, &g);
  Nvfp4GroupedGemmParams p{};
  p.groups = groups;
  p.N = N;
  p.K = K;
  return arrays + Gemm::get_workspace_size(make_arguments(p, g, current_sm_count()));
}

void nvfp4_grouped_gemm(const Nvfp4GroupedGemmParams& p, cudaStream_t stream) {
  check_shape(p.groups, p.N, p.K);
  for (auto [name, ptr] : {std::pair{"a", p.a}, {"a_scale", p.a_scale}, {"b", p.b}, {"b_scale", p.b_scale},
                           {"out", static_cast<const void*>(p.out)}, {"workspace", static_cast<const void*>(p.workspace)}}) {
    GEMMA4X_CHECK_ARG(ptr != nullptr, kOp, ": ", name, " is a null pointer");
    GEMMA4X_CHECK_ARG(is_aligned(ptr, 16), kOp, ": ", name, " must be 16-byte aligned");
  }
  GEMMA4X_CHECK_ARG(p.row_offsets != nullptr && p.alpha != nullptr, kOp, ": row_offsets and alpha must be set");
  check_sm100(kOp);

  GroupArrays g{};
  const size_t arrays = carve(p.workspace, p.groups, &g);
  const Arguments args = make_arguments(p, g, current_sm_count());
  const size_t need = arrays + Gemm::get_workspace_size(args);
  GEMMA4X_CHECK_ARG(p.workspace_bytes >= need, kOp, ": workspace has ", p.workspace_bytes, " bytes, the launch needs ",
                    need);

  constexpr int kThreads = 128;
  fill_group_arrays<<<(p.groups + kThreads - 1) / kThreads, kThreads, 0, stream>>>(g, p);
  check_launch("nvfp4_grouped_gemm: fill_group_arrays");

  Gemm gemm;
  const cutlass::Status ok = gemm.can_implement(args);
  GEMMA4X_CHECK_ARG(ok == cutlass::Status::kSuccess, kOp, ": CUTLASS cannot run groups=", p.groups, " N=", p.N,
                    " K=", p.K, " (", cutlassGetStatusString(ok), ")");
  cutlass::Status st = gemm.initialize(args, static_cast<char*>(p.workspace) + arrays, stream);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(kOp) + ": initialize failed (" + cutlassGetStatusString(st) + ")");
  }
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(kOp) + ": launch failed (" + cutlassGetStatusString(st) + ")");
  }
  check_launch("nvfp4_grouped_gemm (CUTLASS sm100 ptr-array block-scaled)");
}

}  // namespace gemma4x::gemm

// MoE prefill path on SM100 (B200): the shared launcher (moe_prefill_launch.cuh) with CUTLASS's
// SM100 ptr-array grouped GEMMs (tcgen05 MMA into tensor memory, TMA loads and stores).
//
// COMPILED, NOT RUN: no B200 was available while this was written. The Python wrapper takes this
// path only when GEMMA4X_MOE_PREFILL_SM100=1 is set; otherwise SM100 runs the reference
// grouped_mm path. The tiles below are CUTLASS's usual 1-SM shapes, not measured choices.
#include "moe_prefill_launch.cuh"

namespace gemma4x::moe {
namespace {

using namespace cute;
using prefill::kOp;

// 1-SM MMA tiles (an M = 128 tcgen05 instruction per CTA), no clusters: the same reasoning as on
// SM90 (a cluster rounds every expert's tile count up). K tile 64 = one 128-byte swizzle row.
struct Sm100Tile128x256 {
  using Arch = cutlass::arch::Sm100;
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm;
};
struct Sm100Tile128x128 {
  using Arch = cutlass::arch::Sm100;
  using Tile = Shape<_128, _128, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm;
};

using Big = prefill::GroupedGemm<Sm100Tile128x256>;
using Small = prefill::GroupedGemm<Sm100Tile128x128>;

// sm_100a code is arch-specific: compute capability 10.0 only.
void check_device() {
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 10 || minor != 0) {
    throw std::runtime_error(std::string(kOp) + ": the SM100 grouped-GEMM prefill path is built for sm_100a and " +
                             "needs a compute capability 10.0 GPU (B200/GB200); device " + std::to_string(dev) +
                             " is " + std::to_string(major) + "." + std::to_string(minor));
  }
}

}  // namespace

// No GeGLU epilogue on SM100 yet: interleaved gate_up runs GEMM1 into h1 and the GeGLU kernel.
size_t moe_prefill_workspace_size_sm100(int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden,
                                        int32_t inter, int32_t gate_up_interleaved) {
  return prefill::prefill_workspace_size<Big, Small>(tokens, top_k, experts, hidden, inter, gate_up_interleaved);
}

void moe_experts_prefill_sm100(const MoePrefillParams& params, cudaStream_t stream) {
  prefill::run_prefill<Big, Small>(params, stream, check_device);
}

}  // namespace gemma4x::moe

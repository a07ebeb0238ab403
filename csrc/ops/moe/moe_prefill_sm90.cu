// MoE prefill path on SM90: device-side permute, two CUTLASS ptr-array grouped GEMMs (TMA loads,
// WGMMA, warp-specialised persistent kernels, TMA-store epilogue) and the GeGLU / combine kernels.
// The launcher is shared with SM100 (moe_prefill_launch.cuh); this file picks the Hopper tiles.
#include "moe_prefill_launch.cuh"

namespace gemma4x::moe {
namespace {

using namespace cute;
using prefill::kOp;

// Two configurations, measured on H200 (bench/RESULTS.md). K tile 64 = one 128-byte swizzle row
// of bf16; the stage count is whatever shared memory holds after the epilogue's carve-out.
// - Cooperative 128x256: both consumer warpgroups on one tile (64 rows each, 128 fp32
//   accumulators per thread); the largest tile that keeps the N remainder small
//   (2I = 1408 = 5.5 x 256, H = 2816 = 11 x 256). For >= 128 rows per expert.
// - Ping-pong 64x256: each consumer warpgroup owns a 64-row tile, so an expert with a few dozen
//   rows wastes half as much MMA work and one warpgroup's epilogue overlaps the other's MMAs.
// Cluster 1x1: a 2-CTA cluster rounds every expert's tile count up to a multiple of 2, which
// costs more than the multicast saves when experts have one or two M tiles.
struct Coop128x256 {
  using Arch = cutlass::arch::Sm90;
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct Pingpong64x256 {
  using Arch = cutlass::arch::Sm90;
  using Tile = Shape<_64, _256, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

using Big = prefill::GroupedGemm<Coop128x256>;
using Small = prefill::GroupedGemm<Pingpong64x256>;
// GEMM1 over interleaved gate_up with the GeGLU computed in the epilogue (same tiles and mainloop;
// the epilogue stores from registers, so the mainloop gets the TMA-store epilogue's shared memory
// as extra stages).
using BigGeglu = prefill::GroupedGemm<Coop128x256, true>;
using SmallGeglu = prefill::GroupedGemm<Pingpong64x256, true>;
// Tiles per GEMM (H200, bench/RESULTS.md), as run_prefill's auto setting picks them. GEMM1
// (K = H = 2816): the cooperative 128x256 tile once experts average >= 128 rows (T = 4096: 509 us
// vs 600 us ping-pong), ping-pong 64x256 below (fewer padded rows). GEMM2 (K = I = 704, 11
// k-tiles per tile): ping-pong at every size, its epilogue overlapping the other warpgroup's MMAs
// (T = 4096: 289 us vs 300 us).

void check_device() {
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0) {
    throw std::runtime_error(std::string(kOp) + ": the grouped-GEMM prefill path is built for sm_90a and needs a " +
                             "compute capability 9.0 GPU (H100/H200); device " + std::to_string(dev) + " is " +
                             std::to_string(major) + "." + std::to_string(minor));
  }
}

}  // namespace

size_t moe_prefill_workspace_size_sm90(int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter,
                                       int32_t gate_up_interleaved) {
  return prefill::prefill_workspace_size<Big, Small, BigGeglu, SmallGeglu>(tokens, top_k, experts, hidden, inter,
                                                                           gate_up_interleaved);
}

void moe_experts_prefill_sm90(const MoePrefillParams& params, cudaStream_t stream) {
  prefill::run_prefill<Big, Small, BigGeglu, SmallGeglu>(params, stream, check_device);
}

}  // namespace gemma4x::moe

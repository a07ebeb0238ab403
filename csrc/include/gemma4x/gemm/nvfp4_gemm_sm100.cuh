// The SM100 (Blackwell, tcgen05) NVFP4 block-scaled GEMM, assembled from CUTLASS collectives.
// Include only from sources compiled for sm_100a (*_sm100.cu).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/detail/sm100_blockscaled_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_types.h>

namespace gemma4x::gemm::sm100 {

using namespace cute;

// Operands: e2m1 codes with one e4m3 (ue4m3) scale per 16 K-elements (NVFP4), both K-major:
// A = activations [M, K] row-major, B = weights [N, K] (CUTLASS's column-major B).
using ElementAB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
// TMA moves 16 bytes at least: 32 four-bit codes.
constexpr int kAlignAB = 32;

using ElementD = cutlass::bfloat16_t;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
// No C operand (beta = 0): ElementC void removes the source load from the epilogue.
using ElementC = void;
constexpr int kAlignC = kAlignD;

using ElementAccumulator = float;
using ElementCompute = float;

// One tile shape keeps the build small (one CUTLASS instantiation, ~minutes on 2 cores).
// 128x128 is the 1-SM tcgen05 MMA's native M and a square N tile; K = 256 codes is 128 bytes per
// row, one 128-byte TMA swizzle line, and 16 scale blocks (4 scale atoms) per stage.
using MmaTileShape = Shape<_128, _128, _256>;
// No clusters: 2-SM MMA and multicast pay off on large prefill GEMMs; decode GEMMs have M <= 64.
using ClusterShape = Shape<_1, _1, _1>;

// The epilogue builder is told the mainloop's op class too: it sizes the epilogue subtile
// (128x64, fewer live registers) and the 1-SM/2-SM choice for block-scaled mainloops.
using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, MmaTileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementCompute, ElementC, LayoutD, kAlignC,
    ElementD, LayoutD, kAlignD, cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, ElementAB, LayoutA, kAlignAB, ElementAB, LayoutB,
    kAlignAB, ElementAccumulator, MmaTileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

using GemmKernel =
    cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, void>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

// The scale layout the mainloop reads must be the one nvfp4_swizzle_scales writes (16-wide blocks).
using SfConfig = typename CollectiveMainloop::Sm1xxBlkScaledConfig;
// tests/ops/cpp/sm100_sf_layout_probe.cpp prints this very config's layout for the swizzle test.
static_assert(cute::is_same_v<SfConfig, cutlass::detail::Sm1xxBlockScaledConfig<16>>,
              "the mainloop reads scales in another layout than the one the swizzle test checks");

}  // namespace gemma4x::gemm::sm100

// The SM100 (Blackwell, tcgen05) grouped NVFP4 block-scaled GEMM over experts, from CUTLASS's
// ptr-array collectives. Include only from sources compiled for sm_100a (*_sm100.cu).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/detail/sm100_blockscaled_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_types.h>

namespace gemma4x::gemm::sm100_grouped {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per expert

using ElementAB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
using LayoutA = cutlass::layout::RowMajor;     // activations [M, K], K-major
using LayoutB = cutlass::layout::ColumnMajor;  // weights [N, K], K-major
constexpr int kAlignAB = 32;                   // 16-byte TMA rows: 32 four-bit codes
using ElementD = cutlass::bfloat16_t;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
using ElementC = void;  // beta = 0: no source operand
using ElementAccumulator = float;

// 1-SM MMA, 128 x 256 tiles: expert groups hold few rows each at prefill sizes (T * k / E), so the
// 2-SM 256-row tile would mostly multiply padding; N = 256 keeps B (weight) reuse per A tile high.
using MmaTileShape = Shape<_128, _256, _256>;
using ClusterShape = Shape<_1, _1, _1>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, MmaTileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator, ElementC, LayoutD*,
    kAlignD, ElementD, LayoutD*, kAlignD, cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, ElementAB, LayoutA*, kAlignAB, ElementAB,
    LayoutB*, kAlignAB, ElementAccumulator, MmaTileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmNvf4Sm100>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

using StrideA = typename GemmKernel::InternalStrideA;
using StrideB = typename GemmKernel::InternalStrideB;
using StrideD = typename GemmKernel::InternalStrideD;
using LayoutSFA = typename CollectiveMainloop::InternalLayoutSFA;
using LayoutSFB = typename CollectiveMainloop::InternalLayoutSFB;
using SfConfig = typename CollectiveMainloop::Sm1xxBlkScaledConfig;
static_assert(cute::is_same_v<SfConfig, cutlass::detail::Sm1xxBlockScaledConfig<16>>,
              "the grouped mainloop reads scales in another layout than nvfp4_swizzle_scales writes");

using Arguments = typename Gemm::Arguments;
using PtrA = std::remove_pointer_t<decltype(Arguments{}.mainloop.ptr_A)>;
using PtrB = std::remove_pointer_t<decltype(Arguments{}.mainloop.ptr_B)>;
using PtrSF = std::remove_pointer_t<decltype(Arguments{}.mainloop.ptr_SFA)>;
using PtrD = std::remove_pointer_t<decltype(Arguments{}.epilogue.ptr_D)>;
using FusionArguments = decltype(Arguments{}.epilogue.thread);
using PtrAlpha = std::remove_cv_t<std::remove_pointer_t<decltype(FusionArguments{}.alpha_ptr_array)>>;

// The per-group argument arrays CUTLASS reads on the device, carved from one workspace.
struct GroupArrays {
  typename ProblemShape::UnderlyingProblemShape* problems;
  PtrA* a;
  PtrB* b;
  PtrSF* sfa;
  PtrSF* sfb;
  PtrD* d;
  PtrAlpha* alpha;
  StrideA* stride_a;
  StrideB* stride_b;
  StrideD* stride_d;
  LayoutSFA* layout_sfa;
  LayoutSFB* layout_sfb;
};

}  // namespace gemma4x::gemm::sm100_grouped

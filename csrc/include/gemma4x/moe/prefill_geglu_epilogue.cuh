// GEMM1's GeGLU epilogue for the SM90 ptr-array grouped GEMM of the MoE prefill path.
//
// GEMM1 multiplies the permuted x rows by gate_up^T with gate_up's rows interleaved in blocks of 8
// (rows 16b..16b+7 = gate rows 8b..8b+7, rows 16b+8..16b+15 = up rows 8b..8b+7; the layout the model
// layer keeps, gemma4x.ops.moe.interleave_gate_up). In the WGMMA accumulator fragment of an
// m64nNk16 atom a thread holds, for every 8-column block of N, columns 2c and 2c+1 (c = lane % 4) of
// rows r and r + 8: its values of accumulator column block 2b (gate) and 2b+1 (up) are the gate and
// up values of the same two output columns 8b + 2c, 8b + 2c + 1. So the epilogue needs no data
// exchange: per pair of blocks it rounds gate and up to bf16 (HF's GEMM outputs), computes
// act = bf16(bf16(gelu_tanh(gate)) * up) in fp32 (the separate GeGLU kernel's exact arithmetic) and
// stores the two bf16 outputs as one 4-byte word into act [rows, I]. No shared memory, no TMA store:
// each quad of threads writes 16 contiguous bytes of a row per block pair.
//
// The class follows the interface of CUTLASS's register-to-global array epilogues (the kernel wraps
// it in Sm90TmaWarpSpecializedAdapter, which supplies the pipeline / tensormap no-ops), so both the
// cooperative and the ping-pong ptr-array kernels take it.
#pragma once

#include <cuda_bf16.h>

#include "cute/tensor.hpp"
#include "cutlass/cuda_host_adapter.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/numeric_types.h"

namespace gemma4x::moe::prefill {

// PyTorch's GeluCUDAKernelImpl (approximate="tanh") in opmath (fp32); the same expression as
// prefill_gelu_tanh in prefill_kernels.cuh, so the fused and separate paths agree bit for bit.
__device__ __forceinline__ float geglu_epilogue_gelu(float x) {
  constexpr float kBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}

// Benchmark knob: one MUFU tanh.approx.f32 (max rel. error ~2^-11) instead of tanhf; rounds a
// different bf16 value for some activations, so it is off by default.
__device__ __forceinline__ float geglu_epilogue_gelu_approx(float x) {
  constexpr float kBeta = static_cast<float>(1.41421356237309504880 * 1.12837916709551257390 * 0.5);
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(inner));
  return 0.5f * x * (1.f + t);
}

// What the GEMM adapter reads of the "thread epilogue op" (types only: the math is fixed).
struct GegluThreadOp {
  using ElementOutput = cutlass::bfloat16_t;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementD = cutlass::bfloat16_t;
  static constexpr int kCount = 2;
  struct Params {};
};

// StrideD: CUTLASS's packed row-major stride type (one dynamic int64 row stride per group).
template <class StrideD_>
class GegluEpilogueArray {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  using ThreadEpilogueOp = GegluThreadOp;
  using ElementOutput = cutlass::bfloat16_t;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementC = void;  // no source operand
  using StrideC = StrideD_;
  using InternalStrideC = cute::remove_pointer_t<StrideC>;
  using ElementD = cutlass::bfloat16_t;
  using StrideD = StrideD_;
  using InternalStrideD = cute::remove_pointer_t<StrideD>;
  using GmemElementC = ElementD;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  static const int kOutputAlignment = 2;
  static_assert(cute::rank(InternalStrideD{}) == 3, "StrideD must be rank-3: [M, N, L]");

  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  // ptr_D[g]: act rows of group g ([rows, N/2] bf16); dD[g]: its row stride (elements).
  struct Arguments {
    ElementD** ptr_D = nullptr;
    StrideD dD{};
    int gelu_approx = 0;  // 1: geglu_epilogue_gelu_approx (benchmark knob)
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }

  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_D != nullptr && args.dD != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit GegluEpilogueArray(Params const& params) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    static_assert(rank(FrgLayout{}) == 3 && rank<0>(FrgLayout{}) == 3,
                  "expected the SM90 WGMMA accumulator fragment ((2, 2, N/8), MMA_M, MMA_N)");
    static_assert(size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                  "expected 2 columns x 2 row halves per 8-column block");
    constexpr int kBlocks = size<0, 2>(FrgLayout{});  // 8-column blocks per atom
    static_assert(kBlocks % 2 == 0, "gate/up block pairs must not straddle an MMA atom");
    constexpr int kMmaM = size<1>(FrgLayout{});
    constexpr int kMmaN = size<2>(FrgLayout{});

    const int M = static_cast<int>(get<0>(problem_shape_mnkl));
    const int N = static_cast<int>(get<1>(problem_shape_mnkl));  // 2I: a multiple of 16
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    (void)k_coord;

    // (m, n) of every accumulator of this thread, laid out as the fragment.
    Tensor coords = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_mnk),
                               make_coord(m_coord, n_coord));
    Tensor t_coords = tiled_mma.get_thread_slice(thread_idx).partition_C(coords);
    CUTE_STATIC_ASSERT_V(size(t_coords) == size(acc), "coordinate and accumulator fragments must match");

    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(params_.ptr_D[l_coord]);
    const int64_t ld = get<0>(params_.dD[l_coord]);
    const bool approx = params_.gelu_approx != 0;

    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < kMmaM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int nn = 0; nn < kMmaN; ++nn) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < 2; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int b = 0; b < kBlocks; b += 2) {
            const auto crd = t_coords(make_coord(0, r, b), mm, nn);  // first gate column of the pair
            const int m = get<0>(crd);
            const int n = get<1>(crd);
            if (m < M && n < N) {
              float a[2];
              CUTLASS_PRAGMA_UNROLL
              for (int c = 0; c < 2; ++c) {
                const float g = __bfloat162float(__float2bfloat16_rn(acc(make_coord(c, r, b), mm, nn)));
                const float u = __bfloat162float(__float2bfloat16_rn(acc(make_coord(c, r, b + 1), mm, nn)));
                const float gl = approx ? geglu_epilogue_gelu_approx(g) : geglu_epilogue_gelu(g);
                a[c] = __bfloat162float(__float2bfloat16_rn(gl)) * u;
              }
              const int col = (n >> 4) * 8 + (n & 7);  // n: a gate column (bit 3 clear), even
              *reinterpret_cast<__nv_bfloat162*>(out + static_cast<int64_t>(m) * ld + col) =
                  __floats2bfloat162_rn(a[0], a[1]);
            }
          }
        }
      }
    }
  }

 private:
  Params params_;
};

}  // namespace gemma4x::moe::prefill

// The MoE prefill launcher, shared by the arch files (moe_prefill_sm90.cu, moe_prefill_sm100.cu):
// workspace layout, argument checks, the seven launches (the routing kernels' through
// gemma4x/moe/prefill_launch.cuh, shared with the NVFP4 prefill), and the CUTLASS ptr-array grouped
// GEMM wrapper. Each arch file instantiates it with its own tile configurations (a Config names the
// arch tag, tile, cluster and schedules) and adds its device check.
//
// Both GEMMs are "TN" bf16 GEMMs with bf16 output and one group per expert:
//   GEMM1  h1[rows of e] = xs[rows of e] @ gate_up[e]^T      (n_e x 2I x H)
//   GEMM2  y [rows of e] = act[rows of e] @ down[e]^T        (n_e x H x I)
// so one CUTLASS kernel type serves both. The group sizes n_e live only on the device: the scan
// kernel writes CUTLASS's per-group problem shapes, pointers and strides, and the kernels run with
// no host copy of the shapes (persistent grid of one CTA per SM, the group tile scheduler walks the
// device array; experts with no rows contribute no tiles).
#pragma once

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "gemma4x/common/check.h"
#include "gemma4x/common/device.h"
#include "gemma4x/moe/prefill_geglu_epilogue.cuh"
#include "gemma4x/moe/prefill_launch.cuh"
#include "moe_prefill.h"

namespace gemma4x::moe::prefill {

constexpr const char* kOp = "moe_experts_prefill";

using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per expert
using LayoutA = cutlass::layout::RowMajor;     // [M, K], K contiguous
using LayoutB = cutlass::layout::ColumnMajor;  // [N, K], K contiguous (weights as stored)
using LayoutD = cutlass::layout::RowMajor;     // [M, N]
constexpr int kAlignment = 8;                  // 16-byte TMA rows: H and I multiples of 8

template <class Config>
struct PlainEpilogue {
  // No C operand (void): D = acc, rounded to bf16 once.
  using type = typename cutlass::epilogue::collective::CollectiveBuilder<
      typename Config::Arch, cutlass::arch::OpClassTensorOp, typename Config::Tile, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment, Element, LayoutD*,
      kAlignment, typename Config::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
};

// SM90 only: GEMM1 over interleaved gate_up, act = GeGLU(acc) stored from registers
// (prefill_geglu_epilogue.cuh); D is then [rows, N/2].
template <class Config>
struct GegluEpilogue {
  using type = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      GegluEpilogueArray<cutlass::detail::TagToStrideC_t<LayoutD*>>>;
};

template <class Config, bool Geglu = false>
struct GroupedGemm {
  using Epilogue = typename cute::conditional_t<Geglu, GegluEpilogue<Config>, PlainEpilogue<Config>>::type;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      typename Config::Arch, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*, kAlignment,
      float, typename Config::Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  // The scan kernel writes these arrays as plain ints: (M, N, K) as 3 x int32 and each stride as
  // its one dynamic int64 (the row stride; the column stride is the static 1, the batch stride 0).
  static_assert(sizeof(UnderlyingShape) == 3 * sizeof(int), "problem shape must be 3 packed ints");
  static_assert(sizeof(StrideA) == sizeof(int64_t) && sizeof(StrideB) == sizeof(int64_t) &&
                    sizeof(StrideD) == sizeof(int64_t),
                "each per-group stride must be one int64");
  static_assert(cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(StrideA{}))>> &&
                    cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(StrideB{}))>> &&
                    cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<1>(StrideD{}))>>,
                "A, B, D must be K-major / row-major");

  static typename Gemm::Arguments arguments(int32_t* shapes, const void** a, int64_t* sa, const void** b, int64_t* sb,
                                            void** d, int64_t* sd, int experts, int sms, int gelu_approx = 0) {
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {experts, reinterpret_cast<UnderlyingShape*>(shapes), nullptr};  // shapes on device only
    args.mainloop.ptr_A = reinterpret_cast<const Element**>(a);
    args.mainloop.dA = reinterpret_cast<StrideA*>(sa);
    args.mainloop.ptr_B = reinterpret_cast<const Element**>(b);
    args.mainloop.dB = reinterpret_cast<StrideB*>(sb);
    if constexpr (!Geglu) {
      args.epilogue.thread.alpha = 1.f;
      args.epilogue.thread.beta = 0.f;
      args.epilogue.ptr_C = nullptr;
      args.epilogue.dC = reinterpret_cast<StrideD*>(sd);
    } else {
      args.epilogue.gelu_approx = gelu_approx;
    }
    args.epilogue.ptr_D = reinterpret_cast<Element**>(d);
    args.epilogue.dD = reinterpret_cast<StrideD*>(sd);
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    args.hw_info.device_id = dev;
    args.hw_info.sm_count = sms;
    return args;
  }

  static size_t workspace_size(int experts, int sms) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, experts, sms));
  }

  static void run(int32_t* shapes, const void** a, int64_t* sa, const void** b, int64_t* sb, void** d, int64_t* sd,
                  int experts, int sms, void* workspace, cudaStream_t stream, const char* what,
                  int gelu_approx = 0) {
    Gemm gemm;
    const auto args = arguments(shapes, a, sa, b, sb, d, sd, experts, sms, gelu_approx);
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess) {
      throw std::runtime_error(std::string(kOp) + ": CUTLASS cannot run " + what + " (" + cutlassGetStatusString(st) + ")");
    }
    st = gemm.initialize(args, workspace, stream);
    if (st != cutlass::Status::kSuccess) {
      throw std::runtime_error(std::string(kOp) + ": " + what + " initialize failed (" + cutlassGetStatusString(st) + ")");
    }
    st = gemm.run(stream);
    if (st != cutlass::Status::kSuccess) {
      throw std::runtime_error(std::string(kOp) + ": " + what + " launch failed (" + cutlassGetStatusString(st) + ")");
    }
    check_launch(what);
  }
};

// CUTLASS workspace bytes of the widest of the GEMM types (void ones ignored).
template <class... Gemms>
size_t cutlass_workspace(int experts, int sms) {
  size_t bytes = 0;
  ((bytes = std::max(bytes, [&] {
      if constexpr (std::is_void_v<Gemms>) return size_t{0};
      else return Gemms::workspace_size(experts, sms);
    }())), ...);
  return bytes;
}

template <class... Gemms>
PrefillLayout carve(void* workspace, int64_t pairs, int experts, int64_t hidden, int64_t inter, bool fused_geglu,
                    size_t* bytes) {
  const int sms = device_sms();
  WorkspaceCarver c{static_cast<char*>(workspace)};
  PrefillLayout w{};
  carve_routing(c, w, pairs, experts);
  w.shapes1 = c.take<int32_t>(3 * experts);
  w.shapes2 = c.take<int32_t>(3 * experts);
  w.a1 = c.take<const void*>(experts);
  w.b1 = c.take<const void*>(experts);
  w.d1 = c.take<void*>(experts);
  w.a2 = c.take<const void*>(experts);
  w.b2 = c.take<const void*>(experts);
  w.d2 = c.take<void*>(experts);
  w.stride_a1 = c.take<int64_t>(experts);
  w.stride_b1 = c.take<int64_t>(experts);
  w.stride_d1 = c.take<int64_t>(experts);
  w.stride_a2 = c.take<int64_t>(experts);
  w.stride_b2 = c.take<int64_t>(experts);
  w.stride_d2 = c.take<int64_t>(experts);
  const size_t cutlass_ws = cutlass_workspace<Gemms...>(experts, sms);
  w.cutlass_ws1 = c.take<char>(cutlass_ws);
  w.cutlass_ws2 = c.take<char>(cutlass_ws);
  w.xs = c.take<bf16>(pairs * hidden);
  w.h1 = c.take<bf16>(fused_geglu ? 0 : pairs * 2 * inter);
  w.act = c.take<bf16>(pairs * inter);
  *bytes = c.used;
  return w;
}

inline void check_sizes(int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter) {
  GEMMA4X_CHECK_ARG(tokens >= 0, kOp, ": tokens must be >= 0, got ", tokens);
  GEMMA4X_CHECK_ARG(top_k >= 1 && top_k <= kPrefillMaxTopK, kOp, ": top_k must be in [1, ", kPrefillMaxTopK, "], got ",
                    top_k);
  GEMMA4X_CHECK_ARG(experts >= 1 && experts <= kPrefillMaxExperts, kOp, ": experts must be in [1, ",
                    kPrefillMaxExperts, "], got ", experts);
  GEMMA4X_CHECK_ARG(hidden > 0 && hidden % 8 == 0, kOp, ": hidden size H must be a positive multiple of 8, got ",
                    hidden);
  GEMMA4X_CHECK_ARG(inter > 0 && inter % 8 == 0, kOp, ": intermediate size I must be a positive multiple of 8, got ",
                    inter);
  GEMMA4X_CHECK_ARG(static_cast<int64_t>(tokens) * top_k <= (int64_t{1} << 30), kOp, ": T*k = ",
                    static_cast<int64_t>(tokens) * top_k, " pairs is too many");
  GEMMA4X_CHECK_ARG(static_cast<int64_t>(2) * inter <= (int64_t{1} << 30) && hidden <= (1 << 30), kOp,
                    ": sizes overflow the GEMM's int32 shapes");
}

inline void check_ptr(const char* name, const void* p, size_t align) {
  GEMMA4X_CHECK_ARG(p != nullptr, kOp, ": ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(is_aligned(p, align), kOp, ": ", name, " must be ", align, "-byte aligned, got address ",
                    reinterpret_cast<uintptr_t>(p));
}

// Big / Small: the arch's two GroupedGemm instances; BigG / SmallG: the same tiles with the GeGLU
// epilogue (void where the arch has none: interleaved gate_up then runs GEMM1 + the GeGLU kernel).
template <class Big, class Small, class BigG = void, class SmallG = void>
size_t prefill_workspace_size(int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter,
                              int32_t gate_up_interleaved) {
  check_sizes(tokens, top_k, experts, hidden, inter);
  const bool fused_geglu = gate_up_interleaved != 0 && !std::is_void_v<BigG>;
  size_t bytes = 0;
  carve<Big, Small, BigG, SmallG>(nullptr, static_cast<int64_t>(tokens) * top_k, experts, hidden, inter, fused_geglu,
                                  &bytes);
  return bytes;
}

// Prep (one fused launch, or count + scan + gather), GEMM1, GeGLU, GEMM2, finalize on `stream`; with
// interleaved gate_up and an arch with the GeGLU epilogue, GEMM1 writes act and there is no GeGLU
// launch (5 launches with the fused prep, 4 besides the router). Tile 1 runs the large tile for both
// GEMMs, tile 2 the small one, tile 0 (auto) the large one for GEMM1 once experts average >= 128
// rows and the small one otherwise, the small one for GEMM2.
template <class Big, class Small, class BigG = void, class SmallG = void>
void run_prefill(const MoePrefillParams& p, cudaStream_t stream, void (*check_device)()) {
  check_sizes(p.tokens, p.top_k, p.experts, p.hidden, p.inter);
  GEMMA4X_CHECK_ARG(p.tile >= 0 && p.tile <= 2, kOp, ": tile must be 0 (auto), 1 (the large tile) or 2 ",
                    "(the small tile), got ", p.tile);
  GEMMA4X_CHECK_ARG(p.gate_up_interleaved == 0 || p.gate_up_interleaved == 1, kOp,
                    ": gate_up_interleaved must be 0 or 1, got ", p.gate_up_interleaved);
  GEMMA4X_CHECK_ARG(p.prep >= 0 && p.prep <= 2, kOp, ": prep must be 0 (auto), 1 (fused) or 2 (multi-kernel), got ",
                    p.prep);
  const int64_t pairs = static_cast<int64_t>(p.tokens) * p.top_k;
  GEMMA4X_CHECK_ARG(static_cast<PrefillPrep>(p.prep) != PrefillPrep::kFused || pairs <= kFusedPrepMaxPairs, kOp,
                    ": the fused prep takes at most ", kFusedPrepMaxPairs, " pairs T*k, got ", pairs);
  if (p.tokens == 0) return;
  check_ptr("x", p.x, 16);
  check_ptr("idx", p.idx, 8);
  check_ptr("weights", p.weights, 4);
  check_ptr("gate_up", p.gate_up, 16);
  check_ptr("down", p.down, 16);
  check_ptr("out", p.out, 16);
  check_ptr("workspace", p.workspace, kPrefillWorkspaceAlign);
  GEMMA4X_CHECK_ARG(p.x_row_stride >= p.hidden && p.x_row_stride % 8 == 0, kOp, ": x row stride must be >= H = ",
                    p.hidden, " and a multiple of 8, got ", p.x_row_stride);
  GEMMA4X_CHECK_ARG(p.out_row_stride >= p.hidden && p.out_row_stride % 8 == 0, kOp,
                    ": out row stride must be >= H = ", p.hidden, " and a multiple of 8, got ", p.out_row_stride);
  check_device();

  constexpr bool kHasGegluEpilogue = !std::is_void_v<BigG>;
  const bool fused_geglu = p.gate_up_interleaved != 0 && kHasGegluEpilogue;
  size_t need = 0;
  const PrefillLayout ws =
      carve<Big, Small, BigG, SmallG>(p.workspace, pairs, p.experts, p.hidden, p.inter, fused_geglu, &need);
  GEMMA4X_CHECK_ARG(p.workspace_bytes >= need, kOp, ": workspace has ", p.workspace_bytes, " bytes, the call needs ",
                    need);
  PrefillKernelParams kp = prefill_kernel_params(p, ws);
  kp.gate_up = p.gate_up;
  kp.down = p.down;
  kp.interleaved = p.gate_up_interleaved;
  kp.fused_geglu = fused_geglu ? 1 : 0;

  const int sms = device_sms();
  const PrefillLayout& w = kp.ws;
  const PrefillPrep prep = static_cast<PrefillPrep>(p.prep);
  if (prep == PrefillPrep::kFused || (prep == PrefillPrep::kAuto && pairs <= kFusedPrepAutoPairs)) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + kPrepWarps - 1) / kPrepWarps, 2 * sms));
    launch_prefill_kernel(moe_prefill_prep_kernel, blocks, kPrepThreads, stream, kp, "moe_prefill_prep_kernel");
  } else {
    launch_count_scan_gather</*kGemmArgs=*/true>(kp, stream);
  }

  // Tiles per GEMM: see the arch file (moe_prefill_sm90.cu holds the H200 measurements).
  const bool many_rows = pairs >= static_cast<int64_t>(128) * p.experts;
  const PrefillTile chosen = static_cast<PrefillTile>(p.tile);
  const PrefillTile tile1 = chosen != PrefillTile::kAuto ? chosen
                            : many_rows                  ? PrefillTile::kCoop128x256
                                                         : PrefillTile::kPingpong64x256;
  const PrefillTile tile2 = chosen != PrefillTile::kAuto ? chosen : PrefillTile::kPingpong64x256;
  const char* gemm1 = "GEMM1 (x @ gate_up^T)";
  const char* gemm2 = "GEMM2 (act @ down^T)";
  bool gemm1_done = false;
  if constexpr (kHasGegluEpilogue) {
    if (fused_geglu) {
      const char* gemm1g = "GEMM1 + GeGLU epilogue (x @ gate_up^T, interleaved)";
      if (tile1 == PrefillTile::kCoop128x256) {
        BigG::run(w.shapes1, w.a1, w.stride_a1, w.b1, w.stride_b1, w.d1, w.stride_d1, p.experts, sms, w.cutlass_ws1,
                  stream, gemm1g, p.gelu_approx);
      } else {
        SmallG::run(w.shapes1, w.a1, w.stride_a1, w.b1, w.stride_b1, w.d1, w.stride_d1, p.experts, sms,
                    w.cutlass_ws1, stream, gemm1g, p.gelu_approx);
      }
      gemm1_done = true;
    }
  }
  if (!gemm1_done) {
    if (tile1 == PrefillTile::kCoop128x256) {
      Big::run(w.shapes1, w.a1, w.stride_a1, w.b1, w.stride_b1, w.d1, w.stride_d1, p.experts, sms, w.cutlass_ws1,
               stream, gemm1);
    } else {
      Small::run(w.shapes1, w.a1, w.stride_a1, w.b1, w.stride_b1, w.d1, w.stride_d1, p.experts, sms, w.cutlass_ws1,
                 stream, gemm1);
    }
    const int64_t vecs = pairs * (p.inter / 8);
    const unsigned geglu_grid = static_cast<unsigned>(
        std::min<int64_t>((vecs + kGegluThreads - 1) / kGegluThreads, static_cast<int64_t>(sms) * 16));
    launch_prefill_kernel(moe_prefill_geglu_kernel, geglu_grid, kGegluThreads, stream, kp, "moe_prefill_geglu_kernel");
  }
  if (tile2 == PrefillTile::kCoop128x256) {
    Big::run(w.shapes2, w.a2, w.stride_a2, w.b2, w.stride_b2, w.d2, w.stride_d2, p.experts, sms, w.cutlass_ws2,
             stream, gemm2);
  } else {
    Small::run(w.shapes2, w.a2, w.stride_a2, w.b2, w.stride_b2, w.d2, w.stride_d2, p.experts, sms, w.cutlass_ws2,
               stream, gemm2);
  }
  launch_finalize(kp, stream);
}

}  // namespace gemma4x::moe::prefill

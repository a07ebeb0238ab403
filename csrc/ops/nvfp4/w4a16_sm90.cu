// Launchers of the SM90 W4A16 kernels (compiled for sm_90a only).
#include <algorithm>

#include "gemma4x/common/check.h"
#include "gemma4x/common/device.h"
#include "gemma4x/nvfp4/w4a16_kernels.cuh"
#include "nvfp4.h"
#include "sm90_checks.h"

namespace gemma4x::nvfp4 {
namespace {

constexpr int kGemvMaxTokens = 64;

// Blocks per row block (a cluster splitting K): enough blocks for ~4 per SM (16 warps streaming),
// while every warp keeps at least 2 units.
int gemv_splits(int row_blocks, int units) {
  const int target = 4 * device_sms();
  int s = 1;
  while (s < kGemvMaxSplits && row_blocks * s < target && units >= 2 * s * 2 * kGemvWarps) s *= 2;
  return s;
}

template <int NT>
void launch_gemv(const GemvParams& p, cudaStream_t stream) {
  const int row_blocks = p.n / kUnitRows;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(row_blocks * p.splits));
  cfg.blockDim = dim3(kGemvThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(p.splits);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.splits > 1 ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, nvfp4_w4a16_gemv_kernel<NT>, p), "nvfp4_w4a16_gemv_kernel launch");
}

template <typename Kernel>
void launch_moe(Kernel kernel, unsigned grid, unsigned threads, bool pdl, cudaStream_t stream,
                const MoeDecodeParams& p, const char* name) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, p), name);
}


}  // namespace

W4A16Limits w4a16_limits() { return W4A16Limits{kGemvMaxTokens, kMoeMaxPairs, kMoeMaxExperts}; }

void w4a16_gemv(const GemvParams& in, cudaStream_t stream) {
  constexpr const char* op = "nvfp4_w4a16_gemm";
  GEMMA4X_CHECK_ARG(in.m >= 0 && in.m <= kGemvMaxTokens, op, ": M must be in [0, ", kGemvMaxTokens, "], got ", in.m);
  GEMMA4X_CHECK_ARG(in.n > 0 && in.n % kUnitRows == 0, op, ": N must be a positive multiple of ", kUnitRows,
                    ", got ", in.n);
  GEMMA4X_CHECK_ARG(in.k > 0 && in.k % kUnitK == 0, op, ": K must be a positive multiple of ", kUnitK, ", got ",
                    in.k);
  GEMMA4X_CHECK_ARG(in.x_row_stride % 8 == 0 && in.x_row_stride >= in.k, op,
                    ": x row stride must be a multiple of 8 and >= K, got ", in.x_row_stride);
  GEMMA4X_CHECK_ARG(in.out_row_stride >= in.n, op, ": out row stride must be >= N, got ", in.out_row_stride);
  if (in.m == 0) return;
  check_sm90(op);
  check_ptr(op, "packed", in.packed, 16);
  check_ptr(op, "x", in.x, 16);
  check_ptr(op, "global_scale", in.global_scale, 4);
  check_ptr(op, "out", in.out, 2);
  GemvParams p = in;
  p.splits = gemv_splits(p.n / kUnitRows, p.k / kUnitK);
  const int nt = (p.m + 7) / 8;
  if (nt == 1) launch_gemv<1>(p, stream);
  else if (nt == 2) launch_gemv<2>(p, stream);
  else if (nt <= 4) launch_gemv<4>(p, stream);
  else launch_gemv<8>(p, stream);
  check_launch("nvfp4_w4a16_gemv_kernel");
}

void moe_decode(const MoeDecodeParams& p, bool pdl, cudaStream_t stream) {
  constexpr const char* op = "nvfp4_moe_experts_decode";
  const int64_t pairs = static_cast<int64_t>(p.tokens) * p.top_k;
  GEMMA4X_CHECK_ARG(p.tokens >= 0 && p.top_k > 0 && pairs <= kMoeMaxPairs, op, ": T*k must be <= ", kMoeMaxPairs,
                    ", got T=", p.tokens, ", k=", p.top_k);
  GEMMA4X_CHECK_ARG(p.experts > 0 && p.experts <= kMoeMaxExperts, op, ": experts E must be in [1, ", kMoeMaxExperts,
                    "], got ", p.experts);
  GEMMA4X_CHECK_ARG(p.hidden > 0 && p.hidden % kUnitK == 0, op, ": hidden H must be a positive multiple of ", kUnitK,
                    ", got ", p.hidden);
  GEMMA4X_CHECK_ARG(p.inter > 0 && p.inter % kUnitK == 0, op, ": intermediate I must be a positive multiple of ",
                    kUnitK, ", got ", p.inter);
  GEMMA4X_CHECK_ARG(p.x_row_stride % 8 == 0 && p.x_row_stride >= p.hidden, op,
                    ": x row stride must be a multiple of 8 and >= H, got ", p.x_row_stride);
  GEMMA4X_CHECK_ARG(p.out_row_stride >= p.hidden, op, ": out row stride must be >= H");
  if (pairs == 0) return;
  check_sm90(op);
  check_ptr(op, "x", p.x, 16);
  check_ptr(op, "idx", p.idx, 8);
  check_ptr(op, "weights", p.weights, 4);
  check_ptr(op, "gate_up", p.gate_up, 16);
  check_ptr(op, "gate_up_scale_2", p.gate_up_scale_2, 4);
  check_ptr(op, "down", p.down, 16);
  check_ptr(op, "down_scale_2", p.down_scale_2, 4);
  check_ptr(op, "act", p.act, 16);
  check_ptr(op, "out", p.out, 2);
  const unsigned gate_up_grid = static_cast<unsigned>(pairs * (p.inter / 8));
  launch_moe(nvfp4_moe_gate_up_kernel, gate_up_grid, 32 * kGateUpWarps, pdl, stream, p,
             "nvfp4_moe_gate_up_kernel launch");
  check_launch("nvfp4_moe_gate_up_kernel");
  launch_moe(nvfp4_moe_down_kernel, static_cast<unsigned>(p.hidden / kUnitRows), 32 * kDownWarps, true, stream, p,
             "nvfp4_moe_down_kernel launch");
  check_launch("nvfp4_moe_down_kernel");
}

}  // namespace gemma4x::nvfp4

// Launchers of the W4A16 prefill GEMM (w4a16_wgmma_sm90.cuh; compiled for sm_90a only): the
// dense GEMM and the routed-expert prefill (count, scan, gather, GEMM1 + GeGLU, GEMM2, finalize;
// the routing kernels and their launches are the bf16 prefill path's, moe/prefill_launch.cuh).
#include <cudaTypedefs.h>

#include <algorithm>
#include <string>

#include "gemma4x/common/check.h"
#include "gemma4x/common/device.h"
#include "gemma4x/moe/prefill_launch.cuh"
#include "gemma4x/nvfp4/w4a16_wgmma_sm90.cuh"
#include "nvfp4.h"
#include "sm90_checks.h"

namespace gemma4x::nvfp4 {
namespace {

using wgmma::Config;
using wgmma::Epilogue;
using wgmma::GemmParams;

PFN_cuTensorMapEncodeTiled_v12000 encode_fn(const char* op) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [op] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (status != cudaDriverEntryPointSuccess || ptr == nullptr)
      throw std::runtime_error(std::string(op) + ": the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

void check_encode(CUresult r, const char* op, const char* what) {
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error(std::string(op) + ": cuTensorMapEncodeTiled failed for " + what + " (CUresult " +
                             std::to_string(static_cast<int>(r)) + ")");
  }
}

// Packed weights [G][N/16][K/64][576] seen as u32 [G][N/16][K/64 * 9][16]: a box {16, 9, R, 1} is
// the R units (16 R rows) of one k stage; row blocks past N/16 are zero-filled (zero codes).
CUtensorMap weight_map(const char* op, const uint8_t* packed, int groups, int n, int k, int row_blocks) {
  const int64_t units = k / kUnitK;
  const cuuint64_t dims[4] = {16, static_cast<cuuint64_t>(units * wgmma::kUnitRows64),
                              static_cast<cuuint64_t>(n / kUnitRows), static_cast<cuuint64_t>(groups)};
  const cuuint64_t strides[3] = {64, static_cast<cuuint64_t>(units * kUnitBytes),
                                 static_cast<cuuint64_t>(units * kUnitBytes * (n / kUnitRows))};
  const cuuint32_t box[4] = {16, wgmma::kUnitRows64, static_cast<cuuint32_t>(row_blocks), 1};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  CUtensorMap map;
  check_encode(encode_fn(op)(&map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, const_cast<uint8_t*>(packed), dims, strides, box,
                             elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_64B,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               op, "the packed weights");
  return map;
}

// Activations [rows, K] bf16 (row stride in elements): box {64, BN}, 128-byte swizzle, rows past
// the end zero-filled.
CUtensorMap act_map(const char* op, const void* x, int64_t rows, int k, int64_t row_stride, int bn) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(std::max<int64_t>(rows, 1))};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(bn)};
  const cuuint32_t elem[2] = {1, 1};
  CUtensorMap map;
  check_encode(encode_fn(op)(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(x), dims, strides, box, elem,
                             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               op, "the activations");
  return map;
}

// Persistent grid: one CTA per SM (fewer when the tiles are known to be fewer).
template <class Cfg>
void launch(const GemmParams& p, const CUtensorMap& tw, const CUtensorMap& tx, int max_tiles, cudaStream_t stream,
            const char* what) {
  auto kernel = wgmma::w4a16_wgmma_kernel<Cfg>;
  static bool configured = false;  // the attribute is per function; set it once
  if (!configured) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
               "cudaFuncSetAttribute(w4a16_wgmma_kernel)");
    configured = true;
  }
  const int grid = std::max(1, std::min(device_sms(), max_tiles));
  kernel<<<grid, wgmma::kThreads, Cfg::kSmemBytes, stream>>>(p, tw, tx);
  check_launch(what);
}

// Tile variants: 1 = 128 rows x 128 tokens, 2 = 128 x 256, 3 = 256 x 128 (rows = weight rows).
// Relative time of one tile on H200 (bench_nvfp4 prefill section, 26B / 31B dense shapes):
// 128x128 1, 128x256 1.56, 256x128 1.75. Auto picks the fewest waves x tile time.
int pick_variant(int tile, int64_t tokens, int rows, int sms) {
  if (tile != 0) return tile;
  const double cost[4] = {0, 1.0, 1.56, 1.75};
  const int64_t tiles[4] = {0, ((tokens + 127) / 128) * ((rows + 127) / 128), ((tokens + 255) / 256) * ((rows + 127) / 128),
                            ((tokens + 127) / 128) * ((rows + 255) / 256)};
  int best = 2;
  double best_t = 1e300;
  for (int v : {2, 1, 3}) {
    const double t = static_cast<double>((tiles[v] + sms - 1) / sms) * cost[v];
    if (t < best_t) best_t = t, best = v;
  }
  return best;
}

template <class F>
void with_variant(int variant, F&& f) {
  switch (variant) {
    case 1: f(Config<1, 1>{}); break;
    case 2: f(Config<1, 2>{}); break;
    default: f(Config<2, 1>{}); break;
  }
}

template <class Cfg>
void run_gemm(const GemmParams& p, const uint8_t* packed, const void* x, int64_t x_rows, int64_t x_row_stride,
              int max_tiles, cudaStream_t stream, const char* op, const char* what) {
  const CUtensorMap tw = weight_map(op, packed, p.groups, p.n, p.k, Cfg::kRowBlocks);
  const CUtensorMap tx = act_map(op, x, x_rows, p.k, x_row_stride, Cfg::kBN);
  launch<Cfg>(p, tw, tx, max_tiles, stream, what);
}

// ---- routed-expert prefill ---------------------------------------------------------------------

constexpr const char* kMoeOp = "nvfp4_moe_experts_prefill";
// The workspace: the routing pieces (moe/prefill_launch.cuh), then xs [P, H] (gathered x, then
// GEMM2's output y) and act [P, I].
moe::PrefillLayout carve(void* base, int64_t pairs, int experts, int64_t hidden, int64_t inter, size_t* bytes) {
  moe::WorkspaceCarver c{static_cast<char*>(base)};
  moe::PrefillLayout w{};
  moe::carve_routing(c, w, pairs, experts);
  w.xs = c.take<moe::bf16>(pairs * hidden);
  w.act = c.take<moe::bf16>(pairs * inter);
  *bytes = c.used;
  return w;
}

void check_moe_sizes(const W4A16MoePrefillParams& p) {
  GEMMA4X_CHECK_ARG(p.tokens >= 0, kMoeOp, ": tokens must be >= 0, got ", p.tokens);
  GEMMA4X_CHECK_ARG(p.top_k >= 1 && p.top_k <= moe::kPrefillMaxTopK, kMoeOp, ": top_k must be in [1, ",
                    moe::kPrefillMaxTopK, "], got ", p.top_k);
  GEMMA4X_CHECK_ARG(p.experts >= 1 && p.experts <= wgmma::kMaxGroups, kMoeOp, ": experts must be in [1, ",
                    wgmma::kMaxGroups, "], got ", p.experts);
  GEMMA4X_CHECK_ARG(p.hidden > 0 && p.hidden % kUnitK == 0, kMoeOp, ": hidden H must be a positive multiple of ",
                    kUnitK, ", got ", p.hidden);
  GEMMA4X_CHECK_ARG(p.inter > 0 && p.inter % kUnitK == 0, kMoeOp, ": intermediate I must be a positive multiple of ",
                    kUnitK, ", got ", p.inter);
  GEMMA4X_CHECK_ARG(static_cast<int64_t>(p.tokens) * p.top_k <= (int64_t{1} << 30), kMoeOp, ": T*k too large");
  GEMMA4X_CHECK_ARG(p.tile >= 0 && p.tile <= 3, kMoeOp, ": tile must be 0 (auto), 1 (128x128), 2 (128x256) or ",
                    "3 (256x128), got ", p.tile);
}

}  // namespace

void w4a16_gemm_sm90(const W4A16GemmParams& in, cudaStream_t stream) {
  constexpr const char* op = "nvfp4_w4a16_gemm_sm90";
  GEMMA4X_CHECK_ARG(in.m >= 0, op, ": M must be >= 0, got ", in.m);
  GEMMA4X_CHECK_ARG(in.n > 0 && in.n % kUnitRows == 0, op, ": N must be a positive multiple of ", kUnitRows, ", got ",
                    in.n);
  GEMMA4X_CHECK_ARG(in.k > 0 && in.k % kUnitK == 0, op, ": K must be a positive multiple of ", kUnitK, ", got ", in.k);
  GEMMA4X_CHECK_ARG(in.x_row_stride % 8 == 0 && in.x_row_stride >= in.k, op,
                    ": x row stride must be a multiple of 8 and >= K, got ", in.x_row_stride);
  GEMMA4X_CHECK_ARG(in.out_row_stride >= in.n, op, ": out row stride must be >= N, got ", in.out_row_stride);
  GEMMA4X_CHECK_ARG(in.tile >= 0 && in.tile <= 3, op, ": tile must be 0 (auto), 1 (128x128), 2 (128x256) or ",
                    "3 (256x128), got ", in.tile);
  if (in.m == 0) return;
  check_sm90(op);
  check_ptr(op, "packed", in.packed, 16);
  check_ptr(op, "x", in.x, 16);
  check_ptr(op, "global_scale", in.global_scale, 4);
  check_ptr(op, "out", in.out, 2);
  GemmParams p{};
  p.global_scale = in.global_scale;
  p.offsets = nullptr;
  p.out = in.out;
  p.out_row_stride = in.out_row_stride;
  p.tokens = in.m;
  p.n = in.n;
  p.k = in.k;
  p.groups = 1;
  p.epilogue = Epilogue::kStore;
  const int variant = pick_variant(in.tile, in.m, in.n, device_sms());
  with_variant(variant, [&](auto cfg) {
    using Cfg = decltype(cfg);
    const int64_t tiles = ((in.m + Cfg::kBN - 1) / Cfg::kBN) * static_cast<int64_t>((in.n + Cfg::kTileRows - 1) / Cfg::kTileRows);
    run_gemm<Cfg>(p, in.packed, in.x, in.m, in.x_row_stride, static_cast<int>(std::min<int64_t>(tiles, 1 << 30)), stream,
                  op, "w4a16_wgmma_kernel");
  });
}

size_t w4a16_moe_prefill_workspace_size(const W4A16MoePrefillParams& p) {
  check_moe_sizes(p);
  size_t bytes = 0;
  carve(nullptr, static_cast<int64_t>(p.tokens) * p.top_k, p.experts, p.hidden, p.inter, &bytes);
  return bytes;
}

void w4a16_moe_prefill(const W4A16MoePrefillParams& p, cudaStream_t stream) {
  check_moe_sizes(p);
  if (p.tokens == 0) return;
  GEMMA4X_CHECK_ARG(p.x_row_stride >= p.hidden && p.x_row_stride % 8 == 0, kMoeOp, ": x row stride must be >= H = ",
                    p.hidden, " and a multiple of 8, got ", p.x_row_stride);
  GEMMA4X_CHECK_ARG(p.out_row_stride >= p.hidden && p.out_row_stride % 8 == 0, kMoeOp,
                    ": out row stride must be >= H = ", p.hidden, " and a multiple of 8, got ", p.out_row_stride);
  check_sm90(kMoeOp);
  check_ptr(kMoeOp, "x", p.x, 16);
  check_ptr(kMoeOp, "idx", p.idx, 8);
  check_ptr(kMoeOp, "weights", p.weights, 4);
  check_ptr(kMoeOp, "gate_up", p.gate_up, 16);
  check_ptr(kMoeOp, "gate_up_scale_2", p.gate_up_scale_2, 4);
  check_ptr(kMoeOp, "down", p.down, 16);
  check_ptr(kMoeOp, "down_scale_2", p.down_scale_2, 4);
  check_ptr(kMoeOp, "out", p.out, 16);
  check_ptr(kMoeOp, "workspace", p.workspace, moe::kPrefillWorkspaceAlign);
  const int64_t pairs = static_cast<int64_t>(p.tokens) * p.top_k;
  size_t need = 0;
  const moe::PrefillLayout w = carve(p.workspace, pairs, p.experts, p.hidden, p.inter, &need);
  GEMMA4X_CHECK_ARG(p.workspace_bytes >= need, kMoeOp, ": workspace has ", p.workspace_bytes, " bytes, the call needs ",
                    need);
  const moe::PrefillKernelParams kp = moe::prefill_kernel_params(p, w);
  moe::launch_count_scan_gather</*kGemmArgs=*/false>(kp, stream);

  // Tile counts are on the device only; bound them from the host: sum_e ceil(n_e / BN) <=
  // P / BN + E token tiles. Auto: 128 x 256 once experts average >= 128 rows (half the
  // dequantisation per flop; H200 at 4096 tokens: 1217 us vs 1269 (256x128) and 1299 (128x128)),
  // else 256 x 128 (fewer padded token rows; 512 tokens: 476 us vs 496 and 722).
  const int variant = p.tile != 0 ? p.tile : pairs >= static_cast<int64_t>(128) * p.experts ? 2 : 3;
  GemmParams g1{};
  g1.global_scale = p.gate_up_scale_2;
  g1.offsets = w.offsets;
  g1.out = w.act;
  g1.out_row_stride = p.inter;
  g1.tokens = static_cast<int32_t>(pairs);
  g1.n = 2 * p.inter;
  g1.k = p.hidden;
  g1.groups = p.experts;
  g1.epilogue = Epilogue::kGeglu;
  GemmParams g2 = g1;
  g2.global_scale = p.down_scale_2;
  g2.out = w.xs;  // y reuses xs: GEMM1 has consumed it
  g2.out_row_stride = p.hidden;
  g2.n = p.hidden;
  g2.k = p.inter;
  g2.epilogue = Epilogue::kStore;
  with_variant(variant, [&](auto cfg) {
    using Cfg = decltype(cfg);
    const int64_t token_tiles = pairs / Cfg::kBN + p.experts;
    const int max1 = static_cast<int>(std::min<int64_t>(token_tiles * ((2 * p.inter + Cfg::kTileRows - 1) / Cfg::kTileRows), 1 << 30));
    const int max2 = static_cast<int>(std::min<int64_t>(token_tiles * ((p.hidden + Cfg::kTileRows - 1) / Cfg::kTileRows), 1 << 30));
    run_gemm<Cfg>(g1, p.gate_up, w.xs, pairs, p.hidden, max1, stream, kMoeOp, "w4a16_wgmma_kernel (GEMM1)");
    run_gemm<Cfg>(g2, p.down, w.act, pairs, p.inter, max2, stream, kMoeOp, "w4a16_wgmma_kernel (GEMM2)");
  });
  moe::launch_finalize(kp, stream);
}

}  // namespace gemma4x::nvfp4

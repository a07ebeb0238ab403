#include "moe.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "gemma4x/common/check.h"
#include "gemma4x/moe/experts_decode_kernels.cuh"
#include "gemma4x/moe/experts_stream_kernels.cuh"
#include "gemma4x/moe/router_kernels.cuh"

namespace gemma4x::moe {
namespace {

// The r and scale rows live in dynamic shared memory (2 * H * sizeof(T)); 48 KB needs no opt-in
// for any dtype up to H = 6144 (Gemma 4: H <= 5376).
constexpr int kRouterMaxHidden = 48 * 1024 / 8;

// Decode instances: vectors per lane of one weight row. Kernel A: a warp per H row, so 11 covers
// H = 2816 exactly (26B-A4B); kernel B: 8 lanes per I row, 11 covers I = 704. The others serve
// small test shapes and up to H = 3072, I = 1024 within kernel A's register budget.
constexpr int kGateUpVpl[] = {2, 6, 11, 12};
constexpr int kDownVpl[] = {4, 11, 16};
constexpr int kDecodeMaxHidden = 32 * 12 * 8;
constexpr int kDecodeMaxInter = kDownLanes * 16 * 8;

int device_sms() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms;
}

void check_ptr(const char* op, const char* name, const void* ptr, bool needed, size_t align) {
  GEMMA4X_CHECK_ARG(!needed || ptr != nullptr, op, ": ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(ptr == nullptr || is_aligned(ptr, align), op, ": ", name, " must be ", align,
                    "-byte aligned for the vector loads");
}

int g_router_cluster = 0;  // benchmark knob (moe_router_tuning): forced cluster size, 0 = automatic

// Blocks per cluster: the router matrix (E*H elements) is split over C SMs per token. Decode
// batches get 8, so the 720 KB matrix streams through 8 SMs; once the tokens alone fill the
// machine, C = 1 avoids recomputing the norm.
int router_cluster(int64_t tokens, int experts) {
  const int sms = device_sms();
  int c = tokens * 8 <= 2 * sms ? 8 : tokens * 4 <= 2 * sms ? 4 : tokens * 2 <= 2 * sms ? 2 : 1;
  if (g_router_cluster > 0) c = g_router_cluster;
  while (c > 1 && experts % c != 0) c /= 2;
  return c;
}

template <typename T>
void launch_router(const MoeRouterParams& p, cudaStream_t stream) {
  const int c = router_cluster(p.tokens, p.experts);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(c * p.tokens));
  cfg.blockDim = dim3(kRouterThreads);
  cfg.dynamicSmemBytes = 2 * static_cast<size_t>(p.hidden) * sizeof(T);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(c);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&cfg, moe_router_kernel<T>, p), "moe_router_kernel launch");
}

// GEMMA4X_MOE_PDL=0 launches the experts kernels without programmatic dependent launch (for
// benchmarks comparing the two).
bool use_pdl() {
  static const bool v = [] {
    const char* env = std::getenv("GEMMA4X_MOE_PDL");
    return env == nullptr || std::atoi(env) != 0;
  }();
  return v;
}

// Launch on `stream`, allowed to start before the previous kernel on it has finished (the kernel
// calls grid_dependency_wait() before reading what that kernel wrote).
template <typename Kernel>
void launch_dependent(Kernel kernel, unsigned grid, unsigned threads, size_t smem, cudaStream_t stream,
                      const MoeExpertsDecodeParams& p, const char* name) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = use_pdl() ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, p), name);
}

// GEMMA4X_MOE_GATE_UP_BLOCKS caps kernel A's resident blocks per SM below what fits; benchmarks
// sweep it, nothing else should need it.
int gate_up_blocks_cap() {
  static const int v = [] {
    const char* env = std::getenv("GEMMA4X_MOE_GATE_UP_BLOCKS");
    return env != nullptr ? std::atoi(env) : 0;
  }();
  return v;
}

// GEMMA4X_MOE_X_SMEM=1 stages x in shared memory where it fits (kernel A's X_SMEM variant). Off by
// default: on an H200 at the 26B-A4B shape it measured the same at 1 token (35.0 against 35.3 us
// for the experts) and 4% slower at 8 tokens (194.0 against 185.7 us); benchmarks compare the two.
bool x_smem_allowed() {
  static const bool v = [] {
    const char* env = std::getenv("GEMMA4X_MOE_X_SMEM");
    return env != nullptr && std::atoi(env) != 0;
  }();
  return v;
}

template <typename T, int NVL, bool X_SMEM>
void launch_gate_up_variant(const MoeExpertsDecodeParams& p, size_t smem, cudaStream_t stream) {
  const auto kernel = moe_decode_gate_up_kernel<T, NVL, X_SMEM>;
  int fits = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fits, kernel, kGateUpThreads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  fits = std::max(fits, 1);
  const int occupancy = gate_up_blocks_cap() > 0 ? std::min(fits, gate_up_blocks_cap()) : fits;
  // Upper bound of the warp tasks (the used experts are known only on the device), capped at one
  // resident wave: the kernel strides over its tasks, so no block waits for a second wave.
  const int64_t pairs = static_cast<int64_t>(p.tokens) * p.top_k;
  const int64_t tasks = std::min<int64_t>(pairs, p.experts) * p.inter;
  const int64_t warps = kGateUpThreads / 32;
  const int64_t grid =
      std::max<int64_t>(1, std::min<int64_t>((tasks + warps - 1) / warps, int64_t{occupancy} * device_sms()));
  launch_dependent(kernel, static_cast<unsigned>(grid), kGateUpThreads, smem, stream, p,
                   "moe_decode_gate_up_kernel launch");
}

template <typename T, int NVL>
void launch_gate_up(const MoeExpertsDecodeParams& p, cudaStream_t stream) {
  const size_t x_bytes = static_cast<size_t>(p.tokens) * p.hidden * sizeof(T);
  if (x_smem_allowed() && x_bytes <= kGateUpMaxXSmem) {
    launch_gate_up_variant<T, NVL, true>(p, x_bytes, stream);
  } else {
    launch_gate_up_variant<T, NVL, false>(p, 0, stream);
  }
}

template <typename T, int NVB>
void launch_down(const MoeExpertsDecodeParams& p, cudaStream_t stream) {
  // act rows in shared memory: up to kDecodeMaxPairs x kDecodeMaxInter elements (128 KB).
  static const bool opted_in = [] {
    check_cuda(cudaFuncSetAttribute(moe_decode_down_kernel<T, NVB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    kDecodeMaxPairs * kDecodeMaxInter * static_cast<int>(sizeof(T))),
               "cudaFuncSetAttribute(moe_decode_down_kernel)");
    return true;
  }();
  (void)opted_in;
  const unsigned grid = static_cast<unsigned>((p.hidden + kDownRows - 1) / kDownRows);
  const size_t smem = static_cast<size_t>(p.tokens) * p.top_k * p.inter * sizeof(T);
  launch_dependent(moe_decode_down_kernel<T, NVB>, grid, kDownThreads, smem, stream, p,
                   "moe_decode_down_kernel launch");
}

template <typename T>
void launch_decode(const MoeExpertsDecodeParams& p, cudaStream_t stream) {
  const int a_vpl = (p.hidden / 8 + 31) / 32;
  const int b_vpl = (p.inter / 8 + kDownLanes - 1) / kDownLanes;
  if (a_vpl <= kGateUpVpl[0]) launch_gate_up<T, kGateUpVpl[0]>(p, stream);
  else if (a_vpl <= kGateUpVpl[1]) launch_gate_up<T, kGateUpVpl[1]>(p, stream);
  else if (a_vpl <= kGateUpVpl[2]) launch_gate_up<T, kGateUpVpl[2]>(p, stream);
  else launch_gate_up<T, kGateUpVpl[3]>(p, stream);
  check_launch("moe_decode_gate_up_kernel");
  if (b_vpl <= kDownVpl[0]) launch_down<T, kDownVpl[0]>(p, stream);
  else if (b_vpl <= kDownVpl[1]) launch_down<T, kDownVpl[1]>(p, stream);
  else launch_down<T, kDownVpl[2]>(p, stream);
  check_launch("moe_decode_down_kernel");
}

// ---- one-launch path (experts_stream_kernels.cuh) ----

struct StreamConfig {
  bool ok = false;
  int grid = 0;
  StreamArgs args{};
  size_t smem = 0;
};

// Benchmark knobs (moe_stream_tuning): most stages, bulk-copy piece size (0: one copy per row
// slice), mode (1: stream the weights without computing, a timing probe).
StreamTuning g_tuning{};

int device_attr(cudaDeviceAttr attr) {
  int dev = 0, v = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&v, attr, dev), "cudaDeviceGetAttribute");
  return v;
}

// Every instance of the stream kernel: NVL (gate/up vectors per lane) x NVB (down vectors per lane).
template <typename T, typename F>
bool for_each_stream_kernel(F f) {
  bool ok = true;
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[0], kDownVpl[0]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[0], kDownVpl[1]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[0], kDownVpl[2]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[1], kDownVpl[0]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[1], kDownVpl[1]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[1], kDownVpl[2]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[2], kDownVpl[0]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[2], kDownVpl[1]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[2], kDownVpl[2]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[3], kDownVpl[0]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[3], kDownVpl[1]>);
  ok &= f(moe_decode_stream_kernel<T, kGateUpVpl[3], kDownVpl[2]>);
  return ok;
}

// Per device and dtype, once: whether a cooperative launch is possible and the shared memory a
// block may take beside the kernel's static part (the attribute is raised to it once).
struct StreamDevice {
  bool init = false;
  bool coop = false;
  int sms = 0;
  int64_t budget = 0;
};

template <typename T>
const StreamDevice& stream_device() {
  static StreamDevice devs[64];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  StreamDevice& d = devs[dev & 63];
  if (d.init) return d;
  const auto kernel = moe_decode_stream_kernel<T, kGateUpVpl[3], kDownVpl[2]>;  // the largest static smem
  cudaFuncAttributes fa{};
  check_cuda(cudaFuncGetAttributes(&fa, kernel), "cudaFuncGetAttributes(moe_decode_stream_kernel)");
  d.coop = device_attr(cudaDevAttrCooperativeLaunch) != 0;
  d.sms = device_sms();
  d.budget = static_cast<int64_t>(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin)) -
             static_cast<int64_t>(fa.sharedSizeBytes);
  d.coop = d.coop && for_each_stream_kernel<T>([&](auto k) {
    check_cuda(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(d.budget)),
               "cudaFuncSetAttribute(moe_decode_stream_kernel)");
    int fits = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fits, k, kStreamThreads, d.budget),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return fits >= 1;
  });
  d.init = true;
  return d;
}

// Pipeline shape: a stage holds one gate/up chunk (4 gate + 4 up rows) or one down chunk (the
// block's rows of one expert); 4 stages, act staged in shared memory when it fits beside them
// (1 token at the 26B-A4B shape: 4 x 45 KB + 11 KB), else read through L2.
template <typename T>
StreamConfig stream_config(const MoeExpertsDecodeParams& p) {
  StreamConfig c;
  const StreamDevice& d = stream_device<T>();
  if (!d.coop) return c;
  const int rows = (p.hidden + d.sms - 1) / d.sms;  // down rows per block
  if (rows > kStreamMaxRows) return c;
  const int64_t esz = sizeof(T);
  int64_t stage = std::max<int64_t>(2 * kStreamIdxPerChunk * int64_t{p.hidden} * esz, int64_t{rows} * p.inter * esz);
  stage = (stage + 127) / 128 * 128;
  const int64_t act = (int64_t{p.tokens} * p.top_k * p.inter * esz + 127) / 128 * 128;
  const int64_t most = std::clamp(g_tuning.max_stages, 2, kStreamMaxStages);
  int64_t stages = std::min<int64_t>(most, (d.budget - act) / stage);
  int act_smem = 1;
  if (stages < most) {  // a deep pipeline first
    act_smem = 0;
    stages = std::min<int64_t>(most, d.budget / stage);
  }
  if (stages < 2) return c;
  c.ok = true;
  c.smem = static_cast<size_t>(stages * stage + (act_smem ? act : 0));
  c.grid = d.sms;  // one block per SM, all resident (the cooperative launch guarantees it)
  c.args.stages = static_cast<int>(stages);
  c.args.stage_bytes = static_cast<int>(stage);
  c.args.act_smem = act_smem;
  c.args.piece_bytes = g_tuning.piece_bytes > 0 ? (g_tuning.piece_bytes + 15) / 16 * 16 : static_cast<int>(stage);
  c.args.mode = g_tuning.mode;
  return c;
}

// Cooperative launch (the grid barrier needs every block resident), chained behind the router with
// programmatic dependent launch where the driver takes both attributes together: probed once,
// outside stream capture (a refused launch inside a capture would invalidate it).
template <typename T, int NVL, int NVB>
void launch_stream(const MoeExpertsDecodeParams& p, const StreamConfig& c, cudaStream_t stream) {
  static int pdl_with_coop = -1;  // -1 unknown, 0 refused, 1 works
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(c.grid));
  cfg.blockDim = dim3(kStreamThreads);
  cfg.dynamicSmemBytes = c.smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  const auto kernel = moe_decode_stream_kernel<T, NVL, NVB>;
  if (use_pdl() && pdl_with_coop != 0) {
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(stream, &capturing), "cudaStreamIsCapturing");
    if (pdl_with_coop == 1 || capturing == cudaStreamCaptureStatusNone) {
      cfg.numAttrs = 2;
      const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, p, c.args);
      if (err == cudaSuccess) {
        pdl_with_coop = 1;
        return;
      }
      if (pdl_with_coop == 1) check_cuda(err, "moe_decode_stream_kernel launch");
      (void)cudaGetLastError();  // refused: clear it and launch without PDL from now on
      pdl_with_coop = 0;
    }
  }
  cfg.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, p, c.args), "moe_decode_stream_kernel launch");
}

template <typename T>
DecodeKernel run_decode(const MoeExpertsDecodeParams& p, DecodeKernel want, cudaStream_t stream) {
  if (want == DecodeKernel::kStream && p.gate_up_interleaved == 0) {  // the stream kernel reads the HF layout only
    const StreamConfig c = stream_config<T>(p);
    if (c.ok) {
      const int a_vpl = (p.hidden / 8 + 31) / 32;
      const int b_vpl = (p.inter / 8 + kDownLanes - 1) / kDownLanes;
      const auto by_b = [&](auto nvl) {
        constexpr int NVL = decltype(nvl)::value;
        if (b_vpl <= kDownVpl[0]) launch_stream<T, NVL, kDownVpl[0]>(p, c, stream);
        else if (b_vpl <= kDownVpl[1]) launch_stream<T, NVL, kDownVpl[1]>(p, c, stream);
        else launch_stream<T, NVL, kDownVpl[2]>(p, c, stream);
      };
      if (a_vpl <= kGateUpVpl[0]) by_b(std::integral_constant<int, kGateUpVpl[0]>{});
      else if (a_vpl <= kGateUpVpl[1]) by_b(std::integral_constant<int, kGateUpVpl[1]>{});
      else if (a_vpl <= kGateUpVpl[2]) by_b(std::integral_constant<int, kGateUpVpl[2]>{});
      else by_b(std::integral_constant<int, kGateUpVpl[3]>{});
      check_launch("moe_decode_stream_kernel");
      return DecodeKernel::kStream;
    }
  }
  launch_decode<T>(p, stream);
  return DecodeKernel::kSplit;
}

// What kAuto runs: the two-kernel split path, measured faster (H200, 26B-A4B shape, experts alone:
// 34.2 against 43.3 us at 1 token, 186 against 344 us at 8 tokens; bench/RESULTS.md).
// GEMMA4X_MOE_DECODE=stream makes kAuto run the one-launch stream kernel instead.
DecodeKernel env_decode_kernel() {
  static const DecodeKernel v = [] {
    const char* env = std::getenv("GEMMA4X_MOE_DECODE");
    if (env != nullptr && std::string(env) == "stream") return DecodeKernel::kStream;
    return DecodeKernel::kSplit;
  }();
  return v;
}

}  // namespace

void moe_stream_tuning(const StreamTuning& t) { g_tuning = t; }

void moe_router_tuning(int cluster) { g_router_cluster = cluster; }

DecodeLimits moe_decode_limits() {
  return DecodeLimits{kDecodeMaxPairs, kDecodeMaxExperts, kDecodeMaxHidden, kDecodeMaxInter};
}

void moe_router(const MoeRouterParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "moe_router";
  const int vec = 16 / dtype_size(dtype);
  GEMMA4X_CHECK_ARG(p.tokens >= 0 && p.tokens <= 0x7fffffff / kRouterMaxCluster, op, ": tokens T must be in [0, ",
                    0x7fffffff / kRouterMaxCluster, "], got ", p.tokens);
  GEMMA4X_CHECK_ARG(p.hidden > 0 && p.hidden % vec == 0 && p.hidden <= kRouterMaxHidden, op,
                    ": hidden size H must be a positive multiple of ", vec, " and <= ", kRouterMaxHidden, ", got ",
                    p.hidden);
  GEMMA4X_CHECK_ARG(p.experts > 0 && p.experts <= kRouterMaxExperts, op, ": experts E must be in [1, ",
                    kRouterMaxExperts, "], got ", p.experts);
  GEMMA4X_CHECK_ARG(p.top_k > 0 && p.top_k <= 32 && p.top_k <= p.experts, op, ": top_k must be in [1, min(32, E=",
                    p.experts, ")], got ", p.top_k);
  GEMMA4X_CHECK_ARG(std::isfinite(p.eps) && p.eps >= 0.f, op, ": eps must be finite and >= 0, got ", p.eps);
  GEMMA4X_CHECK_ARG(p.h_row_stride % vec == 0, op, ": h row stride must be a multiple of ", vec, ", got ",
                    p.h_row_stride);
  const bool needed = p.tokens > 0;
  check_ptr(op, "h", p.h, needed, 16);
  check_ptr(op, "proj_weight", p.proj_weight, needed, 16);
  check_ptr(op, "scale", p.scale, needed, 16);
  check_ptr(op, "per_expert_scale", p.per_expert_scale, needed, 1);
  check_ptr(op, "weights", p.weights, needed, 4);
  check_ptr(op, "idx", p.idx, needed, 8);
  if (p.tokens == 0) return;
  switch (dtype) {
    case DType::kFloat32: launch_router<float>(p, stream); break;
    case DType::kFloat16: launch_router<__half>(p, stream); break;
    case DType::kBFloat16: launch_router<__nv_bfloat16>(p, stream); break;
  }
  check_launch("moe_router_kernel");
}

DecodeKernel moe_experts_decode(const MoeExpertsDecodeParams& p, DType dtype, cudaStream_t stream, DecodeKernel kernel) {
  constexpr const char* op = "moe_experts_decode";
  GEMMA4X_CHECK_ARG(dtype != DType::kFloat32, op, ": dtype float32 is not supported (bfloat16 or float16)");
  GEMMA4X_CHECK_ARG(p.tokens >= 0, op, ": tokens T must be >= 0, got ", p.tokens);
  GEMMA4X_CHECK_ARG(p.top_k > 0, op, ": top_k k must be > 0, got ", p.top_k);
  GEMMA4X_CHECK_ARG(static_cast<int64_t>(p.tokens) * p.top_k <= kDecodeMaxPairs, op, ": T*k must be <= ",
                    kDecodeMaxPairs, " on the decode path, got T=", p.tokens, " k=", p.top_k);
  GEMMA4X_CHECK_ARG(p.experts > 0 && p.experts <= kDecodeMaxExperts, op, ": experts E must be in [1, ",
                    kDecodeMaxExperts, "], got ", p.experts);
  GEMMA4X_CHECK_ARG(p.hidden > 0 && p.hidden % 8 == 0 && p.hidden <= kDecodeMaxHidden, op,
                    ": hidden size H must be a positive multiple of 8 and <= ", kDecodeMaxHidden, ", got ", p.hidden);
  GEMMA4X_CHECK_ARG(p.inter > 0 && p.inter % 8 == 0 && p.inter <= kDecodeMaxInter, op,
                    ": intermediate size I must be a positive multiple of 8 and <= ", kDecodeMaxInter, ", got ",
                    p.inter);
  GEMMA4X_CHECK_ARG(p.x_row_stride % 8 == 0, op, ": x row stride must be a multiple of 8, got ", p.x_row_stride);
  GEMMA4X_CHECK_ARG(p.tokens <= 1 || p.out_row_stride >= p.hidden, op, ": out row stride ", p.out_row_stride,
                    " is smaller than H=", p.hidden);
  const bool needed = p.tokens > 0;
  check_ptr(op, "x", p.x, needed, 16);
  check_ptr(op, "idx", p.idx, needed, 8);
  check_ptr(op, "weights", p.weights, needed, 4);
  check_ptr(op, "gate_up_proj", p.gate_up, needed, 16);
  check_ptr(op, "down_proj", p.down, needed, 16);
  check_ptr(op, "act", p.act, needed, 16);
  check_ptr(op, "out", p.out, needed, 2);
  if (p.tokens == 0) return kernel == DecodeKernel::kAuto ? DecodeKernel::kSplit : kernel;
  if (kernel == DecodeKernel::kAuto) kernel = env_decode_kernel();
  switch (dtype) {
    case DType::kFloat16: return run_decode<__half>(p, kernel, stream);
    case DType::kBFloat16: return run_decode<__nv_bfloat16>(p, kernel, stream);
    case DType::kFloat32: break;
  }
  return DecodeKernel::kSplit;
}

}  // namespace gemma4x::moe

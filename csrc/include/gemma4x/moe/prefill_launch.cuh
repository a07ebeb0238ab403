// Host side of the routing kernels around the prefill GEMMs (prefill_kernels.cuh), shared by the
// bf16 prefill launcher (ops/moe/moe_prefill_launch.cuh, CUTLASS grouped GEMMs) and the NVFP4 one
// (ops/nvfp4/w4a16_gemm_sm90.cu, W4A16 WGMMA GEMMs): workspace carving, the kernels' arguments,
// the count / scan / gather launches and the finalize launch.
//
// The launch helpers are static like the kernels they launch: an arch file's launcher must run
// that file's copy of each kernel (compiled for its arch), never another file's.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "gemma4x/common/check.h"
#include "gemma4x/moe/prefill_kernels.cuh"

namespace gemma4x::moe {

constexpr size_t kPrefillWorkspaceAlign = 256;  // every piece of a prefill workspace starts aligned

// Carves a workspace in a fixed order; with base == nullptr it only measures.
struct WorkspaceCarver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(size_t count) {
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += (count * sizeof(T) + kPrefillWorkspaceAlign - 1) / kPrefillWorkspaceAlign * kPrefillWorkspaceAlign;
    return p;
  }
};

// The routing pieces every prefill workspace starts with: offsets [E + 1], pos [P], block_counts.
inline void carve_routing(WorkspaceCarver& c, PrefillLayout& w, int64_t pairs, int experts) {
  w.offsets = c.take<int32_t>(experts + 1);
  w.pos = c.take<int32_t>(pairs);
  w.block_counts = c.take<int32_t>((pairs + kCountChunk - 1) / kCountChunk * experts);
}

// The kernels' arguments common to both paths, from a launcher's params P (MoePrefillParams or
// nvfp4::W4A16MoePrefillParams: x, idx, weights, out, their strides and the sizes). The bf16 path
// adds gate_up, down, interleaved and fused_geglu (read by the scan's GEMM arguments and GeGLU).
template <class P>
PrefillKernelParams prefill_kernel_params(const P& p, const PrefillLayout& ws) {
  PrefillKernelParams kp{};
  kp.ws = ws;
  kp.x = p.x;
  kp.x_row_stride = p.x_row_stride;
  kp.idx = p.idx;
  kp.weights = p.weights;
  kp.out = p.out;
  kp.out_row_stride = p.out_row_stride;
  kp.tokens = p.tokens;
  kp.top_k = p.top_k;
  kp.pairs = static_cast<int32_t>(static_cast<int64_t>(p.tokens) * p.top_k);
  kp.experts = p.experts;
  kp.hidden = p.hidden;
  kp.inter = p.inter;
  return kp;
}

template <typename Kernel>
static void launch_prefill_kernel(Kernel kernel, unsigned grid, unsigned threads, cudaStream_t stream,
                                  const PrefillKernelParams& kp, const char* what) {
  kernel<<<grid, threads, 0, stream>>>(kp);
  check_launch(what);
}

// count, scan, gather (three launches): pos and offsets, x gathered into xs in expert order, and
// with kGemmArgs the CUTLASS grouped GEMMs' per-expert arguments.
template <bool kGemmArgs>
static void launch_count_scan_gather(const PrefillKernelParams& kp, cudaStream_t stream) {
  const int64_t pairs = kp.pairs;
  launch_prefill_kernel(moe_prefill_count_kernel, static_cast<unsigned>((pairs + kCountChunk - 1) / kCountChunk),
                        kCountThreads, stream, kp, "moe_prefill_count_kernel");
  launch_prefill_kernel(moe_prefill_scan_kernel<kGemmArgs>, 1, kPrefillMaxExperts, stream, kp,
                        "moe_prefill_scan_kernel");
  launch_prefill_kernel(moe_prefill_gather_kernel, static_cast<unsigned>((pairs * 32 + kGatherThreads - 1) / kGatherThreads),
                        kGatherThreads, stream, kp, "moe_prefill_gather_kernel");
}

// out[t] = bf16(sum_j w[t, j] * y[pos[t, j]]) with y in xs: one block per token.
static void launch_finalize(const PrefillKernelParams& kp, cudaStream_t stream) {
  launch_prefill_kernel(moe_prefill_finalize_kernel, static_cast<unsigned>(kp.tokens), kFinalizeThreads, stream, kp,
                        "moe_prefill_finalize_kernel");
}

}  // namespace gemma4x::moe

// Host launchers of the MoE family. Each validates its Params (names, shapes, limits, alignment),
// picks the kernel instance and grid, and launches on the caller's stream.
#pragma once

#include <cuda_runtime_api.h>

#include "gemma4x/common/dtype.h"
#include "gemma4x/moe/params.h"

namespace gemma4x::moe {

// Fused router: one launch for any T.
void moe_router(const MoeRouterParams& params, DType dtype, cudaStream_t stream);

// Which decode kernels run: kAuto is kSplit (measured faster; GEMMA4X_MOE_DECODE=stream makes it
// kStream). kStream needs cooperative launch, H <= 32 rows per SM and the pipeline in shared
// memory; where the device does not allow it, kSplit runs.
enum class DecodeKernel : int { kAuto = 0, kSplit = 1, kStream = 2 };

// Decode experts path; requires P = T*k <= 64 and the limits below. kSplit: two launches
// (gate/up+GeGLU, down+combine); kStream: one persistent launch (experts_stream_kernels.cuh).
// Returns the kernel that ran (kStream requested but unavailable falls back to kSplit).
DecodeKernel moe_experts_decode(const MoeExpertsDecodeParams& params, DType dtype, cudaStream_t stream,
                                DecodeKernel kernel = DecodeKernel::kAuto);

// Benchmark knobs of the stream kernel (defaults are the shipped configuration).
struct StreamTuning {
  int max_stages = 4;   // pipeline depth cap (2..4)
  int piece_bytes = 0;  // bulk-copy piece size; 0: one copy per row slice
  int mode = 0;         // 1: stream the weights without computing (timing probe, output unset)
};
void moe_stream_tuning(const StreamTuning& tuning);
// Benchmark knob of the router: cluster size at every T (1, 2, 4 or 8; 0 = automatic).
void moe_router_tuning(int cluster);

// Largest sizes the decode kernels take (the Python op sends anything larger to grouped_mm).
struct DecodeLimits {
  int max_pairs;
  int max_experts;
  int max_hidden;
  int max_inter;
};
DecodeLimits moe_decode_limits();

}  // namespace gemma4x::moe

// Host launchers of the MoE prefill path: CUTLASS ptr-array grouped GEMMs, one pair of entry points
// per arch file (moe_prefill_sm90.cu: measured on H200; moe_prefill_sm100.cu: compiled, not run).
// On the caller's stream, no host sync: prep (one fused launch up to kFusedPrepMaxPairs pairs, else
// count, scan, gather), GEMM1 (+ GeGLU in its epilogue on SM90 with interleaved gate_up, else a
// GeGLU kernel), GEMM2, finalize. The binding picks the pair by the device's compute capability.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "gemma4x/moe/prefill_params.h"

namespace gemma4x::moe {

// Bytes of workspace the prefill path needs for these sizes (P = tokens * top_k rows of x, of
// GEMM1's [P, 2I] output and of the [P, I] activation, plus the per-expert GEMM arguments).
// GEMM1's [P, 2I] output only where the arch runs a separate GeGLU kernel.
size_t moe_prefill_workspace_size_sm90(int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter,
                                       int32_t gate_up_interleaved);
size_t moe_prefill_workspace_size_sm100(int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter,
                                        int32_t gate_up_interleaved);

// out[t] = bf16(sum_j w[t,j] * bf16(bf16(gelu(bf16(x G^T)) * bf16(x U^T)) D^T)), e = idx[t,j]; bf16 only.
void moe_experts_prefill_sm90(const MoePrefillParams& params, cudaStream_t stream);
void moe_experts_prefill_sm100(const MoePrefillParams& params, cudaStream_t stream);

// Largest experts / top_k the scan and finalize kernels take.
struct PrefillLimits {
  int max_experts;
  int max_top_k;
};
inline PrefillLimits moe_prefill_limits() { return {kPrefillMaxExperts, kPrefillMaxTopK}; }

}  // namespace gemma4x::moe

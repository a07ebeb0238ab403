// Parameters of the MoE prefill path (many tokens, T*k > 64): permute -> grouped GEMM1 -> GeGLU ->
// grouped GEMM2 -> routing-weighted combine. Symbols: T tokens, k top-k, P = T*k (token, slot)
// pairs, E experts, H hidden, I expert intermediate size.
#pragma once

#include <cstdint>

namespace gemma4x::moe {

constexpr int kPrefillMaxExperts = 256;  // the scan kernel: one thread per expert
constexpr int kPrefillMaxTopK = 32;      // the finalize kernel's per-token slot table

// What the caller hands the prefill launcher. Every pointer is a device pointer.
struct MoePrefillParams {
  const void* x;            // [T, H] bf16, row stride x_row_stride
  int64_t x_row_stride;
  const int64_t* idx;       // [T, k] contiguous; ids outside [0, E) contribute nothing
  const float* weights;     // [T, k] contiguous fp32 routing weights
  const void* gate_up;      // [E, 2I, H] contiguous bf16 (gate rows, then up rows)
  const void* down;         // [E, H, I] contiguous bf16
  void* out;                // [T, H] bf16, row stride out_row_stride
  int64_t out_row_stride;
  void* workspace;          // moe_prefill_workspace_size(...) bytes, 256-byte aligned
  size_t workspace_bytes;
  int32_t tokens;
  int32_t top_k;
  int32_t experts;
  int32_t hidden;
  int32_t inter;
  int32_t tile;             // GEMM tile config: 0 = pick by rows per expert, else a PrefillTile
  // 1: gate_up rows interleaved in blocks of 8 (rows 16b..16b+7 = gate rows 8b..8b+7, the next 8 =
  // up rows 8b..8b+7). Where the arch has it (SM90), GEMM1's epilogue then computes the GeGLU and
  // stores act directly: no h1 buffer, no GeGLU launch.
  int32_t gate_up_interleaved;
  int32_t prep;             // PrefillPrep: how count / scan / gather run
  int32_t gelu_approx;      // benchmark knob: GEMM1's GeGLU epilogue with tanh.approx.f32 (not HF's rounding)
};

// How the routing is turned into the permuted rows and the GEMM arguments.
enum class PrefillPrep : int32_t {
  kAuto = 0,    // kFused up to kFusedPrepAutoPairs pairs, kMulti beyond
  kFused = 1,   // one launch: every block ranks all pairs (same result in each), block 0 writes the
                // GEMM arguments, each block gathers its share of the rows
  kMulti = 2,   // count, scan, gather: three launches
};
constexpr int kFusedPrepMaxPairs = 4096;
// Where kAuto switches (H200, 26B-A4B shape, bench/RESULTS.md): every block ranks all P pairs, so
// the fused launch grows with P. Eager kernel times: 6.4 us against 6.8 us for the three kernels at
// 512 pairs, 25.5 us against 13.3 us at 4096; whole experts op in a graph: 405.5 against 407.6 us
// at 512 pairs, 460.4 against 448.4 us at 4096. 1024 lies between (not measured there).
constexpr int kFusedPrepAutoPairs = 1024;

// The two grouped-GEMM tile configurations of each arch file (the benchmark measures both).
// Named after SM90's; on SM100 they are the 1-SM 128x256 and 128x128 tiles.
enum class PrefillTile : int32_t {
  kAuto = 0,
  kCoop128x256 = 1,      // large: SM90 cooperative, two consumer warpgroups on a 128x256 tile
  kPingpong64x256 = 2,   // small: SM90 ping-pong, each consumer warpgroup owns a 64x256 tile
};

// Where the pieces of the workspace live (filled by the host from MoePrefillParams).
struct PrefillLayout {
  int32_t* offsets;      // [E+1] first permuted row of each expert; offsets[E] = valid pairs
  int32_t* pos;          // [P] permuted row of each pair (-1: id out of range)
  int32_t* block_counts; // [ceil(P / kCountChunk)][E] rows per expert in each count block
  int32_t* shapes1;      // [E][3] GEMM1 (M, N, K) per expert = (n_e, 2I, H)
  int32_t* shapes2;      // [E][3] GEMM2 (n_e, H, I)
  const void** a1;       // [E] GEMM1 operand pointers per expert
  const void** b1;
  void** d1;
  const void** a2;       // [E] GEMM2 operand pointers per expert
  const void** b2;
  void** d2;
  int64_t* stride_a1;    // [E] row strides (elements) in CUTLASS's packed stride layout
  int64_t* stride_b1;
  int64_t* stride_d1;
  int64_t* stride_a2;
  int64_t* stride_b2;
  int64_t* stride_d2;
  void* cutlass_ws1;     // CUTLASS workspace (per-SM TMA descriptors) of GEMM1
  void* cutlass_ws2;     // ... of GEMM2
  void* xs;              // [P, H] x rows in expert order; reused for GEMM2's output y
  void* h1;              // [P, 2I] GEMM1 output (gate | up, or interleaved); absent with fused_geglu
  void* act;             // [P, I] gelu_tanh(gate) * up
};

// Device-side arguments of the small kernels around the GEMMs.
struct PrefillKernelParams {
  PrefillLayout ws;
  const void* x;
  int64_t x_row_stride;
  const int64_t* idx;
  const float* weights;
  const void* gate_up;
  const void* down;
  void* out;
  int64_t out_row_stride;
  int32_t tokens;
  int32_t top_k;
  int32_t pairs;
  int32_t experts;
  int32_t hidden;
  int32_t inter;
  int32_t interleaved;   // gate_up_interleaved
  int32_t fused_geglu;   // GEMM1's epilogue writes act (d1 = act, row stride I); else d1 = h1
};

// Many-token router (prefill_router_kernels.cuh): rows kernel, the caller's GEMM, top-k kernel.
constexpr int kRouterRowsWarps = 8;           // tokens per block of the rows kernel
constexpr int kRouterTopkWarps = 8;           // tokens per block of the topk kernel
constexpr int kRouterTopkPerLane = 8;         // E <= 256 probabilities, 8 per lane
constexpr int kRouterPrefillMaxExperts = 32 * kRouterTopkPerLane;
constexpr int kRouterPrefillMaxTopK = 32;     // lane s keeps the s-th pick

struct RouterRowsParams {
  const void* h;          // [T, H], row stride h_row_stride
  int64_t h_row_stride;
  const void* scale;      // [H]
  void* r;                // [T, H] out, contiguous
  int64_t tokens;
  int32_t hidden;
  float eps;
  float input_scale;      // H^-0.5 as Python evaluates it, rounded to fp32
};

struct RouterTopkParams {
  const void* logits;           // [T, E] contiguous, dtype T
  const void* per_expert_scale; // [E], dtype T or fp32
  float* weights;               // [T, k] out
  int64_t* idx;                 // [T, k] out
  int64_t tokens;
  int32_t experts;
  int32_t top_k;
  bool per_expert_scale_fp32;
};

}  // namespace gemma4x::moe

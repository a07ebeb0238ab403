// Parameters of the MoE family (Gemma 4 routed GeGLU experts, spec §2.8). Pointers are device
// pointers; strides are in elements between consecutive rows (the last dimension is contiguous).
// Symbols: T tokens, H hidden, E experts, k top-k, I expert intermediate size, P = T*k pairs.
#pragma once

#include <cstdint>

namespace gemma4x::moe {

// Router: r = bf16(bf16(rms(h) * scale) * H^-0.5); logits = bf16(r @ W^T); p = softmax_fp32(logits);
// (w, idx) = topk(p, k); w = w / sum(w) * per_expert_scale[idx].
struct MoeRouterParams {
  const void* h;             // [T, H], row stride h_row_stride
  int64_t h_row_stride;
  const void* proj_weight;   // [E, H] contiguous, dtype of h
  const void* scale;         // [H], dtype of h
  const void* per_expert_scale;  // [E], dtype of h or float32 (per_expert_scale_fp32)
  float* weights;            // [T, k] out, fp32
  int64_t* idx;              // [T, k] out
  int64_t tokens;
  int32_t hidden;
  int32_t experts;
  int32_t top_k;
  float eps;
  float input_scale;         // H^-0.5 as Python evaluates it (double pow), rounded to fp32 as torch does
  bool per_expert_scale_fp32;
};

// Decode experts (P <= kMaxPairs): out[t] = sum_j w[t,j] * GeGLU_{idx[t,j]}(x_t), the fp32 sum over
// the k slots rounded once. `act` is a [P, I] workspace holding gelu_tanh(x G^T) * (x U^T).
struct MoeExpertsDecodeParams {
  const void* x;             // [T, H], row stride x_row_stride
  int64_t x_row_stride;
  const int64_t* idx;        // [T, k] contiguous; ids outside [0, E) contribute nothing
  const float* weights;      // [T, k] contiguous
  const void* gate_up;       // [E, 2I, H] contiguous: gate rows [0, I), up rows [I, 2I); or interleaved
  const void* down;          // [E, H, I] contiguous
  void* act;                 // [P, I] workspace
  void* out;                 // [T, H], row stride out_row_stride
  int64_t out_row_stride;
  int32_t tokens;
  int32_t top_k;
  int32_t experts;
  int32_t hidden;
  int32_t inter;
  // 1: gate_up rows interleaved in blocks of 8 (rows 16b..16b+7 = gate 8b..8b+7, rows 16b+8..16b+15
  // = up 8b..8b+7; gemma4x.ops.moe.interleave_gate_up), the layout the model layer keeps. The split
  // kernels read both layouts; the stream kernel reads only the HF one (kStream falls back to kSplit).
  int32_t gate_up_interleaved;
};

}  // namespace gemma4x::moe

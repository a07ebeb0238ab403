// Parameters of the NVFP4 family on any GPU (quantizer, dequantizer) and on SM90 (W4A16 decode
// GEMM and routed experts). Pointers are device pointers.
//
// W4A16 packed layout (python/gemma4x/reference/nvfp4_w4a16.py builds it, once at load): a weight
// [N, K] (N % 16 == 0, K % 64 == 0) is cut into 16-row x 64-column units, stored
// [N/16][K/64][576 bytes]: 512 bytes of e2m1 codes (lane l = 4g + t of a warp owns bytes
// 16l..16l+15: rows g and g+8 of the block, scale block t of the unit, in the order the mma
// A fragment wants them) followed by the 64 e4m3 block scales (bytes 2l, 2l+1: rows g, g+8,
// block t). Exactly 0.5625 bytes per weight, one contiguous 576-byte stream per unit.
#pragma once

#include <cstdint>

namespace gemma4x::nvfp4 {

constexpr int kUnitRows = 16;   // rows of one mma A tile
constexpr int kUnitK = 64;      // 4 scale blocks: one per lane quad column t
constexpr int kUnitBytes = 576; // 512 code bytes + 64 scale bytes
constexpr int kCodeBytes = 512;

// codes[r, k/2] (low nibble = even k), scales[r, k/16] e4m3 of w [rows, K] (row-major),
// ModelOpt's rounding bit for bit; global_scale[r / rows_per_scale] is the row's weight_scale_2.
struct QuantizeParams {
  const void* w;
  const float* global_scale;
  uint8_t* codes;
  uint8_t* scales;
  int64_t rows;
  int64_t rows_per_scale;
  int32_t k;
};

// out[r, k] = dtype(e2m1 * fp32(scale) * global_scale) from the packed W4A16 layout, for
// `batches` weights of [rows, K] each (experts). Packed row order: interleave8 = the rows of block
// b are gate rows 8b..8b+7 then up rows half+8b..; global scale index = batch * g_batch_stride +
// (interleave8 && up row ? 1 : 0).
struct DequantizeParams {
  const uint8_t* packed;
  const float* global_scale;
  void* out;
  int64_t batches;
  int32_t rows;
  int32_t k;
  int32_t g_batch_stride;
  bool interleave8;
};

// out[m, n] = bf16(g * sum_k x[m, k] * W[n, k]), W in the packed layout, M <= 64 tokens.
struct GemvParams {
  const uint8_t* packed;     // [N/16][K/64][576]
  const void* x;             // [M, K] bf16, row stride x_row_stride (elements)
  const float* global_scale; // [1]
  void* out;                 // [M, N] bf16, row stride out_row_stride
  int64_t x_row_stride;
  int64_t out_row_stride;
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t splits;            // CTAs per row block (a thread-block cluster), K split between them
};

// Routed GeGLU experts at decode (P = T*k <= 64 pairs), weights in the packed layout:
//   act[q, i] = bf16(bf16(gelu(bf16(x_t . G_e[i]))) * bf16(x_t . U_e[i]))   q = t*k + j, e = idx[q]
//   out[t, h] = bf16(sum_j w[q] * bf16(act_q . D_e[h]))
struct MoeDecodeParams {
  const void* x;                  // [T, H] bf16, row stride x_row_stride
  int64_t x_row_stride;
  const int64_t* idx;             // [T, k] contiguous
  const float* weights;           // [T, k] contiguous
  const uint8_t* gate_up;         // [E][2I/16][H/64][576], gate/up rows interleaved by 8
  const float* gate_up_scale_2;   // [E, 2] (gate, up)
  const uint8_t* down;            // [E][H/16][I/64][576]
  const float* down_scale_2;      // [E]
  void* act;                      // [P, I] bf16 workspace
  void* out;                      // [T, H] bf16, row stride out_row_stride
  int64_t out_row_stride;
  int32_t tokens;
  int32_t top_k;
  int32_t experts;
  int32_t hidden;
  int32_t inter;
};

}  // namespace gemma4x::nvfp4

namespace gemma4x::nvfp4 {

// Prefill W4A16 GEMM (w4a16_wgmma_sm90.cuh): out[m, n] = bf16(g * sum_k x[m, k] * W[n, k]), any M.
struct W4A16GemmParams {
  const uint8_t* packed;     // [N/16][K/64][576]
  const void* x;             // [M, K] bf16, row stride x_row_stride (elements, multiple of 8)
  const float* global_scale; // [1]
  void* out;                 // [M, N] bf16, row stride out_row_stride
  int64_t x_row_stride;
  int64_t out_row_stride;
  int32_t m;
  int32_t n;
  int32_t k;
  int32_t tile;              // 0 auto, 1 = 128x128, 2 = 128x256, 3 = 256x128 (weight rows x tokens)
};

// Routed GeGLU experts at prefill with packed NVFP4 weights (any T*k): the bf16 prefill path's
// count / scan / gather and finalize around two W4A16 grouped GEMMs (GEMM1 with GeGLU fused).
//   out[t, h] = bf16(sum_j w[t, j] * y[q, h]),  y[q] = bf16(act_q . D_e),
//   act[q, i] = bf16(bf16(gelu(bf16(x_t . G_e[i]))) * bf16(x_t . U_e[i]))     q = t*k + j, e = idx[q]
struct W4A16MoePrefillParams {
  const void* x;                  // [T, H] bf16, row stride x_row_stride
  int64_t x_row_stride;
  const int64_t* idx;             // [T, k] contiguous; ids outside [0, E) contribute nothing
  const float* weights;           // [T, k] contiguous
  const uint8_t* gate_up;         // [E][2I/16][H/64][576], gate/up rows interleaved by 8
  const float* gate_up_scale_2;   // [E, 2]
  const uint8_t* down;            // [E][H/16][I/64][576]
  const float* down_scale_2;      // [E]
  void* out;                      // [T, H] bf16, row stride out_row_stride
  int64_t out_row_stride;
  void* workspace;                // w4a16_moe_prefill_workspace_size bytes, 256-byte aligned
  size_t workspace_bytes;
  int32_t tokens;
  int32_t top_k;
  int32_t experts;
  int32_t hidden;
  int32_t inter;
  int32_t tile;                   // 0 auto, 1 = 128x128, 2 = 128x256, 3 = 256x128
};

}  // namespace gemma4x::nvfp4

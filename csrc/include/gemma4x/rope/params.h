// Parameters of the fused attention-input kernel: per-head RMSNorm of q, k, v and RoPE of q, k.
// Pointers are device pointers. Inputs are [tokens, heads, head_dim] with the heads of a token
// contiguous and `token_stride` elements between tokens (so q, k and v may be column slices of
// one fused projection output); outputs are contiguous [tokens, heads, head_dim].
#pragma once

#include <cstdint>

namespace gemma4x::rope {

// One of q, k, v: what to read, how to normalise it, whether to rotate it, where to write.
struct HeadTensor {
  const void* x;        // nullptr: this tensor is absent (KV-shared layers have no k and v)
  int64_t token_stride;  // elements between consecutive tokens
  int32_t heads;
  const void* weight;   // [head_dim] RMSNorm scale, or nullptr (v_norm has none)
  float eps;
  bool rotate;          // apply RoPE after the norm
  void* out;            // [tokens, heads, head_dim], contiguous
};

struct QkvNormRopeParams {
  HeadTensor t[3];      // q, k, v
  const void* cos;      // [tokens, head_dim], contiguous, in the activation dtype
  const void* sin;
  int64_t tokens;
  int32_t head_dim;
};

}  // namespace gemma4x::rope

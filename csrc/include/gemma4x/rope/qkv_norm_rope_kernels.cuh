// q, k, v of an attention layer in one launch: RMSNorm per head (with or without a scale), then
// NeoX RoPE (x*cos + rotate_half(x)*sin) on q and k, rounding to T wherever the PyTorch op
// chain it replaces materialises a T tensor (the norm's output, x*cos, rotate_half(x)*sin and
// their sum), so the result equals that chain's up to the order of the fp32 sum of squares.
//
// One warp owns one (token, head) row: lane l holds elements [l*VEC, (l+1)*VEC) with
// VEC = head_dim / 32. rotate_half pairs element i with i +- head_dim/2, i.e. lane l with lane
// l ^ 16, so the rotation is VEC shuffles and the whole row never leaves registers. At decode
// sizes the kernel is one memory round trip: every load (row, scale, cos, sin) is issued before
// the reduction.
#pragma once

#include "gemma4x/common/vec.cuh"
#include "gemma4x/rope/params.h"

namespace gemma4x::rope {

constexpr int kWarpsPerBlock = 4;

// A lane's VEC elements, moved in 16-byte pieces (or one smaller piece for small heads).
template <typename T, int VEC>
struct LaneRow {
  static constexpr int kPiece = (VEC * sizeof(T) > 16) ? 16 / sizeof(T) : VEC;
  static constexpr int kPieces = VEC / kPiece;
  Vec<T, kPiece> p[kPieces];

  __device__ __forceinline__ void load(const T* src) {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) p[i] = *reinterpret_cast<const Vec<T, kPiece>*>(src + i * kPiece);
  }
  __device__ __forceinline__ void store(T* dst) const {
#pragma unroll
    for (int i = 0; i < kPieces; ++i) *reinterpret_cast<Vec<T, kPiece>*>(dst + i * kPiece) = p[i];
  }
  __device__ __forceinline__ float f(int e) const { return Float<T>::load(p[e / kPiece].v[e % kPiece]); }
  __device__ __forceinline__ void set(int e, float v) { p[e / kPiece].v[e % kPiece] = Float<T>::store(v); }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) qkv_norm_rope_kernel(const __grid_constant__ QkvNormRopeParams p) {
  const int lane = threadIdx.x & 31;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  // Rows are numbered q's first, then k's, then v's; each tensor's rows are token-major.
  int which = 0;
#pragma unroll
  for (; which < 2; ++which) {
    const int64_t n = p.t[which].x != nullptr ? p.tokens * p.t[which].heads : 0;
    if (row < n) break;
    row -= n;
  }
  const HeadTensor& t = p.t[which];
  if (t.x == nullptr || row >= p.tokens * t.heads) return;
  const int64_t token = row / t.heads;
  const int head = static_cast<int>(row - token * t.heads);
  const int d = VEC * 32;
  const int col = lane * VEC;

  LaneRow<T, VEC> x, w, c, s;
  x.load(static_cast<const T*>(t.x) + token * t.token_stride + static_cast<int64_t>(head) * d + col);
  if (t.weight != nullptr) w.load(static_cast<const T*>(t.weight) + col);
  if (t.rotate) {
    c.load(static_cast<const T*>(p.cos) + token * d + col);
    s.load(static_cast<const T*>(p.sin) + token * d + col);
  }

  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < VEC; ++e) ss += x.f(e) * x.f(e);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  // rms_norm's own formula (norm/rms_norm_kernels.cuh: rsqrt of mean + eps, as PyTorch on CUDA).
  const float r = rsqrtf(ss * __frcp_rn(static_cast<float>(d)) + t.eps);
  float n[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) n[e] = round_to<T>(t.weight != nullptr ? (x.f(e) * r) * w.f(e) : x.f(e) * r);

  if (t.rotate) {
    // rotate_half: the first half takes -x[i + d/2], the second half x[i - d/2].
    const bool first_half = lane < 16;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float partner = __shfl_xor_sync(0xffffffffu, n[e], 16);
      const float rh = first_half ? -partner : partner;
      n[e] = round_to<T>(n[e] * c.f(e)) + round_to<T>(rh * s.f(e));
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) x.set(e, n[e]);
  x.store(static_cast<T*>(t.out) + (token * t.heads + head) * static_cast<int64_t>(d) + col);
}

}  // namespace gemma4x::rope

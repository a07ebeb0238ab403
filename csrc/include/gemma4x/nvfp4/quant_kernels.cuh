// NVFP4 quantizer and dequantizer, portable (any arch with fp8 conversions in cuda_fp8.h).
//
// Quantizer: one thread per 16-element block, ModelOpt's rounding bit for bit (see
// python/gemma4x/reference/quant.py): s = e4m3(clamp(amax/(6*g), 2^-9, 448)) (an all-zero block
// gets 1), code = e2m1_round(w / (s*g)) with ties to the even code. Every float operation is the
// correctly rounded IEEE one PyTorch performs (no fast-math, no contraction across the steps).
//
// Dequantizer: reads the W4A16 packed layout (params.h) and writes dtype(e2m1 * (s * g)), the
// product formed as the reference forms it, so the bf16 result equals
// reference.quant.nvfp4_dequantize(...).to(bf16) bit for bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "gemma4x/common/vec.cuh"
#include "gemma4x/nvfp4/params.h"

namespace gemma4x::nvfp4 {

constexpr int kQuantizeThreads = 256;
constexpr int kDequantizeThreads = 256;

__device__ __forceinline__ float e4m3_to_float(uint8_t b) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3);
  return __half2float(__half(h));
}

// Nearest e2m1 code of x (already divided by its scales): the number of rounding bounds strictly
// below |x|, plus one on the bounds whose tie goes up to the even code; sign bit for x < 0.
__device__ __forceinline__ uint32_t e2m1_encode(float x) {
  const float m = fabsf(x);
  uint32_t c = (m > 0.25f) + (m > 0.75f) + (m > 1.25f) + (m > 1.75f) + (m > 2.5f) + (m > 3.5f) + (m > 5.0f);
  c += (m == 0.75f) | (m == 1.75f) | (m == 3.5f);
  return c | (x < 0.f ? 8u : 0u);
}

__device__ __forceinline__ float e2m1_value(uint32_t code) {
  // magnitude index 0..7 -> 0, .5, 1, 1.5, 2, 3, 4, 6
  const uint32_t i = code & 7u;
  const float mag = i < 4 ? 0.5f * static_cast<float>(i) : static_cast<float>(1u << ((i >> 1) - 1)) * (i & 1 ? 1.5f : 1.f);
  return code & 8u ? -mag : mag;
}

template <typename T>
__device__ __forceinline__ void load16(const T* src, float (&v)[16]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 r = *reinterpret_cast<const float4*>(src + 4 * i);
      v[4 * i] = r.x;
      v[4 * i + 1] = r.y;
      v[4 * i + 2] = r.z;
      v[4 * i + 3] = r.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const Vec<T, 8> r = *reinterpret_cast<const Vec<T, 8>*>(src + 8 * i);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[8 * i + j] = Float<T>::load(r.v[j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kQuantizeThreads) nvfp4_quantize_kernel(const __grid_constant__ QuantizeParams p) {
  const int64_t blocks_per_row = p.k / 16;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kQuantizeThreads + threadIdx.x;
  if (b >= p.rows * blocks_per_row) return;
  const int64_t row = b / blocks_per_row;
  const float g = p.global_scale[row / p.rows_per_scale];
  float v[16];
  load16(static_cast<const T*>(p.w) + b * 16, v);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
  float s = __fdiv_rn(amax, __fmul_rn(6.f, g));
  if (s == 0.f) s = 1.f;
  s = fminf(fmaxf(s, 0x1p-9f), 448.f);
  const __nv_fp8_storage_t s8 = __nv_cvt_float_to_fp8(s, __NV_SATFINITE, __NV_E4M3);
  const float denom = __fmul_rn(e4m3_to_float(s8), g);
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) lo |= e2m1_encode(__fdiv_rn(v[i], denom)) << (4 * i);
#pragma unroll
  for (int i = 0; i < 8; ++i) hi |= e2m1_encode(__fdiv_rn(v[8 + i], denom)) << (4 * i);
  *reinterpret_cast<uint2*>(p.codes + b * 8) = make_uint2(lo, hi);
  p.scales[b] = s8;
}

// One thread per (batch, row block, unit, lane): 16 codes of rows g and g+8 each.
template <typename T>
__global__ void __launch_bounds__(kDequantizeThreads) nvfp4_dequantize_kernel(const __grid_constant__ DequantizeParams p) {
  const int units = p.k / kUnitK;
  const int row_blocks = p.rows / kUnitRows;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kDequantizeThreads + threadIdx.x;
  const int64_t total = p.batches * row_blocks * units * 32;
  if (tid >= total) return;
  const int lane = static_cast<int>(tid & 31);
  const int64_t unit_index = tid >> 5;  // (batch, rb, u)
  const int u = static_cast<int>(unit_index % units);
  const int64_t brb = unit_index / units;
  const int rb = static_cast<int>(brb % row_blocks);
  const int64_t batch = brb / row_blocks;
  const uint8_t* unit = p.packed + unit_index * kUnitBytes;
  const uint4 q = *reinterpret_cast<const uint4*>(unit + 16 * lane);
  const uint16_t sc = *reinterpret_cast<const uint16_t*>(unit + kCodeBytes + 2 * lane);
  const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = p.interleave8 ? (h == 0 ? 8 * rb + g : p.rows / 2 + 8 * rb + g) : kUnitRows * rb + 8 * h + g;
    const float gs = p.global_scale[batch * p.g_batch_stride + (p.interleave8 ? h : 0)];
    const float sg = __fmul_rn(e4m3_to_float(static_cast<uint8_t>(sc >> (8 * h))), gs);
    float v[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int w = k >> 3, pr = (k & 7) >> 1, lohi = k & 1;
      const uint32_t code = (qw[2 * h + w] >> (12 - 4 * pr + 16 * lohi)) & 0xFu;
      v[k] = __fmul_rn(e2m1_value(code), sg);
    }
    T* dst = static_cast<T*>(p.out) + (batch * p.rows + row) * static_cast<int64_t>(p.k) + u * kUnitK + 16 * t;
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        *reinterpret_cast<float4*>(dst + 4 * i) = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    } else {
      Vec<T, 8> a, b;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        a.v[i] = Float<T>::store(v[i]);
        b.v[i] = Float<T>::store(v[8 + i]);
      }
      *reinterpret_cast<Vec<T, 8>*>(dst) = a;
      *reinterpret_cast<Vec<T, 8>*>(dst + 8) = b;
    }
  }
}

}  // namespace gemma4x::nvfp4

// Arithmetic on bf16 pairs packed in one 32-bit register (the layout of __nv_bfloat162 and of the
// mma / wgmma A-fragment registers), for kernels that build operands in registers.
#pragma once

#include <cstdint>

namespace gemma4x {

// {a.lo * b.lo, a.hi * b.hi}, each rounded to nearest even (one HMUL2.BF16).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

}  // namespace gemma4x

// Hopper (sm_90a) warpgroup primitives shared by the warp-specialised kernels (attention/,
// nvfp4/w4a16_wgmma_sm90.cuh): warpgroup MMA (wgmma.mma_async) and its fences, shared-memory matrix
// descriptors, register reallocation between warpgroups (setmaxnreg) and named barriers.
//
// Accumulators are float acc[n / 8][4] per thread: fragment r of n8 tile j is acc[j][r], the
// mma.sync m16n8 C layout per warp (r = 0, 1 row lane/4, r = 2, 3 row lane/4 + 8; columns
// 8j + 2(lane%4) + {0, 1}), which is the register order of a wgmma m64nN fp32 accumulator.
// A operands from registers are the m16k16 mma.sync A fragment of the warp's 16 rows.
#pragma once

#include <cstdint>

namespace gemma4x {

// ---- shared-memory matrix descriptor ----
// 128B swizzle: start >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride byte offset >> 4
// in 32-45, layout type 1 (SWIZZLE_128B) in bits 62-63. Regions are 1024-byte aligned, so the base
// offset is 0.
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

// ---- issue / completion ----
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pins accumulator registers at this point of the program: reads after a wgmma.wait_group and
// writes before a wgmma issue cannot be moved across it by the compiler.
template <int kN>
__device__ __forceinline__ void fence_acc(float (*a)[4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(a[j][r])::"memory");
}

// ---- warp specialisation ----
// A producer warpgroup gives registers away (dec), the consumer warpgroups take them (inc); the
// counts are per thread and every warp of the warpgroup must execute the instruction.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// Named barriers (id 0 is __syncthreads): `threads` (a multiple of 32) arrive; sync also waits.
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- wgmma.mma_async, fp32 accumulators, bf16 (kBf16) or fp16 inputs ----
// Operand lists: G4X_ACC<n>(a) the n fp32 accumulator registers of acc[0 .. n/4), G4X_D<n> the
// matching "{%0, ..., %n-1}" of the instruction.
#define G4X_ACC16(a)                                                                                           \
  "+f"(a[0][0]), "+f"(a[0][1]), "+f"(a[0][2]), "+f"(a[0][3]), "+f"(a[1][0]), "+f"(a[1][1]), "+f"(a[1][2]),   \
      "+f"(a[1][3]), "+f"(a[2][0]), "+f"(a[2][1]), "+f"(a[2][2]), "+f"(a[2][3]), "+f"(a[3][0]), "+f"(a[3][1]), \
      "+f"(a[3][2]), "+f"(a[3][3])
#define G4X_ACC32(a) G4X_ACC16(a), G4X_ACC16((a + 4))
#define G4X_ACC36(a) G4X_ACC32(a), "+f"(a[8][0]), "+f"(a[8][1]), "+f"(a[8][2]), "+f"(a[8][3])
#define G4X_ACC64(a) G4X_ACC32(a), G4X_ACC32((a + 8))
#define G4X_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define G4X_D32                                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define G4X_D36                                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35}"
#define G4X_D64                                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "   \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// One wgmma.mma_async: "{ setp p = (SCALE_D != 0); wgmma.mma_async.<SHAPE>.f32.<ab>.<ab> D, OPS, p, ... }"
// with ab = bf16 (kBf16) or f16; OUTS the accumulator operands, the rest the inputs.
#define G4X_WGMMA(kBf16, SHAPE, D, OPS, SCALE_D, OUTS, ...)                                                       \
  if constexpr (kBf16) {                                                                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\nwgmma.mma_async.sync.aligned." SHAPE         \
                 ".f32.bf16.bf16 " D ", " OPS ";\n}\n"                                                           \
                 : OUTS                                                                                           \
                 : __VA_ARGS__);                                                                                  \
  } else {                                                                                                        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\nwgmma.mma_async.sync.aligned." SHAPE         \
                 ".f32.f16.f16 " D ", " OPS ";\n}\n"                                                             \
                 : OUTS                                                                                           \
                 : __VA_ARGS__);                                                                                  \
  }

// Naming: wgmma_<ss|rs>_64x<n>[_tb]. ss: A and B from shared memory (descriptors), rs: A from
// registers; both K-major unless _tb (B MN-major, "transposed"), which always accumulates.
// `accumulate` = 0 overwrites acc (the first k16 step of a chain).

// acc[64 x 32] (+)= A (smem, K-major) * B (smem, K-major), one k16 step.
template <bool kBf16>
__device__ __forceinline__ void wgmma_ss_64x32(float (*acc)[4], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  G4X_WGMMA(kBf16, "m64n32k16", G4X_D16, "%16, %17, p, 1, 1, 0, 0", "%18", G4X_ACC16(acc), "l"(da), "l"(db),
            "r"(accumulate));
#endif
}

// acc[64 x 32] (+)= A (registers) * B (smem, K-major).
template <bool kBf16>
__device__ __forceinline__ void wgmma_rs_64x32(float (*acc)[4], const uint32_t (&a)[4], uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  G4X_WGMMA(kBf16, "m64n32k16", G4X_D16, "{%16, %17, %18, %19}, %20, p, 1, 1, 0", "%21", G4X_ACC16(acc), "r"(a[0]),
            "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
#endif
}

// acc[64 x 64] (+)= A (smem, K-major) * B (smem, K-major), one k16 step.
template <bool kBf16>
__device__ __forceinline__ void wgmma_ss_64x64(float (*acc)[4], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  G4X_WGMMA(kBf16, "m64n64k16", G4X_D32, "%32, %33, p, 1, 1, 0, 0", "%34", G4X_ACC32(acc), "l"(da), "l"(db),
            "r"(accumulate));
#endif
}

// acc[64 x 64] += A (registers) * B (smem, MN-major).
template <bool kBf16>
__device__ __forceinline__ void wgmma_rs_64x64_tb(float (*acc)[4], const uint32_t (&a)[4], uint64_t db) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  G4X_WGMMA(kBf16, "m64n64k16", G4X_D32, "{%32, %33, %34, %35}, %36, p, 1, 1, 1", "1", G4X_ACC32(acc), "r"(a[0]),
            "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#endif
}

// acc[64 x 72] += A (registers) * B (smem, MN-major).
template <bool kBf16>
__device__ __forceinline__ void wgmma_rs_64x72_tb(float (*acc)[4], const uint32_t (&a)[4], uint64_t db) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  G4X_WGMMA(kBf16, "m64n72k16", G4X_D36, "{%36, %37, %38, %39}, %40, p, 1, 1, 1", "1", G4X_ACC36(acc), "r"(a[0]),
            "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#endif
}

// acc[64 x 128] (+)= A (smem, K-major) * B (smem, K-major), one k16 step.
template <bool kBf16>
__device__ __forceinline__ void wgmma_ss_64x128(float (*acc)[4], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  G4X_WGMMA(kBf16, "m64n128k16", G4X_D64, "%64, %65, p, 1, 1, 0, 0", "%66", G4X_ACC64(acc), "l"(da), "l"(db),
            "r"(accumulate));
#endif
}

// acc[64 x 128] (+)= A (registers) * B (smem, K-major).
template <bool kBf16>
__device__ __forceinline__ void wgmma_rs_64x128(float (*acc)[4], const uint32_t (&a)[4], uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  G4X_WGMMA(kBf16, "m64n128k16", G4X_D64, "{%64, %65, %66, %67}, %68, p, 1, 1, 0", "%69", G4X_ACC64(acc), "r"(a[0]),
            "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
#endif
}

}  // namespace gemma4x

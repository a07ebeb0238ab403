#include <cmath>
#include <string>
#include <type_traits>

#include "attention.h"
#include "gemma4x/attention/attention_varlen_sm90.cuh"
#include "gemma4x/common/check.h"

namespace gemma4x::attention {
namespace {

constexpr const char* kOp = "attention_varlen";

// Tile shapes (rows x keys x d per CTA), one per head dim Gemma 4 uses; `variant` bit 0 picks
// wgmma (else mma.sync), bit 1 the 64-row tile (several CTAs per SM instead of one large CTA).
//  d 512: 64 query rows, two warpgroups each owning half of d (kDSplit 2). Q, K, V tiles are
//         64 KB each (192 KB) + 32 KB of partial-S exchange: the whole 227 KB, one CTA per SM.
//  d 256: 128 query rows, two warpgroups of 64 rows, 128 KB of tiles, one CTA per SM (O is 128
//         fp32 registers per thread); or 64 rows, one warpgroup, 96 KB, two CTAs per SM, whose
//         barriers and softmax then overlap the other CTA's MMAs.
//  d 64 / 72 (vision): 128 (2 CTAs per SM) or 64 rows (3 per SM), d padded to 64 / 80 inside
//         the kernel; 33-39 KB per CTA.
template <typename T, bool W>
using Cfg512 = AttnConfig<T, 512, 64, 2, W, 1>;
template <typename T, bool W, bool S>
using Cfg256 = std::conditional_t<S, AttnConfig<T, 256, 64, 1, W, 2>, AttnConfig<T, 256, 128, 1, W, 1>>;
template <typename T, bool W, bool S>
using Cfg64 = std::conditional_t<S, AttnConfig<T, 64, 64, 1, W, 3>, AttnConfig<T, 64, 128, 1, W, 2>>;
template <typename T, bool S>
using Cfg80 = std::conditional_t<S, AttnConfig<T, 80, 64, 1, false, 3>, AttnConfig<T, 80, 128, 1, false, 2>>;

constexpr int kVariantWgmma = 1, kVariantSmallTile = 2, kVariantFa3 = 4, kVariantWide = 8;

bool is_fa3(int head_dim, int variant) { return (variant & kVariantFa3) && (head_dim == 256 || head_dim == 512); }
// Head dims 64/72 with bit 2: the small-head-dim FA3 kernel (attention_varlen_fa3_small_sm90.cu).
bool is_fa3_small(int head_dim, int variant) { return (variant & kVariantFa3) && (head_dim == 64 || head_dim == 72); }

template <class Cfg>
void launch(const AttentionVarlenParams& p, cudaStream_t stream) {
  auto kernel = attention_varlen_kernel<Cfg>;
  static bool configured = false;  // the attribute is per function; set it once
  if (!configured) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
               "cudaFuncSetAttribute(attention_varlen)");
    configured = true;
  }
  const dim3 grid(p.num_heads, p.tiles_bound);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  check_launch("attention_varlen_kernel");
}

// Calls f(Cfg{}) with the config of (head_dim, variant); false if head_dim is unsupported.
template <typename T, typename F>
bool with_config(int head_dim, int variant, F&& f) {
  const bool w = variant & kVariantWgmma, s = variant & kVariantSmallTile;
  switch (head_dim) {
    case 512: w ? f(Cfg512<T, true>{}) : f(Cfg512<T, false>{}); return true;
    case 256:
      if (w) { s ? f(Cfg256<T, true, true>{}) : f(Cfg256<T, true, false>{}); }
      else { s ? f(Cfg256<T, false, true>{}) : f(Cfg256<T, false, false>{}); }
      return true;
    case 64:
      if (w) { s ? f(Cfg64<T, true, true>{}) : f(Cfg64<T, true, false>{}); }
      else { s ? f(Cfg64<T, false, true>{}) : f(Cfg64<T, false, false>{}); }
      return true;
    case 72: s ? f(Cfg80<T, true>{}) : f(Cfg80<T, false>{}); return true;
    default: return false;
  }
}

void check_device() {
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0) {
    throw std::runtime_error(std::string(kOp) + ": the prefill attention kernel is built for sm_90a and needs a " +
                             "compute capability 9.0 GPU (H100/H200); device " + std::to_string(dev) + " is " +
                             std::to_string(major) + "." + std::to_string(minor));
  }
}

void check_pointer(const char* name, const void* ptr, size_t alignment) {
  GEMMA4X_CHECK_ARG(ptr != nullptr, kOp, ": ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(is_aligned(ptr, alignment), kOp, ": ", name, " must be ", alignment, "-byte aligned, got address ",
                    reinterpret_cast<uintptr_t>(ptr));
}

void check_stride(const char* name, int64_t stride) {
  GEMMA4X_CHECK_ARG(stride >= 0 && stride % 8 == 0, kOp, ": ", name,
                    " must be a non-negative multiple of 8 elements (16-byte rows), got ", stride);
}

}  // namespace

int attention_varlen_block_m(int head_dim, int variant) {
  if (is_fa3(head_dim, variant)) return attention_varlen_fa3_block_m(head_dim, variant);
  if (is_fa3_small(head_dim, variant)) return attention_varlen_fa3_small_block_m(head_dim, variant);
  variant &= ~(kVariantFa3 | kVariantWide);
  int block_m = 0;
  with_config<__nv_bfloat16>(head_dim, variant, [&](auto cfg) { block_m = decltype(cfg)::kBlockM; });
  return block_m;
}

void attention_varlen(AttentionVarlenParams p, DType dtype, float scale, int variant, cudaStream_t stream) {
  GEMMA4X_CHECK_ARG(dtype == DType::kBFloat16 || dtype == DType::kFloat16, kOp,
                    ": dtype must be bfloat16 or float16, got ", dtype_name(dtype));
  GEMMA4X_CHECK_ARG(variant >= 0 && variant <= 15, kOp, ": variant must be in [0, 15], got ", variant);
  const int block_m = attention_varlen_block_m(p.head_dim, variant);
  GEMMA4X_CHECK_ARG(block_m > 0, kOp, ": head_dim must be 64, 72, 256 or 512, got ", p.head_dim);
  GEMMA4X_CHECK_ARG(p.block_m == block_m, kOp, ": tile_cum was built for ", p.block_m, "-row tiles, the kernel uses ",
                    block_m);
  GEMMA4X_CHECK_ARG(p.batch >= 1, kOp, ": batch must be >= 1, got ", p.batch);
  GEMMA4X_CHECK_ARG(p.num_kv_heads >= 1 && p.num_heads >= 1 && p.num_heads % p.num_kv_heads == 0, kOp,
                    ": num_heads (", p.num_heads, ") must be a positive multiple of num_kv_heads (", p.num_kv_heads,
                    ")");
  GEMMA4X_CHECK_ARG(p.total_q >= 0 && p.total_k >= 0, kOp, ": token counts must be >= 0");
  GEMMA4X_CHECK_ARG(p.tiles_bound >= 0 && p.tiles_bound <= 65535, kOp, ": ", p.tiles_bound,
                    " query tiles exceed the grid limit 65535");
  GEMMA4X_CHECK_ARG(p.window_left >= kNoWindow && p.window_right >= kNoWindow, kOp,
                    ": windows must be >= 0 or -1 (unbounded), got ", p.window_left, ", ", p.window_right);
  GEMMA4X_CHECK_ARG(std::isfinite(scale) && scale > 0.f, kOp, ": scale must be a finite float > 0, got ", scale);
  GEMMA4X_CHECK_ARG((p.q_block == nullptr) == (p.k_block == nullptr) &&
                        (p.q_block == nullptr) == (p.kb_min == nullptr) &&
                        (p.q_block == nullptr) == (p.kb_max == nullptr),
                    kOp, ": q_block, k_block, kb_min and kb_max must be given together");
  if (p.total_q == 0 || p.tiles_bound == 0) return;
  check_pointer("q", p.q, 16);
  check_pointer("k", p.k, 16);
  check_pointer("v", p.v, 16);
  check_pointer("out", p.out, 16);
  check_pointer("cu_seqlens_q", p.cu_q, 4);
  check_pointer("cu_seqlens_k", p.cu_k, 4);
  check_pointer("tile_cum", p.tile_cum, 4);
  for (auto [name, s] : {std::pair{"q row stride", p.q_row_stride}, {"q head stride", p.q_head_stride},
                         {"k row stride", p.k_row_stride}, {"k head stride", p.k_head_stride},
                         {"v row stride", p.v_row_stride}, {"v head stride", p.v_head_stride},
                         {"out row stride", p.o_row_stride}, {"out head stride", p.o_head_stride}})
    check_stride(name, s);
  check_device();
  p.scale_log2 = scale * 1.4426950408889634f;
  if (is_fa3(p.head_dim, variant)) {
    attention_varlen_fa3(p, dtype, variant, stream);
    return;
  }
  if (is_fa3_small(p.head_dim, variant)) {
    attention_varlen_fa3_small(p, dtype, variant, stream);
    return;
  }
  variant &= ~(kVariantFa3 | kVariantWide);
  auto run = [&](auto cfg) { launch<decltype(cfg)>(p, stream); };
  if (dtype == DType::kBFloat16) {
    with_config<__nv_bfloat16>(p.head_dim, variant, run);
  } else {
    with_config<__half>(p.head_dim, variant, run);
  }
}

}  // namespace gemma4x::attention

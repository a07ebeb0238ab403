// Host launcher of the FlashAttention-3-structured prefill / vision kernel at head dims 64 and 72
// (attention_varlen_fa3_small_sm90.cuh): builds the TMA tensor maps of q, k, v over the real head
// dim (72 is padded by the TMA unit's out-of-bounds zero fill, in shared memory only) and launches.
// attention_varlen() has validated p already.
#include <string>

#include "attention.h"
#include "gemma4x/attention/attention_varlen_fa3_small_sm90.cuh"
#include "gemma4x/common/check.h"

namespace gemma4x::attention {
namespace {

constexpr const char* kOp = "attention_varlen (fa3, head dim 64/72)";

// Tile shapes, one CTA per SM, 128-key K/V stages, 2 stages (d 72: 2 regions of 128-byte rows per
// tile, Q 32 KB + 2 x (K 32 + V 32) KB = 160 KB at 128 rows). Variant bits 0, 1, 3 (bit 2 is set):
//  4 ("fa3"):       128 query rows, 2 consumers taking turns at their MMAs, Q in registers (RS
//                   wgmma for S). ptxas moves the wait for P(n) V(n) above the softmax of S(n+1).
//  6 ("fa3_alt"):   the same, the consumers running free.
//  5 ("fa3_ovl"):   "fa3" with Q read from shared memory (SS) and the softmax of S(n+1) kept
//                   overlapping P(n) V(n) (kSplitWait); measured no faster (bench/RESULTS.md).
//  12 ("fa3_m192"): 192 query rows, 3 consumers of 160 registers running free, Q in shared memory.
// Other values pick "fa3" (bits 0 and 1 both set) or "fa3_m192" (bit 3 set).
template <typename T, int D>
using SmallCfg = Fa3SmallConfig<T, D, 2, 2, true, true, false>;
template <typename T, int D>
using SmallCfgAlt = Fa3SmallConfig<T, D, 2, 2, false, true, false>;
template <typename T, int D>
using SmallCfgOvl = Fa3SmallConfig<T, D, 2, 2, true, false, true>;
template <typename T, int D>
using SmallCfg192 = Fa3SmallConfig<T, D, 2, 3, false, false, false>;

template <class Cfg>
void launch(const AttentionVarlenParams& p, cudaStream_t stream) {
  constexpr bool kBf16 = MmaType<typename Cfg::Element>::kBf16;
  const CUtensorMap tq = make_attention_tensor_map("q", p.q, kBf16, p.head_dim, p.num_heads, p.total_q,
                                                   p.q_row_stride, p.q_head_stride, Cfg::kBlockM);
  const CUtensorMap tk = make_attention_tensor_map("k", p.k, kBf16, p.head_dim, p.num_kv_heads, p.total_k,
                                                   p.k_row_stride, p.k_head_stride, Cfg::kBlockN);
  const CUtensorMap tv = make_attention_tensor_map("v", p.v, kBf16, p.head_dim, p.num_kv_heads, p.total_k,
                                                   p.v_row_stride, p.v_head_stride, Cfg::kBlockN);
  auto kernel = attention_varlen_fa3_small_kernel<Cfg>;
  static bool configured = false;  // the attribute is per function; set it once
  if (!configured) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
               "cudaFuncSetAttribute(attention_varlen_fa3_small)");
    configured = true;
  }
  const dim3 grid(p.num_heads, p.tiles_bound);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, tq, tk, tv);
  check_launch("attention_varlen_fa3_small_kernel");
}

template <typename T, int D, typename F>
void with_d(int variant, F&& f) {
  if (variant & 8) {
    f(SmallCfg192<T, D>{});
  } else if ((variant & 3) == 1) {
    f(SmallCfgOvl<T, D>{});
  } else if ((variant & 3) == 2) {
    f(SmallCfgAlt<T, D>{});
  } else {
    f(SmallCfg<T, D>{});
  }
}

template <typename T, typename F>
bool with_small_config(int head_dim, int variant, F&& f) {
  switch (head_dim) {
    case 64: with_d<T, 64>(variant, f); return true;
    case 72: with_d<T, 72>(variant, f); return true;
    default: return false;
  }
}

}  // namespace

int attention_varlen_fa3_small_block_m(int head_dim, int variant) {
  int block_m = 0;
  with_small_config<__nv_bfloat16>(head_dim, variant, [&](auto cfg) { block_m = decltype(cfg)::kBlockM; });
  return block_m;
}

void attention_varlen_fa3_small(const AttentionVarlenParams& p, DType dtype, int variant, cudaStream_t stream) {
  auto run = [&](auto cfg) { launch<decltype(cfg)>(p, stream); };
  const bool ok = dtype == DType::kBFloat16 ? with_small_config<__nv_bfloat16>(p.head_dim, variant, run)
                                            : with_small_config<__half>(p.head_dim, variant, run);
  GEMMA4X_CHECK_ARG(ok, kOp, ": head_dim must be 64 or 72, got ", p.head_dim);
}

}  // namespace gemma4x::attention

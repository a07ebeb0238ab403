// Host launcher of the FlashAttention-3-structured prefill / vision kernel at head dims 64 and 72
// (attention_varlen_fa3_small_sm90.cuh): builds the TMA tensor maps of q, k, v over the real head
// dim (72 is padded by the TMA unit's out-of-bounds zero fill, in shared memory only) and launches.
// attention_varlen() has validated p already.
#include "attention.h"
#include "fa3_launch.cuh"
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

struct Fa3SmallFamily {
  static constexpr const char* kName = "attention_varlen_fa3_small_kernel";
  template <class Cfg>
  static constexpr auto kernel = attention_varlen_fa3_small_kernel<Cfg>;

  template <typename T, int D, typename F>
  static void with_d(int variant, F&& f) {
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
  static bool with_config(int head_dim, int variant, F&& f) {
    switch (head_dim) {
      case 64: with_d<T, 64>(variant, f); return true;
      case 72: with_d<T, 72>(variant, f); return true;
      default: return false;
    }
  }
};

}  // namespace

int attention_varlen_fa3_small_block_m(int head_dim, int variant) {
  return fa3_block_m<Fa3SmallFamily>(head_dim, variant);
}

void attention_varlen_fa3_small(const AttentionVarlenParams& p, DType dtype, int variant, cudaStream_t stream) {
  GEMMA4X_CHECK_ARG(fa3_launch<Fa3SmallFamily>(p, dtype, variant, stream), kOp, ": head_dim must be 64 or 72, got ",
                    p.head_dim);
}

}  // namespace gemma4x::attention

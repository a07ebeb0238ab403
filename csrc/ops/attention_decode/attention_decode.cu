#include "attention_decode.h"

#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "gemma4x/attention_decode/decode_kernels.cuh"
#include "gemma4x/common/check.h"

namespace gemma4x::attention_decode {
namespace {

int num_sms() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms;
}

// Opts the kernel into its dynamic shared memory (once per instantiation) and returns how many
// of its CTAs fit one SM.
template <typename T, int D>
int prepare() {
  static const int ctas_per_sm = [] {
    const auto kernel = decode_attention_kernel<T, D>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<D>::kSmemBytes),
               "decode_attention: cudaFuncSetAttribute");
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, Tile<D>::kSmemBytes),
               "decode_attention: occupancy");
    return n > 0 ? n : 1;
  }();
  return ctas_per_sm;
}

// GEMMA4X_ATTN_PDL=0 launches without programmatic dependent launch (benchmarks compare).
bool use_pdl() {
  static const bool v = [] {
    const char* env = std::getenv("GEMMA4X_ATTN_PDL");
    return env == nullptr || std::atoi(env) != 0;
  }();
  return v;
}

// Launch on `stream`, allowed to start while the previous kernel finishes: the kernels call
// grid_dependency_wait() before reading anything.
template <typename Kernel>
void launch(Kernel kernel, dim3 grid, unsigned threads, size_t smem, cudaStream_t stream, const DecodeParams& p,
            const char* name) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = use_pdl() ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, p), name);
}

template <typename Fn>
auto with_head_dim(int head_dim, Fn&& fn) {
  switch (head_dim) {
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    case 256: return fn(std::integral_constant<int, 256>{});
    case 512: return fn(std::integral_constant<int, 512>{});
  }
  fail_argument("decode_attention: head_dim ", head_dim, " is not supported (expected 64, 128, 256 or 512)");
}

template <typename Fn>
auto with_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat16: return fn(__half{});
    default: break;
  }
  fail_argument("decode_attention: dtype ", dtype_name(dtype), " is not supported (expected bfloat16 or float16)");
}

struct Tuning {
  int variant = 0;
  int splits = 0;
};
Tuning& tuning() {
  static Tuning t = [] {
    Tuning init;
    const char* env = std::getenv("GEMMA4X_ATTN_DECODE_VARIANT");
    const int v = env != nullptr ? std::atoi(env) : 0;
    init.variant = v >= 0 && v < kNumVariants ? v : 0;
    return init;
  }();
  return t;
}

}  // namespace

void set_tuning(int variant, int splits) {
  GEMMA4X_CHECK_ARG(variant >= 0 && variant < kNumVariants, "decode_attention: variant ", variant, " is not in [0, ",
                    kNumVariants, ")");
  GEMMA4X_CHECK_ARG(splits >= 0 && splits <= kMaxSplits, "decode_attention: splits ", splits, " is not in [0, ",
                    kMaxSplits, "]");
  tuning().variant = variant;
  tuning().splits = splits;
}
int tuning_variant() { return tuning().variant; }
int tuning_splits() { return tuning().splits; }

int num_splits(int batch, int tq, int num_heads, int num_kv_heads, int head_dim, int max_rows, DType dtype) {
  GEMMA4X_CHECK_ARG(batch >= 1 && tq >= 1 && num_kv_heads >= 1 && num_heads % num_kv_heads == 0,
                    "decode_attention: bad shape batch=", batch, " tq=", tq, " heads=", num_heads, "/", num_kv_heads);
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    return with_head_dim(head_dim, [&](auto d) {
      constexpr int D = decltype(d)::value;
      const int row_groups = (tq * (num_heads / num_kv_heads) + kM - 1) / kM;
      const long base = static_cast<long>(batch) * num_kv_heads * row_groups;
      const int max_tiles = (max_rows + Tile<D>::kN - 1) / Tile<D>::kN;
      // Fill whole waves of CTA slots (equal-length sequences give equal CTAs): the fewest
      // waves, up to 4, that keep >= 90% of the slots busy in the last one. Never more splits
      // than tiles (an idle split still costs a launch slot).
      const long slots = static_cast<long>(num_sms()) * prepare<T, D>();
      long splits = 0;
      for (int waves = 1; waves <= 4 && splits == 0; ++waves) {
        const long s = waves * slots / base;
        if (s >= 1 && 10 * base * s >= 9L * waves * slots) splits = s;
      }
      if (splits == 0) splits = (2 * slots + base - 1) / base;
      if (tuning().splits > 0) splits = tuning().splits;
      if (splits > max_tiles) splits = max_tiles;
      if (splits > kMaxSplits) splits = kMaxSplits;
      if (!(tuning().variant & kVariantNoSplitRounding) && splits > 1) {
        // The kernel gives each split ceil(tiles / splits) tiles, so with `splits` that do not
        // divide the tiles the last ones get none (66 splits of 256 tiles: 64 of 4, 2 empty).
        // An empty split still takes a CTA slot and a partial for the combine to read.
        const long per = (max_tiles + splits - 1) / splits;
        splits = (max_tiles + per - 1) / per;
      }
      return static_cast<int>(splits < 1 ? 1 : splits);
    });
  });
}

void decode_attention(const DecodeParams& p, DType dtype, cudaStream_t stream) {
  GEMMA4X_CHECK_ARG(p.num_kv_heads >= 1 && p.num_heads % p.num_kv_heads == 0, "decode_attention: ", p.num_heads,
                    " query heads are not a multiple of ", p.num_kv_heads, " KV heads");
  GEMMA4X_CHECK_ARG(p.batch >= 1 && p.tq >= 1 && p.rows >= 1 && p.num_slots >= 1 && p.num_splits >= 1,
                    "decode_attention: empty shape (batch ", p.batch, ", tq ", p.tq, ", rows ", p.rows, ", slots ",
                    p.num_slots, ", splits ", p.num_splits, ")");
  GEMMA4X_CHECK_ARG(p.batch <= 65535, "decode_attention: batch ", p.batch, " > 65535");
  const int g = p.num_heads / p.num_kv_heads;
  GEMMA4X_CHECK_ARG(p.row_groups == (p.tq * g + kM - 1) / kM, "decode_attention: row_groups ", p.row_groups,
                    ", expected ", (p.tq * g + kM - 1) / kM);
  GEMMA4X_CHECK_ARG(static_cast<long>(p.num_kv_heads) * p.row_groups <= 65535, "decode_attention: too many heads");
  for (const void* ptr : std::initializer_list<const void*>{p.q, p.k, p.v, p.out}) {
    GEMMA4X_CHECK_ARG(is_aligned(ptr, 16), "decode_attention: q, k, v and out must be 16-byte aligned");
  }
  for (int64_t s : std::initializer_list<int64_t>{p.q_stride_b, p.q_stride_t, p.q_stride_h, p.k_stride_slot, p.k_stride_row, p.k_stride_head,
                    p.v_stride_slot, p.v_stride_row, p.v_stride_head}) {
    GEMMA4X_CHECK_ARG(s % 8 == 0, "decode_attention: q, k and v strides must be multiples of 8 elements, got ", s);
  }
  GEMMA4X_CHECK_ARG(p.num_splits <= kMaxSplits, "decode_attention: ", p.num_splits, " splits > ", kMaxSplits);
  GEMMA4X_CHECK_ARG(p.num_splits == 1 || (p.o_part != nullptr && p.lse_part != nullptr),
                    "decode_attention: ", p.num_splits, " splits need o_part and lse_part");
  with_type(dtype, [&](auto t) {
    using T = decltype(t);
    with_head_dim(p.head_dim, [&](auto d) {
      constexpr int D = decltype(d)::value;
      const int variant = tuning().variant;
      DecodeParams q = p;
      q.flags = (variant & kVariantNoEarlyTrigger) ? 0 : kFlagCombineTriggersEarly;
      const dim3 grid(q.num_splits, q.num_kv_heads * q.row_groups, q.batch);
      prepare<T, D>();
      launch(decode_attention_kernel<T, D>, grid, kThreads, Tile<D>::kSmemBytes, stream, q, "decode_attention_kernel");
      if (q.num_splits > 1 && !(variant & kVariantSkipCombine)) {
        const unsigned rows = static_cast<unsigned>(q.batch) * q.tq * q.num_heads;
        // The wide combine spreads a row over D / 64 CTAs with all its loads in flight: the
        // faster merge of many splits at batch 1 (-2.5 to -3 us at 8k), but at batch 32 its
        // 4096 small CTAs cost more than they save (26B, 2 splits: 45.6 -> 60.7 us at 1k).
        const long wide_ctas = static_cast<long>(rows) * (D / (4 * kWideCols4));
        const bool wide = (variant & kVariantWideCombine) ||
                          (!(variant & kVariantOldCombine) && wide_ctas <= 4L * num_sms());
        if (wide) {
          launch(decode_combine_wide_kernel<T, D>, dim3(rows, D / (4 * kWideCols4)), kWideThreads, 0, stream, q,
                 "decode_combine_wide_kernel");
        } else {
          launch(decode_combine_kernel<T, D>, dim3(rows), kCombineThreads, 0, stream, q, "decode_combine_kernel");
        }
      }
      return 0;
    });
    return 0;
  });
}

}  // namespace gemma4x::attention_decode

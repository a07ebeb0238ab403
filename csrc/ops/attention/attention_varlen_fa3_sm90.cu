// Host launcher of the FlashAttention-3-structured prefill kernel (attention_varlen_fa3_sm90.cuh):
// builds the TMA tensor maps of q, k, v and launches. attention_varlen() has validated p already.
#include <cudaTypedefs.h>

#include <string>

#include "attention.h"
#include "fa3_launch.cuh"
#include "gemma4x/attention/attention_varlen_fa3_sm90.cuh"
#include "gemma4x/common/check.h"

namespace gemma4x::attention {
namespace {

constexpr const char* kOp = "attention_varlen (fa3)";

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (status != cudaDriverEntryPointSuccess || ptr == nullptr)
      throw std::runtime_error(std::string(kOp) + ": the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

}  // namespace

CUtensorMap make_attention_tensor_map(const char* name, const void* ptr, bool bf16, int d, int heads, int rows,
                                      int64_t row_stride, int64_t head_stride, int box_rows) {
  // A stride of a size-1 dimension is never used; the encoder still wants a valid one.
  if (heads == 1) head_stride = d;
  if (rows <= 1) row_stride = static_cast<int64_t>(heads) * head_stride;
  GEMMA4X_CHECK_ARG(head_stride >= d && row_stride >= head_stride, kOp, ": ", name,
                    " strides (row ", row_stride, ", head ", head_stride,
                    ") must be ordered row >= head >= head_dim for the TMA tensor map");
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(rows < 1 ? 1 : rows)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_stride) * 2, static_cast<cuuint64_t>(row_stride) * 2};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode_fn()(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
                                 const_cast<void*>(ptr), dims, strides, box, elem_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error(std::string(kOp) + ": cuTensorMapEncodeTiled failed for " + name + " (CUresult " +
                             std::to_string(static_cast<int>(r)) + ")");
  }
  return map;
}

namespace {

// Tile shapes, one CTA per SM (384 threads):
//  d 256: 128 query rows (2 consumers x 64), 64-key stages, 2 stages: Q 64 KB + 2 x (K 32 + V 32) KB.
//         The consumers take turns issuing their MMAs; variant bit 1: they run free.
//  d 512: 64 query rows (2 consumers x half of d), 32-key stages, 2 stages: Q 64 KB + 2 x (32 + 32) KB
//         + 16 KB partial-S exchange. The first 6 of the 16 k16 slices of each consumer's Q are
//         held in registers (more spill: O 128 + S 16 + P 8 registers come first); variant bit 1:
//         Q read from shared memory only. 64-key stages fit only once (64 + 128 + 32 KB): no
//         prefetch depth, and the registers of S and P double; not built.
template <typename T, bool kAlt>
using Fa3Cfg256 = Fa3Config<T, 256, 64, 2, 1, 0, !kAlt>;
template <typename T, bool kAlt>
using Fa3Cfg512 = Fa3Config<T, 512, 32, 2, 2, kAlt ? 0 : 6>;

struct Fa3Family {
  static constexpr const char* kName = "attention_varlen_fa3_kernel";
  template <class Cfg>
  static constexpr auto kernel = attention_varlen_fa3_kernel<Cfg>;

  template <typename T, typename F>
  static bool with_config(int head_dim, int variant, F&& f) {
    const bool alt = variant & 2;
    switch (head_dim) {
      case 256: alt ? f(Fa3Cfg256<T, true>{}) : f(Fa3Cfg256<T, false>{}); return true;
      case 512: alt ? f(Fa3Cfg512<T, true>{}) : f(Fa3Cfg512<T, false>{}); return true;
      default: return false;
    }
  }
};

}  // namespace

int attention_varlen_fa3_block_m(int head_dim, int variant) { return fa3_block_m<Fa3Family>(head_dim, variant); }

void attention_varlen_fa3(const AttentionVarlenParams& p, DType dtype, int variant, cudaStream_t stream) {
  GEMMA4X_CHECK_ARG(fa3_launch<Fa3Family>(p, dtype, variant, stream), kOp, ": head_dim must be 256 or 512, got ",
                    p.head_dim);
}

}  // namespace gemma4x::attention

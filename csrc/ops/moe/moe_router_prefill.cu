#include "moe_router_prefill.h"

#include "gemma4x/common/check.h"
#include "gemma4x/moe/prefill_router_kernels.cuh"

namespace gemma4x::moe {
namespace {

void check_ptr(const char* op, const char* name, const void* p, size_t align) {
  GEMMA4X_CHECK_ARG(p != nullptr, op, ": ", name, " is a null pointer");
  GEMMA4X_CHECK_ARG(is_aligned(p, align), op, ": ", name, " must be ", align, "-byte aligned, got address ",
                    reinterpret_cast<uintptr_t>(p));
}

unsigned blocks_for(int64_t tokens, int per_block) {
  return static_cast<unsigned>((tokens + per_block - 1) / per_block);
}

}  // namespace

void moe_router_rows(const RouterRowsParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "moe_router_rows";
  const int vec = 16 / dtype_size(dtype);
  GEMMA4X_CHECK_ARG(p.tokens >= 0, op, ": tokens must be >= 0, got ", p.tokens);
  GEMMA4X_CHECK_ARG(p.hidden > 0 && p.hidden % vec == 0, op, ": hidden size H must be a positive multiple of ", vec,
                    " (16-byte vectors), got ", p.hidden);
  GEMMA4X_CHECK_ARG(p.h_row_stride >= p.hidden && p.h_row_stride % vec == 0, op, ": h row stride must be >= H = ",
                    p.hidden, " and a multiple of ", vec, ", got ", p.h_row_stride);
  if (p.tokens == 0) return;
  GEMMA4X_CHECK_ARG(p.tokens <= int64_t{1} << 35, op, ": too many tokens (", p.tokens, ")");
  check_ptr(op, "h", p.h, 16);
  check_ptr(op, "scale", p.scale, 16);
  check_ptr(op, "r", p.r, 16);
  const unsigned grid = blocks_for(p.tokens, kRouterRowsWarps);
  switch (dtype) {
    case DType::kBFloat16: moe_router_rows_kernel<__nv_bfloat16><<<grid, 32 * kRouterRowsWarps, 0, stream>>>(p); break;
    case DType::kFloat16: moe_router_rows_kernel<__half><<<grid, 32 * kRouterRowsWarps, 0, stream>>>(p); break;
    case DType::kFloat32: moe_router_rows_kernel<float><<<grid, 32 * kRouterRowsWarps, 0, stream>>>(p); break;
  }
  check_launch("moe_router_rows_kernel");
}

void moe_router_topk(const RouterTopkParams& p, DType dtype, cudaStream_t stream) {
  constexpr const char* op = "moe_router_topk";
  GEMMA4X_CHECK_ARG(p.tokens >= 0, op, ": tokens must be >= 0, got ", p.tokens);
  GEMMA4X_CHECK_ARG(p.experts >= 1 && p.experts <= kRouterPrefillMaxExperts, op, ": experts E must be in [1, ",
                    kRouterPrefillMaxExperts, "], got ", p.experts);
  GEMMA4X_CHECK_ARG(p.top_k >= 1 && p.top_k <= kRouterPrefillMaxTopK && p.top_k <= p.experts, op,
                    ": top_k must be in [1, min(", kRouterPrefillMaxTopK, ", E)], got ", p.top_k);
  if (p.tokens == 0) return;
  check_ptr(op, "logits", p.logits, dtype_size(dtype));
  check_ptr(op, "per_expert_scale", p.per_expert_scale, p.per_expert_scale_fp32 ? 4 : dtype_size(dtype));
  check_ptr(op, "weights", p.weights, 4);
  check_ptr(op, "idx", p.idx, 8);
  const unsigned grid = blocks_for(p.tokens, kRouterTopkWarps);
  switch (dtype) {
    case DType::kBFloat16: moe_router_topk_kernel<__nv_bfloat16><<<grid, 32 * kRouterTopkWarps, 0, stream>>>(p); break;
    case DType::kFloat16: moe_router_topk_kernel<__half><<<grid, 32 * kRouterTopkWarps, 0, stream>>>(p); break;
    case DType::kFloat32: moe_router_topk_kernel<float><<<grid, 32 * kRouterTopkWarps, 0, stream>>>(p); break;
  }
  check_launch("moe_router_topk_kernel");
}

}  // namespace gemma4x::moe

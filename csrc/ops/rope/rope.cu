#include "rope.h"

#include <algorithm>

#include "gemma4x/common/check.h"
#include "gemma4x/rope/qkv_norm_rope_kernels.cuh"

namespace gemma4x::rope {
namespace {

constexpr const char* kOp = "qkv_norm_rope";
constexpr const char* kNames[3] = {"q", "k", "v"};

template <typename T, int VEC>
void launch(const QkvNormRopeParams& p, int64_t rows, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  qkv_norm_rope_kernel<T, VEC><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p);
}

template <typename T>
void launch_typed(const QkvNormRopeParams& p, int64_t rows, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: launch<T, 2>(p, rows, stream); break;
    case 128: launch<T, 4>(p, rows, stream); break;
    case 256: launch<T, 8>(p, rows, stream); break;
    default: launch<T, 16>(p, rows, stream); break;
  }
}

}  // namespace

void qkv_norm_rope(const QkvNormRopeParams& p, DType dtype, cudaStream_t stream) {
  GEMMA4X_CHECK_ARG(p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256 || p.head_dim == 512, kOp,
                    ": head_dim must be 64, 128, 256 or 512, got ", p.head_dim);
  GEMMA4X_CHECK_ARG(p.tokens >= 0, kOp, ": tokens must be >= 0, got ", p.tokens);
  GEMMA4X_CHECK_ARG(p.t[0].x != nullptr, kOp, ": q is a null pointer");
  const int elem = dtype_size(dtype);
  // A lane moves head_dim / 32 elements in pieces of at most 16 bytes; every row start must be
  // aligned to one piece.
  const size_t piece = static_cast<size_t>(std::min(16, p.head_dim / 32 * elem));
  bool rotate = false;
  int64_t rows = 0;
  for (int i = 0; i < 3; ++i) {
    const HeadTensor& t = p.t[i];
    if (t.x == nullptr) continue;
    GEMMA4X_CHECK_ARG(t.heads > 0, kOp, ": ", kNames[i], " must have at least one head, got ", t.heads);
    GEMMA4X_CHECK_ARG(t.token_stride >= static_cast<int64_t>(t.heads) * p.head_dim, kOp, ": ", kNames[i],
                      " token stride ", t.token_stride, " is smaller than heads * head_dim = ",
                      static_cast<int64_t>(t.heads) * p.head_dim);
    GEMMA4X_CHECK_ARG(is_aligned(t.x, piece) && (t.token_stride * elem) % piece == 0, kOp, ": ", kNames[i],
                      " rows must be ", piece, "-byte aligned (address and token stride)");
    GEMMA4X_CHECK_ARG(t.out != nullptr && is_aligned(t.out, piece), kOp, ": ", kNames[i], " output must be ",
                      piece, "-byte aligned");
    GEMMA4X_CHECK_ARG(t.weight == nullptr || is_aligned(t.weight, piece), kOp, ": ", kNames[i],
                      " norm weight must be ", piece, "-byte aligned");
    GEMMA4X_CHECK_ARG(t.eps >= 0.f, kOp, ": ", kNames[i], " eps must be >= 0, got ", t.eps);
    rotate = rotate || t.rotate;
    rows += p.tokens * t.heads;
  }
  if (rotate) {
    GEMMA4X_CHECK_ARG(p.cos != nullptr && p.sin != nullptr && is_aligned(p.cos, piece) && is_aligned(p.sin, piece),
                      kOp, ": cos and sin must be ", piece, "-byte aligned device pointers");
  }
  if (rows == 0) return;
  switch (dtype) {
    case DType::kFloat32: launch_typed<float>(p, rows, stream); break;
    case DType::kFloat16: launch_typed<__half>(p, rows, stream); break;
    case DType::kBFloat16: launch_typed<__nv_bfloat16>(p, rows, stream); break;
  }
  check_launch("qkv_norm_rope_kernel");
}

}  // namespace gemma4x::rope

#include <cuda_runtime_api.h>

#include <tuple>
#include <utility>

#include "ops/nvfp4/nvfp4.h"
#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

namespace {

using namespace gemma4x::nvfp4;

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

template <typename T>
const T* in_ptr(uintptr_t p) {
  return static_cast<const T*>(as_ptr(p));
}

// m.def with argument names given as py::arg or as tuples of them (the shared name lists below).
template <typename T>
auto arg_tuple(T&& a) {
  return std::make_tuple(std::forward<T>(a));
}
template <typename... A>
auto arg_tuple(std::tuple<A...> t) {
  return t;
}
template <typename F, typename... Args>
void def(py::module_& m, const char* name, F&& f, Args&&... args) {
  std::apply([&](auto&&... a) { m.def(name, std::forward<F>(f), a...); },
             std::tuple_cat(arg_tuple(std::forward<Args>(args))...));
}

#ifdef GEMMA4X_HAS_SM90
// Dense W4A16 GEMMs (GemvParams, W4A16GemmParams): out [M, N] = g * x [M, K] @ W^T.
template <class P>
P dense_params(uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t packed,
               uintptr_t global_scale, int32_t m, int32_t n, int32_t k) {
  P p{};
  p.packed = in_ptr<uint8_t>(packed);
  p.x = as_ptr(x);
  p.global_scale = in_ptr<float>(global_scale);
  p.out = as_mut_ptr(out);
  p.x_row_stride = x_stride;
  p.out_row_stride = out_stride;
  p.m = m;
  p.n = n;
  p.k = k;
  return p;
}
auto dense_args() {
  return std::make_tuple(py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("packed"),
                         py::arg("global_scale"), py::arg("m"), py::arg("n"), py::arg("k"));
}

// Routed experts (MoeDecodeParams, W4A16MoePrefillParams): sizes, then the tensors.
template <class P>
void set_moe_sizes(P& p, int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter) {
  p.tokens = tokens;
  p.top_k = top_k;
  p.experts = experts;
  p.hidden = hidden;
  p.inter = inter;
}
auto moe_size_args() {
  return std::make_tuple(py::arg("tokens"), py::arg("top_k"), py::arg("experts"), py::arg("hidden"), py::arg("inter"));
}
template <class P>
P moe_params(uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t idx, uintptr_t weights,
             uintptr_t gate_up, uintptr_t gate_up_scale_2, uintptr_t down, uintptr_t down_scale_2) {
  P p{};
  p.x = as_ptr(x);
  p.x_row_stride = x_stride;
  p.idx = in_ptr<int64_t>(idx);
  p.weights = in_ptr<float>(weights);
  p.gate_up = in_ptr<uint8_t>(gate_up);
  p.gate_up_scale_2 = in_ptr<float>(gate_up_scale_2);
  p.down = in_ptr<uint8_t>(down);
  p.down_scale_2 = in_ptr<float>(down_scale_2);
  p.out = as_mut_ptr(out);
  p.out_row_stride = out_stride;
  return p;
}
auto moe_tensor_args() {
  return std::make_tuple(py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("idx"),
                         py::arg("weights"), py::arg("gate_up"), py::arg("gate_up_scale_2"), py::arg("down"),
                         py::arg("down_scale_2"));
}
#endif  // GEMMA4X_HAS_SM90

}  // namespace

void register_nvfp4(py::module_& m) {
  // codes [rows, K/2] uint8, scales [rows, K/16] e4m3 = ModelOpt NVFP4 of w [rows, K] under global_scale[row / rows_per_scale].
  m.def(
      "quantize",
      [](uintptr_t codes, uintptr_t scales, uintptr_t w, uintptr_t global_scale, int64_t rows, int64_t rows_per_scale,
         int32_t k, int32_t dtype, uintptr_t stream) {
        QuantizeParams p{};
        p.w = as_ptr(w);
        p.global_scale = in_ptr<float>(global_scale);
        p.codes = static_cast<uint8_t*>(as_mut_ptr(codes));
        p.scales = static_cast<uint8_t*>(as_mut_ptr(scales));
        p.rows = rows;
        p.rows_per_scale = rows_per_scale;
        p.k = k;
        quantize(p, dtype_from_code(dtype, "nvfp4.quantize dtype"), as_stream(stream));
      },
      py::arg("codes"), py::arg("scales"), py::arg("w"), py::arg("global_scale"), py::arg("rows"),
      py::arg("rows_per_scale"), py::arg("k"), py::arg("dtype"), py::arg("stream"));

  // out [batches, rows, K] = dtype(e2m1 * fp32(scale) * g) from the W4A16 packed layout.
  m.def(
      "dequantize",
      [](uintptr_t out, uintptr_t packed, uintptr_t global_scale, int64_t batches, int32_t rows, int32_t k,
         int32_t g_batch_stride, bool interleave8, int32_t dtype, uintptr_t stream) {
        DequantizeParams p{};
        p.packed = in_ptr<uint8_t>(packed);
        p.global_scale = in_ptr<float>(global_scale);
        p.out = as_mut_ptr(out);
        p.batches = batches;
        p.rows = rows;
        p.k = k;
        p.g_batch_stride = g_batch_stride;
        p.interleave8 = interleave8;
        dequantize(p, dtype_from_code(dtype, "nvfp4.dequantize dtype"), as_stream(stream));
      },
      py::arg("out"), py::arg("packed"), py::arg("global_scale"), py::arg("batches"), py::arg("rows"), py::arg("k"),
      py::arg("g_batch_stride"), py::arg("interleave8"), py::arg("dtype"), py::arg("stream"));

#ifdef GEMMA4X_HAS_SM90
  m.attr("has_sm90") = true;

  // out [M, N] bf16 = g * x [M, K] bf16 @ W^T, W packed NVFP4, M <= 64 (sm_90a).
  def(
      m, "w4a16_gemv",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t packed, uintptr_t global_scale,
         int32_t m, int32_t n, int32_t k, uintptr_t stream) {
        w4a16_gemv(dense_params<GemvParams>(out, out_stride, x, x_stride, packed, global_scale, m, n, k),
                   as_stream(stream));
      },
      dense_args(), py::arg("stream"));

  // out [T, H] bf16 = sum_j w * GeGLU experts, NVFP4 packed weights, T*k <= 64 (two launches, sm_90a).
  def(
      m, "moe_decode",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t idx, uintptr_t weights,
         uintptr_t gate_up, uintptr_t gate_up_scale_2, uintptr_t down, uintptr_t down_scale_2, uintptr_t act,
         int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter, bool pdl, uintptr_t stream) {
        auto p = moe_params<MoeDecodeParams>(out, out_stride, x, x_stride, idx, weights, gate_up, gate_up_scale_2,
                                             down, down_scale_2);
        p.act = as_mut_ptr(act);
        set_moe_sizes(p, tokens, top_k, experts, hidden, inter);
        moe_decode(p, pdl, as_stream(stream));
      },
      moe_tensor_args(), py::arg("act"), moe_size_args(), py::arg("pdl"), py::arg("stream"));

  // out [M, N] bf16 = g * x [M, K] bf16 @ W^T, W packed NVFP4, any M (TMA + RS WGMMA, sm_90a).
  def(
      m, "w4a16_gemm_sm90",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t packed, uintptr_t global_scale,
         int32_t m, int32_t n, int32_t k, int32_t tile, uintptr_t stream) {
        auto p = dense_params<W4A16GemmParams>(out, out_stride, x, x_stride, packed, global_scale, m, n, k);
        p.tile = tile;
        w4a16_gemm_sm90(p, as_stream(stream));
      },
      dense_args(), py::arg("tile"), py::arg("stream"));

  // Bytes of workspace moe_prefill needs for (T, k, E, H, I).
  def(
      m, "moe_prefill_workspace_size",
      [](int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter) {
        W4A16MoePrefillParams p{};
        set_moe_sizes(p, tokens, top_k, experts, hidden, inter);
        return w4a16_moe_prefill_workspace_size(p);
      },
      moe_size_args());

  // out [T, H] bf16 = sum_j w * GeGLU experts, NVFP4 packed weights, any T*k (W4A16 grouped GEMMs, sm_90a).
  def(
      m, "moe_prefill",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t idx, uintptr_t weights,
         uintptr_t gate_up, uintptr_t gate_up_scale_2, uintptr_t down, uintptr_t down_scale_2, uintptr_t workspace,
         size_t workspace_bytes, int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter,
         int32_t tile, uintptr_t stream) {
        auto p = moe_params<W4A16MoePrefillParams>(out, out_stride, x, x_stride, idx, weights, gate_up,
                                                   gate_up_scale_2, down, down_scale_2);
        p.workspace = as_mut_ptr(workspace);
        p.workspace_bytes = workspace_bytes;
        set_moe_sizes(p, tokens, top_k, experts, hidden, inter);
        p.tile = tile;
        w4a16_moe_prefill(p, as_stream(stream));
      },
      moe_tensor_args(), py::arg("workspace"), py::arg("workspace_bytes"), moe_size_args(), py::arg("tile"),
      py::arg("stream"));

  // (max tokens of w4a16_gemv, max pairs T*k, max experts E of moe_decode).
  m.def("w4a16_limits", [] {
    const W4A16Limits l = w4a16_limits();
    return py::make_tuple(l.max_tokens, l.max_pairs, l.max_experts);
  });
#else
  m.attr("has_sm90") = false;
#endif
}

}  // namespace gemma4x::bindings

#include <cuda_runtime_api.h>

#include "ops/nvfp4/nvfp4.h"
#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_nvfp4(py::module_& m) {
  using namespace gemma4x::nvfp4;

  // codes [rows, K/2] uint8, scales [rows, K/16] e4m3 = ModelOpt NVFP4 of w [rows, K] under global_scale[row / rows_per_scale].
  m.def(
      "quantize",
      [](uintptr_t codes, uintptr_t scales, uintptr_t w, uintptr_t global_scale, int64_t rows, int64_t rows_per_scale,
         int32_t k, int32_t dtype, uintptr_t stream) {
        QuantizeParams p{};
        p.w = as_ptr(w);
        p.global_scale = static_cast<const float*>(as_ptr(global_scale));
        p.codes = static_cast<uint8_t*>(as_mut_ptr(codes));
        p.scales = static_cast<uint8_t*>(as_mut_ptr(scales));
        p.rows = rows;
        p.rows_per_scale = rows_per_scale;
        p.k = k;
        quantize(p, dtype_from_code(dtype, "nvfp4.quantize dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("codes"), py::arg("scales"), py::arg("w"), py::arg("global_scale"), py::arg("rows"),
      py::arg("rows_per_scale"), py::arg("k"), py::arg("dtype"), py::arg("stream"));

  // out [batches, rows, K] = dtype(e2m1 * fp32(scale) * g) from the W4A16 packed layout.
  m.def(
      "dequantize",
      [](uintptr_t out, uintptr_t packed, uintptr_t global_scale, int64_t batches, int32_t rows, int32_t k,
         int32_t g_batch_stride, bool interleave8, int32_t dtype, uintptr_t stream) {
        DequantizeParams p{};
        p.packed = static_cast<const uint8_t*>(as_ptr(packed));
        p.global_scale = static_cast<const float*>(as_ptr(global_scale));
        p.out = as_mut_ptr(out);
        p.batches = batches;
        p.rows = rows;
        p.k = k;
        p.g_batch_stride = g_batch_stride;
        p.interleave8 = interleave8;
        dequantize(p, dtype_from_code(dtype, "nvfp4.dequantize dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("packed"), py::arg("global_scale"), py::arg("batches"), py::arg("rows"), py::arg("k"),
      py::arg("g_batch_stride"), py::arg("interleave8"), py::arg("dtype"), py::arg("stream"));

#ifdef GEMMA4X_HAS_SM90
  m.attr("has_sm90") = true;

  // out [M, N] bf16 = g * x [M, K] bf16 @ W^T, W packed NVFP4, M <= 64 (sm_90a).
  m.def(
      "w4a16_gemv",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t packed, uintptr_t global_scale,
         int32_t m, int32_t n, int32_t k, uintptr_t stream) {
        GemvParams p{};
        p.packed = static_cast<const uint8_t*>(as_ptr(packed));
        p.x = as_ptr(x);
        p.global_scale = static_cast<const float*>(as_ptr(global_scale));
        p.out = as_mut_ptr(out);
        p.x_row_stride = x_stride;
        p.out_row_stride = out_stride;
        p.m = m;
        p.n = n;
        p.k = k;
        w4a16_gemv(p, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("packed"),
      py::arg("global_scale"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("stream"));

  // out [T, H] bf16 = sum_j w * GeGLU experts, NVFP4 packed weights, T*k <= 64 (two launches, sm_90a).
  m.def(
      "moe_decode",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t idx, uintptr_t weights,
         uintptr_t gate_up, uintptr_t gate_up_scale_2, uintptr_t down, uintptr_t down_scale_2, uintptr_t act,
         int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter, bool pdl, uintptr_t stream) {
        MoeDecodeParams p{};
        p.x = as_ptr(x);
        p.x_row_stride = x_stride;
        p.idx = static_cast<const int64_t*>(as_ptr(idx));
        p.weights = static_cast<const float*>(as_ptr(weights));
        p.gate_up = static_cast<const uint8_t*>(as_ptr(gate_up));
        p.gate_up_scale_2 = static_cast<const float*>(as_ptr(gate_up_scale_2));
        p.down = static_cast<const uint8_t*>(as_ptr(down));
        p.down_scale_2 = static_cast<const float*>(as_ptr(down_scale_2));
        p.act = as_mut_ptr(act);
        p.out = as_mut_ptr(out);
        p.out_row_stride = out_stride;
        p.tokens = tokens;
        p.top_k = top_k;
        p.experts = experts;
        p.hidden = hidden;
        p.inter = inter;
        moe_decode(p, pdl, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("idx"), py::arg("weights"),
      py::arg("gate_up"), py::arg("gate_up_scale_2"), py::arg("down"), py::arg("down_scale_2"), py::arg("act"),
      py::arg("tokens"), py::arg("top_k"), py::arg("experts"), py::arg("hidden"), py::arg("inter"), py::arg("pdl"),
      py::arg("stream"));

  // out [M, N] bf16 = g * x [M, K] bf16 @ W^T, W packed NVFP4, any M (TMA + RS WGMMA, sm_90a).
  m.def(
      "w4a16_gemm_sm90",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t packed, uintptr_t global_scale,
         int32_t m, int32_t n, int32_t k, int32_t tile, uintptr_t stream) {
        W4A16GemmParams p{};
        p.packed = static_cast<const uint8_t*>(as_ptr(packed));
        p.x = as_ptr(x);
        p.global_scale = static_cast<const float*>(as_ptr(global_scale));
        p.out = as_mut_ptr(out);
        p.x_row_stride = x_stride;
        p.out_row_stride = out_stride;
        p.m = m;
        p.n = n;
        p.k = k;
        p.tile = tile;
        w4a16_gemm_sm90(p, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("packed"),
      py::arg("global_scale"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("tile"), py::arg("stream"));

  // Bytes of workspace moe_prefill needs for (T, k, E, H, I).
  m.def(
      "moe_prefill_workspace_size",
      [](int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter) {
        W4A16MoePrefillParams p{};
        p.tokens = tokens;
        p.top_k = top_k;
        p.experts = experts;
        p.hidden = hidden;
        p.inter = inter;
        return w4a16_moe_prefill_workspace_size(p);
      },
      py::arg("tokens"), py::arg("top_k"), py::arg("experts"), py::arg("hidden"), py::arg("inter"));

  // out [T, H] bf16 = sum_j w * GeGLU experts, NVFP4 packed weights, any T*k (W4A16 grouped GEMMs, sm_90a).
  m.def(
      "moe_prefill",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t idx, uintptr_t weights,
         uintptr_t gate_up, uintptr_t gate_up_scale_2, uintptr_t down, uintptr_t down_scale_2, uintptr_t workspace,
         size_t workspace_bytes, int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter,
         int32_t tile, uintptr_t stream) {
        W4A16MoePrefillParams p{};
        p.x = as_ptr(x);
        p.x_row_stride = x_stride;
        p.idx = static_cast<const int64_t*>(as_ptr(idx));
        p.weights = static_cast<const float*>(as_ptr(weights));
        p.gate_up = static_cast<const uint8_t*>(as_ptr(gate_up));
        p.gate_up_scale_2 = static_cast<const float*>(as_ptr(gate_up_scale_2));
        p.down = static_cast<const uint8_t*>(as_ptr(down));
        p.down_scale_2 = static_cast<const float*>(as_ptr(down_scale_2));
        p.out = as_mut_ptr(out);
        p.out_row_stride = out_stride;
        p.workspace = as_mut_ptr(workspace);
        p.workspace_bytes = workspace_bytes;
        p.tokens = tokens;
        p.top_k = top_k;
        p.experts = experts;
        p.hidden = hidden;
        p.inter = inter;
        p.tile = tile;
        w4a16_moe_prefill(p, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("idx"), py::arg("weights"),
      py::arg("gate_up"), py::arg("gate_up_scale_2"), py::arg("down"), py::arg("down_scale_2"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("tokens"), py::arg("top_k"), py::arg("experts"), py::arg("hidden"),
      py::arg("inter"), py::arg("tile"), py::arg("stream"));

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

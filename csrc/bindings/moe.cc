#include "ops/moe/moe.h"

#include <cuda_runtime_api.h>

#include <cmath>

#include "gemma4x/common/check.h"
#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_moe(py::module_& m) {
  using namespace gemma4x::moe;

  // (weights [T,k] fp32, idx [T,k] int64) = top-k of softmax(bf16(bf16(rms(h)*scale)*H^-0.5) @ W^T), renormalised, * per_expert_scale.
  m.def(
      "moe_router",
      [](uintptr_t weights, uintptr_t idx, uintptr_t h, int64_t h_stride, uintptr_t proj_weight, uintptr_t scale,
         uintptr_t per_expert_scale, bool per_expert_scale_fp32, int64_t tokens, int32_t hidden, int32_t experts,
         int32_t top_k, float eps, int32_t dtype, uintptr_t stream) {
        MoeRouterParams p{};
        p.h = as_ptr(h);
        p.h_row_stride = h_stride;
        p.proj_weight = as_ptr(proj_weight);
        p.scale = as_ptr(scale);
        p.per_expert_scale = as_ptr(per_expert_scale);
        p.weights = static_cast<float*>(as_mut_ptr(weights));
        p.idx = static_cast<int64_t*>(as_mut_ptr(idx));
        p.tokens = tokens;
        p.hidden = hidden;
        p.experts = experts;
        p.top_k = top_k;
        p.eps = eps;
        // Python's `H ** -0.5` (a double), which torch then multiplies in fp32.
        p.input_scale = static_cast<float>(std::pow(static_cast<double>(hidden), -0.5));
        p.per_expert_scale_fp32 = per_expert_scale_fp32;
        moe_router(p, dtype_from_code(dtype, "moe_router dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("weights"), py::arg("idx"), py::arg("h"), py::arg("h_stride"), py::arg("proj_weight"), py::arg("scale"),
      py::arg("per_expert_scale"), py::arg("per_expert_scale_fp32"), py::arg("tokens"), py::arg("hidden"),
      py::arg("experts"), py::arg("top_k"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));

  // out[t] = bf16(sum_j w[t,j] * GeGLU_{idx[t,j]}(x_t)) for T*k <= 64; act is a [T*k, I] workspace.
  // kernel: 0 auto (split unless GEMMA4X_MOE_DECODE=stream), 1 split (two launches), 2 stream (one
  // persistent launch, falls back to split where the device does not allow it or gate_up is
  // interleaved). gate_up_interleaved: rows in blocks of 8 (params.h). Returns the kernel that ran.
  m.def(
      "moe_experts_decode",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t idx, uintptr_t weights,
         uintptr_t gate_up, uintptr_t down, uintptr_t act, int32_t tokens, int32_t top_k, int32_t experts,
         int32_t hidden, int32_t inter, int32_t dtype, uintptr_t stream, int32_t kernel, bool gate_up_interleaved) {
        GEMMA4X_CHECK_ARG(kernel >= 0 && kernel <= 2, "moe_experts_decode: kernel must be 0, 1 or 2, got ", kernel);
        MoeExpertsDecodeParams p{};
        p.x = as_ptr(x);
        p.x_row_stride = x_stride;
        p.idx = static_cast<const int64_t*>(as_ptr(idx));
        p.weights = static_cast<const float*>(as_ptr(weights));
        p.gate_up = as_ptr(gate_up);
        p.down = as_ptr(down);
        p.act = as_mut_ptr(act);
        p.out = as_mut_ptr(out);
        p.out_row_stride = out_stride;
        p.tokens = tokens;
        p.top_k = top_k;
        p.experts = experts;
        p.hidden = hidden;
        p.inter = inter;
        p.gate_up_interleaved = gate_up_interleaved ? 1 : 0;
        return static_cast<int>(moe_experts_decode(p, dtype_from_code(dtype, "moe_experts_decode dtype"),
                                                   reinterpret_cast<cudaStream_t>(stream),
                                                   static_cast<DecodeKernel>(kernel)));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("idx"), py::arg("weights"),
      py::arg("gate_up"), py::arg("down"), py::arg("act"), py::arg("tokens"), py::arg("top_k"), py::arg("experts"),
      py::arg("hidden"), py::arg("inter"), py::arg("dtype"), py::arg("stream"), py::arg("kernel") = 0,
      py::arg("gate_up_interleaved") = false);

  // Benchmark knobs of the one-launch decode kernel: (max stages, bulk-copy piece bytes, mode);
  // mode 1 streams the weights without computing (a timing probe whose output is unset).
  m.def(
      "moe_stream_tuning",
      [](int32_t max_stages, int32_t piece_bytes, int32_t mode) {
        GEMMA4X_CHECK_ARG(max_stages >= 2 && max_stages <= 4, "moe_stream_tuning: max_stages in [2, 4], got ", max_stages);
        GEMMA4X_CHECK_ARG(piece_bytes >= 0, "moe_stream_tuning: piece_bytes >= 0, got ", piece_bytes);
        GEMMA4X_CHECK_ARG(mode == 0 || mode == 1, "moe_stream_tuning: mode 0 or 1, got ", mode);
        moe_stream_tuning(StreamTuning{max_stages, piece_bytes, mode});
      },
      py::arg("max_stages") = 4, py::arg("piece_bytes") = 0, py::arg("mode") = 0);

  m.def(
      "moe_router_tuning",
      [](int32_t cluster) {
        GEMMA4X_CHECK_ARG(cluster == 0 || cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8,
                          "moe_router_tuning: cluster must be 0, 1, 2, 4 or 8, got ", cluster);
        moe_router_tuning(cluster);
      },
      py::arg("cluster") = 0);

  // (max pairs T*k, max experts E, max hidden H, max intermediate I) of the decode kernels.
  m.def("moe_decode_limits", [] {
    const DecodeLimits l = moe_decode_limits();
    return py::make_tuple(l.max_pairs, l.max_experts, l.max_hidden, l.max_inter);
  });
}

}  // namespace gemma4x::bindings

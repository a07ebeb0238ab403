#include <cuda_runtime_api.h>

#include <cmath>
#include <stdexcept>

#include "gemma4x/common/check.h"
#include "ops/moe/moe_prefill.h"
#include "ops/moe/moe_router_prefill.h"
#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {
namespace {

// Compute capability of the current device as major * 10 + minor (90 = H100/H200, 100 = B200).
int prefill_arch() {
  int dev = 0, major = 0, minor = 0;
  gemma4x::check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  gemma4x::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  gemma4x::check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  return major * 10 + minor;
}

// Benchmark knob of the SM90 GeGLU epilogue (moe_prefill_tuning): tanh.approx instead of tanhf.
int g_gelu_approx = 0;

[[noreturn]] void no_prefill_arch() {
  throw std::runtime_error(
      "moe_experts_prefill: this build has no grouped-GEMM prefill kernels for the current GPU (sm_90a needs "
      "compute capability 9.0, sm_100a 10.0; see moe_prefill.has_sm90 / has_sm100); use the grouped_mm path");
}

}  // namespace

void register_moe_prefill(py::module_& m) {
  using gemma4x::dtype_from_code;

  // r [T,H] = T(T(T(h * rsqrt(mean(h^2) + eps)) * scale) * H^-0.5): the many-token router's rows (every arch).
  m.def(
      "moe_router_rows",
      [](uintptr_t r, uintptr_t h, int64_t h_stride, uintptr_t scale, int64_t tokens, int32_t hidden, float eps,
         int32_t dtype, uintptr_t stream) {
        gemma4x::moe::RouterRowsParams p{};
        p.h = as_ptr(h);
        p.h_row_stride = h_stride;
        p.scale = as_ptr(scale);
        p.r = as_mut_ptr(r);
        p.tokens = tokens;
        p.hidden = hidden;
        p.eps = eps;
        // Python's `H ** -0.5` (a double), which torch then multiplies in fp32.
        p.input_scale = static_cast<float>(std::pow(static_cast<double>(hidden), -0.5));
        gemma4x::moe::moe_router_rows(p, dtype_from_code(dtype, "moe_router_rows dtype"),
                                      reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("r"), py::arg("h"), py::arg("h_stride"), py::arg("scale"), py::arg("tokens"), py::arg("hidden"),
      py::arg("eps"), py::arg("dtype"), py::arg("stream"));

  // (weights [T,k] fp32, idx [T,k] int64) = top-k of softmax_fp32(logits [T,E]), renormalised, * per_expert_scale (every arch).
  m.def(
      "moe_router_topk",
      [](uintptr_t weights, uintptr_t idx, uintptr_t logits, uintptr_t per_expert_scale, bool per_expert_scale_fp32,
         int64_t tokens, int32_t experts, int32_t top_k, int32_t dtype, uintptr_t stream) {
        gemma4x::moe::RouterTopkParams p{};
        p.logits = as_ptr(logits);
        p.per_expert_scale = as_ptr(per_expert_scale);
        p.weights = static_cast<float*>(as_mut_ptr(weights));
        p.idx = static_cast<int64_t*>(as_mut_ptr(idx));
        p.tokens = tokens;
        p.experts = experts;
        p.top_k = top_k;
        p.per_expert_scale_fp32 = per_expert_scale_fp32;
        gemma4x::moe::moe_router_topk(p, dtype_from_code(dtype, "moe_router_topk dtype"),
                                      reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("weights"), py::arg("idx"), py::arg("logits"), py::arg("per_expert_scale"),
      py::arg("per_expert_scale_fp32"), py::arg("tokens"), py::arg("experts"), py::arg("top_k"), py::arg("dtype"),
      py::arg("stream"));

  using namespace gemma4x::moe;
#ifdef GEMMA4X_HAS_SM90
  m.attr("has_sm90") = true;
#else
  m.attr("has_sm90") = false;  // built without sm_90a: moe_experts falls back to the grouped_mm path
#endif
#ifdef GEMMA4X_HAS_SM100
  m.attr("has_sm100") = true;  // compiled, not run on a B200 yet: the wrapper enables it only on request
#else
  m.attr("has_sm100") = false;
#endif

  // out [T,H] bf16 = sum_j w[t,j] * GeGLU_{idx[t,j]}(x_t): permute, grouped GEMM1, GeGLU, grouped GEMM2, combine.
  // gate_up_interleaved: rows in blocks of 8 (prefill_params.h; SM90 fuses the GeGLU into GEMM1's
  // epilogue); prep: 0 auto, 1 one fused launch (T*k <= 4096), 2 count + scan + gather.
  m.def(
      "moe_experts_prefill",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t idx, uintptr_t weights,
         uintptr_t gate_up, uintptr_t down, uintptr_t workspace, size_t workspace_bytes, int32_t tokens, int32_t top_k,
         int32_t experts, int32_t hidden, int32_t inter, int32_t tile, uintptr_t stream, bool gate_up_interleaved,
         int32_t prep) {
        MoePrefillParams p{};
        p.x = as_ptr(x);
        p.x_row_stride = x_stride;
        p.idx = static_cast<const int64_t*>(as_ptr(idx));
        p.weights = static_cast<const float*>(as_ptr(weights));
        p.gate_up = as_ptr(gate_up);
        p.down = as_ptr(down);
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
        p.gate_up_interleaved = gate_up_interleaved ? 1 : 0;
        p.prep = prep;
        p.gelu_approx = g_gelu_approx;
        const auto s = reinterpret_cast<cudaStream_t>(stream);
        switch (prefill_arch()) {
#ifdef GEMMA4X_HAS_SM90
          case 90: return moe_experts_prefill_sm90(p, s);
#endif
#ifdef GEMMA4X_HAS_SM100
          case 100: return moe_experts_prefill_sm100(p, s);
#endif
          default: no_prefill_arch();
        }
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("idx"), py::arg("weights"),
      py::arg("gate_up"), py::arg("down"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("tokens"),
      py::arg("top_k"), py::arg("experts"), py::arg("hidden"), py::arg("inter"), py::arg("tile"), py::arg("stream"),
      py::arg("gate_up_interleaved") = false, py::arg("prep") = 0);

  // Workspace bytes moe_experts_prefill needs for (T, k, E, H, I) on the current device.
  m.def(
      "moe_prefill_workspace_size",
      [](int32_t tokens, int32_t top_k, int32_t experts, int32_t hidden, int32_t inter,
         bool gate_up_interleaved) -> size_t {
        const int32_t il = gate_up_interleaved ? 1 : 0;
        switch (prefill_arch()) {
#ifdef GEMMA4X_HAS_SM90
          case 90: return moe_prefill_workspace_size_sm90(tokens, top_k, experts, hidden, inter, il);
#endif
#ifdef GEMMA4X_HAS_SM100
          case 100: return moe_prefill_workspace_size_sm100(tokens, top_k, experts, hidden, inter, il);
#endif
          default: no_prefill_arch();
        }
      },
      py::arg("tokens"), py::arg("top_k"), py::arg("experts"), py::arg("hidden"), py::arg("inter"),
      py::arg("gate_up_interleaved") = false);

  // Benchmark knob: GEMM1's GeGLU epilogue computes gelu with tanh.approx.f32 (faster, rounds some
  // activations differently from HF); off by default.
  m.def(
      "moe_prefill_tuning", [](bool gelu_approx) { g_gelu_approx = gelu_approx ? 1 : 0; },
      py::arg("gelu_approx") = false);

  // (max experts E, max top_k) of the prefill path.
  m.def("moe_prefill_limits", [] {
    const PrefillLimits l = moe_prefill_limits();
    return py::make_tuple(l.max_experts, l.max_top_k);
  });
}

}  // namespace gemma4x::bindings

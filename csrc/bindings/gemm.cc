#include <cuda_runtime_api.h>

#include "registry.h"

#ifdef GEMMA4X_HAS_SM100
#include "ops/gemm/nvfp4_gemm.h"
#endif

namespace py = pybind11;

namespace gemma4x::bindings {

void register_gemm(py::module_& m) {
#ifdef GEMMA4X_HAS_SM100
  using namespace gemma4x::gemm;
  m.attr("has_sm100") = true;

  // out [M,N] bf16 = alpha[0] * (A e2m1 [M,K] * SFA) @ (B e2m1 [N,K] * SFB)^T; scales swizzled (SM100 only).
  m.def(
      "nvfp4_gemm",
      [](uintptr_t out, uintptr_t a, uintptr_t a_scale, uintptr_t b, uintptr_t b_scale, uintptr_t alpha,
         uintptr_t workspace, size_t workspace_bytes, int32_t M, int32_t N, int32_t K, uintptr_t stream) {
        Nvfp4GemmParams p{};
        p.a = as_ptr(a);
        p.a_scale = as_ptr(a_scale);
        p.b = as_ptr(b);
        p.b_scale = as_ptr(b_scale);
        p.alpha = static_cast<const float*>(as_ptr(alpha));
        p.out = as_mut_ptr(out);
        p.workspace = as_mut_ptr(workspace);
        p.workspace_bytes = workspace_bytes;
        p.M = M;
        p.N = N;
        p.K = K;
        nvfp4_gemm(p, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("a"), py::arg("a_scale"), py::arg("b"), py::arg("b_scale"), py::arg("alpha"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("stream"));

  // Scratch bytes nvfp4_gemm needs for (M, N, K).
  m.def("nvfp4_gemm_workspace_size", &nvfp4_gemm_workspace_size, py::arg("M"), py::arg("N"), py::arg("K"));

  // Grouped over experts: rows of A in expert order, row_offsets int32 [groups + 1] on the device.
  m.def(
      "nvfp4_grouped_gemm",
      [](uintptr_t out, uintptr_t a, uintptr_t a_scale, uintptr_t row_offsets, uintptr_t b, uintptr_t b_scale,
         uintptr_t alpha, uintptr_t workspace, size_t workspace_bytes, int32_t groups, int32_t N, int32_t K,
         uintptr_t stream) {
        Nvfp4GroupedGemmParams p{};
        p.a = as_ptr(a);
        p.a_scale = as_ptr(a_scale);
        p.row_offsets = static_cast<const int32_t*>(as_ptr(row_offsets));
        p.b = as_ptr(b);
        p.b_scale = as_ptr(b_scale);
        p.alpha = static_cast<const float*>(as_ptr(alpha));
        p.out = as_mut_ptr(out);
        p.workspace = as_mut_ptr(workspace);
        p.workspace_bytes = workspace_bytes;
        p.groups = groups;
        p.N = N;
        p.K = K;
        nvfp4_grouped_gemm(p, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("a"), py::arg("a_scale"), py::arg("row_offsets"), py::arg("b"), py::arg("b_scale"),
      py::arg("alpha"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("groups"), py::arg("N"),
      py::arg("K"), py::arg("stream"));

  // Scratch bytes nvfp4_grouped_gemm needs for (groups, N, K): argument arrays + CUTLASS's.
  m.def("nvfp4_grouped_gemm_workspace_size", &nvfp4_grouped_gemm_workspace_size, py::arg("groups"), py::arg("N"),
        py::arg("K"));
#else
  // Built without an sm_100 target: the wrapper reads this and says how to rebuild.
  m.attr("has_sm100") = false;
#endif
}

}  // namespace gemma4x::bindings

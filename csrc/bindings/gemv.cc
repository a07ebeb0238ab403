#include "ops/gemv/gemv.h"

#include <cuda_runtime_api.h>

#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_gemv(py::module_& m) {
  using namespace gemma4x::gemv;
  m.attr("max_tokens") = kMaxTokens;

  // y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M <= max_tokens.
  m.def(
      "skinny_gemm",
      [](uintptr_t y, int64_t y_stride, uintptr_t x, int64_t x_stride, uintptr_t w, uintptr_t bias, int32_t m_,
         int32_t n, int32_t k, int32_t dtype, uintptr_t stream) {
        const SkinnyGemmParams p{as_ptr(x), x_stride, as_ptr(w), as_ptr(bias), as_mut_ptr(y), y_stride, m_, n, k};
        skinny_gemm(p, dtype_from_code(dtype, "skinny_gemm dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("y"), py::arg("y_stride"), py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("bias"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("dtype"), py::arg("stream"));
}

}  // namespace gemma4x::bindings

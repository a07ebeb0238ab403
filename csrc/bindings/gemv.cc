#include "ops/gemv/gemv.h"

#include <cuda_runtime_api.h>

#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_gemv(py::module_& m) {
  using namespace gemma4x::gemv;
  m.attr("max_tokens") = kMaxTokens;

  // y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M <= max_tokens; K split over `splits` CTAs per row block
  // (partials: splits * N * 8 * ceil(M / 8) fp32; counters: N / 16 int32, zero, left zero).
  m.def(
      "skinny_gemm",
      [](uintptr_t y, int64_t y_stride, uintptr_t x, int64_t x_stride, uintptr_t w, uintptr_t bias, int32_t m_,
         int32_t n, int32_t k, int32_t splits, uintptr_t partials, uintptr_t counters, int32_t dtype,
         uintptr_t stream) {
        const SkinnyGemmParams p{as_ptr(x), x_stride, as_ptr(w),  as_ptr(bias), as_mut_ptr(y),
                                 y_stride,  m_,       n,          k,            splits,
                                 static_cast<float*>(as_mut_ptr(partials)), static_cast<int32_t*>(as_mut_ptr(counters))};
        skinny_gemm(p, dtype_from_code(dtype, "skinny_gemm dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("y"), py::arg("y_stride"), py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("bias"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("splits"), py::arg("partials"), py::arg("counters"),
      py::arg("dtype"), py::arg("stream"));
}

}  // namespace gemma4x::bindings

#include "ops/norm/norm.h"

#include <cuda_runtime_api.h>

#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_norm(py::module_& m) {
  using namespace gemma4x::norm;

  // out = rms(x) [* weight], rows of `hidden` contiguous elements.
  m.def(
      "rms_norm",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t weight, int64_t rows,
         int32_t hidden, float eps, int32_t dtype, uintptr_t stream) {
        const RmsNormParams p{as_ptr(x), x_stride, as_ptr(weight), as_mut_ptr(out), out_stride, rows, hidden, eps};
        rms_norm(p, dtype_from_code(dtype, "rms_norm dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("weight"), py::arg("rows"),
      py::arg("hidden"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));

  // residual <- residual + x; out = rms(residual) [* weight].
  m.def(
      "fused_add_rms_norm",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t residual, int64_t residual_stride,
         uintptr_t weight, int64_t rows, int32_t hidden, float eps, int32_t dtype, uintptr_t stream) {
        const FusedAddRmsNormParams p{as_ptr(x),      x_stride,         as_mut_ptr(residual), residual_stride,
                                      as_ptr(weight), as_mut_ptr(out), out_stride,           rows,
                                      hidden,         eps};
        fused_add_rms_norm(p, dtype_from_code(dtype, "fused_add_rms_norm dtype"),
                           reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("residual"),
      py::arg("residual_stride"), py::arg("weight"), py::arg("rows"), py::arg("hidden"), py::arg("eps"),
      py::arg("dtype"), py::arg("stream"));

  // out = (rms_w3(rms_w1(x1) + rms_w2(x2)) + residual) * scalar.
  m.def(
      "moe_tail_norm",
      [](uintptr_t out, int64_t out_stride, uintptr_t x1, int64_t x1_stride, uintptr_t x2, int64_t x2_stride,
         uintptr_t residual, int64_t residual_stride, uintptr_t w1, uintptr_t w2, uintptr_t w3, uintptr_t scalar,
         int64_t rows, int32_t hidden, float eps1, float eps2, float eps3, int32_t dtype, uintptr_t stream) {
        const MoeTailNormParams p{as_ptr(x1),       x1_stride,       as_ptr(x2), x2_stride,  as_ptr(residual),
                                  residual_stride,  as_ptr(w1),      as_ptr(w2), as_ptr(w3), as_ptr(scalar),
                                  as_mut_ptr(out),  out_stride,      rows,       hidden,     eps1,
                                  eps2,             eps3};
        moe_tail_norm(p, dtype_from_code(dtype, "moe_tail_norm dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x1"), py::arg("x1_stride"), py::arg("x2"), py::arg("x2_stride"),
      py::arg("residual"), py::arg("residual_stride"), py::arg("w1"), py::arg("w2"), py::arg("w3"), py::arg("scalar"),
      py::arg("rows"), py::arg("hidden"), py::arg("eps1"), py::arg("eps2"), py::arg("eps3"), py::arg("dtype"),
      py::arg("stream"));

  // out = residual + rms(x) [* weight], then [* scalar] (scalar == 0: no product); out of place.
  m.def(
      "residual_rms_norm",
      [](uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride, uintptr_t residual, int64_t residual_stride,
         uintptr_t weight, uintptr_t scalar, int64_t rows, int32_t hidden, float eps, int32_t dtype,
         uintptr_t stream) {
        const ResidualRmsNormParams p{as_ptr(x),      x_stride,       as_ptr(residual), residual_stride,
                                      as_ptr(weight), as_ptr(scalar), as_mut_ptr(out),  out_stride,
                                      rows,           hidden,         eps};
        residual_rms_norm(p, dtype_from_code(dtype, "residual_rms_norm dtype"),
                          reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("x"), py::arg("x_stride"), py::arg("residual"),
      py::arg("residual_stride"), py::arg("weight"), py::arg("scalar"), py::arg("rows"), py::arg("hidden"),
      py::arg("eps"), py::arg("dtype"), py::arg("stream"));
}

}  // namespace gemma4x::bindings

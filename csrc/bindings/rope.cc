#include "ops/rope/rope.h"

#include <cuda_runtime_api.h>

#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_rope(py::module_& m) {
  using namespace gemma4x::rope;

  // Per-head RMSNorm of q, k, v and RoPE of the tensors marked `rotate`, one launch. Each of
  // q, k, v is (x, token_stride, heads, weight, eps, rotate, out); x == 0 marks it absent.
  m.def(
      "qkv_norm_rope",
      [](py::tuple q, py::tuple k, py::tuple v, uintptr_t cos, uintptr_t sin, int64_t tokens, int32_t head_dim,
         int32_t dtype, uintptr_t stream) {
        const auto head = [](const py::tuple& t) {
          if (t.size() != 7) throw py::value_error("qkv_norm_rope: each tensor is a 7-tuple");
          return HeadTensor{as_ptr(t[0].cast<uintptr_t>()), t[1].cast<int64_t>(), t[2].cast<int32_t>(),
                            as_ptr(t[3].cast<uintptr_t>()), t[4].cast<float>(),   t[5].cast<bool>(),
                            as_mut_ptr(t[6].cast<uintptr_t>())};
        };
        const QkvNormRopeParams p{{head(q), head(k), head(v)}, as_ptr(cos), as_ptr(sin), tokens, head_dim};
        qkv_norm_rope(p, dtype_from_code(dtype, "qkv_norm_rope dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("tokens"),
      py::arg("head_dim"), py::arg("dtype"), py::arg("stream"));
}

}  // namespace gemma4x::bindings

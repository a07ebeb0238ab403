#include <cuda_runtime_api.h>

#include "ops/activation/activation.h"
#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_activation(py::module_& m) {
  using namespace gemma4x::activation;

  // out = T(T(gelu_tanh(gate)) * up) over [rows, cols]; gate/up rows may be slices of one buffer.
  m.def(
      "geglu",
      [](uintptr_t out, int64_t out_stride, uintptr_t gate, int64_t gate_stride, uintptr_t up, int64_t up_stride,
         int64_t rows, int64_t cols, int32_t dtype, uintptr_t stream) {
        const GegluParams p{as_ptr(gate), gate_stride, as_ptr(up), up_stride, as_mut_ptr(out), out_stride, rows, cols};
        geglu(p, dtype_from_code(dtype, "geglu dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("out_stride"), py::arg("gate"), py::arg("gate_stride"), py::arg("up"),
      py::arg("up_stride"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("stream"));
}

}  // namespace gemma4x::bindings

#include <pybind11/pybind11.h>

#ifdef GEMMA4X_WITH_CUDA
#include "registry.h"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "gemma4x kernels: torch-free bindings taking device pointers, shapes, dtype codes and streams";
#ifdef GEMMA4X_WITH_CUDA
  m.def("built_with_cuda", [] { return true; }, "True: this build contains the CUDA kernels");
  auto norm = m.def_submodule("norm", "RMSNorm family");
  gemma4x::bindings::register_norm(norm);
  auto moe = m.def_submodule("moe", "routed GeGLU experts: router, decode experts");
  gemma4x::bindings::register_moe(moe);
  auto gemm = m.def_submodule("gemm", "NVFP4 W4A4 block-scaled GEMM (sm_100a builds only; gemm.has_sm100 says)");
  gemma4x::bindings::register_gemm(gemm);
  auto moe_prefill = m.def_submodule("moe_prefill", "MoE prefill: CUTLASS grouped GEMMs (sm_90a builds only; has_sm90 says)");
  gemma4x::bindings::register_moe_prefill(moe_prefill);
#else
  m.def("built_with_cuda", [] { return false; }, "False: built with GEMMA4X_CUDA=OFF");
#endif
}

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
  auto attention = m.def_submodule("attention", "prefill / vision attention over packed varlen sequences (sm_90a builds only; attention.has_sm90 says)");
  gemma4x::bindings::register_attention(attention);
  auto attention_decode = m.def_submodule("attention_decode", "decode attention over the per-slot KV cache (split-KV)");
  gemma4x::bindings::register_attention_decode(attention_decode);
  auto nvfp4 = m.def_submodule("nvfp4", "NVFP4: quantizer, dequantizer (any arch); W4A16 decode GEMM and experts (sm_90a; nvfp4.has_sm90 says)");
  gemma4x::bindings::register_nvfp4(nvfp4);
  auto moe_prefill = m.def_submodule("moe_prefill", "MoE prefill: CUTLASS grouped GEMMs (sm_90a builds only; has_sm90 says)");
  gemma4x::bindings::register_moe_prefill(moe_prefill);
  auto kv_cache = m.def_submodule("kv_cache", "decode-step KV-cache writes (K, V, ring positions in one launch)");
  gemma4x::bindings::register_kv_cache(kv_cache);
  auto rope = m.def_submodule("rope", "attention inputs: per-head RMSNorm of q, k, v and RoPE of q, k in one launch");
  gemma4x::bindings::register_rope(rope);
  auto gemv = m.def_submodule("gemv", "decode-size linear layers: skinny GEMM for M <= 16 tokens");
  gemma4x::bindings::register_gemv(gemv);
  auto activation = m.def_submodule("activation", "elementwise activations: GeGLU as PyTorch rounds it");
  gemma4x::bindings::register_activation(activation);
#else
  m.def("built_with_cuda", [] { return false; }, "False: built with GEMMA4X_CUDA=OFF");
#endif
}

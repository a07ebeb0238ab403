// One register_<family> per op family; module.cc calls each, nothing else edits module.cc.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace gemma4x::bindings {

// Device pointers and CUDA streams cross the boundary as plain integers: the extension never
// sees a torch tensor, so it links no libtorch and serves every torch version.
inline const void* as_ptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
inline void* as_mut_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

void register_norm(pybind11::module_& m);
void register_moe(pybind11::module_& m);
void register_gemm(pybind11::module_& m);
void register_attention(pybind11::module_& m);
void register_attention_decode(pybind11::module_& m);
void register_nvfp4(pybind11::module_& m);
void register_moe_prefill(pybind11::module_& m);
void register_kv_cache(pybind11::module_& m);
void register_rope(pybind11::module_& m);
void register_gemv(pybind11::module_& m);
void register_activation(pybind11::module_& m);

}  // namespace gemma4x::bindings

#include "ops/kv_cache/kv_cache.h"

#include <cuda_runtime_api.h>

#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_kv_cache(py::module_& m) {
  using namespace gemma4x::kv_cache;

  // k_cache[slot, row] = k[b], v_cache[slot, row] = v[b], ring_pos[slot, row] = pos; one launch.
  m.def(
      "kv_cache_write",
      [](uintptr_t k_cache, uintptr_t v_cache, uintptr_t ring_pos, uintptr_t k, int64_t k_stride_bytes, uintptr_t v,
         int64_t v_stride_bytes, uintptr_t slots, uintptr_t positions, int64_t positions_stride, int64_t num_slots,
         int64_t rows, int64_t row_bytes, int32_t batch, uintptr_t stream) {
        KvCacheWriteParams p{};
        p.k_cache = as_mut_ptr(k_cache);
        p.v_cache = as_mut_ptr(v_cache);
        p.ring_pos = static_cast<int64_t*>(as_mut_ptr(ring_pos));
        p.k = as_ptr(k);
        p.v = as_ptr(v);
        p.k_stride_bytes = k_stride_bytes;
        p.v_stride_bytes = v_stride_bytes;
        p.slots = static_cast<const int64_t*>(as_ptr(slots));
        p.positions = static_cast<const int64_t*>(as_ptr(positions));
        p.positions_stride = positions_stride;
        p.num_slots = num_slots;
        p.rows = rows;
        p.row_bytes = row_bytes;
        p.batch = batch;
        kv_cache_write(p, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("ring_pos"), py::arg("k"), py::arg("k_stride_bytes"),
      py::arg("v"), py::arg("v_stride_bytes"), py::arg("slots"), py::arg("positions"), py::arg("positions_stride"),
      py::arg("num_slots"), py::arg("rows"), py::arg("row_bytes"), py::arg("batch"), py::arg("stream"));
}

}  // namespace gemma4x::bindings

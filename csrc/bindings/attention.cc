#include <cuda_runtime_api.h>

#include "registry.h"

#ifdef GEMMA4X_HAS_SM90
#include "ops/attention/attention.h"
#endif

namespace py = pybind11;

namespace gemma4x::bindings {

void register_attention(py::module_& m) {
#ifdef GEMMA4X_HAS_SM90
  using namespace gemma4x::attention;
  m.attr("has_sm90") = true;

  // out [Nq,nH,d] = masked GQA softmax(scale q k^T) v over packed varlen sequences (sm_90a only).
  m.def(
      "attention_varlen",
      [](uintptr_t out, uintptr_t q, uintptr_t k, uintptr_t v, py::tuple strides, uintptr_t cu_q, uintptr_t cu_k,
         uintptr_t tile_cum, uintptr_t q_block, uintptr_t k_block, uintptr_t kb_min, uintptr_t kb_max, int32_t batch,
         int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t total_q, int32_t total_k,
         int32_t tiles_bound, int32_t block_m, int32_t window_left, int32_t window_right, bool unified, float scale,
         int32_t variant, int32_t dtype, uintptr_t stream) {
        if (py::len(strides) != 8) throw std::invalid_argument("attention_varlen: strides must have 8 entries");
        AttentionVarlenParams p{};
        p.q = as_ptr(q);
        p.k = as_ptr(k);
        p.v = as_ptr(v);
        p.out = as_mut_ptr(out);
        p.q_row_stride = strides[0].cast<int64_t>();
        p.q_head_stride = strides[1].cast<int64_t>();
        p.k_row_stride = strides[2].cast<int64_t>();
        p.k_head_stride = strides[3].cast<int64_t>();
        p.v_row_stride = strides[4].cast<int64_t>();
        p.v_head_stride = strides[5].cast<int64_t>();
        p.o_row_stride = strides[6].cast<int64_t>();
        p.o_head_stride = strides[7].cast<int64_t>();
        p.cu_q = static_cast<const int32_t*>(as_ptr(cu_q));
        p.cu_k = static_cast<const int32_t*>(as_ptr(cu_k));
        p.tile_cum = static_cast<const int32_t*>(as_ptr(tile_cum));
        p.q_block = static_cast<const int32_t*>(as_ptr(q_block));
        p.k_block = static_cast<const int32_t*>(as_ptr(k_block));
        p.kb_min = static_cast<const int32_t*>(as_ptr(kb_min));
        p.kb_max = static_cast<const int32_t*>(as_ptr(kb_max));
        p.batch = batch;
        p.num_heads = num_heads;
        p.num_kv_heads = num_kv_heads;
        p.head_dim = head_dim;
        p.total_q = total_q;
        p.total_k = total_k;
        p.tiles_bound = tiles_bound;
        p.block_m = block_m;
        p.window_left = window_left;
        p.window_right = window_right;
        p.unified = unified ? 1 : 0;
        attention_varlen(p, dtype_from_code(dtype, "attention_varlen dtype"), scale, variant,
                         reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("strides"), py::arg("cu_q"), py::arg("cu_k"),
      py::arg("tile_cum"), py::arg("q_block"), py::arg("k_block"), py::arg("kb_min"), py::arg("kb_max"),
      py::arg("batch"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("total_q"),
      py::arg("total_k"), py::arg("tiles_bound"), py::arg("block_m"), py::arg("window_left"), py::arg("window_right"),
      py::arg("unified"), py::arg("scale"), py::arg("variant"), py::arg("dtype"), py::arg("stream"));

  // Query rows per CTA for (head dim, variant) (tile_cum is built with it); 0 when unsupported.
  m.def("attention_varlen_block_m", &attention_varlen_block_m, py::arg("head_dim"), py::arg("variant"));
#else
  // Built without an sm_90 target: the wrapper reads this and falls back to SDPA.
  m.attr("has_sm90") = false;
#endif
}

}  // namespace gemma4x::bindings

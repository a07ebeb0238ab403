#include "ops/attention_decode/attention_decode.h"

#include <cuda_runtime_api.h>

#include "registry.h"

namespace py = pybind11;

namespace gemma4x::bindings {

void register_attention_decode(py::module_& m) {
  using namespace gemma4x::attention_decode;

  // KV splits (flash-decoding) the launch will use; sizes the fp32 partials.
  m.def(
      "num_splits",
      [](int32_t batch, int32_t tq, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t max_rows,
         int32_t dtype) {
        return num_splits(batch, tq, num_heads, num_kv_heads, head_dim, max_rows,
                          dtype_from_code(dtype, "attention_decode dtype"));
      },
      py::arg("batch"), py::arg("tq"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("max_rows"), py::arg("dtype"));

  // Benchmark knobs: variant bitmask (kVariant* in attention_decode.h) and a split-count
  // override (0 = heuristic). Read at launch time.
  m.def("set_tuning", [](int32_t variant, int32_t splits) { set_tuning(variant, splits); }, py::arg("variant"),
        py::arg("splits"));
  m.def("get_tuning", [] { return py::make_tuple(tuning_variant(), tuning_splits()); });

  // out[b, t, h] = softmax(scale q k^T) v over the cache rows sequence b may see.
  m.def(
      "decode",
      [](uintptr_t q, int64_t q_sb, int64_t q_st, int64_t q_sh, uintptr_t k, int64_t k_ss, int64_t k_sr, int64_t k_sh,
         uintptr_t v, int64_t v_ss, int64_t v_sr, int64_t v_sh, uintptr_t q_pos, uintptr_t slots, uintptr_t ring_pos,
         int64_t ring_ss, uintptr_t out, int64_t o_sb, int64_t o_st, int64_t o_sh, uintptr_t o_part,
         uintptr_t lse_part, int32_t batch, int32_t tq, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
         int32_t num_slots, int32_t rows, int32_t splits, int32_t window_left, float scale, int32_t dtype,
         uintptr_t stream) {
        DecodeParams p{};
        p.q = as_ptr(q);
        p.q_stride_b = q_sb, p.q_stride_t = q_st, p.q_stride_h = q_sh;
        p.k = as_ptr(k);
        p.k_stride_slot = k_ss, p.k_stride_row = k_sr, p.k_stride_head = k_sh;
        p.v = as_ptr(v);
        p.v_stride_slot = v_ss, p.v_stride_row = v_sr, p.v_stride_head = v_sh;
        p.q_pos = static_cast<const int64_t*>(as_ptr(q_pos));
        p.slots = static_cast<const int64_t*>(as_ptr(slots));
        p.ring_pos = static_cast<const int64_t*>(as_ptr(ring_pos));
        p.ring_stride_slot = ring_ss;
        p.out = as_mut_ptr(out);
        p.out_stride_b = o_sb, p.out_stride_t = o_st, p.out_stride_h = o_sh;
        p.o_part = static_cast<float*>(as_mut_ptr(o_part));
        p.lse_part = static_cast<float*>(as_mut_ptr(lse_part));
        p.batch = batch, p.tq = tq, p.num_heads = num_heads, p.num_kv_heads = num_kv_heads, p.head_dim = head_dim;
        p.num_slots = num_slots, p.rows = rows, p.num_splits = splits;
        p.row_groups = num_kv_heads > 0 ? (tq * (num_heads / num_kv_heads) + 15) / 16 : 0;
        p.window_left = window_left;
        p.scale_log2 = scale * 1.4426950408889634f;
        decode_attention(p, dtype_from_code(dtype, "attention_decode dtype"), reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("q"), py::arg("q_sb"), py::arg("q_st"), py::arg("q_sh"), py::arg("k"), py::arg("k_ss"), py::arg("k_sr"),
      py::arg("k_sh"), py::arg("v"), py::arg("v_ss"), py::arg("v_sr"), py::arg("v_sh"), py::arg("q_pos"),
      py::arg("slots"), py::arg("ring_pos"), py::arg("ring_ss"), py::arg("out"), py::arg("o_sb"), py::arg("o_st"),
      py::arg("o_sh"), py::arg("o_part"), py::arg("lse_part"), py::arg("batch"), py::arg("tq"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("num_slots"), py::arg("rows"), py::arg("splits"),
      py::arg("window_left"), py::arg("scale"), py::arg("dtype"), py::arg("stream"));
}

}  // namespace gemma4x::bindings

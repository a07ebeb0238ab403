// Host side shared by the launchers of the FlashAttention-3-structured kernels
// (attention_varlen_fa3_sm90.cu at head dims 256 / 512, attention_varlen_fa3_small_sm90.cu at 64 / 72).
// A family is a struct with
//   static constexpr const char* kName;                      // the kernel's name in errors
//   template <class Cfg> static constexpr auto kernel = ...;  // the kernel of a config
//   template <typename T, typename F> static bool with_config(int head_dim, int variant, F&& f);
// where with_config calls f(Cfg{}) with the config of (head_dim, variant), or returns false when
// it has none for head_dim. attention_varlen() has validated p before any of this runs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "attention.h"
#include "gemma4x/attention/varlen_common.cuh"  // MmaType
#include "gemma4x/common/check.h"

namespace gemma4x::attention {

// TMA tensor maps of q, k, v over the real head dim (boxes of Cfg::kBlockM query rows and Cfg::kBlockN
// key rows) and the launch: one CTA per (query head, query tile).
template <class Family, class Cfg>
void launch_fa3(const AttentionVarlenParams& p, cudaStream_t stream) {
  constexpr bool kBf16 = MmaType<typename Cfg::Element>::kBf16;
  const CUtensorMap tq = make_attention_tensor_map("q", p.q, kBf16, p.head_dim, p.num_heads, p.total_q,
                                                   p.q_row_stride, p.q_head_stride, Cfg::kBlockM);
  const CUtensorMap tk = make_attention_tensor_map("k", p.k, kBf16, p.head_dim, p.num_kv_heads, p.total_k,
                                                   p.k_row_stride, p.k_head_stride, Cfg::kBlockN);
  const CUtensorMap tv = make_attention_tensor_map("v", p.v, kBf16, p.head_dim, p.num_kv_heads, p.total_k,
                                                   p.v_row_stride, p.v_head_stride, Cfg::kBlockN);
  auto kernel = Family::template kernel<Cfg>;
  static bool configured = false;  // the attribute is per function; set it once
  if (!configured) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes),
               (std::string("cudaFuncSetAttribute(") + Family::kName + ")").c_str());
    configured = true;
  }
  const dim3 grid(p.num_heads, p.tiles_bound);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, tq, tk, tv);
  check_launch(Family::kName);
}

// Query rows per CTA of (head_dim, variant); 0 if the family has no config for head_dim.
template <class Family>
int fa3_block_m(int head_dim, int variant) {
  int block_m = 0;
  Family::template with_config<__nv_bfloat16>(head_dim, variant,
                                              [&](auto cfg) { block_m = decltype(cfg)::kBlockM; });
  return block_m;
}

// Launches the config of (p.head_dim, variant) for dtype; false if the family has none.
template <class Family>
bool fa3_launch(const AttentionVarlenParams& p, DType dtype, int variant, cudaStream_t stream) {
  auto run = [&](auto cfg) { launch_fa3<Family, decltype(cfg)>(p, stream); };
  return dtype == DType::kBFloat16 ? Family::template with_config<__nv_bfloat16>(p.head_dim, variant, run)
                                   : Family::template with_config<__half>(p.head_dim, variant, run);
}

}  // namespace gemma4x::attention

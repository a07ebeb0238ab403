// Host-only probe of CUTLASS's SM100 block-scale layout (Sm1xxBlockScaledConfig<16>, the one the
// NVFP4 collective uses for SFA and SFB). For each shape "rows k" given on the command line it
// prints "rows k L size" and then, row by row, the linear offset of every (row, k-block, l)
// coordinate. tests/ops/test_nvfp4_gemm.py compares these against nvfp4_swizzle_scales.
#include <cstdio>
#include <cstdlib>

#include <cute/layout.hpp>
#include <cutlass/detail/sm100_blockscaled_layout.hpp>

int main(int argc, char** argv) {
  using Config = cutlass::detail::Sm1xxBlockScaledConfig<16>;
  for (int i = 1; i + 2 < argc; i += 3) {
    const int rows = std::atoi(argv[i]);
    const int k = std::atoi(argv[i + 1]);
    const int batches = std::atoi(argv[i + 2]);
    // SFA of an (M=rows, N=1, K) problem; SFB of (M=1, N=rows, K) must agree.
    const auto sfa = Config::tile_atom_to_shape_SFA(cute::make_shape(rows, 1, k, batches));
    const auto sfb = Config::tile_atom_to_shape_SFB(cute::make_shape(1, rows, k, batches));
    std::printf("%d %d %d %d\n", rows, k, batches, static_cast<int>(cute::cosize(sfa)));
    for (int l = 0; l < batches; ++l) {
      for (int r = 0; r < rows; ++r) {
        for (int kk = 0; kk < k; kk += 16) {
          const int a = static_cast<int>(sfa(cute::make_coord(r, kk, l)));
          const int b = static_cast<int>(sfb(cute::make_coord(r, kk, l)));
          if (a != b) {
            std::fprintf(stderr, "SFA/SFB disagree at (%d, %d, %d): %d vs %d\n", r, kk, l, a, b);
            return 1;
          }
          // Every element of a 16-wide block must share its scale.
          for (int e = 1; e < 16; ++e) {
            if (sfa(cute::make_coord(r, kk + e, l)) != a) {
              std::fprintf(stderr, "block (%d, %d) element %d has another offset\n", r, kk, e);
              return 1;
            }
          }
          std::printf("%d%c", a, kk + 16 < k ? ' ' : '\n');
        }
      }
    }
  }
  return 0;
}

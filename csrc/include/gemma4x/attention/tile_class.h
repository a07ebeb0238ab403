// Classification of one (query tile, key tile) pair of the varlen attention mask from summaries
// alone, shared by every prefill kernel variant and compiled on the host by a CPU test
// (tests/ops/test_attention_tile_class.py) that checks it against the reference mask.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GEMMA4X_HOST_DEVICE __host__ __device__
#else
#define GEMMA4X_HOST_DEVICE
#endif

namespace gemma4x::attention {

struct TileClass {
  static constexpr int kSkip = 0, kPartial = 1, kFull = 2;
};

// What the mask needs to know about a query tile. Positions are in key coordinates (a query's
// position is its index plus the cached prefix length); windows are "unbounded" when huge.
struct QueryTileSummary {
  int64_t p_lo, p_hi;  // positions of the tile's first and last real query
  int64_t wl, wr;      // window: key s is inside when p - s <= wl and s - p <= wr
  int qbmin, qbmax;    // image-block ids of the tile's queries (qbmax < 0: none)
  bool unified;        // gemma4_unified's block rule instead of Gemma4's
};

// Keys s0..s1 (s1 >= s0). full_width: the key tile holds a whole tile of real keys, so a fully
// visible tile may skip the per-element mask. blocks_overlap: some key of the tile may share an
// image block with some query of the tile (a conservative summary is fine: it only turns
// skips into partial tiles).
//   kSkip:    no pair is visible;   kFull: every pair is visible;   kPartial: mask per element.
GEMMA4X_HOST_DEVICE inline int classify_key_tile(const QueryTileSummary& q, int64_t s0, int64_t s1, bool full_width,
                                                 bool blocks_overlap) {
  const bool left_none = q.p_lo - s1 > q.wl;   // every pair violates the left bound
  const bool right_none = s0 - q.p_hi > q.wr;  // every pair violates the right bound
  const bool all = (s1 - q.p_lo <= q.wr) && (q.p_hi - s0 <= q.wl) && full_width;
  if (all) return TileClass::kFull;
  if (q.unified) {  // visible = inside the window, or the same block
    if (blocks_overlap) return TileClass::kPartial;
    return (left_none || right_none) ? TileClass::kSkip : TileClass::kPartial;
  }
  // Gemma4: visible = inside the left bound, and (inside the right bound or the same block)
  if (left_none) return TileClass::kSkip;
  if (right_none) return blocks_overlap ? TileClass::kPartial : TileClass::kSkip;
  return TileClass::kPartial;
}

}  // namespace gemma4x::attention

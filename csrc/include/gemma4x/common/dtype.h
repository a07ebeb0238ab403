// Element types crossing the Python boundary. The codes are part of the binding ABI:
// python/gemma4x/ops/_dtypes.py holds the same table.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace gemma4x {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline DType dtype_from_code(int32_t code, const char* arg) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string(arg) + ": unknown dtype code " + std::to_string(code) +
                                " (expected 0=float32, 1=float16, 2=bfloat16)");
  }
  return static_cast<DType>(code);
}

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace gemma4x

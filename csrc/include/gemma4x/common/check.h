// Host-side argument checks. Every failure names the argument and says expected vs actual;
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace gemma4x {

template <typename... Parts>
[[noreturn]] inline void fail_argument(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                             ")");
  }
}

// Launch errors surface through cudaGetLastError; checking here keeps a bad launch from being
// reported later by an unrelated call.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace gemma4x

#define GEMMA4X_CHECK_ARG(cond, ...)                    \
  do {                                                  \
    if (!(cond)) ::gemma4x::fail_argument(__VA_ARGS__); \
  } while (0)

// Runtime values turned into compile-time constants, so that the CPU kernels' inner loops
// are specialized (and vectorized) for the common case.
#pragma once

#include <cstdint>
#include <type_traits>

namespace dense_ops {

// Calls f with std::true_type or std::false_type: a runtime flag as a compile-time constant.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{}); else f(std::false_type{});
}

// Calls body(stride) with a unit stride as a compile-time constant, so that loops over a
// contiguous run vectorize, and with the runtime stride otherwise.
template <typename Body>
void with_unit_stride(int64_t stride, const Body& body) {
  if (stride == 1) body(std::integral_constant<int64_t, 1>{}); else body(stride);
}

}  // namespace dense_ops

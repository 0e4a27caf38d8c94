// Dtype rules shared by every op of the extension, and read by Python through dense_ops._C.
#pragma once

#include <c10/core/ScalarType.h>

namespace dense_ops {

// The dtype the ops compute per-channel values in: batch statistics, BN parameters as the kernels
// read them, accumulated gradients, the condensed conv's folded BN. float64 for float64 input,
// float32 otherwise (float16/bfloat16 accumulate in float32, as at::opmath_type says).
inline c10::ScalarType stats_dtype(c10::ScalarType dtype) {
  return dtype == c10::kDouble ? c10::kDouble : c10::kFloat;
}

}  // namespace dense_ops

// Operand checks shared by the CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <utility>

namespace dense_ops {

// A kernel operand and its name for error messages; undefined means an absent optional operand.
using NamedOperand = std::pair<const char*, at::Tensor>;

// Every defined operand must be a CUDA tensor on the device of the first one. Call it before
// constructing the CUDAGuard: a CPU tensor then gets this message, not the guard's.
inline void check_same_cuda_device(const char* op, std::initializer_list<NamedOperand> operands) {
  const auto& [first_name, first] = *operands.begin();
  for (const auto& [name, t] : operands) {
    if (!t.defined()) continue;
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but ", first_name, " is on ",
                first.device());
  }
}

}  // namespace dense_ops

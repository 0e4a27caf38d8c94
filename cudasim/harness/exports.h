// What the harness TUs export to the bindings.
#pragma once
#include <optional>
#include "dense_block.h"

namespace dense_ops {
const BnKernels& sim_bn_kernels();  // csrc/cuda/bn_kernels.cu run by cudasim
const BnKernels& cpu_bn_kernels();  // csrc/cpu/bn_kernels_impl.h, baseline ISA

using OptT = std::optional<at::Tensor>;
at::Tensor sim_condensed_conv(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& weight, int64_t groups, const OptT& out_scale,
                              const OptT& out_shift);
at::Tensor cpu_condensed_conv(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& weight, int64_t groups, const OptT& out_scale,
                              const OptT& out_shift);
}  // namespace dense_ops

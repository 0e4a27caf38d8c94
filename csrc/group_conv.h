// The 3x3 grouped convolution of CondenseNet's layers (stride 1, zero padding 1, no bias), for
// inference: dense_ops::group_conv3x3. Host side in group_conv.cpp; the CPU's direct kernel in
// cpu/group_conv_impl.h.
#pragma once

#include <ATen/ATen.h>

namespace dense_ops {
namespace group_conv {

// The CPU runs a grouped conv with at most this many input channels per group with its own
// direct kernel and a wider one through at::convolution (oneDNN). With few inputs per group
// oneDNN's grouped kernel runs far below the machine's rate (CondenseNet-74 on the README's
// 2-core EPYC, per conv: 8 inputs per group at 112x112, one image, 0.9-1.2 ms against 0.2 ms;
// 16 at 56x56, 0.3 against 0.16 ms), while from 32 on it is as fast as the direct kernel or faster.
constexpr int64_t kDirectMaxGroupInputs = 16;

// Checks the op's arguments (schema: dense_ops.cpp).
void check_arguments(const at::Tensor& input, const at::Tensor& weight, int64_t groups);

// The op's output, uninitialized: [N, weight.size(0), H, W], channels-last when the input is.
at::Tensor empty_output(const at::Tensor& input, const at::Tensor& weight);

// Whether the CPU runs this conv with the direct kernel (else through at::convolution).
bool uses_direct_kernel(int64_t group_inputs, at::ScalarType dtype);

// The conv, its arguments checked, through ATen (cuDNN on CUDA, oneDNN on the CPU), for what the
// direct kernel does not take.
at::Tensor through_aten(const at::Tensor& input, const at::Tensor& weight, int64_t groups);

}  // namespace group_conv
}  // namespace dense_ops

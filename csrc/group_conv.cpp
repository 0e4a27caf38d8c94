// The 3x3 grouped convolution's host side (see group_conv.h), and its CUDA form: cuDNN's grouped
// convolution, which has no thin-group weakness to work around.
#include "group_conv.h"

#include <torch/library.h>

namespace dense_ops {
namespace group_conv {

void check_arguments(const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "group_conv3x3: input must be 4-D [N, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "group_conv3x3: input must be floating point, got ",
              input.scalar_type());
  TORCH_CHECK(input.size(1) > 0, "group_conv3x3: input must have channels, got shape ", input.sizes());
  TORCH_CHECK(groups > 0, "group_conv3x3: groups must be positive, got ", groups);
  TORCH_CHECK(input.size(1) % groups == 0, "group_conv3x3: input's channels ", input.size(1),
              " are not divisible by groups=", groups);
  const int64_t group_inputs = input.size(1) / groups;
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == group_inputs && weight.size(2) == 3 && weight.size(3) == 3,
              "group_conv3x3: weight must be [out_channels, ", group_inputs, ", 3, 3] (input channels per group), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) % groups == 0, "group_conv3x3: weight's out_channels ", weight.size(0),
              " is not divisible by groups=", groups);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "group_conv3x3: weight dtype ", weight.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "group_conv3x3: weight is on ", weight.device(),
              ", but the input is on ", input.device());
}

at::Tensor empty_output(const at::Tensor& input, const at::Tensor& weight) {
  return at::empty({input.size(0), weight.size(0), input.size(2), input.size(3)},
                   input.options().memory_format(input.suggest_memory_format()));
}

bool uses_direct_kernel(int64_t group_inputs, at::ScalarType dtype) {
  return group_inputs <= kDirectMaxGroupInputs && (dtype == at::kFloat || dtype == at::kDouble);
}

at::Tensor through_aten(const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  if (input.numel() == 0 || weight.size(0) == 0) return empty_output(input, weight);
  return at::convolution(input, weight, {}, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, groups)
      .contiguous(input.suggest_memory_format());
}

}  // namespace group_conv

namespace {

at::Tensor group_conv3x3_cuda(const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  group_conv::check_arguments(input, weight, groups);
  return group_conv::through_aten(input, weight, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CUDA, m) {
  m.impl("group_conv3x3", &group_conv3x3_cuda);
}

}  // namespace dense_ops

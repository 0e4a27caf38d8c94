// The condensed 1x1 convolution's host side (see condensed_conv.h).
#include "condensed_conv.h"

#include <utility>

#include "dtypes.h"

namespace dense_ops {
namespace condense {
namespace {

bool spatial_dims_merge(const at::Tensor& t) {
  return t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

// The checked sizes: (kept, per_group_out).
std::pair<int64_t, int64_t> check_arguments(const at::Tensor& input, const at::Tensor& index,
                                            const at::Tensor& scale, const at::Tensor& shift,
                                            const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "condensed_conv: input must be 4-D [N, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "condensed_conv: input must be floating point, got ",
              input.scalar_type());
  TORCH_CHECK(groups > 0, "condensed_conv: groups must be positive, got ", groups);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "condensed_conv: index must be a 1-D int64 tensor, got ", index.dim(), "-D ", index.scalar_type());
  TORCH_CHECK(index.numel() % groups == 0, "condensed_conv: index length ", index.numel(),
              " is not divisible by groups=", groups);
  const int64_t kept = index.numel() / groups;
  for (const auto* affine : {&scale, &shift}) {
    TORCH_CHECK(affine->dim() == 1 && affine->numel() == index.numel() && at::isFloatingType(affine->scalar_type()),
                "condensed_conv: scale and shift must be floating 1-D tensors of the index's length ", index.numel(),
                ", got shape ", affine->sizes());
  }
  TORCH_CHECK((weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1)) &&
                  weight.size(1) == kept,
              "condensed_conv: weight must be [out_channels, ", kept, "] or [out_channels, ", kept,
              ", 1, 1] (kept channels per group), got ", weight.sizes());
  TORCH_CHECK(weight.size(0) % groups == 0, "condensed_conv: weight's out_channels ", weight.size(0),
              " is not divisible by groups=", groups);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "condensed_conv: weight dtype ", weight.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  for (const auto* t : {&index, &scale, &shift, &weight}) {
    TORCH_CHECK(t->device() == input.device(), "condensed_conv: all tensors must be on the input's device ",
                input.device(), ", got one on ", t->device());
  }
  return {kept, weight.size(0) / groups};
}

Epilogue check_epilogue(int64_t out_channels, const at::Tensor& input, const OptionalTensor& out_scale,
                        const OptionalTensor& out_shift) {
  TORCH_CHECK(out_scale.has_value() == out_shift.has_value(),
              "condensed_conv: out_scale and out_shift must be given together");
  if (!out_scale.has_value()) return {};
  for (const auto* affine : {&*out_scale, &*out_shift}) {
    TORCH_CHECK(affine->dim() == 1 && affine->numel() == out_channels &&
                    at::isFloatingType(affine->scalar_type()),
                "condensed_conv: out_scale and out_shift must be floating 1-D tensors of out_channels=",
                out_channels, " elements, got shape ", affine->sizes());
    TORCH_CHECK(affine->device() == input.device(), "condensed_conv: out_scale and out_shift must be on the input's "
                "device ", input.device(), ", got one on ", affine->device());
  }
  const auto acc_type = stats_dtype(input.scalar_type());
  return {out_scale->to(acc_type).contiguous(), out_shift->to(acc_type).contiguous()};
}

// One GEMM per group, through ATen: the packed result in result_layout().
at::Tensor grouped_gemm(const Call& call, const at::Tensor& operand) {
  const at::Tensor grouped_weight = call.weight.view({call.groups, call.per_group_out, call.kept});
  if (call.pixel_major) {
    return at::bmm(operand.view({call.groups, call.pixels(), call.kept}), grouped_weight.transpose(1, 2));
  }
  return at::bmm(grouped_weight, operand.view({call.groups, call.kept, call.pixels()}));
}

}  // namespace

PlaneStrides plane_strides(const at::Tensor& t) {
  const int64_t pixel_stride = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  return {t.stride(0), t.stride(1), pixel_stride, t.size(2) * t.size(3)};
}

Call prepare(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale, const at::Tensor& shift,
             const at::Tensor& weight, int64_t groups, const OptionalTensor& out_scale,
             const OptionalTensor& out_shift) {
  const auto [kept, per_group_out] = check_arguments(input, index, scale, shift, weight, groups);
  const bool pixel_major = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto format = pixel_major ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto acc_type = stats_dtype(input.scalar_type());
  Call call;
  call.input = spatial_dims_merge(input) ? input : input.contiguous(format);
  call.index = index.contiguous();
  call.scale = scale.to(acc_type).contiguous();
  call.shift = shift.to(acc_type).contiguous();
  call.weight = weight.reshape({weight.size(0), kept}).contiguous();
  call.epilogue = check_epilogue(groups * per_group_out, input, out_scale, out_shift);
  // A new tensor in `format`: its H and W strides merge, as the scatter's PlaneStrides needs.
  call.out = at::empty({input.size(0), groups * per_group_out, input.size(2), input.size(3)},
                       input.options().memory_format(format));
  call.groups = groups;
  call.kept = kept;
  call.per_group_out = per_group_out;
  call.pixel_major = pixel_major;
  return call;
}

at::Tensor run(const Kernels& kernels, const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
               const at::Tensor& shift, const at::Tensor& weight, int64_t groups, const OptionalTensor& out_scale,
               const OptionalTensor& out_shift) {
  Call call = prepare(input, index, scale, shift, weight, groups, out_scale, out_shift);
  if (call.out.numel() == 0) return call.out;
  at::Tensor operand = at::empty({call.groups * call.kept * call.pixels()}, call.input.options());
  kernels.gather(call.input, plane_strides(call.input), call.index, call.scale, call.shift, operand,
                 call.operand_layout());
  const at::Tensor result = grouped_gemm(call, operand).contiguous();
  kernels.scatter(result, call.result_layout(), call.groups, call.epilogue, call.out, plane_strides(call.out));
  return call.out;
}

}  // namespace condense
}  // namespace dense_ops

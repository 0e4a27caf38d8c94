// The condensed 1x1 convolution's host side (see condensed_conv.h).
#include "condensed_conv.h"

#include "dtypes.h"

namespace dense_ops {
namespace condense {
namespace {

struct Problem {
  int64_t batch, in_channels, height, width, groups, kept, per_group_out;
  bool pixel_major;  // channels-last input: pack pixel-major

  int64_t pixels() const { return batch * height * width; }
  int64_t out_channels() const { return groups * per_group_out; }
  PackedLayout operand_layout() const { return {kept, pixels(), pixel_major}; }
  PackedLayout result_layout() const { return {per_group_out, pixels(), pixel_major}; }
};

bool spatial_dims_merge(const at::Tensor& t) {
  return t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

PlaneStrides plane_strides(const at::Tensor& t) {
  const int64_t pixel_stride = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  return {t.stride(0), t.stride(1), pixel_stride, t.size(2) * t.size(3)};
}

Problem check_arguments(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor& weight, int64_t groups) {
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
  const bool pixel_major = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return {input.size(0), input.size(1), input.size(2), input.size(3), groups, kept, weight.size(0) / groups,
          pixel_major};
}

Epilogue check_epilogue(const Problem& problem, const at::Tensor& input, const OptionalTensor& out_scale,
                        const OptionalTensor& out_shift) {
  TORCH_CHECK(out_scale.has_value() == out_shift.has_value(),
              "condensed_conv: out_scale and out_shift must be given together");
  if (!out_scale.has_value()) return {};
  for (const auto* affine : {&*out_scale, &*out_shift}) {
    TORCH_CHECK(affine->dim() == 1 && affine->numel() == problem.out_channels() &&
                    at::isFloatingType(affine->scalar_type()),
                "condensed_conv: out_scale and out_shift must be floating 1-D tensors of out_channels=",
                problem.out_channels(), " elements, got shape ", affine->sizes());
    TORCH_CHECK(affine->device() == input.device(), "condensed_conv: out_scale and out_shift must be on the input's "
                "device ", input.device(), ", got one on ", affine->device());
  }
  const auto acc_type = stats_dtype(input.scalar_type());
  return {out_scale->to(acc_type).contiguous(), out_shift->to(acc_type).contiguous()};
}

// One GEMM per group, through ATen: the packed result in result_layout().
at::Tensor grouped_gemm(const Problem& p, const at::Tensor& operand, const at::Tensor& weight) {
  const at::Tensor grouped_weight = weight.reshape({p.groups, p.per_group_out, p.kept});
  if (p.pixel_major) return at::bmm(operand.view({p.groups, p.pixels(), p.kept}), grouped_weight.transpose(1, 2));
  return at::bmm(grouped_weight, operand.view({p.groups, p.kept, p.pixels()}));
}

}  // namespace

// The whole op: gather + BN + ReLU into the packed operand, one GEMM per group, shuffled scatter.
at::Tensor run(const Kernels& kernels, const at::Tensor& input_arg, const at::Tensor& index,
               const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight, int64_t groups,
               const OptionalTensor& out_scale, const OptionalTensor& out_shift) {
  const Problem problem = check_arguments(input_arg, index, scale, shift, weight, groups);
  const Epilogue epilogue = check_epilogue(problem, input_arg, out_scale, out_shift);
  const auto format = problem.pixel_major ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // A new tensor in `format`: its H and W strides merge, as the scatter's PlaneStrides needs.
  at::Tensor out = at::empty({problem.batch, problem.out_channels(), problem.height, problem.width},
                             input_arg.options().memory_format(format));
  if (out.numel() == 0) return out;
  const at::Tensor input = spatial_dims_merge(input_arg) ? input_arg : input_arg.contiguous(format);
  const auto acc_type = stats_dtype(input.scalar_type());

  at::Tensor operand = at::empty({problem.groups * problem.kept * problem.pixels()}, input.options());
  kernels.gather(input, plane_strides(input), index.contiguous(), scale.to(acc_type).contiguous(),
                 shift.to(acc_type).contiguous(), operand, problem.operand_layout());
  const at::Tensor result = grouped_gemm(problem, operand, weight).contiguous();
  kernels.scatter(result, problem.result_layout(), problem.groups, epilogue, out, plane_strides(out));
  return out;
}

}  // namespace condense
}  // namespace dense_ops

// The transition's BN-ReLU-avgpool2x2 as one pass over its input, and its backward as two
// (common/bn_math.h): written once for every device over its BnKernels. dense_ops/functional.py
// runs the 1x1 convolution after the pool.
#include "dense_block.h"

#include "dtypes.h"

namespace dense_ops {
namespace {

// A per-channel tensor of the input's channels on its device; returned in the stats dtype.
at::Tensor channel_vector(const at::Tensor& t, const char* op, const char* name, const at::Tensor& input,
                          at::ScalarType stats) {
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == input.size(1), op, ": ", name, " must be a 1-D tensor of ",
              input.size(1), " elements (the input's channels), got ", (t.defined() ? t.sizes() : at::IntArrayRef{}));
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
              input.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
  return t.to(stats).contiguous();
}

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be a 4-D [N, C, H, W] tensor, got ", input.dim(), "-D");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": input must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(input.size(2) >= 2 && input.size(3) >= 2, op,
              ": input must be at least 2x2 pixels for the 2x2 pool, got ", input.sizes());
}

BnParams checked_bn(const char* op, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& mean, const at::Tensor& var, double eps) {
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  const auto stats = stats_dtype(input.scalar_type());
  return BnParams{channel_vector(weight, op, "weight", input, stats), channel_vector(bias, op, "bias", input, stats),
                  channel_vector(mean, op, "mean", input, stats), channel_vector(var, op, "var", input, stats), eps};
}

at::Tensor empty_pooled(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2},
                   x.options().memory_format(x.suggest_memory_format()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_forward(const at::Tensor& input, const at::Tensor& weight,
                                                                    const at::Tensor& bias, const at::Tensor& mean,
                                                                    const at::Tensor& var, bool training, double eps,
                                                                    const BnKernels& kernels) {
  constexpr const char* kOp = "bn_relu_pool";
  check_input(input, kOp);
  const at::Tensor x = input.contiguous(input.suggest_memory_format());
  BnParams bn = checked_bn(kOp, x, weight, bias, mean, var, eps);
  if (training) {
    TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, kOp,
                ": training needs more than one value per channel, got input of size ", x.sizes());
    bn.mean = at::empty_like(bn.mean), bn.var = at::empty_like(bn.var);
    kernels.channel_moments(x, bn.mean, bn.var, is_channels_last(x));
  } else {  // copies: backward must see these statistics even if the module's change
    bn.mean = bn.mean.clone(), bn.var = bn.var.clone();
  }
  const at::Tensor pooled = empty_pooled(x);
  if (pooled.numel() > 0) kernels.bn_relu_pool(x, bn, pooled, is_channels_last(x));
  return {pooled, bn.mean, bn.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward(
    const at::Tensor& grad_pooled, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool input_needs_grad,
    const BnKernels& kernels) {
  constexpr const char* kOp = "bn_relu_pool_backward";
  check_input(input, kOp);
  const auto format = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(format);
  const BnParams bn = checked_bn(kOp, x, weight, bias, mean, var, eps);
  const std::vector<int64_t> pooled_sizes{x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2};
  TORCH_CHECK(grad_pooled.sizes() == at::IntArrayRef(pooled_sizes), kOp, ": grad_pooled must have shape ",
              at::IntArrayRef(pooled_sizes), " (the pooled input's), got ", grad_pooled.sizes());
  TORCH_CHECK(grad_pooled.scalar_type() == x.scalar_type() && grad_pooled.device() == x.device(), kOp,
              ": grad_pooled must have the input's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
              grad_pooled.scalar_type(), ", ", grad_pooled.device());
  const at::Tensor grad = grad_pooled.contiguous(format);
  const bool channels_last = is_channels_last(x);

  const at::Tensor sums = at::zeros({2, x.size(1)}, bn.mean.options().dtype(at::kDouble));  // dy * x_hat, dy
  if (x.numel() > 0) kernels.bn_relu_pool_sums(x, grad, bn, sums[0], sums[1], channels_last);
  at::Tensor grad_input = at::empty({0}, x.options());
  if (input_needs_grad) {
    grad_input = at::empty_like(x, x.options().memory_format(format));
    at::Tensor proj_mean, proj_xhat;
    if (training) {  // the batch-statistics projections
      proj_mean = at::zeros_like(bn.mean), proj_xhat = at::zeros_like(bn.mean);
      add_projections(bn, sums[0], sums[1], x.size(0) * x.size(2) * x.size(3), proj_mean, proj_xhat);
    }
    if (x.numel() > 0) kernels.bn_relu_pool_input_grad(x, grad, bn, proj_mean, proj_xhat, grad_input, channels_last);
  }
  return {grad_input, sums[0].to(weight.scalar_type()), sums[1].to(bias.scalar_type())};
}

}  // namespace dense_ops

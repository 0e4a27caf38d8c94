// Argument checks of the dense block ops (see block_checks.h).
#include "block_checks.h"

#include "block.h"

#include <string>
#include <vector>

namespace dense_ops {
namespace {

void check_vector(const at::Tensor& t, int64_t size, const char* what, int64_t layer, const at::Tensor& input) {
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == size, "dense_block: layer ", layer, " ", what,
              " must be a 1-D tensor of ", size, " elements, got ", (t.defined() ? t.sizes() : at::IntArrayRef{}));
  TORCH_CHECK(t.device() == input.device(), "dense_block: layer ", layer, " ", what, " is on ", t.device(),
              " but the input is on ", input.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "dense_block: layer ", layer, " ", what,
              " must be a floating-point tensor, got ", t.scalar_type());
}

void check_conv(const at::Tensor& w, int64_t out_channels, int64_t in_channels, const char* what, int64_t layer,
                const at::Tensor& input) {
  TORCH_CHECK(w.defined() && w.dim() == 4 && w.size(0) == out_channels && w.size(1) == in_channels &&
                  w.size(2) == w.size(3) && w.size(2) % 2 == 1,
              "dense_block: layer ", layer, " ", what, " must have shape [", out_channels, ", ", in_channels,
              ", K, K] with odd K, got ", (w.defined() ? w.sizes() : at::IntArrayRef{}));
  TORCH_CHECK(w.device() == input.device(), "dense_block: layer ", layer, " ", what, " is on ", w.device(),
              " but the input is on ", input.device());
  TORCH_CHECK(w.scalar_type() == input.scalar_type(), "dense_block: layer ", layer, " ", what, " has dtype ",
              w.scalar_type(), " but the input has dtype ", input.scalar_type());
}

// An argument of dense_block_backward must be what dense_block_forward returned: shape
// (unless `shape` is nullopt: unused in eval mode), dtype and device. The kernels index
// it by the block's shape, so a mismatch would read or write out of bounds.
void check_saved(const at::Tensor& t, const std::string& name, at::OptionalIntArrayRef shape, at::ScalarType dtype,
                 const at::Device& device) {
  TORCH_CHECK(t.defined(), "dense_block_backward: ", name, " is undefined");
  TORCH_CHECK(!shape.has_value() || t.sizes() == *shape, "dense_block_backward: ", name, " must have shape ", *shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "dense_block_backward: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, "dense_block_backward: ", name, " must be on ", device,
              " (the features' device), got ", t.device());
}

}  // namespace

BlockShape check_block(const at::Tensor& input, at::TensorList params, bool bottleneck, bool with_running_stats) {
  TORCH_CHECK(input.dim() == 4, "dense_block: input must be a 4-D [N, C, H, W] tensor, got ", input.dim(), "-D");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "dense_block: input must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t per_layer = params_per_layer(bottleneck);
  TORCH_CHECK(!params.empty() && params.size() % per_layer == 0, "dense_block: layer_params must hold ",
              per_layer, " tensors per layer (at least one layer), got ", params.size());
  BlockShape shape{input.size(0), input.size(1), input.size(2), input.size(3),
                   static_cast<int64_t>(params.size()) / per_layer, 0, 0};
  TORCH_CHECK(shape.in_channels > 0, "dense_block: input must have at least one channel, got ", input.sizes());
  const at::Tensor& last_conv = param(params, bottleneck, shape.num_layers - 1, bottleneck ? kConv2Weight : kConv1Weight);
  TORCH_CHECK(last_conv.defined() && last_conv.dim() == 4, "dense_block: conv weights must be 4-D");
  shape.growth = last_conv.size(0);
  shape.bottleneck_width = bottleneck ? param(params, bottleneck, 0, kConv1Weight).size(0) : 0;
  TORCH_CHECK(shape.growth > 0, "dense_block: growth rate must be positive");
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    const int64_t channels = shape.channels(l);
    check_vector(param(params, bottleneck, l, kNorm1Weight), channels, "norm1.weight", l, input);
    check_vector(param(params, bottleneck, l, kNorm1Bias), channels, "norm1.bias", l, input);
    if (with_running_stats) {
      check_vector(param(params, bottleneck, l, kNorm1Mean), channels, "norm1.running_mean", l, input);
      check_vector(param(params, bottleneck, l, kNorm1Var), channels, "norm1.running_var", l, input);
    }
    if (bottleneck) {
      const int64_t width = shape.bottleneck_width;
      check_conv(param(params, bottleneck, l, kConv1Weight), width, channels, "conv1.weight", l, input);
      TORCH_CHECK(param(params, bottleneck, l, kConv1Weight).size(2) == 1, "dense_block: layer ", l,
                  " conv1.weight of a bottleneck layer must be 1x1");
      check_vector(param(params, bottleneck, l, kNorm2Weight), width, "norm2.weight", l, input);
      check_vector(param(params, bottleneck, l, kNorm2Bias), width, "norm2.bias", l, input);
      if (with_running_stats) {
        check_vector(param(params, bottleneck, l, kNorm2Mean), width, "norm2.running_mean", l, input);
        check_vector(param(params, bottleneck, l, kNorm2Var), width, "norm2.running_var", l, input);
      }
      check_conv(param(params, bottleneck, l, kConv2Weight), shape.growth, width, "conv2.weight", l, input);
    } else {
      check_conv(param(params, bottleneck, l, kConv1Weight), shape.growth, channels, "conv1.weight", l, input);
    }
  }
  return shape;
}

void check_dropout_mask(const std::optional<at::Tensor>& mask, const at::Tensor& input, const BlockShape& s) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->dim() == 4 && mask->size(0) == s.batch && mask->size(1) == s.num_layers * s.growth &&
                  mask->size(2) == s.height && mask->size(3) == s.width,
              "dense_block: dropout_mask must have shape [", s.batch, ", ", s.num_layers * s.growth, ", ", s.height,
              ", ", s.width, "], got ", mask->sizes());
  TORCH_CHECK(mask->scalar_type() == input.scalar_type() && mask->device() == input.device(),
              "dense_block: dropout_mask must match the input's dtype and device");
}

SavedForBackward check_backward(const at::Tensor& grad_features, const at::Tensor& features,
                                const at::Tensor& batch_mean, const at::Tensor& batch_var,
                                at::TensorList saved_bottleneck, const at::Tensor& bottleneck_mean,
                                const at::Tensor& bottleneck_var, at::TensorList params,
                                const std::optional<at::Tensor>& dropout_mask, bool bottleneck, bool training,
                                double eps, at::IntArrayRef layer_needs_grad) {
  TORCH_CHECK(features.dim() == 4, "dense_block_backward: features must be 4-D");
  const int64_t per_layer = params_per_layer(bottleneck);
  TORCH_CHECK(!params.empty() && params.size() % per_layer == 0, "dense_block_backward: layer_params must hold ",
              per_layer, " tensors per layer");
  const int64_t num_layers = static_cast<int64_t>(params.size()) / per_layer;
  const int64_t growth = param(params, bottleneck, num_layers - 1, bottleneck ? kConv2Weight : kConv1Weight).size(0);
  const int64_t in_channels = features.size(1) - num_layers * growth;
  TORCH_CHECK(in_channels > 0, "dense_block_backward: features has too few channels for ", num_layers, " layers");
  const BlockShape shape =
      check_block(features.narrow(1, 0, in_channels), params, bottleneck, /*with_running_stats=*/!training);
  TORCH_CHECK(eps > 0, "dense_block_backward: eps must be positive, got ", eps);
  TORCH_CHECK(static_cast<int64_t>(layer_needs_grad.size()) == shape.num_layers,
              "dense_block_backward: layer_needs_grad must have one entry per layer");
  const auto format = features.suggest_memory_format();
  const auto acc = stats_dtype(features.scalar_type());
  const auto device = features.device();
  check_saved(grad_features, "grad_features", features.sizes(), features.scalar_type(), device);
  // The batch statistics are unused in eval mode: their shape is not checked there.
  const std::vector<int64_t> channel_stats{shape.total_channels()};
  const std::vector<int64_t> bottleneck_stats{shape.num_layers, shape.bottleneck_width};
  const at::OptionalIntArrayRef stats_shape = training ? at::OptionalIntArrayRef(channel_stats) : std::nullopt;
  const at::OptionalIntArrayRef bottleneck_stats_shape =
      training ? at::OptionalIntArrayRef(bottleneck_stats) : std::nullopt;
  check_saved(batch_mean, "batch_mean", stats_shape, acc, device);
  check_saved(batch_var, "batch_var", stats_shape, acc, device);
  check_saved(bottleneck_mean, "bottleneck_mean", bottleneck_stats_shape, acc, device);
  check_saved(bottleneck_var, "bottleneck_var", bottleneck_stats_shape, acc, device);
  const bool keep_bottleneck = !saved_bottleneck.empty();
  TORCH_CHECK(!keep_bottleneck || (bottleneck && static_cast<int64_t>(saved_bottleneck.size()) == shape.num_layers),
              "dense_block_backward: saved_bottleneck must be empty or, with a bottleneck, hold one tensor per layer");
  const auto saved_format = bottleneck_format(bottleneck_strategy(features.is_cpu()), format);
  std::vector<at::Tensor> saved;  // in the bottleneck layout, as the kernels expect
  for (int64_t l = 0; l < static_cast<int64_t>(saved_bottleneck.size()); ++l) {
    check_saved(saved_bottleneck[l], "saved_bottleneck[" + std::to_string(l) + "]",
                {{shape.batch, shape.bottleneck_width, shape.height, shape.width}}, features.scalar_type(), device);
    saved.push_back(saved_bottleneck[l].contiguous(saved_format));
  }
  check_dropout_mask(dropout_mask, features, shape);

  return {shape, saved};
}

}  // namespace dense_ops

// The dense block over one shared feature buffer (see DESIGN.md):
//   forward:  features = [input | new_0 | ... | new_{L-1}], layer l reads features[:, :C0 + l*k];
//             batch statistics are computed once per channel, when the channel is written.
//   backward: walks the layers in reverse; BN1-ReLU outputs are recomputed into one scratch
//             buffer, every reader of a channel adds scale * dy into one gradient buffer, and
//             a channel's input gradient is finalized once, just before the layer that wrote
//             it needs it.
#include "dense_block.h"

#include <algorithm>

namespace dense_ops {
namespace {

// Position of each parameter of a layer in the flat `layer_params` list.
enum ParamIndex : int64_t {
  kNorm1Weight, kNorm1Bias, kNorm1Mean, kNorm1Var, kConv1Weight,
  kNorm2Weight, kNorm2Bias, kNorm2Mean, kNorm2Var, kConv2Weight,
};

int64_t params_per_layer(bool bottleneck) { return bottleneck ? 10 : 5; }

struct BlockShape {
  int64_t batch, in_channels, height, width;
  int64_t num_layers, growth, bottleneck_width;  // bottleneck_width is 0 without a bottleneck
  int64_t channels(int64_t layer) const { return in_channels + layer * growth; }
  int64_t total_channels() const { return channels(num_layers); }
};

at::ScalarType stats_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

const at::Tensor& param(at::TensorList params, bool bottleneck, int64_t layer, ParamIndex which) {
  return params[layer * params_per_layer(bottleneck) + which];
}

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

// Running statistics are checked unless they are unused (backward of a training step).
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
    const int64_t c = shape.channels(l);
    check_vector(param(params, bottleneck, l, kNorm1Weight), c, "norm1.weight", l, input);
    check_vector(param(params, bottleneck, l, kNorm1Bias), c, "norm1.bias", l, input);
    if (with_running_stats) {
      check_vector(param(params, bottleneck, l, kNorm1Mean), c, "norm1.running_mean", l, input);
      check_vector(param(params, bottleneck, l, kNorm1Var), c, "norm1.running_var", l, input);
    }
    if (bottleneck) {
      const int64_t b = shape.bottleneck_width;
      check_conv(param(params, bottleneck, l, kConv1Weight), b, c, "conv1.weight", l, input);
      check_vector(param(params, bottleneck, l, kNorm2Weight), b, "norm2.weight", l, input);
      check_vector(param(params, bottleneck, l, kNorm2Bias), b, "norm2.bias", l, input);
      if (with_running_stats) {
        check_vector(param(params, bottleneck, l, kNorm2Mean), b, "norm2.running_mean", l, input);
        check_vector(param(params, bottleneck, l, kNorm2Var), b, "norm2.running_var", l, input);
      }
      check_conv(param(params, bottleneck, l, kConv2Weight), shape.growth, b, "conv2.weight", l, input);
    } else {
      check_conv(param(params, bottleneck, l, kConv1Weight), shape.growth, c, "conv1.weight", l, input);
    }
  }
  return shape;
}

at::MemoryFormat block_memory_format(const at::Tensor& input) { return input.suggest_memory_format(); }

bool is_channels_last(at::MemoryFormat format) { return format == at::MemoryFormat::ChannelsLast; }

// A [N, C, H, W] tensor laid out in `format` over the first elements of a flat scratch buffer.
at::Tensor scratch_view(const at::Tensor& scratch, const BlockShape& s, int64_t channels, at::MemoryFormat format) {
  auto view = scratch.narrow(0, 0, s.batch * channels * s.height * s.width);
  if (is_channels_last(format)) {
    return view.view({s.batch, s.height, s.width, channels}).permute({0, 3, 1, 2});
  }
  return view.view({s.batch, channels, s.height, s.width});
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, at::MemoryFormat format) {
  const int64_t pad = (weight.size(2) - 1) / 2;
  return at::convolution(x, weight, {}, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1).contiguous(format);
}

// Returns (grad_input, grad_weight); either is undefined when not asked for.
std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& weight, bool need_input, bool need_weight,
                                                 at::MemoryFormat format) {
  const int64_t pad = (weight.size(2) - 1) / 2;
  auto grads = at::convolution_backward(grad_out, x, weight, std::nullopt, {1, 1}, {pad, pad}, {1, 1}, false,
                                        {0, 0}, 1, {need_input, need_weight, false});
  at::Tensor grad_input = std::get<0>(grads);
  if (grad_input.defined()) grad_input = grad_input.contiguous(format);
  return {grad_input, std::get<1>(grads)};
}

// Batch-norm parameters of one BN of one layer: batch statistics in training, the
// layer's own running statistics in eval mode.
BnParams bn_params(at::TensorList params, bool bottleneck, int64_t layer, bool second, bool training,
                   const at::Tensor& batch_mean, const at::Tensor& batch_var, double eps, at::ScalarType dtype) {
  const ParamIndex w = second ? kNorm2Weight : kNorm1Weight, b = second ? kNorm2Bias : kNorm1Bias;
  const ParamIndex m = second ? kNorm2Mean : kNorm1Mean, v = second ? kNorm2Var : kNorm1Var;
  BnParams bn;
  bn.weight = param(params, bottleneck, layer, w).to(dtype).contiguous();
  bn.bias = param(params, bottleneck, layer, b).to(dtype).contiguous();
  if (training) {
    bn.mean = batch_mean;
    bn.var = batch_var;
  } else {
    bn.mean = param(params, bottleneck, layer, m).to(dtype).contiguous();
    bn.var = param(params, bottleneck, layer, v).to(dtype).contiguous();
  }
  bn.eps = eps;
  return bn;
}

// The first `channels` batch statistics; undefined in eval mode, where there are none.
at::Tensor prefix(const at::Tensor& stats, int64_t channels) {
  return stats.numel() > 0 ? stats.narrow(0, 0, channels) : at::Tensor();
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

}  // namespace

ForwardResult dense_block_forward(const at::Tensor& input, at::TensorList params,
                                  const std::optional<at::Tensor>& dropout_mask, bool bottleneck, bool training,
                                  bool keep_bottleneck, double eps, const BnKernels& kernels) {
  const BlockShape s = check_block(input, params, bottleneck, /*with_running_stats=*/true);
  check_dropout_mask(dropout_mask, input, s);
  TORCH_CHECK(eps > 0, "dense_block: eps must be positive, got ", eps);
  const auto format = block_memory_format(input);
  const bool cl = is_channels_last(format);
  const auto stat_options = input.options().dtype(stats_dtype(input.scalar_type()));
  const int64_t stat_channels = training ? s.total_channels() : 0;
  const int64_t stat_width = training ? s.bottleneck_width : 0;

  at::Tensor features = at::empty({s.batch, s.total_channels(), s.height, s.width}, input.options().memory_format(format));
  at::Tensor batch_mean = at::empty({stat_channels}, stat_options), batch_var = at::empty({stat_channels}, stat_options);
  at::Tensor bottleneck_mean = at::empty({s.num_layers, stat_width}, stat_options);
  at::Tensor bottleneck_var = at::empty({s.num_layers, stat_width}, stat_options);
  std::vector<at::Tensor> saved_bottleneck;
  if (s.batch * s.height * s.width == 0) {
    // Nothing to compute; an empty batch has undefined (NaN) statistics, as in PyTorch.
    batch_mean.fill_(NAN), batch_var.fill_(NAN), bottleneck_mean.fill_(NAN), bottleneck_var.fill_(NAN);
    if (keep_bottleneck && bottleneck) {
      for (int64_t l = 0; l < s.num_layers; ++l)
        saved_bottleneck.push_back(at::empty({s.batch, s.bottleneck_width, s.height, s.width}, input.options().memory_format(format)));
    }
    return {features, batch_mean, batch_var, saved_bottleneck, bottleneck_mean, bottleneck_var};
  }

  features.narrow(1, 0, s.in_channels).copy_(input);
  if (training) {
    kernels.channel_moments(features.narrow(1, 0, s.in_channels), batch_mean.narrow(0, 0, s.in_channels),
                            batch_var.narrow(0, 0, s.in_channels), cl);
  }
  at::Tensor scratch = at::empty({s.batch * s.channels(s.num_layers - 1) * s.height * s.width}, input.options());
  at::Tensor bottleneck_scratch;
  if (bottleneck) {
    bottleneck_scratch = at::empty({s.batch, s.bottleneck_width, s.height, s.width}, input.options().memory_format(format));
  }
  const auto acc = stat_options.dtype().toScalarType();
  for (int64_t l = 0; l < s.num_layers; ++l) {
    const int64_t c = s.channels(l);
    const at::Tensor x = features.narrow(1, 0, c);
    const at::Tensor z1 = scratch_view(scratch, s, c, format);
    kernels.bn_relu_forward(x, bn_params(params, bottleneck, l, false, training, prefix(batch_mean, c), prefix(batch_var, c),
                                         eps, acc), z1, cl);
    at::Tensor new_features;
    if (bottleneck) {
      at::Tensor b = conv(z1, param(params, bottleneck, l, kConv1Weight), format);
      if (training) kernels.channel_moments(b, bottleneck_mean[l], bottleneck_var[l], cl);
      kernels.bn_relu_forward(b, bn_params(params, bottleneck, l, true, training, bottleneck_mean[l], bottleneck_var[l], eps, acc),
                              bottleneck_scratch, cl);
      new_features = conv(bottleneck_scratch, param(params, bottleneck, l, kConv2Weight), format);
      if (keep_bottleneck) saved_bottleneck.push_back(std::move(b));
    } else {
      new_features = conv(z1, param(params, bottleneck, l, kConv1Weight), format);
    }
    if (dropout_mask.has_value()) new_features.mul_(dropout_mask->narrow(1, l * s.growth, s.growth));
    const at::Tensor slot = features.narrow(1, c, s.growth);
    slot.copy_(new_features);
    if (training) {
      kernels.channel_moments(slot, batch_mean.narrow(0, c, s.growth), batch_var.narrow(0, c, s.growth), cl);
    }
  }
  return {features, batch_mean, batch_var, saved_bottleneck, bottleneck_mean, bottleneck_var};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> dense_block_backward(
    const at::Tensor& grad_features, const at::Tensor& features, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, at::TensorList saved_bottleneck, const at::Tensor& bottleneck_mean,
    const at::Tensor& bottleneck_var, at::TensorList params, const std::optional<at::Tensor>& dropout_mask,
    bool bottleneck, bool training, double eps, at::IntArrayRef layer_needs_grad, bool input_needs_grad,
    const BnKernels& kernels) {
  TORCH_CHECK(features.dim() == 4, "dense_block_backward: features must be 4-D");
  const int64_t per_layer = params_per_layer(bottleneck);
  TORCH_CHECK(!params.empty() && params.size() % per_layer == 0, "dense_block_backward: layer_params must hold ",
              per_layer, " tensors per layer");
  const int64_t num_layers = static_cast<int64_t>(params.size()) / per_layer;
  const int64_t growth = param(params, bottleneck, num_layers - 1, bottleneck ? kConv2Weight : kConv1Weight).size(0);
  const int64_t in_channels = features.size(1) - num_layers * growth;
  TORCH_CHECK(in_channels > 0, "dense_block_backward: features has too few channels for ", num_layers, " layers");
  const at::Tensor input_like = features.narrow(1, 0, in_channels);
  const BlockShape s = check_block(input_like, params, bottleneck, /*with_running_stats=*/!training);
  TORCH_CHECK(grad_features.sizes() == features.sizes(), "dense_block_backward: grad_features must have shape ",
              features.sizes(), ", got ", grad_features.sizes());
  TORCH_CHECK(static_cast<int64_t>(layer_needs_grad.size()) == s.num_layers,
              "dense_block_backward: layer_needs_grad must have one entry per layer");
  const bool keep_bottleneck = !saved_bottleneck.empty();
  TORCH_CHECK(!keep_bottleneck || static_cast<int64_t>(saved_bottleneck.size()) == s.num_layers,
              "dense_block_backward: saved_bottleneck must be empty or hold one tensor per layer");
  check_dropout_mask(dropout_mask, features, s);

  const auto format = block_memory_format(features);
  const bool cl = is_channels_last(format);
  const auto options = features.options();
  const auto acc = stats_dtype(features.scalar_type());
  const auto acc_options = options.dtype(acc);

  std::vector<at::Tensor> grad_params(params.size());
  for (auto& g : grad_params) g = at::empty({0}, acc_options);
  at::Tensor grad_input = at::empty({s.batch, s.in_channels, s.height, s.width}, options.memory_format(format));
  if (features.numel() == 0) {
    grad_input.zero_();
    for (int64_t l = 0; l < s.num_layers; ++l) {
      if (!layer_needs_grad[l]) continue;
      for (int64_t i = 0; i < per_layer; ++i) {
        if (i == kNorm1Mean || i == kNorm1Var || i == kNorm2Mean || i == kNorm2Var) continue;
        grad_params[l * per_layer + i] = at::zeros_like(params[l * per_layer + i]);
      }
    }
    return {grad_input, grad_params};
  }

  // Layers below the lowest one that needs gradients are skipped when the input needs none.
  int64_t lowest_layer = 0;
  if (!input_needs_grad) {
    lowest_layer = s.num_layers;
    for (int64_t l = 0; l < s.num_layers; ++l) {
      if (layer_needs_grad[l]) { lowest_layer = l; break; }
    }
  }

  const at::Tensor grad = grad_features.contiguous(format);
  const int64_t max_channels = s.channels(s.num_layers - 1);
  at::Tensor accumulated = at::empty({s.batch, max_channels, s.height, s.width}, acc_options.memory_format(format));
  at::Tensor proj_mean, proj_xhat, proj2_mean, proj2_xhat;
  if (training) {
    proj_mean = at::zeros({max_channels}, acc_options);
    proj_xhat = at::zeros({max_channels}, acc_options);
    proj2_mean = at::empty({s.bottleneck_width}, acc_options);
    proj2_xhat = at::empty({s.bottleneck_width}, acc_options);
  }
  auto slice = [](const at::Tensor& t, int64_t start, int64_t length) {
    return t.defined() && t.numel() > 0 ? t.narrow(0, start, length) : at::Tensor();
  };
  auto stats_slice = [&](int64_t start, int64_t length) {
    BnParams st;
    st.mean = batch_mean.narrow(0, start, length);
    st.var = batch_var.narrow(0, start, length);
    st.eps = eps;
    return st;
  };
  at::Tensor scratch = at::empty({s.batch * max_channels * s.height * s.width}, options);
  at::Tensor bottleneck_scratch;
  if (bottleneck) {
    bottleneck_scratch = at::empty({s.batch, s.bottleneck_width, s.height, s.width}, options.memory_format(format));
  }

  for (int64_t l = s.num_layers - 1; l >= lowest_layer; --l) {
    const int64_t c = s.channels(l);
    const bool need_weights = layer_needs_grad[l] != 0;
    // The gradient of this layer's new channels is final: later layers have all added to it.
    at::Tensor grad_new = grad.narrow(1, c, s.growth);
    if (l < s.num_layers - 1) {
      at::Tensor finalized = at::empty({s.batch, s.growth, s.height, s.width}, options.memory_format(format));
      BnParams st = training ? stats_slice(c, s.growth) : BnParams{};
      kernels.bn_input_grad(features.narrow(1, c, s.growth), st, accumulated.narrow(1, c, s.growth), grad_new,
                            slice(proj_mean, c, s.growth), slice(proj_xhat, c, s.growth), finalized, cl);
      grad_new = finalized;
    }
    if (dropout_mask.has_value()) grad_new = grad_new * dropout_mask->narrow(1, l * s.growth, s.growth);

    const at::Tensor x = features.narrow(1, 0, c);
    const at::Tensor z1 = scratch_view(scratch, s, c, format);
    const BnParams bn1 = bn_params(params, bottleneck, l, false, training, prefix(batch_mean, c),
                                   prefix(batch_var, c), eps, acc);
    kernels.bn_relu_forward(x, bn1, z1, cl);
    at::Tensor grad_z1;
    auto& grads = grad_params;
    const int64_t base = l * per_layer;
    if (bottleneck) {
      const at::Tensor& conv1_weight = param(params, bottleneck, l, kConv1Weight);
      const at::Tensor b = keep_bottleneck ? saved_bottleneck[l] : conv(z1, conv1_weight, format);
      const BnParams bn2 = bn_params(params, bottleneck, l, true, training, bottleneck_mean[l], bottleneck_var[l], eps, acc);
      kernels.bn_relu_forward(b, bn2, bottleneck_scratch, cl);
      auto [grad_z2, grad_w2] = conv_backward(grad_new, bottleneck_scratch, param(params, bottleneck, l, kConv2Weight),
                                              true, need_weights, format);
      at::Tensor accumulated2 = at::empty(b.sizes(), acc_options.memory_format(format));
      at::Tensor grad_norm2_weight = at::empty({s.bottleneck_width}, acc_options);
      at::Tensor grad_norm2_bias = at::empty({s.bottleneck_width}, acc_options);
      if (training) proj2_mean.zero_(), proj2_xhat.zero_();
      kernels.bn_relu_backward(b, grad_z2, bn2, accumulated2, false, grad_norm2_weight, grad_norm2_bias, proj2_mean,
                               proj2_xhat, cl);
      at::Tensor grad_b = at::empty(b.sizes(), options.memory_format(format));
      kernels.bn_input_grad(b, bn2, accumulated2, at::Tensor(), proj2_mean, proj2_xhat, grad_b, cl);
      accumulated2.reset();
      auto [gz1, grad_w1] = conv_backward(grad_b, z1, conv1_weight, true, need_weights, format);
      grad_z1 = gz1;
      if (need_weights) {
        grads[base + kConv2Weight] = grad_w2;
        grads[base + kConv1Weight] = grad_w1;
        grads[base + kNorm2Weight] = grad_norm2_weight.to(param(params, bottleneck, l, kNorm2Weight).scalar_type());
        grads[base + kNorm2Bias] = grad_norm2_bias.to(param(params, bottleneck, l, kNorm2Bias).scalar_type());
      }
    } else {
      auto [gz1, grad_w1] = conv_backward(grad_new, z1, param(params, bottleneck, l, kConv1Weight), true,
                                          need_weights, format);
      grad_z1 = gz1;
      if (need_weights) grads[base + kConv1Weight] = grad_w1;
    }
    at::Tensor grad_norm1_weight = at::empty({c}, acc_options), grad_norm1_bias = at::empty({c}, acc_options);
    kernels.bn_relu_backward(x, grad_z1, bn1, accumulated.narrow(1, 0, c), l < s.num_layers - 1, grad_norm1_weight,
                             grad_norm1_bias, slice(proj_mean, 0, c), slice(proj_xhat, 0, c), cl);
    if (need_weights) {
      grads[base + kNorm1Weight] = grad_norm1_weight.to(param(params, bottleneck, l, kNorm1Weight).scalar_type());
      grads[base + kNorm1Bias] = grad_norm1_bias.to(param(params, bottleneck, l, kNorm1Bias).scalar_type());
    }
  }
  if (input_needs_grad) {
    BnParams st = training ? stats_slice(0, s.in_channels) : BnParams{};
    kernels.bn_input_grad(features.narrow(1, 0, s.in_channels), st, accumulated.narrow(1, 0, s.in_channels),
                          grad.narrow(1, 0, s.in_channels), slice(proj_mean, 0, s.in_channels),
                          slice(proj_xhat, 0, s.in_channels), grad_input, cl);
  } else {
    grad_input = at::empty({0}, options);
  }
  return {grad_input, grad_params};
}

void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList batch_mean,
                          at::TensorList batch_var, at::ArrayRef<double> momentum, int64_t count) {
  const size_t n = running_mean.size();
  TORCH_CHECK(running_var.size() == n && batch_mean.size() == n && batch_var.size() == n && momentum.size() == n,
              "update_running_stats: running_mean, running_var, batch_mean, batch_var and momentum must have the "
              "same length");
  TORCH_CHECK(count > 1, "update_running_stats: count must be > 1 (the unbiased variance needs two values), got ", count);
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(running_mean[i].sizes() == batch_mean[i].sizes() && running_var[i].sizes() == batch_var[i].sizes(),
                "update_running_stats: entry ", i, " has mismatched running and batch statistics shapes");
    // running = (1 - momentum) * running + momentum * batch, as nn.BatchNorm2d does.
    running_mean[i].lerp_(batch_mean[i].to(running_mean[i].scalar_type()), momentum[i]);
    running_var[i].lerp_((batch_var[i] * bessel).to(running_var[i].scalar_type()), momentum[i]);
  }
}

}  // namespace dense_ops

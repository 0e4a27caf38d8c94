// The dense block over one shared feature buffer (see DESIGN.md):
//   forward:  features = [input | new_0 | ... | new_{L-1}], layer l reads features[:, :C0 + l*k];
//             batch statistics are computed once per channel, when the channel is written.
//   backward: walks the layers in reverse; BN1-ReLU outputs are recomputed into one scratch
//             buffer (a bounded number of samples with a bottleneck: block.h's strategies),
//             every reader of a channel adds scale * dy into one gradient buffer, and a
//             channel's input gradient is finalized once, just before the layer that wrote it
//             needs it.
// Argument checks live in block_checks.cpp, the process-group collectives in stat_sync.cpp.
#include "dense_block.h"

#include <map>

#include "block.h"

namespace dense_ops {

Recompute parse_recompute(c10::string_view level) {
  if (level == "bn_relu") return Recompute::kBnRelu;
  if (level == "bottleneck") return Recompute::kBottleneck;
  TORCH_CHECK(false, "dense_block: recompute must be 'bn_relu' or 'bottleneck', got '", std::string(level), "'");
}

namespace {

// Batch-norm parameters of one BN of one layer: `mean`/`var` are the batch statistics in
// training; eval mode reads the layer's running statistics.
BnParams bn_params(const Block& block, int64_t layer, bool second, const at::Tensor& batch_mean,
                   const at::Tensor& batch_var) {
  const auto read = [&](LayerParam which) { return block.weight(layer, which).to(block.acc).contiguous(); };
  BnParams bn;
  bn.weight = read(second ? kNorm2Weight : kNorm1Weight);
  bn.bias = read(second ? kNorm2Bias : kNorm1Bias);
  bn.mean = block.training ? batch_mean : read(second ? kNorm2Mean : kNorm1Mean);
  bn.var = block.training ? batch_var : read(second ? kNorm2Var : kNorm1Var);
  bn.eps = block.eps;
  return bn;
}

}  // namespace

void add_projections(const BnParams& bn, const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy, int64_t count,
                     const at::Tensor& proj_mean, const at::Tensor& proj_xhat) {
  const at::Tensor scale = bn.weight * (bn.var + bn.eps).rsqrt() / static_cast<double>(count);
  proj_mean.add_(scale * sum_dy);
  proj_xhat.add_(scale * sum_dy_xhat);
}

BnParams Block::bn1(int64_t l) const {
  if (!training) return bn_params(*this, l, false, {}, {});
  const int64_t c = shape.channels(l);
  return bn_params(*this, l, false, batch_mean.narrow(0, 0, c), batch_var.narrow(0, 0, c));
}

BnParams Block::bn2(int64_t l) const {
  if (!training) return bn_params(*this, l, true, {}, {});
  return bn_params(*this, l, true, bottleneck_mean[l], bottleneck_var[l]);
}

namespace {

// In whichever layout the convolution picks: the caller copies it into the features.
at::Tensor conv(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t pad = (weight.size(2) - 1) / 2;
  return at::convolution(x, weight, {}, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1);
}

// Returns (grad_input, grad_weight); grad_weight is undefined unless asked for. The weight
// gradient comes back in the weight's own layout (cuDNN and oneDNN pick the input's), as the
// fake kernel says and autograd expects of a parameter's gradient.
std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& weight, bool need_weight, at::MemoryFormat format) {
  const int64_t pad = (weight.size(2) - 1) / 2;
  auto [grad_input, grad_weight, unused_bias] = at::convolution_backward(
      grad_out, x, weight, std::nullopt, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1, {true, need_weight, false});
  if (need_weight) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  return {grad_input.contiguous(format), grad_weight};
}

// Statistics of channels [start, start + length) for bn_input_grad (none in eval mode).
BnParams channel_statistics(const Block& block, int64_t start, int64_t length) {
  if (!block.training) return BnParams{};
  return BnParams{{}, {}, block.batch_mean.narrow(0, start, length), block.batch_var.narrow(0, start, length),
                  block.eps};
}

at::Tensor slice(const at::Tensor& t, int64_t start, int64_t length) {
  return t.defined() ? t.narrow(0, start, length) : t;
}

}  // namespace

ForwardResult dense_block_forward(const at::Tensor& input, at::TensorList params,
                                  const std::optional<at::Tensor>& dropout_mask, bool bottleneck, bool training,
                                  c10::string_view recompute, double eps,
                                  const std::optional<c10::string_view>& sync_group, const BnKernels& kernels) {
  const BlockShape shape = check_block(input, params, bottleneck, /*with_running_stats=*/true);
  check_dropout_mask(dropout_mask, input, shape);
  TORCH_CHECK(eps > 0, "dense_block: eps must be positive, got ", eps);
  const bool keep_bottleneck = bottleneck && parse_recompute(recompute) == Recompute::kBnRelu;
  const auto format = input.suggest_memory_format();
  const auto acc = stats_dtype(input.scalar_type());
  const auto stat_options = input.options().dtype(acc);
  const int64_t stat_channels = training ? shape.total_channels() : 0;
  const int64_t stat_width = training ? shape.bottleneck_width : 0;
  const StatSync sync(training ? sync_group : std::nullopt, shape.pixels(), input);
  const at::Tensor features = at::empty({shape.batch, shape.total_channels(), shape.height, shape.width},
                                        input.options().memory_format(format));
  Block block{shape, params, bottleneck, training, format == at::MemoryFormat::ChannelsLast, eps, format, acc, kernels,
              sync, bottleneck_strategy(features.is_cpu()), features};
  block.batch_mean = at::empty({stat_channels}, stat_options);
  block.batch_var = at::empty({stat_channels}, stat_options);
  block.bottleneck_mean = at::empty({shape.num_layers, stat_width}, stat_options);
  block.bottleneck_var = at::empty({shape.num_layers, stat_width}, stat_options);
  std::vector<at::Tensor> saved_bottleneck;
  if (keep_bottleneck) {
    for (int64_t l = 0; l < shape.num_layers; ++l) {
      saved_bottleneck.push_back(block.empty_bottleneck(input.scalar_type()));
    }
  }
  if (block.count() == 0) {  // an empty batch has undefined (NaN) statistics, as in PyTorch
    for (auto* t : {&block.batch_mean, &block.batch_var, &block.bottleneck_mean, &block.bottleneck_var}) t->fill_(NAN);
    return {block.features, block.batch_mean, block.batch_var, saved_bottleneck, block.bottleneck_mean,
            block.bottleneck_var};
  }

  // Training statistics of freshly written channels, taken once.
  const auto take_moments = [&](const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                bool channels_last) {
    kernels.channel_moments(x, mean, var, channels_last);
    sync.moments(mean, var);
  };
  block.features.narrow(1, 0, shape.in_channels).copy_(input);
  if (training) {
    take_moments(block.inputs(0), block.batch_mean.narrow(0, 0, shape.in_channels),
                 block.batch_var.narrow(0, 0, shape.in_channels), block.channels_last);
  }
  block.allocate_scratch();
  at::Tensor bottleneck_out, z2;
  if (bottleneck) {
    z2 = block.empty_bottleneck(input.scalar_type());
    if (!keep_bottleneck) bottleneck_out = block.empty_bottleneck(input.scalar_type());
  }
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    at::Tensor new_features;
    if (bottleneck) {
      const at::Tensor& out = keep_bottleneck ? saved_bottleneck[l] : bottleneck_out;
      bottleneck_forward(block, l, out);
      const bool channels_last = block.bottleneck_channels_last();
      if (training) take_moments(out, block.bottleneck_mean[l], block.bottleneck_var[l], channels_last);
      kernels.bn_relu_forward(out, block.bn2(l), z2, channels_last);
      new_features = conv(z2, block.weight(l, kConv2Weight));
    } else {
      const at::Tensor z1 = block.z1(l, 0, shape.batch);
      kernels.bn_relu_forward(block.inputs(l), block.bn1(l), z1, block.channels_last);
      new_features = conv(z1, block.weight(l, kConv1Weight));
    }
    if (dropout_mask.has_value()) new_features.mul_(dropout_mask->narrow(1, l * shape.growth, shape.growth));
    const int64_t channels = shape.channels(l);
    const at::Tensor slot = block.features.narrow(1, channels, shape.growth);
    slot.copy_(new_features);
    if (training) {
      // An NCHW slot is contiguous planes; a channels-last one is rows with gaps, so there the
      // statistics come from the convolution's own dense output (the same values).
      const at::Tensor& written = block.channels_last ? new_features : slot;
      take_moments(written, block.batch_mean.narrow(0, channels, shape.growth),
                   block.batch_var.narrow(0, channels, shape.growth),
                   block.channels_last ? is_channels_last(new_features) : false);
    }
  }
  return {block.features, block.batch_mean, block.batch_var, saved_bottleneck, block.bottleneck_mean,
          block.bottleneck_var};
}

namespace {

// Buffers of the backward pass, allocated once per call and reused by every layer. The sums
// hold one layer at a time (the gradients copy them out): [L, ...] buffers would grow with L^2.
struct BackwardWorkspace {
  at::Tensor accumulated;           // scale * dy summed over every reader of each channel (stats dtype)
  at::Tensor proj_mean, proj_xhat;  // the per-channel batch-statistics projections (training only)
  at::Tensor layer_sums;            // [2, C]: the layer's sum(dy * x_hat) and sum(dy), float64
  at::Tensor finalized;             // one layer's final new-channel gradient
  at::Tensor recomputed_bottleneck; // conv1's output, recomputed ("bottleneck" level)
  at::Tensor z2, accumulated2;      // BN2-ReLU output / its gradient, and BN2's accumulator
  at::Tensor bottleneck_sums;       // [2, width], float64
  at::Tensor bottleneck_proj;       // [2, width]
};

BackwardWorkspace backward_workspace(const Block& block, bool keep_bottleneck) {
  const BlockShape& shape = block.shape;
  const int64_t max_channels = shape.channels(shape.num_layers - 1);
  const auto acc_options = block.features.options().dtype(block.acc), sum_options = acc_options.dtype(at::kDouble);
  const auto dtype = block.features.scalar_type();
  BackwardWorkspace workspace;
  workspace.accumulated = block.empty(max_channels, block.acc);
  if (block.training) {
    workspace.proj_mean = at::zeros({max_channels}, acc_options);
    workspace.proj_xhat = at::zeros({max_channels}, acc_options);
  }
  workspace.layer_sums = at::empty({2, max_channels}, sum_options);
  workspace.finalized = block.empty(shape.growth, dtype);
  if (block.bottleneck) {
    if (!keep_bottleneck) workspace.recomputed_bottleneck = block.empty_bottleneck(dtype);
    workspace.z2 = block.empty_bottleneck(dtype);
    workspace.accumulated2 = block.empty_bottleneck(block.acc);
    workspace.bottleneck_sums = at::empty({2, shape.bottleneck_width}, sum_options);
    workspace.bottleneck_proj = at::empty({2, shape.bottleneck_width}, acc_options);
  }
  return workspace;
}

// A gradient in the parameter's dtype that owns its memory: the sums live in the shared workspace.
at::Tensor own_copy(const at::Tensor& sum, const at::Tensor& parameter) {
  return sum.to(parameter.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

// Backward of one layer's BN2-ReLU-conv3x3 (bottleneck) given the gradient of its new
// channels; returns the gradient of the bottleneck output and fills the layer's grads.
at::Tensor bottleneck_output_backward(const Block& block, int64_t l, const at::Tensor& bottleneck_out,
                                      const at::Tensor& grad_new, bool need_weights,
                                      const BackwardWorkspace& workspace, std::vector<at::Tensor>& grads) {
  const int64_t base = l * params_per_layer(true);
  const BnParams bn2 = block.bn2(l);
  const bool channels_last = block.bottleneck_channels_last();
  block.kernels.bn_relu_forward(bottleneck_out, bn2, workspace.z2, channels_last);
  auto [grad_z2, grad_conv2] =
      conv_backward(grad_new, workspace.z2, block.weight(l, kConv2Weight), need_weights, block.bottleneck_format());
  const at::Tensor sum_dy_xhat = workspace.bottleneck_sums[0], sum_dy = workspace.bottleneck_sums[1];
  workspace.bottleneck_sums.zero_();
  block.kernels.bn_relu_backward(bottleneck_out, grad_z2, bn2, workspace.accumulated2, false, sum_dy_xhat, sum_dy,
                                 channels_last);
  at::Tensor proj_mean, proj_xhat;
  if (block.training) {
    workspace.bottleneck_proj.zero_();
    proj_mean = workspace.bottleneck_proj[0], proj_xhat = workspace.bottleneck_proj[1];
    add_projections(bn2, sum_dy_xhat, sum_dy, block.count(), proj_mean, proj_xhat);
    block.sync.sum({proj_mean, proj_xhat});  // the weight gradients stay this rank's own
  }
  const at::Tensor& grad_bottleneck = workspace.z2;  // z2 is no longer needed
  block.kernels.bn_input_grad(bottleneck_out, bn2, workspace.accumulated2, at::Tensor(), proj_mean, proj_xhat,
                              grad_bottleneck, channels_last);
  if (need_weights) {
    grads[base + kConv2Weight] = grad_conv2;
    grads[base + kNorm2Weight] = own_copy(sum_dy_xhat, block.weight(l, kNorm2Weight));
    grads[base + kNorm2Bias] = own_copy(sum_dy, block.weight(l, kNorm2Bias));
  }
  return grad_bottleneck;
}

// Gradients of a block whose batch is empty: zeros.
std::tuple<at::Tensor, std::vector<at::Tensor>> empty_batch_grads(at::TensorList params, bool bottleneck,
                                                                  at::IntArrayRef layer_needs_grad,
                                                                  at::Tensor grad_input, std::vector<at::Tensor> grads) {
  const int64_t per_layer = params_per_layer(bottleneck);
  grad_input.zero_();
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const int64_t slot = i % per_layer;
    const bool running = slot == kNorm1Mean || slot == kNorm1Var || slot == kNorm2Mean || slot == kNorm2Var;
    if (layer_needs_grad[i / per_layer] && !running) grads[i] = at::zeros_like(params[i]);
  }
  return {grad_input, grads};
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> dense_block_backward(
    const at::Tensor& grad_features, const at::Tensor& features, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, at::TensorList saved_bottleneck, const at::Tensor& bottleneck_mean,
    const at::Tensor& bottleneck_var, at::TensorList params, const std::optional<at::Tensor>& dropout_mask,
    bool bottleneck, bool training, double eps, at::IntArrayRef layer_needs_grad, bool input_needs_grad,
    const std::optional<c10::string_view>& sync_group, const BnKernels& kernels) {
  const SavedForBackward checked =
      check_backward(grad_features, features, batch_mean, batch_var, saved_bottleneck, bottleneck_mean,
                     bottleneck_var, params, dropout_mask, bottleneck, training, eps, layer_needs_grad);
  const BlockShape& shape = checked.shape;
  const std::vector<at::Tensor>& saved = checked.saved_bottleneck;
  const bool keep_bottleneck = !saved.empty();
  const auto format = features.suggest_memory_format();
  const auto acc = stats_dtype(features.scalar_type());
  const StatSync sync(training ? sync_group : std::nullopt, shape.pixels(), features);
  Block block{shape, params, bottleneck, training, format == at::MemoryFormat::ChannelsLast, eps, format, acc, kernels,
              sync, bottleneck_strategy(features.is_cpu()), features, batch_mean, batch_var, bottleneck_mean,
              bottleneck_var};
  const int64_t per_layer = params_per_layer(bottleneck);
  std::vector<at::Tensor> grads(params.size());
  for (auto& g : grads) g = at::empty({0}, features.options().dtype(acc));
  at::Tensor grad_input =
      input_needs_grad ? block.empty(shape.in_channels, features.scalar_type()) : at::empty({0}, features.options());
  if (block.count() == 0) return empty_batch_grads(params, bottleneck, layer_needs_grad, grad_input, grads);

  // Layers below the lowest one that needs gradients are skipped when the input needs none.
  int64_t lowest_layer = 0;
  if (!input_needs_grad) {
    lowest_layer = shape.num_layers;
    for (int64_t l = shape.num_layers - 1; l >= 0; --l) {
      if (layer_needs_grad[l]) lowest_layer = l;
    }
  }

  const at::Tensor grad = grad_features.contiguous(format);
  const BackwardWorkspace workspace = backward_workspace(block, keep_bottleneck);
  block.allocate_scratch();
  for (int64_t l = shape.num_layers - 1; l >= lowest_layer; --l) {
    const int64_t channels = shape.channels(l), base = l * per_layer;
    const bool need_weights = layer_needs_grad[l] != 0, accumulate = l < shape.num_layers - 1;
    // The gradient of this layer's new channels is final: every later reader has added to it.
    at::Tensor grad_new = grad.narrow(1, channels, shape.growth);
    if (accumulate) {
      const at::Tensor proj_mean = slice(workspace.proj_mean, channels, shape.growth);
      const at::Tensor proj_xhat = slice(workspace.proj_xhat, channels, shape.growth);
      if (training) sync.sum({proj_mean, proj_xhat});
      kernels.bn_input_grad(features.narrow(1, channels, shape.growth),
                            channel_statistics(block, channels, shape.growth),
                            workspace.accumulated.narrow(1, channels, shape.growth), grad_new, proj_mean, proj_xhat,
                            workspace.finalized, block.channels_last);
      grad_new = workspace.finalized;
    }
    if (dropout_mask.has_value()) grad_new = grad_new * dropout_mask->narrow(1, l * shape.growth, shape.growth);

    const at::Tensor sums = workspace.layer_sums.narrow(1, 0, channels).zero_();
    const at::Tensor sum_dy_xhat = sums[0], sum_dy = sums[1];
    if (bottleneck) {
      const at::Tensor& out = keep_bottleneck ? saved[l] : workspace.recomputed_bottleneck;
      if (!keep_bottleneck) bottleneck_forward(block, l, out);
      const at::Tensor grad_bottleneck =
          bottleneck_output_backward(block, l, out, grad_new, need_weights, workspace, grads);
      at::Tensor grad_conv1;  // accumulated over chunks of samples in the stats dtype
      if (need_weights) grad_conv1 = at::zeros({shape.bottleneck_width, channels}, features.options().dtype(acc));
      bottleneck_backward(block, l, grad_bottleneck, workspace.accumulated, accumulate, grad_conv1, sum_dy_xhat,
                          sum_dy);
      if (need_weights) {
        const at::Tensor& weight = block.weight(l, kConv1Weight);
        grads[base + kConv1Weight] =
            grad_conv1.to(weight.scalar_type()).view(weight.sizes()).contiguous(weight.suggest_memory_format());
      }
    } else {
      const at::Tensor z1 = block.z1(l, 0, shape.batch);
      kernels.bn_relu_forward(block.inputs(l), block.bn1(l), z1, block.channels_last);
      auto [grad_z1, grad_conv1] = conv_backward(grad_new, z1, block.weight(l, kConv1Weight), need_weights, format);
      kernels.bn_relu_backward(block.inputs(l), grad_z1, block.bn1(l), workspace.accumulated.narrow(1, 0, channels),
                               accumulate, sum_dy_xhat, sum_dy, block.channels_last);
      if (need_weights) grads[base + kConv1Weight] = grad_conv1;
    }
    if (training) {
      add_projections(block.bn1(l), sum_dy_xhat, sum_dy, block.count(), workspace.proj_mean.narrow(0, 0, channels),
                      workspace.proj_xhat.narrow(0, 0, channels));
    }
    if (need_weights) {
      grads[base + kNorm1Weight] = own_copy(sum_dy_xhat, block.weight(l, kNorm1Weight));
      grads[base + kNorm1Bias] = own_copy(sum_dy, block.weight(l, kNorm1Bias));
    }
  }
  if (input_needs_grad) {
    const int64_t c0 = shape.in_channels;
    const at::Tensor proj_mean = slice(workspace.proj_mean, 0, c0), proj_xhat = slice(workspace.proj_xhat, 0, c0);
    if (training) sync.sum({proj_mean, proj_xhat});
    kernels.bn_input_grad(block.inputs(0), channel_statistics(block, 0, c0), workspace.accumulated.narrow(1, 0, c0),
                          grad.narrow(1, 0, c0), proj_mean, proj_xhat, grad_input, block.channels_last);
  }
  return {grad_input, grads};
}

void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList batch_mean,
                          at::TensorList batch_var, at::ArrayRef<double> momentum, int64_t count) {
  const size_t n = running_mean.size();
  TORCH_CHECK(running_var.size() == n && batch_mean.size() == n && batch_var.size() == n && momentum.size() == n,
              "update_running_stats: running_mean, running_var, batch_mean, batch_var and momentum must have the "
              "same length");
  TORCH_CHECK(count > 1, "update_running_stats: count must be > 1 (the unbiased variance needs two values), got ", count);
  const double bessel = static_cast<double>(count) / static_cast<double>(count - 1);
  // One multi-tensor update per distinct momentum (usually a single one): on a GPU a few
  // multi-tensor launches per block instead of three launches per BN, and no temporaries (the
  // list ops take mixed dtypes).
  std::map<double, std::vector<size_t>> by_momentum;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(running_mean[i].sizes() == batch_mean[i].sizes() && running_var[i].sizes() == batch_var[i].sizes(),
                "update_running_stats: entry ", i, " has mismatched running and batch statistics shapes");
    by_momentum[momentum[i]].push_back(i);
  }
  for (const auto& [weight, entries] : by_momentum) {
    std::vector<at::Tensor> means, vars, new_means, new_vars;
    for (const size_t i : entries) {
      means.push_back(running_mean[i]), vars.push_back(running_var[i]);
      new_means.push_back(batch_mean[i]), new_vars.push_back(batch_var[i]);
    }
    // running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance, as
    // nn.BatchNorm2d's kernels compute it.
    at::_foreach_mul_(means, 1 - weight);
    at::_foreach_add_(means, new_means, weight);
    at::_foreach_mul_(vars, 1 - weight);
    at::_foreach_add_(vars, new_vars, weight * bessel);
  }
}

}  // namespace dense_ops

// Argument checks of the dense block ops: every tensor the kernels index by the block's
// shape is checked here, with messages that name the argument.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "dense_block.h"

namespace dense_ops {

struct BlockShape {
  int64_t batch, in_channels, height, width;
  int64_t num_layers, growth, bottleneck_width;  // bottleneck_width is 0 without a bottleneck
  int64_t channels(int64_t layer) const { return in_channels + layer * growth; }
  int64_t total_channels() const { return channels(num_layers); }
  int64_t pixels() const { return batch * height * width; }
  int64_t pixels_per_sample() const { return height * width; }
};

inline const at::Tensor& param(at::TensorList params, bool bottleneck, int64_t layer, LayerParam which) {
  return params[layer * params_per_layer(bottleneck) + which];
}

// The block's shape from its input and parameters; running statistics are checked unless
// they are unused (backward of a training step).
BlockShape check_block(const at::Tensor& input, at::TensorList params, bool bottleneck, bool with_running_stats);

void check_dropout_mask(const std::optional<at::Tensor>& mask, const at::Tensor& input, const BlockShape& shape);

// The arguments of dense_block_backward that dense_block_forward returned: shapes, dtypes
// and devices; saved_bottleneck is returned in the features' layout, as the kernels expect.
struct SavedForBackward {
  BlockShape shape;
  std::vector<at::Tensor> saved_bottleneck;
};
SavedForBackward check_backward(const at::Tensor& grad_features, const at::Tensor& features,
                                const at::Tensor& batch_mean, const at::Tensor& batch_var,
                                at::TensorList saved_bottleneck, const at::Tensor& bottleneck_mean,
                                const at::Tensor& bottleneck_var, at::TensorList params,
                                const std::optional<at::Tensor>& dropout_mask, bool bottleneck, bool training,
                                double eps, at::IntArrayRef layer_needs_grad);

}  // namespace dense_ops

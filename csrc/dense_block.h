// The dense block algorithm, written once for every device; a device supplies the
// fused batch-norm kernels (BnKernels) and ATen supplies the convolutions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dtypes.h"

namespace dense_ops {

// Batch-norm parameters of one layer as the kernels see them: 1-D tensors of the
// statistics dtype (stats_dtype, dtypes.h).
struct BnParams {
  at::Tensor weight, bias, mean, var;
  double eps;
};

// Per channel, once all readers of a batch norm have added their sums (float64):
// proj_mean += scale * sum(dy) / M and proj_xhat += scale * sum(dy * x_hat) / M (common/bn_math.h).
void add_projections(const BnParams& bn, const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy, int64_t count,
                     const at::Tensor& proj_mean, const at::Tensor& proj_xhat);

// Position of each parameter of a layer in the flat `layer_params` list: the one definition
// of the layout (Python reads it through dense_ops._C.layer_param_names()).
enum LayerParam : int64_t {
  kNorm1Weight, kNorm1Bias, kNorm1Mean, kNorm1Var, kConv1Weight,
  kNorm2Weight, kNorm2Bias, kNorm2Mean, kNorm2Var, kConv2Weight,
  kNumLayerParams
};
constexpr const char* kLayerParamNames[kNumLayerParams] = {
    "norm1.weight", "norm1.bias", "norm1.running_mean", "norm1.running_var", "conv1.weight",
    "norm2.weight", "norm2.bias", "norm2.running_mean", "norm2.running_var", "conv2.weight"};

inline int64_t params_per_layer(bool bottleneck) { return bottleneck ? kNumLayerParams : kConv1Weight + 1; }

// What backward recomputes: "bn_relu" keeps each bottleneck output (conv1's) for backward,
// "bottleneck" keeps only the features and recomputes conv1 too. A call that needs no
// backward passes "bottleneck": then nothing but the features is kept.
enum class Recompute { kBnRelu, kBottleneck };
Recompute parse_recompute(c10::string_view level);

// Whether a dense tensor is laid out channels-last: the layout flag its kernels take.
inline bool is_channels_last(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// All tensors passed to a kernel are 4-D [N, C, H, W] views laid out either NCHW-like
// (unit stride over H*W) or channels-last (unit stride over C), as `channels_last` says.
struct BnKernels {
  // Biased per-channel mean and variance of x into mean[c], var[c].
  void (*channel_moments)(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                          bool channels_last);
  // out = relu(batch_norm(x)).
  void (*bn_relu_forward)(const at::Tensor& x, const BnParams& bn, const at::Tensor& out, bool channels_last);
  // The fused backward of one reader of x: dy = grad_out * relu mask; writes (or adds to)
  // accumulated: scale * dy; adds sum(dy * x_hat) and sum(dy) to sum_dy_xhat and sum_dy
  // (float64 totals: the sums cancel heavily and are added up over many calls).
  void (*bn_relu_backward)(const at::Tensor& x, const at::Tensor& grad_out, const BnParams& bn,
                           const at::Tensor& accumulated, bool accumulate, const at::Tensor& sum_dy_xhat,
                           const at::Tensor& sum_dy, bool channels_last);
  // out = direct + accumulated - proj_mean - x_hat * proj_xhat; `direct` and the
  // projections may be undefined (no direct gradient; eval mode).
  void (*bn_input_grad)(const at::Tensor& x, const BnParams& stats, const at::Tensor& accumulated,
                        const at::Tensor& direct, const at::Tensor& proj_mean, const at::Tensor& proj_xhat,
                        const at::Tensor& out, bool channels_last);
  // The transition's BN-ReLU-avgpool2x2 (common/bn_math.h): pooled = avg_pool2x2(relu(batch_norm(x))),
  // pooled is [N, C, H / 2, W / 2].
  void (*bn_relu_pool)(const at::Tensor& x, const BnParams& bn, const at::Tensor& pooled, bool channels_last);
  // Its backward sums given grad_pooled: adds sum(dy * x_hat) and sum(dy) to sum_dy_xhat and sum_dy (float64).
  void (*bn_relu_pool_sums)(const at::Tensor& x, const at::Tensor& grad_pooled, const BnParams& bn,
                            const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy, bool channels_last);
  // Its input gradient: out = scale * dy - proj_mean - x_hat * proj_xhat; the projections are
  // undefined in eval mode (then out = scale * dy).
  void (*bn_relu_pool_input_grad)(const at::Tensor& x, const at::Tensor& grad_pooled, const BnParams& bn,
                                  const at::Tensor& proj_mean, const at::Tensor& proj_xhat, const at::Tensor& out,
                                  bool channels_last);
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>;

ForwardResult dense_block_forward(const at::Tensor& input, at::TensorList layer_params,
                                  const std::optional<at::Tensor>& dropout_mask, bool bottleneck, bool training,
                                  c10::string_view recompute, double eps,
                                  const std::optional<c10::string_view>& sync_group, const BnKernels& kernels);

std::tuple<at::Tensor, std::vector<at::Tensor>> dense_block_backward(
    const at::Tensor& grad_features, const at::Tensor& features, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, at::TensorList saved_bottleneck, const at::Tensor& bottleneck_mean,
    const at::Tensor& bottleneck_var, at::TensorList layer_params, const std::optional<at::Tensor>& dropout_mask,
    bool bottleneck, bool training, double eps, at::IntArrayRef layer_needs_grad, bool input_needs_grad,
    const std::optional<c10::string_view>& sync_group, const BnKernels& kernels);

void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList batch_mean,
                          at::TensorList batch_var, at::ArrayRef<double> momentum, int64_t count);

// The transition's BN-ReLU-avgpool2x2 (transition.cpp): returns (pooled, mean, var), the batch
// statistics in training, copies of mean and var (the running statistics) in eval mode.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_forward(const at::Tensor& input, const at::Tensor& weight,
                                                                    const at::Tensor& bias, const at::Tensor& mean,
                                                                    const at::Tensor& var, bool training, double eps,
                                                                    const BnKernels& kernels);
// Its backward with forward's mean and var: returns (grad_input (empty unless asked for),
// grad_weight, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward(
    const at::Tensor& grad_pooled, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool input_needs_grad,
    const BnKernels& kernels);

// Registers the dense block and transition ops for one dispatch key, bound to that device's kernels.
template <const BnKernels& (*device_kernels)()>
void register_dense_block_ops(torch::Library& m) {
  m.impl("dense_block_forward",
         [](const at::Tensor& input, at::TensorList layer_params, const std::optional<at::Tensor>& dropout_mask,
            bool bottleneck, bool training, c10::string_view recompute, double eps,
            const std::optional<c10::string_view>& sync_group) {
           const at::AutoDispatchBelowADInplaceOrView below_autograd;  // our internal ATen calls are not recorded
           return dense_block_forward(input, layer_params, dropout_mask, bottleneck, training, recompute, eps,
                                      sync_group, device_kernels());
         });
  m.impl("dense_block_backward",
         [](const at::Tensor& grad_features, const at::Tensor& features, const at::Tensor& batch_mean,
            const at::Tensor& batch_var, at::TensorList saved_bottleneck, const at::Tensor& bottleneck_mean,
            const at::Tensor& bottleneck_var, at::TensorList layer_params,
            const std::optional<at::Tensor>& dropout_mask, bool bottleneck, bool training, double eps,
            at::IntArrayRef layer_needs_grad, bool input_needs_grad,
            const std::optional<c10::string_view>& sync_group) {
           const at::AutoDispatchBelowADInplaceOrView below_autograd;
           return dense_block_backward(grad_features, features, batch_mean, batch_var, saved_bottleneck,
                                       bottleneck_mean, bottleneck_var, layer_params, dropout_mask, bottleneck,
                                       training, eps, layer_needs_grad, input_needs_grad, sync_group,
                                       device_kernels());
         });
  m.impl("update_running_stats", &update_running_stats);
  m.impl("bn_relu_pool", [](const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& mean, const at::Tensor& var, bool training, double eps) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return bn_relu_pool_forward(input, weight, bias, mean, var, training, eps, device_kernels());
  });
  m.impl("bn_relu_pool_backward",
         [](const at::Tensor& grad_pooled, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
            const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool input_needs_grad) {
           const at::AutoDispatchBelowADInplaceOrView below_autograd;
           return bn_relu_pool_backward(grad_pooled, input, weight, bias, mean, var, training, eps,
                                        input_needs_grad, device_kernels());
         });
}

}  // namespace dense_ops

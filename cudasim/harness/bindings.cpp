#include <torch/extension.h>

#include "cudasim/runtime.h"
#include "exports.h"

namespace {
using dense_ops::BnKernels;
using dense_ops::BnParams;

const BnKernels& kernels(bool sim) { return sim ? dense_ops::sim_bn_kernels() : dense_ops::cpu_bn_kernels(); }

BnParams bn(const at::Tensor& w, const at::Tensor& b, const at::Tensor& m, const at::Tensor& v, double eps) {
  return BnParams{w, b, m, v, eps};
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("channel_moments", [](bool sim, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, bool cl) {
    kernels(sim).channel_moments(x, mean, var, cl);
  });
  m.def("bn_relu_forward", [](bool sim, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                              const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& out,
                              bool cl) { kernels(sim).bn_relu_forward(x, bn(w, b, mean, var, eps), out, cl); });
  m.def("bn_relu_backward",
        [](bool sim, const at::Tensor& x, const at::Tensor& gy, const at::Tensor& w, const at::Tensor& b,
           const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& acc, bool accumulate,
           const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy, bool cl) {
          kernels(sim).bn_relu_backward(x, gy, bn(w, b, mean, var, eps), acc, accumulate, sum_dy_xhat, sum_dy, cl);
        });
  m.def("bn_input_grad",
        [](bool sim, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, double eps,
           const at::Tensor& acc, const std::optional<at::Tensor>& direct, const std::optional<at::Tensor>& proj_mean,
           const std::optional<at::Tensor>& proj_xhat, const at::Tensor& out, bool cl) {
          kernels(sim).bn_input_grad(x, bn(at::Tensor(), at::Tensor(), mean, var, eps), acc,
                                     direct.value_or(at::Tensor()), proj_mean.value_or(at::Tensor()),
                                     proj_xhat.value_or(at::Tensor()), out, cl);
        });
  // The whole dense block (csrc/dense_block.cpp and the bottleneck strategies, compiled as they
  // are) over the simulated CUDA kernels or the CPU ones.
  m.def("dense_block_forward", [](bool sim, const at::Tensor& input, const std::vector<at::Tensor>& params,
                                  const dense_ops::OptT& dropout_mask, bool bottleneck, bool training,
                                  const std::string& recompute, double eps) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dense_ops::dense_block_forward(input, params, dropout_mask, bottleneck, training, recompute, eps,
                                          std::nullopt, kernels(sim));
  });
  m.def("dense_block_backward",
        [](bool sim, const at::Tensor& grad_features, const at::Tensor& features, const at::Tensor& batch_mean,
           const at::Tensor& batch_var, const std::vector<at::Tensor>& saved_bottleneck,
           const at::Tensor& bottleneck_mean, const at::Tensor& bottleneck_var, const std::vector<at::Tensor>& params,
           const dense_ops::OptT& dropout_mask, bool bottleneck, bool training, double eps,
           const std::vector<int64_t>& layer_needs_grad, bool input_needs_grad) {
          const at::AutoDispatchBelowADInplaceOrView below_autograd;
          return dense_ops::dense_block_backward(grad_features, features, batch_mean, batch_var, saved_bottleneck,
                                                 bottleneck_mean, bottleneck_var, params, dropout_mask, bottleneck,
                                                 training, eps, layer_needs_grad, input_needs_grad, std::nullopt,
                                                 kernels(sim));
        });
  // The transition's BN-ReLU-avgpool2x2 ops (csrc/transition.cpp) over either set of kernels.
  m.def("bn_relu_pool", [](bool sim, const at::Tensor& input, const at::Tensor& w, const at::Tensor& b,
                           const at::Tensor& mean, const at::Tensor& var, bool training, double eps) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dense_ops::bn_relu_pool_forward(input, w, b, mean, var, training, eps, kernels(sim));
  });
  m.def("bn_relu_pool_backward",
        [](bool sim, const at::Tensor& grad_pooled, const at::Tensor& input, const at::Tensor& w, const at::Tensor& b,
           const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool input_needs_grad) {
          const at::AutoDispatchBelowADInplaceOrView below_autograd;
          return dense_ops::bn_relu_pool_backward(grad_pooled, input, w, b, mean, var, training, eps,
                                                  input_needs_grad, kernels(sim));
        });
  m.def("condensed_conv", [](bool sim, const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                             const at::Tensor& shift, const at::Tensor& weight, int64_t groups,
                             const dense_ops::OptT& os, const dense_ops::OptT& osh) {
    return sim ? dense_ops::sim_condensed_conv(input, index, scale, shift, weight, groups, os, osh)
               : dense_ops::cpu_condensed_conv(input, index, scale, shift, weight, groups, os, osh);
  });
  m.def("stats", [] {
    const auto& s = cudasim::stats();
    return std::map<std::string, uint64_t>{{"launches", s.launches}, {"blocks", s.blocks},
                                           {"threads", s.threads},   {"barriers", s.barriers},
                                           {"warp_syncs", s.warp_syncs}, {"switches", s.switches}};
  });
  m.def("reset_stats", [] { cudasim::stats() = cudasim::Stats{}; });
}

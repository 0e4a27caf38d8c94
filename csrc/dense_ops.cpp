// Operator schemas of the dense_ops library and the Python module's build information.
// Kernels are registered per dispatch key in cpu/ and cuda/; fake kernels and autograd
// are registered from Python (dense_ops/ops.py).
#include <torch/extension.h>
#include <torch/library.h>

#ifdef DENSE_OPS_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION of the toolkit that compiled us
#endif

#ifndef DENSE_OPS_TORCH_VERSION
#error "DENSE_OPS_TORCH_VERSION must be defined by the build (setup.py)"
#endif

TORCH_LIBRARY(dense_ops, m) {
  // layer_params: per layer [norm1.weight, norm1.bias, norm1.running_mean, norm1.running_var,
  // conv1.weight] plus, with a bottleneck, the same five for norm2/conv2. With a sync_group
  // (a c10d process group name), training statistics are taken over the whole group.
  m.def(
      "dense_block_forward(Tensor input, Tensor[] layer_params, Tensor? dropout_mask, bool bottleneck, "
      "bool training, bool keep_bottleneck, float eps, str? sync_group=None) -> (Tensor features, "
      "Tensor batch_mean, Tensor batch_var, Tensor[] saved_bottleneck, Tensor bottleneck_mean, Tensor bottleneck_var)");
  m.def(
      "dense_block_backward(Tensor grad_features, Tensor features, Tensor batch_mean, Tensor batch_var, "
      "Tensor[] saved_bottleneck, Tensor bottleneck_mean, Tensor bottleneck_var, Tensor[] layer_params, "
      "Tensor? dropout_mask, bool bottleneck, bool training, float eps, int[] layer_needs_grad, "
      "bool input_needs_grad, str? sync_group=None) -> (Tensor grad_input, Tensor[] grad_params)");
  m.def(
      "update_running_stats(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, Tensor[] batch_mean, "
      "Tensor[] batch_var, float[] momentum, int count) -> ()");
  // CondenseNet's condensed 1x1 convolution (common/condense_math.h): gather index[g*K + k] for
  // group g, relu(x * scale + shift) per gathered channel, grouped GEMM with weight [O, K(, 1, 1)],
  // output channel g*D + j of the grouped conv written to its shuffled position j*groups + g;
  // with out_scale and out_shift (per output channel), relu(y * out_scale + out_shift) is written
  // instead of y: the following layer's eval-mode BN and ReLU, fused.
  m.def(
      "condensed_conv(Tensor input, Tensor index, Tensor scale, Tensor shift, Tensor weight, int groups, "
      "Tensor? out_scale=None, Tensor? out_shift=None) -> Tensor");
  // The same, written into channels [out_offset, out_offset + O) of a preallocated buffer.
  m.def(
      "condensed_conv_into(Tensor input, Tensor index, Tensor scale, Tensor shift, Tensor weight, int groups, "
      "Tensor(a!) out, int out_offset, Tensor? out_scale=None, Tensor? out_shift=None) -> ()");
}

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = DENSE_OPS_TORCH_VERSION;
#ifdef DENSE_OPS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION / 10 % 100);
  info["cuda_archs"] = DENSE_OPS_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dense_ops compiled kernels (operators live in torch.ops.dense_ops)";
  m.def("build_info", &build_info, "What this build of dense_ops was compiled with");
}

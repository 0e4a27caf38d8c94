// Operator schemas of the dense_ops library and the Python module's build information.
// Kernels are registered per dispatch key in cpu/ and cuda/; fake kernels and autograd
// are registered from Python (dense_ops/ops.py).
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <thread>

#include "block.h"
#include "cpu/isa.h"
#include "dense_block.h"
#include "dtypes.h"
#include "group_conv.h"

#ifdef DENSE_OPS_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION of the toolkit that compiled us
#endif

#ifndef DENSE_OPS_TORCH_VERSION
#error "DENSE_OPS_TORCH_VERSION must be defined by the build (setup.py)"
#endif

TORCH_LIBRARY(dense_ops, m) {
  // layer_params: per layer [norm1.weight, norm1.bias, norm1.running_mean, norm1.running_var,
  // conv1.weight] plus, with a bottleneck, the same five for norm2/conv2 (dense_block.h's LayerParam).
  // recompute: "bn_relu" or "bottleneck" (dense_block.h's Recompute). With a sync_group
  // (a c10d process group name), training statistics are taken over the whole group.
  m.def(
      "dense_block_forward(Tensor input, Tensor[] layer_params, Tensor? dropout_mask, bool bottleneck, "
      "bool training, str recompute, float eps, str? sync_group=None) -> (Tensor features, "
      "Tensor batch_mean, Tensor batch_var, Tensor[] saved_bottleneck, Tensor bottleneck_mean, Tensor bottleneck_var)");
  m.def(
      "dense_block_backward(Tensor grad_features, Tensor features, Tensor batch_mean, Tensor batch_var, "
      "Tensor[] saved_bottleneck, Tensor bottleneck_mean, Tensor bottleneck_var, Tensor[] layer_params, "
      "Tensor? dropout_mask, bool bottleneck, bool training, float eps, int[] layer_needs_grad, "
      "bool input_needs_grad, str? sync_group=None) -> (Tensor grad_input, Tensor[] grad_params)");
  m.def(
      "update_running_stats(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, Tensor[] batch_mean, "
      "Tensor[] batch_var, float[] momentum, int count) -> ()");
  // The transition's BN-ReLU-avgpool2x2 (common/bn_math.h). Training normalizes with the batch
  // statistics and returns them; eval mode normalizes with mean and var (the running statistics)
  // and returns copies. Backward takes forward's mean and var; grad_input is undefined unless
  // input_needs_grad.
  m.def(
      "bn_relu_pool(Tensor input, Tensor weight, Tensor bias, Tensor mean, Tensor var, bool training, float eps) "
      "-> (Tensor pooled, Tensor mean, Tensor var)");
  m.def(
      "bn_relu_pool_backward(Tensor grad_pooled, Tensor input, Tensor weight, Tensor bias, Tensor mean, Tensor var, "
      "bool training, float eps, bool input_needs_grad) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // CondenseNet's condensed 1x1 convolution (common/condense_math.h): gather index[g*K + k] for
  // group g, relu(x * scale + shift) per gathered channel, grouped GEMM with weight [O, K(, 1, 1)],
  // output channel g*D + j of the grouped conv written to its shuffled position j*groups + g;
  // with out_scale and out_shift (per output channel), relu(y * out_scale + out_shift) is written
  // instead of y: the following layer's eval-mode BN and ReLU, fused.
  m.def(
      "condensed_conv(Tensor input, Tensor index, Tensor scale, Tensor shift, Tensor weight, int groups, "
      "Tensor? out_scale=None, Tensor? out_shift=None) -> Tensor");
  // CondenseNet's 3x3 grouped convolution in inference: conv2d(input, weight, padding=1,
  // groups=groups), stride 1, no bias (group_conv.h).
  m.def("group_conv3x3(Tensor input, Tensor weight, int groups) -> Tensor");
}

namespace {

// ATen's parallel backend as this file was compiled against it, and whether our own
// at::parallel_for loops run in parallel: with OpenMP only if we were compiled with it
// (parallel_for is inline), with the native thread pool always.
#if AT_PARALLEL_OPENMP
constexpr const char* kParallelBackend = "OpenMP";
#ifdef _OPENMP
constexpr bool kParallelKernels = true;
#else
constexpr bool kParallelKernels = false;
#endif
#elif AT_PARALLEL_NATIVE
constexpr const char* kParallelBackend = "native thread pool";
constexpr bool kParallelKernels = true;
#else
constexpr const char* kParallelBackend = "unknown";
constexpr bool kParallelKernels = false;
#endif

// How many distinct threads run an at::parallel_for of `items` one-item chunks compiled here,
// as the kernels' loops are (the test of parallel_kernels).
int64_t parallel_for_threads(int64_t items) {
  std::mutex mutex;
  std::set<std::thread::id> threads;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // Enough work per chunk that one thread does not take every chunk before the others start.
    volatile double sink = 0;
    for (int64_t i = begin; i < end; ++i)
      for (int j = 0; j < 2000000; ++j) sink = sink + j;
    const std::lock_guard<std::mutex> lock(mutex);
    threads.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(threads.size());
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = DENSE_OPS_TORCH_VERSION;
  info["parallel_backend"] = kParallelBackend;
  info["parallel_kernels"] = kParallelKernels;
  info["cpu_kernel_isa"] = dense_ops::cpu_kernel_isa();
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
  m.def("layer_param_names", [] {
    return std::vector<std::string>(dense_ops::kLayerParamNames, dense_ops::kLayerParamNames + dense_ops::kNumLayerParams);
  }, "Names of a layer's entries in dense_block's flat layer_params list, in order");
  m.def("stats_dtype", &dense_ops::stats_dtype,
        "The dtype of the statistics, BN parameters and accumulated gradients of the ops for input of this dtype");
  m.def("bottleneck_channels_last", [](bool on_cpu, bool block_channels_last) {
    const auto block_format = block_channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    return dense_ops::bottleneck_format(dense_ops::bottleneck_strategy(on_cpu), block_format) ==
           at::MemoryFormat::ChannelsLast;
  }, "Whether a block keeps its bottleneck-width tensors (saved_bottleneck among them) channels-last");
  m.def("group_conv3x3_direct", [](int64_t group_inputs, at::ScalarType dtype) {
    return dense_ops::group_conv::uses_direct_kernel(group_inputs, dtype);
  }, "Whether the CPU runs group_conv3x3 with this many inputs per group in its direct kernel (else oneDNN)");
  m.def("_parallel_for_threads", &parallel_for_threads,
        "Distinct threads used by an at::parallel_for compiled into the extension (a test probe)");
}

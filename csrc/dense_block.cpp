// The dense block over one shared feature buffer (see DESIGN.md):
//   forward:  features = [input | new_0 | ... | new_{L-1}], layer l reads features[:, :C0 + l*k];
//             batch statistics are computed once per channel, when the channel is written.
//   backward: walks the layers in reverse; BN1-ReLU outputs are recomputed into one scratch
//             buffer (one sample's worth with a bottleneck), every reader of a channel adds
//             scale * dy into one gradient buffer, and a channel's input gradient is finalized
//             once, just before the layer that wrote it needs it.
#include "dense_block.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace dense_ops {
namespace {

// Batch statistics over a process group (dense_ops.convert_sync_batchnorm). Every rank runs
// the same layers in the same order, so the collectives line up across ranks; they go
// through c10d's functional all-reduce op, which finds the group by name. Without a group
// every method is a no-op and count() is the local count.
class StatSync {
 public:
  StatSync(const std::optional<c10::string_view>& group, int64_t local_count, const at::Tensor& like);
  // Samples (N*H*W) over the whole group.
  int64_t count() const { return count_; }
  // Replaces this rank's biased per-channel mean and var with the group's.
  void moments(const at::Tensor& mean, const at::Tensor& var) const;
  // Sums each tensor over the group, in place.
  void sum(std::initializer_list<at::Tensor> tensors) const;

 private:
  void all_reduce(const at::Tensor& t) const;
  std::optional<std::string> group_;
  int64_t local_count_, count_;
};

StatSync::StatSync(const std::optional<c10::string_view>& group, int64_t local_count, const at::Tensor& like)
    : local_count_(local_count), count_(local_count) {
  if (!group.has_value()) return;
  group_ = std::string(*group);
  const at::Tensor count = at::full({1}, static_cast<double>(local_count), like.options().dtype(at::kDouble));
  all_reduce(count);
  count_ = static_cast<int64_t>(count.item<double>());
}

void StatSync::all_reduce(const at::Tensor& t) const {
  static const auto reduce = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce_", "");
  static const auto wait = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
  std::vector<c10::IValue> stack{t, std::string("sum"), *group_};
  reduce.callBoxed(&stack);
  stack = {t};
  wait.callBoxed(&stack);
}

void StatSync::moments(const at::Tensor& mean, const at::Tensor& var) const {
  if (!group_) return;
  // One all-reduce of the sums [x, x^2] in float64; a rank with no samples adds nothing.
  const int64_t channels = mean.numel();
  const at::Tensor m = mean.to(at::kDouble), v = var.to(at::kDouble);
  const at::Tensor sums = local_count_ > 0 ? at::cat({m, v + m * m}).mul_(static_cast<double>(local_count_))
                                           : at::zeros({2 * channels}, m.options());
  all_reduce(sums);
  const at::Tensor group_mean = sums.narrow(0, 0, channels) / static_cast<double>(count_);
  const at::Tensor group_var = sums.narrow(0, channels, channels) / static_cast<double>(count_) - group_mean.square();
  mean.copy_(group_mean);
  var.copy_(group_var.clamp_min(0));
}

void StatSync::sum(std::initializer_list<at::Tensor> tensors) const {
  if (!group_) return;
  std::vector<at::Tensor> flat;
  for (const auto& t : tensors) flat.push_back(t.reshape(-1).to(at::kDouble));
  const at::Tensor packed = at::cat(flat);  // one collective for all of them
  all_reduce(packed);
  int64_t offset = 0;
  for (const auto& t : tensors) {
    t.copy_(packed.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}

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
      TORCH_CHECK(param(params, bottleneck, l, kConv1Weight).size(2) == 1, "dense_block: layer ", l,
                  " conv1.weight of a bottleneck layer must be 1x1");
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

bool is_channels_last(at::MemoryFormat format) { return format == at::MemoryFormat::ChannelsLast; }

// A [batch, channels, H, W] tensor laid out in `format` over a flat scratch buffer, from `offset`.
at::Tensor scratch_view(const at::Tensor& scratch, int64_t offset, int64_t batch, int64_t channels, int64_t height,
                        int64_t width, at::MemoryFormat format) {
  auto view = scratch.narrow(0, offset, batch * channels * height * width);
  if (is_channels_last(format)) return view.view({batch, height, width, channels}).permute({0, 3, 1, 2});
  return view.view({batch, channels, height, width});
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, at::MemoryFormat format) {
  const int64_t pad = (weight.size(2) - 1) / 2;
  return at::convolution(x, weight, {}, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1).contiguous(format);
}

// Returns (grad_input, grad_weight); grad_weight is undefined unless asked for.
std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& weight, bool need_weight, at::MemoryFormat format) {
  const int64_t pad = (weight.size(2) - 1) / 2;
  auto grads = at::convolution_backward(grad_out, x, weight, std::nullopt, {1, 1}, {pad, pad}, {1, 1}, false,
                                        {0, 0}, 1, {true, need_weight, false});
  return {std::get<0>(grads).contiguous(format), std::get<1>(grads)};
}

// The [C, H*W] matrix of a one-sample [1, C, H, W] tensor, as a view in either layout
// (transposed strides for channels-last), so that GEMM outputs land in our buffers.
at::Tensor channel_matrix(const at::Tensor& sample) {
  return sample.permute({0, 2, 3, 1}).view({-1, sample.size(1)}).t();
}

at::Tensor weight_matrix(const at::Tensor& weight) { return weight.reshape({weight.size(0), weight.size(1)}); }

// Batch-norm parameters of one BN of one layer: batch statistics in training, the
// layer's own running statistics in eval mode.
BnParams bn_params(at::TensorList params, bool bottleneck, int64_t layer, bool second, bool training,
                   const at::Tensor& batch_mean, const at::Tensor& batch_var, double eps, at::ScalarType dtype) {
  const ParamIndex w = second ? kNorm2Weight : kNorm1Weight, b = second ? kNorm2Bias : kNorm1Bias;
  const ParamIndex m = second ? kNorm2Mean : kNorm1Mean, v = second ? kNorm2Var : kNorm1Var;
  BnParams bn;
  bn.weight = param(params, bottleneck, layer, w).to(dtype).contiguous();
  bn.bias = param(params, bottleneck, layer, b).to(dtype).contiguous();
  bn.mean = training ? batch_mean : param(params, bottleneck, layer, m).to(dtype).contiguous();
  bn.var = training ? batch_var : param(params, bottleneck, layer, v).to(dtype).contiguous();
  bn.eps = eps;
  return bn;
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

// Per channel, once all readers of a batch norm have added their sums:
// proj_mean += scale * sum(dy) / M and proj_xhat += scale * sum(dy * x_hat) / M (see common/bn_math.h).
void add_projections(const BnParams& bn, const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy, int64_t count,
                     const at::Tensor& proj_mean, const at::Tensor& proj_xhat) {
  const at::Tensor scale = bn.weight * (bn.var + bn.eps).rsqrt() / static_cast<double>(count);
  proj_mean.add_(scale * sum_dy);
  proj_xhat.add_(scale * sum_dy_xhat);
}

// Everything a layer needs besides its own index: the block's buffers and settings.
struct Block {
  BlockShape shape;
  at::TensorList params;
  bool bottleneck, training, cl;
  double eps;
  at::MemoryFormat format;
  at::ScalarType acc;
  const BnKernels& kernels;
  const StatSync& sync;
  at::Tensor features, batch_mean, batch_var, bottleneck_mean, bottleneck_var;
  // BN1-ReLU outputs: one sample's worth per sample worker with a bottleneck, the whole batch without.
  at::Tensor scratch;
  int64_t workers = 1;

  int64_t count() const { return sync.count(); }  // over the process group when synchronized
  at::Tensor inputs(int64_t l) const { return features.narrow(1, 0, shape.channels(l)); }
  at::Tensor z1(int64_t l, int64_t batch) const {
    return scratch_view(scratch, 0, batch, shape.channels(l), shape.height, shape.width, format);
  }
  // The one-sample scratch of sample worker w (bottleneck layers).
  at::Tensor worker_z1(int64_t l, int64_t w) const {
    const int64_t per_sample = shape.channels(shape.num_layers - 1) * shape.height * shape.width;
    return scratch_view(scratch, w * per_sample, 1, shape.channels(l), shape.height, shape.width, format);
  }
  // Runs body(w, n_begin, n_end) for the batch split into `workers` contiguous sample ranges.
  // On CPU the ranges run in parallel, one per thread, and everything inside runs serially:
  // a few large parallel regions instead of several small ones per sample. The split does not
  // depend on scheduling, so per-worker partial sums add up deterministically.
  template <typename Body>
  void for_sample_ranges(const Body& body) const {
    const at::ThreadLocalState caller;  // worker threads run our ATen calls as the caller does (below autograd)
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      const at::ThreadLocalStateGuard as_caller(caller);
      for (int64_t w = w0; w < w1; ++w) body(w, shape.batch * w / workers, shape.batch * (w + 1) / workers);
    });
  }
  // Batch statistics are read in training only (eval mode uses the running statistics).
  BnParams bn1(int64_t l) const {
    const int64_t c = shape.channels(l);
    if (!training) return bn_params(params, bottleneck, l, false, false, {}, {}, eps, acc);
    return bn_params(params, bottleneck, l, false, true, batch_mean.narrow(0, 0, c), batch_var.narrow(0, 0, c), eps,
                     acc);
  }
  BnParams bn2(int64_t l) const {
    if (!training) return bn_params(params, bottleneck, l, true, false, {}, {}, eps, acc);
    return bn_params(params, bottleneck, l, true, true, bottleneck_mean[l], bottleneck_var[l], eps, acc);
  }
  const at::Tensor& weight(int64_t l, ParamIndex which) const { return param(params, bottleneck, l, which); }
  at::Tensor empty(int64_t channels, at::ScalarType dtype) const {
    return at::empty({shape.batch, channels, shape.height, shape.width},
                     features.options().dtype(dtype).memory_format(format));
  }
};

// The number of sample workers of the per-sample bottleneck loops.
int64_t sample_workers(const at::Tensor& features) {
  return features.is_cpu() ? std::max<int64_t>(1, std::min<int64_t>(features.size(0), at::get_num_threads())) : 1;
}

// BN1-ReLU-conv1x1 of a bottleneck layer into `out`, one sample at a time: the BN1-ReLU
// output is never materialized for the whole batch.
void bottleneck_forward(const Block& b, int64_t l, const at::Tensor& out) {
  const BnParams bn1 = b.bn1(l);
  const at::Tensor weight = weight_matrix(b.weight(l, kConv1Weight));
  const at::Tensor x = b.inputs(l);
  b.for_sample_ranges([&](int64_t w, int64_t n_begin, int64_t n_end) {
    const at::Tensor z = b.worker_z1(l, w);
    const at::Tensor z_matrix = channel_matrix(z);
    for (int64_t n = n_begin; n < n_end; ++n) {
      b.kernels.bn_relu_forward(x.narrow(0, n, 1), bn1, z, b.cl);
      at::Tensor out_matrix = channel_matrix(out.narrow(0, n, 1));
      at::mm_out(out_matrix, weight, z_matrix);
    }
  });
}

// The backward of bottleneck_forward, one sample at a time: recomputes the sample's
// BN1-ReLU output, adds conv1's weight gradient, overwrites the scratch with the gradient
// of that output and runs the fused BN1-ReLU backward into the block's accumulator.
void bottleneck_backward(const Block& b, int64_t l, const at::Tensor& grad_out, const at::Tensor& accumulated,
                         bool accumulate, const at::Tensor& grad_conv1, const at::Tensor& norm_sum_dy_xhat,
                         const at::Tensor& norm_sum_dy) {
  const BnParams bn1 = b.bn1(l);
  const int64_t c = b.shape.channels(l);
  const at::Tensor weight = weight_matrix(b.weight(l, kConv1Weight));
  const at::Tensor x = b.inputs(l), acc_inputs = accumulated.narrow(1, 0, c);
  // Per-worker partial sums, added up in worker order below.
  const at::Tensor partial_sums = at::zeros({b.workers, 2, c}, norm_sum_dy.options());
  const at::Tensor partial_grad_conv1 =
      grad_conv1.defined() ? at::zeros({b.workers, grad_conv1.size(0), c}, grad_conv1.options()) : at::Tensor();
  b.for_sample_ranges([&](int64_t w, int64_t n_begin, int64_t n_end) {
    const at::Tensor z = b.worker_z1(l, w);
    at::Tensor z_matrix = channel_matrix(z);
    for (int64_t n = n_begin; n < n_end; ++n) {
      const at::Tensor x_n = x.narrow(0, n, 1), grad_matrix = channel_matrix(grad_out.narrow(0, n, 1));
      b.kernels.bn_relu_forward(x_n, bn1, z, b.cl);
      if (grad_conv1.defined()) partial_grad_conv1[w].addmm_(grad_matrix, z_matrix.t());
      at::mm_out(z_matrix, weight.t(), grad_matrix);  // z now holds the gradient of the BN1-ReLU output
      b.kernels.bn_relu_backward(x_n, z, bn1, acc_inputs.narrow(0, n, 1), accumulate, partial_sums[w][0],
                                 partial_sums[w][1], b.cl);
    }
  });
  const at::Tensor sums = partial_sums.sum(0);
  norm_sum_dy_xhat.add_(sums[0]);
  norm_sum_dy.add_(sums[1]);
  if (grad_conv1.defined()) grad_conv1.add_(partial_grad_conv1.sum(0));
}

}  // namespace

ForwardResult dense_block_forward(const at::Tensor& input, at::TensorList params,
                                  const std::optional<at::Tensor>& dropout_mask, bool bottleneck, bool training,
                                  bool keep_bottleneck, double eps, const std::optional<c10::string_view>& sync_group,
                                  const BnKernels& kernels) {
  const BlockShape s = check_block(input, params, bottleneck, /*with_running_stats=*/true);
  check_dropout_mask(dropout_mask, input, s);
  TORCH_CHECK(eps > 0, "dense_block: eps must be positive, got ", eps);
  const auto format = input.suggest_memory_format();
  const auto acc = stats_dtype(input.scalar_type());
  const auto stat_options = input.options().dtype(acc);
  const int64_t stat_channels = training ? s.total_channels() : 0, stat_width = training ? s.bottleneck_width : 0;
  const StatSync sync(training ? sync_group : std::nullopt, s.batch * s.height * s.width, input);
  Block b{s, params, bottleneck, training, is_channels_last(format), eps, format, acc, kernels, sync};
  b.features = at::empty({s.batch, s.total_channels(), s.height, s.width}, input.options().memory_format(format));
  b.batch_mean = at::empty({stat_channels}, stat_options);
  b.batch_var = at::empty({stat_channels}, stat_options);
  b.bottleneck_mean = at::empty({s.num_layers, stat_width}, stat_options);
  b.bottleneck_var = at::empty({s.num_layers, stat_width}, stat_options);
  std::vector<at::Tensor> saved_bottleneck;
  if (bottleneck && keep_bottleneck) {
    for (int64_t l = 0; l < s.num_layers; ++l) saved_bottleneck.push_back(b.empty(s.bottleneck_width, input.scalar_type()));
  }
  if (b.count() == 0) {  // an empty batch has undefined (NaN) statistics, as in PyTorch
    for (auto* t : {&b.batch_mean, &b.batch_var, &b.bottleneck_mean, &b.bottleneck_var}) t->fill_(NAN);
    return {b.features, b.batch_mean, b.batch_var, saved_bottleneck, b.bottleneck_mean, b.bottleneck_var};
  }

  b.features.narrow(1, 0, s.in_channels).copy_(input);
  if (training) {
    kernels.channel_moments(b.inputs(0), b.batch_mean.narrow(0, 0, s.in_channels),
                            b.batch_var.narrow(0, 0, s.in_channels), b.cl);
    sync.moments(b.batch_mean.narrow(0, 0, s.in_channels), b.batch_var.narrow(0, 0, s.in_channels));
  }
  b.workers = sample_workers(b.features);
  const int64_t scratch_batch = bottleneck ? b.workers : s.batch;
  b.scratch = at::empty({scratch_batch * s.channels(s.num_layers - 1) * s.height * s.width}, input.options());
  at::Tensor bottleneck_out, bottleneck_scratch;
  if (bottleneck) {
    bottleneck_scratch = b.empty(s.bottleneck_width, input.scalar_type());
    if (!keep_bottleneck) bottleneck_out = b.empty(s.bottleneck_width, input.scalar_type());
  }
  for (int64_t l = 0; l < s.num_layers; ++l) {
    at::Tensor new_features;
    if (bottleneck) {
      const at::Tensor& out = keep_bottleneck ? saved_bottleneck[l] : bottleneck_out;
      bottleneck_forward(b, l, out);
      if (training) {
        kernels.channel_moments(out, b.bottleneck_mean[l], b.bottleneck_var[l], b.cl);
        sync.moments(b.bottleneck_mean[l], b.bottleneck_var[l]);
      }
      kernels.bn_relu_forward(out, b.bn2(l), bottleneck_scratch, b.cl);
      new_features = conv(bottleneck_scratch, b.weight(l, kConv2Weight), format);
    } else {
      const at::Tensor z1 = b.z1(l, s.batch);
      kernels.bn_relu_forward(b.inputs(l), b.bn1(l), z1, b.cl);
      new_features = conv(z1, b.weight(l, kConv1Weight), format);
    }
    if (dropout_mask.has_value()) new_features.mul_(dropout_mask->narrow(1, l * s.growth, s.growth));
    const int64_t c = s.channels(l);
    const at::Tensor slot = b.features.narrow(1, c, s.growth);
    slot.copy_(new_features);
    if (training) {
      kernels.channel_moments(slot, b.batch_mean.narrow(0, c, s.growth), b.batch_var.narrow(0, c, s.growth), b.cl);
      sync.moments(b.batch_mean.narrow(0, c, s.growth), b.batch_var.narrow(0, c, s.growth));
    }
  }
  return {b.features, b.batch_mean, b.batch_var, saved_bottleneck, b.bottleneck_mean, b.bottleneck_var};
}

namespace {

// Backward of one layer's BN2-ReLU-conv3x3 (bottleneck) given the gradient of its new
// channels; returns the gradient of the bottleneck output and fills the layer's grads.
at::Tensor bottleneck_output_backward(const Block& b, int64_t l, const at::Tensor& bottleneck_out,
                                      const at::Tensor& grad_new, bool need_weights, std::vector<at::Tensor>& grads) {
  const int64_t width = b.shape.bottleneck_width, base = l * params_per_layer(true);
  const BnParams bn2 = b.bn2(l);
  const at::Tensor z2 = b.empty(width, bottleneck_out.scalar_type());
  b.kernels.bn_relu_forward(bottleneck_out, bn2, z2, b.cl);
  auto [grad_z2, grad_conv2] = conv_backward(grad_new, z2, b.weight(l, kConv2Weight), need_weights, b.format);
  at::Tensor accumulated = b.empty(width, b.acc);
  at::Tensor sum_dy_xhat = at::zeros({width}, accumulated.options().dtype(at::kDouble));
  at::Tensor sum_dy = at::zeros({width}, accumulated.options().dtype(at::kDouble));
  b.kernels.bn_relu_backward(bottleneck_out, grad_z2, bn2, accumulated, false, sum_dy_xhat, sum_dy, b.cl);
  at::Tensor proj_mean, proj_xhat;
  if (b.training) {
    proj_mean = at::zeros({width}, accumulated.options()), proj_xhat = at::zeros({width}, accumulated.options());
    add_projections(bn2, sum_dy_xhat, sum_dy, b.count(), proj_mean, proj_xhat);
    b.sync.sum({proj_mean, proj_xhat});  // the weight gradients stay this rank's own
  }
  at::Tensor grad_bottleneck = z2;  // z2 is no longer needed
  b.kernels.bn_input_grad(bottleneck_out, bn2, accumulated, at::Tensor(), proj_mean, proj_xhat, grad_bottleneck, b.cl);
  if (need_weights) {
    grads[base + kConv2Weight] = grad_conv2;
    grads[base + kNorm2Weight] = sum_dy_xhat.to(b.weight(l, kNorm2Weight).scalar_type());
    grads[base + kNorm2Bias] = sum_dy.to(b.weight(l, kNorm2Bias).scalar_type());
  }
  return grad_bottleneck;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> dense_block_backward(
    const at::Tensor& grad_features, const at::Tensor& features, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, at::TensorList saved_bottleneck, const at::Tensor& bottleneck_mean,
    const at::Tensor& bottleneck_var, at::TensorList params, const std::optional<at::Tensor>& dropout_mask,
    bool bottleneck, bool training, double eps, at::IntArrayRef layer_needs_grad, bool input_needs_grad,
    const std::optional<c10::string_view>& sync_group, const BnKernels& kernels) {
  TORCH_CHECK(features.dim() == 4, "dense_block_backward: features must be 4-D");
  const int64_t per_layer = params_per_layer(bottleneck);
  TORCH_CHECK(!params.empty() && params.size() % per_layer == 0, "dense_block_backward: layer_params must hold ",
              per_layer, " tensors per layer");
  const int64_t num_layers = static_cast<int64_t>(params.size()) / per_layer;
  const int64_t growth = param(params, bottleneck, num_layers - 1, bottleneck ? kConv2Weight : kConv1Weight).size(0);
  const int64_t in_channels = features.size(1) - num_layers * growth;
  TORCH_CHECK(in_channels > 0, "dense_block_backward: features has too few channels for ", num_layers, " layers");
  const BlockShape s = check_block(features.narrow(1, 0, in_channels), params, bottleneck, /*with_running_stats=*/!training);
  TORCH_CHECK(eps > 0, "dense_block_backward: eps must be positive, got ", eps);
  TORCH_CHECK(static_cast<int64_t>(layer_needs_grad.size()) == s.num_layers,
              "dense_block_backward: layer_needs_grad must have one entry per layer");
  const auto format = features.suggest_memory_format();
  const auto acc = stats_dtype(features.scalar_type());
  const auto device = features.device();
  check_saved(grad_features, "grad_features", features.sizes(), features.scalar_type(), device);
  // The batch statistics are unused in eval mode: their shape is not checked there.
  const std::vector<int64_t> channel_stats{s.total_channels()}, bottleneck_stats{s.num_layers, s.bottleneck_width};
  const at::OptionalIntArrayRef stats_shape = training ? at::OptionalIntArrayRef(channel_stats) : std::nullopt;
  const at::OptionalIntArrayRef bottleneck_stats_shape =
      training ? at::OptionalIntArrayRef(bottleneck_stats) : std::nullopt;
  check_saved(batch_mean, "batch_mean", stats_shape, acc, device);
  check_saved(batch_var, "batch_var", stats_shape, acc, device);
  check_saved(bottleneck_mean, "bottleneck_mean", bottleneck_stats_shape, acc, device);
  check_saved(bottleneck_var, "bottleneck_var", bottleneck_stats_shape, acc, device);
  const bool keep_bottleneck = !saved_bottleneck.empty();
  TORCH_CHECK(!keep_bottleneck || (bottleneck && static_cast<int64_t>(saved_bottleneck.size()) == s.num_layers),
              "dense_block_backward: saved_bottleneck must be empty or, with a bottleneck, hold one tensor per layer");
  std::vector<at::Tensor> saved;  // in the features' layout, as the kernels expect
  for (int64_t l = 0; l < static_cast<int64_t>(saved_bottleneck.size()); ++l) {
    check_saved(saved_bottleneck[l], "saved_bottleneck[" + std::to_string(l) + "]",
                {{s.batch, s.bottleneck_width, s.height, s.width}}, features.scalar_type(), device);
    saved.push_back(saved_bottleneck[l].contiguous(format));
  }
  check_dropout_mask(dropout_mask, features, s);

  const StatSync sync(training ? sync_group : std::nullopt, s.batch * s.height * s.width, features);
  Block b{s, params, bottleneck, training, is_channels_last(format), eps, format, acc, kernels, sync,
          features, batch_mean, batch_var, bottleneck_mean, bottleneck_var};
  const auto acc_options = features.options().dtype(acc);
  std::vector<at::Tensor> grads(params.size());
  for (auto& g : grads) g = at::empty({0}, acc_options);
  at::Tensor grad_input = input_needs_grad ? b.empty(s.in_channels, features.scalar_type()) : at::empty({0}, features.options());
  if (b.count() == 0) {
    grad_input.zero_();
    for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
      const int64_t slot = i % per_layer;
      const bool running = slot == kNorm1Mean || slot == kNorm1Var || slot == kNorm2Mean || slot == kNorm2Var;
      if (layer_needs_grad[i / per_layer] && !running) grads[i] = at::zeros_like(params[i]);
    }
    return {grad_input, grads};
  }

  // Layers below the lowest one that needs gradients are skipped when the input needs none.
  int64_t lowest_layer = 0;
  if (!input_needs_grad) {
    lowest_layer = s.num_layers;
    for (int64_t l = s.num_layers - 1; l >= 0; --l) {
      if (layer_needs_grad[l]) lowest_layer = l;
    }
  }

  const at::Tensor grad = grad_features.contiguous(format);
  const int64_t max_channels = s.channels(s.num_layers - 1);
  // scale * dy summed over every reader of each channel, and the two projections.
  const at::Tensor accumulated = b.empty(max_channels, acc);
  at::Tensor proj_mean, proj_xhat;
  if (training) proj_mean = at::zeros({max_channels}, acc_options), proj_xhat = at::zeros({max_channels}, acc_options);
  auto slice = [](const at::Tensor& t, int64_t start, int64_t length) {
    return t.defined() ? t.narrow(0, start, length) : t;
  };
  auto statistics = [&](int64_t start, int64_t length) {
    return training ? BnParams{{}, {}, batch_mean.narrow(0, start, length), batch_var.narrow(0, start, length), eps}
                    : BnParams{};
  };
  b.workers = sample_workers(features);
  b.scratch = at::empty({(bottleneck ? b.workers : s.batch) * max_channels * s.height * s.width}, features.options());
  at::Tensor recomputed_bottleneck;
  if (bottleneck && !keep_bottleneck) recomputed_bottleneck = b.empty(s.bottleneck_width, features.scalar_type());

  for (int64_t l = s.num_layers - 1; l >= lowest_layer; --l) {
    const int64_t c = s.channels(l), base = l * per_layer;
    const bool need_weights = layer_needs_grad[l] != 0, accumulate = l < s.num_layers - 1;
    // The gradient of this layer's new channels is final: every later reader has added to it.
    at::Tensor grad_new = grad.narrow(1, c, s.growth);
    if (accumulate) {
      if (training) sync.sum({proj_mean.narrow(0, c, s.growth), proj_xhat.narrow(0, c, s.growth)});
      at::Tensor finalized = b.empty(s.growth, features.scalar_type());
      kernels.bn_input_grad(features.narrow(1, c, s.growth), statistics(c, s.growth), accumulated.narrow(1, c, s.growth),
                            grad_new, slice(proj_mean, c, s.growth), slice(proj_xhat, c, s.growth), finalized, b.cl);
      grad_new = finalized;
    }
    if (dropout_mask.has_value()) grad_new = grad_new * dropout_mask->narrow(1, l * s.growth, s.growth);

    at::Tensor sum_dy_xhat = at::zeros({c}, acc_options.dtype(at::kDouble)), sum_dy = at::zeros({c}, acc_options.dtype(at::kDouble));
    if (bottleneck) {
      const at::Tensor& out = keep_bottleneck ? saved[l] : recomputed_bottleneck;
      if (!keep_bottleneck) bottleneck_forward(b, l, out);
      const at::Tensor grad_bottleneck = bottleneck_output_backward(b, l, out, grad_new, need_weights, grads);
      at::Tensor grad_conv1;
      if (need_weights) grad_conv1 = at::zeros({s.bottleneck_width, c}, features.options());
      bottleneck_backward(b, l, grad_bottleneck, accumulated, accumulate, grad_conv1, sum_dy_xhat, sum_dy);
      if (need_weights) grads[base + kConv1Weight] = grad_conv1.view(b.weight(l, kConv1Weight).sizes());
    } else {
      const at::Tensor z1 = b.z1(l, s.batch);
      kernels.bn_relu_forward(b.inputs(l), b.bn1(l), z1, b.cl);
      auto [grad_z1, grad_conv1] = conv_backward(grad_new, z1, b.weight(l, kConv1Weight), need_weights, format);
      kernels.bn_relu_backward(b.inputs(l), grad_z1, b.bn1(l), accumulated.narrow(1, 0, c), accumulate, sum_dy_xhat,
                               sum_dy, b.cl);
      if (need_weights) grads[base + kConv1Weight] = grad_conv1;
    }
    if (training) add_projections(b.bn1(l), sum_dy_xhat, sum_dy, b.count(), proj_mean.narrow(0, 0, c), proj_xhat.narrow(0, 0, c));
    if (need_weights) {
      grads[base + kNorm1Weight] = sum_dy_xhat.to(b.weight(l, kNorm1Weight).scalar_type());
      grads[base + kNorm1Bias] = sum_dy.to(b.weight(l, kNorm1Bias).scalar_type());
    }
  }
  if (input_needs_grad) {
    if (training) sync.sum({proj_mean.narrow(0, 0, s.in_channels), proj_xhat.narrow(0, 0, s.in_channels)});
    kernels.bn_input_grad(b.inputs(0), statistics(0, s.in_channels),
                          accumulated.narrow(1, 0, s.in_channels), grad.narrow(1, 0, s.in_channels),
                          slice(proj_mean, 0, s.in_channels), slice(proj_xhat, 0, s.in_channels), grad_input, b.cl);
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
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(running_mean[i].sizes() == batch_mean[i].sizes() && running_var[i].sizes() == batch_var[i].sizes(),
                "update_running_stats: entry ", i, " has mismatched running and batch statistics shapes");
    // running = (1 - momentum) * running + momentum * batch, as nn.BatchNorm2d does.
    running_mean[i].lerp_(batch_mean[i].to(running_mean[i].scalar_type()), momentum[i]);
    running_var[i].lerp_((batch_var[i] * bessel).to(running_var[i].scalar_type()), momentum[i]);
  }
}

}  // namespace dense_ops

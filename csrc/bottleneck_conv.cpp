// The bottleneck layers' BN1-ReLU-conv1x1 and its backward, in the two device strategies of
// block.h. Both write the conv straight into the block's buffers and never hold the BN1-ReLU
// output of more samples than the scratch.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdlib>
#include <string>

#include "block.h"
#include "parallel_chunks.h"

namespace dense_ops {

BottleneckStrategy bottleneck_strategy(bool on_cpu) {
  const char* forced = std::getenv("DENSE_OPS_BOTTLENECK");
  if (forced != nullptr && *forced != '\0') {
    const std::string name(forced);
    TORCH_CHECK(name == "batched" || name == "per_sample",
                "DENSE_OPS_BOTTLENECK must be 'batched' or 'per_sample' (or unset), got '", name, "'");
    return name == "batched" ? BottleneckStrategy::kBatched : BottleneckStrategy::kPerSample;
  }
  return on_cpu ? BottleneckStrategy::kPerSample : BottleneckStrategy::kBatched;
}

at::MemoryFormat bottleneck_format(BottleneckStrategy strategy, at::MemoryFormat block_format) {
  return strategy == BottleneckStrategy::kPerSample ? at::MemoryFormat::ChannelsLast : block_format;
}

int64_t batched_scratch_bytes() {
  const char* forced = std::getenv("DENSE_OPS_BATCHED_SCRATCH_BYTES");
  if (forced == nullptr || *forced == '\0') return int64_t(64) << 20;
  char* end = nullptr;
  const long long bytes = std::strtoll(forced, &end, 10);
  TORCH_CHECK(*end == '\0' && bytes > 0, "DENSE_OPS_BATCHED_SCRATCH_BYTES must be a positive integer, got '",
              forced, "'");
  return bytes;
}

at::Tensor channels_view(const at::Tensor& flat, int64_t offset, int64_t batch, int64_t channels, int64_t height,
                         int64_t width, at::MemoryFormat format) {
  auto view = flat.narrow(0, offset, batch * channels * height * width);
  if (format == at::MemoryFormat::ChannelsLast) return view.view({batch, height, width, channels}).permute({0, 3, 1, 2});
  return view.view({batch, channels, height, width});
}

void Block::allocate_scratch() {
  const int64_t per_sample = shape.channels(shape.num_layers - 1) * shape.height * shape.width;
  if (!bottleneck) {
    scratch_samples = shape.batch;
  } else if (strategy == BottleneckStrategy::kPerSample) {
    const int64_t pixels = std::max<int64_t>(1, shape.pixels_per_sample());
    if (shape.batch == 1) {  // ranges of the sample's rows
      sample_ranges = std::clamp<int64_t>(pixels / kMinRangePixels, std::min<int64_t>(shape.height, 2),
                                          std::min(shape.height, kSampleRanges));
    } else {
      const int64_t min_range_samples = (kMinRangePixels + pixels - 1) / pixels;
      sample_ranges = std::clamp<int64_t>(shape.batch / min_range_samples, 2, kSampleRanges);
    }
    const int64_t range_samples = (shape.batch + sample_ranges - 1) / sample_ranges;
    const int64_t group = kGemmPixels / pixels;
    samples_per_gemm = std::clamp<int64_t>(group, 1, range_samples);
    scratch_samples = std::min<int64_t>(sample_ranges, at::get_num_threads()) * samples_per_gemm;
  } else {
    const int64_t bytes = std::max<int64_t>(1, per_sample * features.element_size());
    scratch_samples = std::max<int64_t>(1, std::min<int64_t>(shape.batch, batched_scratch_bytes() / bytes));
  }
  scratch = at::empty({scratch_samples * scratch_stride()}, features.options());
}

int64_t Block::rows_per_gemm(int64_t l) const {
  if (samples_per_gemm > 1) return shape.height;  // whole samples below kGemmPixels
  const int64_t row_bytes = shape.channels(l) * shape.width * features.element_size();
  return std::clamp<int64_t>(kGroupBytes / row_bytes, 1, shape.height);
}

namespace {

// acc += a @ b, accumulated in acc's dtype (float32 for float16/bfloat16 operands).
void add_matmul(const at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    acc.add_(at::mm(a, b));
  }
}

at::Tensor weight_matrix(const at::Tensor& weight) { return weight.reshape({weight.size(0), weight.size(1)}); }

// ---- kPerSample: one group of samples' GEMM at a time, sample ranges on parallel threads ----

// The [C, samples*H*W] matrix of a [samples, C, H, W] tensor, as a view, so that GEMM outputs land
// in our buffers: channels-last, or channel-major over the samples ([C][samples][H][W], which one
// NCHW sample is too).
at::Tensor samples_matrix(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).view({-1, t.size(1)}).t(); }

// One GEMM's share of the batch: image rows [row, row + rows) of `samples` samples from n on.
struct SampleGroup {
  int64_t n, samples, row, rows;
  at::Tensor of(const at::Tensor& t) const { return t.narrow(0, n, samples).narrow(2, row, rows); }
};

// Runs body(slot, range, group) for every SampleGroup of layer l: the batch split into
// block.sample_ranges contiguous ranges, the threads claiming ranges as they go (parallel_chunks)
// and running the groups of a range in order: one large parallel region instead of several small
// ones per group. A group is at most block.samples_per_gemm samples, or one band of a sample's rows
// (Block::rows_per_gemm). The split depends on neither the thread count nor scheduling, so
// per-range partial sums add up deterministically. `slot` is the running thread's scratch group: a
// parallel region numbers its threads below min(threads, ranges), the scratch's size; one that
// runs inline (nested in another region) runs every range on one thread.
template <typename Body>
void for_sample_groups(const Block& block, int64_t l, const Body& body) {
  const int64_t ranges = block.sample_ranges, batch = block.shape.batch, group = block.samples_per_gemm;
  const int64_t height = block.shape.height, rows = block.rows_per_gemm(l);
  const at::ThreadLocalState caller;  // worker threads run our ATen calls as the caller does (below autograd)
  const bool row_ranges = batch == 1;  // a range is some of the rows of the batch's one sample
  parallel_chunks(ranges, [&](int64_t range) {
    const at::ThreadLocalStateGuard as_caller(caller);
    const int64_t slot = at::get_thread_num() % (block.scratch_samples / group);
    const int64_t n_begin = row_ranges ? 0 : batch * range / ranges;
    const int64_t n_end = row_ranges ? 1 : batch * (range + 1) / ranges;
    const int64_t row_begin = row_ranges ? height * range / ranges : 0;
    const int64_t row_end = row_ranges ? height * (range + 1) / ranges : height;
    for (int64_t n = n_begin; n < n_end; n += group) {
      for (int64_t row = row_begin; row < row_end; row += rows) {
        body(slot, range, SampleGroup{n, std::min(group, n_end - n), row, std::min(rows, row_end - row)});
      }
    }
  });
}

// The BN1-ReLU output of layer l for group g in scratch slot `slot`, laid out as one
// samples_matrix: channels-last, or channel-major over the samples for an NCHW block (each
// sample's plane of a channel is still contiguous, as the NCHW kernels need).
at::Tensor group_z1(const Block& block, int64_t l, int64_t slot, const SampleGroup& g) {
  const BlockShape& shape = block.shape;
  const int64_t channels = shape.channels(l), offset = slot * block.samples_per_gemm * block.scratch_stride();
  if (block.channels_last) {
    return channels_view(block.scratch, offset, g.samples, channels, g.rows, shape.width, block.format);
  }
  return block.scratch.narrow(0, offset, channels * g.samples * g.rows * shape.width)
      .view({channels, g.samples, g.rows, shape.width})
      .transpose(0, 1);
}

void forward_per_sample(const Block& block, int64_t l, const at::Tensor& out) {
  const BnParams bn1 = block.bn1(l);
  const at::Tensor weight = weight_matrix(block.weight(l, kConv1Weight)), x = block.inputs(l);
  for_sample_groups(block, l, [&](int64_t slot, int64_t, const SampleGroup& g) {
    const at::Tensor z = group_z1(block, l, slot, g);
    block.kernels.bn_relu_forward(g.of(x), bn1, z, block.channels_last);
    at::Tensor out_matrix = samples_matrix(g.of(out));
    at::mm_out(out_matrix, weight, samples_matrix(z));
  });
}

void backward_per_sample(const Block& block, int64_t l, const at::Tensor& grad_out, const at::Tensor& accumulated,
                         bool accumulate, const at::Tensor& grad_conv1, const at::Tensor& sum_dy_xhat,
                         const at::Tensor& sum_dy) {
  const BnParams bn1 = block.bn1(l);
  const int64_t channels = block.shape.channels(l), ranges = block.sample_ranges;
  const at::Tensor weight = weight_matrix(block.weight(l, kConv1Weight));
  const at::Tensor x = block.inputs(l), acc_inputs = accumulated.narrow(1, 0, channels);
  // Per-range partial sums, added up in range order below.
  const at::Tensor partial_sums = at::zeros({ranges, 2, channels}, sum_dy.options());
  const at::Tensor partial_grad_conv1 =
      grad_conv1.defined() ? at::zeros({ranges, grad_conv1.size(0), channels}, grad_conv1.options()) : at::Tensor();
  for_sample_groups(block, l, [&](int64_t slot, int64_t range, const SampleGroup& g) {
    const at::Tensor z = group_z1(block, l, slot, g), z_matrix = samples_matrix(z);
    const at::Tensor x_group = g.of(x), grad_matrix = samples_matrix(g.of(grad_out));
    block.kernels.bn_relu_forward(x_group, bn1, z, block.channels_last);
    if (grad_conv1.defined()) add_matmul(partial_grad_conv1[range], grad_matrix, z_matrix.t());
    at::Tensor dz_matrix = z_matrix;  // z now receives the gradient of the BN1-ReLU output
    at::mm_out(dz_matrix, weight.t(), grad_matrix);
    block.kernels.bn_relu_backward(x_group, z, bn1, g.of(acc_inputs), accumulate,
                                   partial_sums[range][0], partial_sums[range][1], block.channels_last);
  });
  const at::Tensor sums = partial_sums.sum(0);
  sum_dy_xhat.add_(sums[0]);
  sum_dy.add_(sums[1]);
  if (grad_conv1.defined()) grad_conv1.add_(partial_grad_conv1.sum(0));
}

// ---- kBatched: chunks of samples, one GEMM per chunk ------------------------------------

// A chunk of samples as GEMM operands. Channels-last: one [chunk*H*W, C] row-major matrix
// (mm). NCHW: a batch of [C, H*W] matrices (bmm).
at::Tensor chunk_rows(const at::Tensor& chunk) {  // channels-last only
  return chunk.permute({0, 2, 3, 1}).view({-1, chunk.size(1)});
}
at::Tensor chunk_planes(const at::Tensor& chunk) {  // NCHW only
  return chunk.view({chunk.size(0), chunk.size(1), -1});
}

template <typename Body>
void for_chunks(const Block& block, const Body& body) {
  for (int64_t n = 0; n < block.shape.batch; n += block.scratch_samples) {
    body(n, std::min(block.scratch_samples, block.shape.batch - n));
  }
}

// out = weight @ z for every sample of the chunk.
void chunk_conv(const at::Tensor& weight, const at::Tensor& z, const at::Tensor& out, bool channels_last) {
  if (channels_last) {
    at::Tensor rows = chunk_rows(out);
    at::mm_out(rows, chunk_rows(z), weight.t());
  } else {
    at::Tensor planes = chunk_planes(out);
    at::bmm_out(planes, weight.expand({z.size(0), weight.size(0), weight.size(1)}), chunk_planes(z));
  }
}

// grad_weight += sum over the chunk of grad_out @ z^T, in grad_weight's dtype.
void chunk_weight_grad(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& grad_weight,
                       bool channels_last) {
  if (channels_last) {
    add_matmul(grad_weight, chunk_rows(grad_out).t(), chunk_rows(z));
  } else {
    grad_weight.add_(at::bmm(chunk_planes(grad_out), chunk_planes(z).transpose(1, 2)).sum(0, false, grad_weight.scalar_type()));
  }
}

void forward_batched(const Block& block, int64_t l, const at::Tensor& out) {
  const BnParams bn1 = block.bn1(l);
  const at::Tensor weight = weight_matrix(block.weight(l, kConv1Weight)), x = block.inputs(l);
  for_chunks(block, [&](int64_t n, int64_t samples) {
    const at::Tensor z = block.z1(l, 0, samples);
    block.kernels.bn_relu_forward(x.narrow(0, n, samples), bn1, z, block.channels_last);
    chunk_conv(weight, z, out.narrow(0, n, samples), block.channels_last);
  });
}

void backward_batched(const Block& block, int64_t l, const at::Tensor& grad_out, const at::Tensor& accumulated,
                      bool accumulate, const at::Tensor& grad_conv1, const at::Tensor& sum_dy_xhat,
                      const at::Tensor& sum_dy) {
  const BnParams bn1 = block.bn1(l);
  const int64_t channels = block.shape.channels(l);
  const at::Tensor weight = weight_matrix(block.weight(l, kConv1Weight)), x = block.inputs(l);
  const at::Tensor acc_inputs = accumulated.narrow(1, 0, channels);
  for_chunks(block, [&](int64_t n, int64_t samples) {
    const at::Tensor z = block.z1(l, 0, samples), x_chunk = x.narrow(0, n, samples);
    const at::Tensor grad_chunk = grad_out.narrow(0, n, samples);
    block.kernels.bn_relu_forward(x_chunk, bn1, z, block.channels_last);
    if (grad_conv1.defined()) chunk_weight_grad(grad_chunk, z, grad_conv1, block.channels_last);
    chunk_conv(weight.t(), grad_chunk, z, block.channels_last);  // z now receives the gradient of the BN1-ReLU output
    block.kernels.bn_relu_backward(x_chunk, z, bn1, acc_inputs.narrow(0, n, samples), accumulate, sum_dy_xhat, sum_dy,
                                   block.channels_last);
  });
}

}  // namespace

void bottleneck_forward(const Block& block, int64_t l, const at::Tensor& out) {
  if (block.strategy == BottleneckStrategy::kBatched) {
    forward_batched(block, l, out);
  } else {
    forward_per_sample(block, l, out);
  }
}

void bottleneck_backward(const Block& block, int64_t l, const at::Tensor& grad_out, const at::Tensor& accumulated,
                         bool accumulate, const at::Tensor& grad_conv1, const at::Tensor& sum_dy_xhat,
                         const at::Tensor& sum_dy) {
  if (block.strategy == BottleneckStrategy::kBatched) {
    backward_batched(block, l, grad_out, accumulated, accumulate, grad_conv1, sum_dy_xhat, sum_dy);
  } else {
    backward_per_sample(block, l, grad_out, accumulated, accumulate, grad_conv1, sum_dy_xhat, sum_dy);
  }
}

}  // namespace dense_ops

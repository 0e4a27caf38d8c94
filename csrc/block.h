// The state of one dense block call, shared by the algorithm (dense_block.cpp) and the
// bottleneck strategies (bottleneck_conv.cpp). Internal to the extension.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "block_checks.h"
#include "dense_block.h"
#include "stat_sync.h"

namespace dense_ops {

// How a bottleneck layer runs BN1-ReLU-conv1x1 without a batch-sized BN1-ReLU copy (DESIGN.md,
// "Device strategies in one place"):
//   kPerSample: sample ranges on parallel CPU threads, one small group of samples at a time (CPU);
//   kBatched:   chunks of samples in turn, one GEMM per chunk (CUDA: few, large launches).
// Chosen per device by bottleneck_strategy(); DENSE_OPS_BOTTLENECK=batched|per_sample forces one.
enum class BottleneckStrategy { kPerSample, kBatched };

// kPerSample splits the batch into this many sample ranges (fewer for a smaller batch; a batch of
// one sample into ranges of its rows), whatever the thread count, so that per-range partial sums,
// added in range order, give bitwise the same gradients for any number of threads. The ranges
// share one scratch group per thread.
constexpr int64_t kSampleRanges = 16;
// Fewer ranges (but two, where there are two samples or rows) where a range would hold fewer
// pixels than this: a GEMM over fewer runs far below the large-GEMM rate (densenet121's 7x7 block
// at batch 8 ran 8-18% faster as 2 ranges of 4 samples than as 8 ranges of one 49-pixel sample).
// Two ranges keep the GEMMs inside a parallel region, single-threaded: MKL's small GEMMs,
// threaded outside one, round differently for different thread counts.
constexpr int64_t kMinRangePixels = 128;
// kPerSample runs its GEMMs over groups of a range's consecutive samples of about this many pixels
// (at least one sample): one 8x8 sample's GEMM is too small to run at the large-GEMM rate, while a
// group of this size still fits in L2 beside its BN1-ReLU output. The group size depends only on
// the shape, as the ranges do.
constexpr int64_t kGemmPixels = 1024;
// A group of one sample whose layer input is over this many bytes runs as bands of image rows of
// at most this size: a band's input and BN1-ReLU output then stay in the core's L2 (1 MiB on
// README's AMD EPYC) from the BN kernel through the GEMMs and back. In channels-last there,
// densenet121's 56x56 block ran 8-16% faster split so and issue 2's block 7%; DenseNet-BC-100's
// 32x32 block, densenet121's 28x28 one and NCHW ran as fast as before. Bands depend only on the
// shape, as the ranges do.
constexpr int64_t kGroupBytes = int64_t(512) << 10;
BottleneckStrategy bottleneck_strategy(bool on_cpu);

// The layout of the bottleneck-width tensors (conv1's output, the BN2-ReLU output, their gradients).
// kPerSample, whose GEMMs take either layout, keeps them channels-last whatever the block's layout:
// oneDNN's backward of the 3x3 convolution, with its few (growth-rate) output channels, runs about
// twice as fast on channels-last operands (issue 2's block, N=32: 9.6 against 17.3 ms a layer).
// kBatched keeps the block's layout, which its GEMMs over chunks of samples need.
at::MemoryFormat bottleneck_format(BottleneckStrategy strategy, at::MemoryFormat block_format);

// The batched strategy's BN1-ReLU scratch holds as many samples as fit in this many bytes (at
// least one; at most the batch): 64 MiB, or DENSE_OPS_BATCHED_SCRATCH_BYTES where set (tests
// use it to make small blocks run in several chunks).
int64_t batched_scratch_bytes();

at::Tensor channels_view(const at::Tensor& flat, int64_t offset, int64_t batch, int64_t channels, int64_t height,
                         int64_t width, at::MemoryFormat format);

struct Block {
  BlockShape shape;
  at::TensorList params;
  bool bottleneck, training, channels_last;
  double eps;
  at::MemoryFormat format;
  at::ScalarType acc;  // stats_dtype of the input
  const BnKernels& kernels;
  const StatSync& sync;
  BottleneckStrategy strategy;
  at::Tensor features, batch_mean, batch_var, bottleneck_mean, bottleneck_var;
  // BN1-ReLU outputs: with a bottleneck, `scratch_samples` samples' worth (one group per thread
  // for kPerSample, one chunk for kBatched); without, the whole batch.
  at::Tensor scratch;
  int64_t scratch_samples = 0;
  int64_t sample_ranges = 0;     // kPerSample's split of the batch (see kSampleRanges)
  int64_t samples_per_gemm = 1;  // kPerSample's samples per GEMM (see kGemmPixels)
  // kPerSample's image rows per GEMM for layer l: all of them, or bands (see kGroupBytes).
  int64_t rows_per_gemm(int64_t l) const;

  int64_t count() const { return sync.count(); }  // over the process group when synchronized
  at::Tensor inputs(int64_t l) const { return features.narrow(1, 0, shape.channels(l)); }
  // Elements between consecutive scratch samples: one sample of the widest layer's input, rounded
  // up to the allocator's 64-byte alignment so that every slot is aligned alike (GEMM kernels pick
  // their code path by alignment: a sample must round the same in whichever slot it lands).
  int64_t scratch_stride() const {
    const int64_t per_sample = shape.channels(shape.num_layers - 1) * shape.height * shape.width;
    const int64_t per_line = std::max<int64_t>(1, 64 / features.element_size());
    return (per_sample + per_line - 1) / per_line * per_line;
  }
  // The BN1-ReLU output of layer l for `samples` samples, starting at scratch sample `slot`.
  at::Tensor z1(int64_t l, int64_t slot, int64_t samples) const {
    return channels_view(scratch, slot * scratch_stride(), samples, shape.channels(l), shape.height, shape.width,
                         format);
  }
  // Batch-norm parameters: batch statistics in training, the layer's running statistics in eval mode.
  BnParams bn1(int64_t l) const;
  BnParams bn2(int64_t l) const;
  const at::Tensor& weight(int64_t l, LayerParam which) const { return param(params, bottleneck, l, which); }
  at::Tensor empty(int64_t channels, at::ScalarType dtype) const {
    return at::empty({shape.batch, channels, shape.height, shape.width},
                     features.options().dtype(dtype).memory_format(format));
  }
  at::MemoryFormat bottleneck_format() const { return dense_ops::bottleneck_format(strategy, format); }
  bool bottleneck_channels_last() const { return bottleneck_format() == at::MemoryFormat::ChannelsLast; }
  at::Tensor empty_bottleneck(at::ScalarType dtype) const {
    return at::empty({shape.batch, shape.bottleneck_width, shape.height, shape.width},
                     features.options().dtype(dtype).memory_format(bottleneck_format()));
  }
  // Allocates the BN1-ReLU scratch for the block's strategy.
  void allocate_scratch();
};

// BN1-ReLU-conv1x1 of bottleneck layer l into `out` ([N, bottleneck_width, H, W]).
void bottleneck_forward(const Block& block, int64_t l, const at::Tensor& out);

// Its backward given grad_out, the gradient of `out`: recomputes BN1-ReLU, adds conv1's
// weight gradient to grad_conv1 (stats dtype; undefined when not needed), and runs the fused
// BN1-ReLU backward into the block's accumulator and the layer's sums (float64).
void bottleneck_backward(const Block& block, int64_t l, const at::Tensor& grad_out, const at::Tensor& accumulated,
                         bool accumulate, const at::Tensor& grad_conv1, const at::Tensor& sum_dy_xhat,
                         const at::Tensor& sum_dy);

}  // namespace dense_ops

// CPU batch-norm kernels of the dense block: own loops parallelized with at::parallel_for, the
// arithmetic from common/bn_math.h. Built once per ISA (cpu/isa.h); bn_kernels.cpp registers them.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/bn_math.h"
#include "cpu/static_flags.h"
#include "dense_block.h"
#include "parallel_chunks.h"
#include "cpu/isa_target.h"  // last: it sets the ISA of the code below

DENSE_OPS_ISA_BEGIN
namespace dense_ops {
namespace DENSE_OPS_ISA {
namespace {

// Channels-last kernels read a layer's C channels of every pixel of a buffer of Ctot: rows with
// gaps, which the hardware prefetchers serve badly (on README's AMD EPYC a pass over 192 of every
// 320 channels ran slower than one over all 320). So the pixel loops ask for the row
// kPrefetchPixels pixels ahead, into L2. Dense rows (a tensor of the layer's channels only, such as
// the bottleneck's 4k) are one stream, which the hardware serves well: asking for them too made
// the kernels on issue 2's 48-channel bottleneck tensors 20-35% slower.
constexpr int64_t kPrefetchPixels = 12, kCacheLine = 64;

// Element (n, c, s) of a [N, C, H*W] view. The unit stride is a compile-time constant
// (over s for NCHW, over c for channels-last) so the inner loops vectorize.
template <typename T, bool kChannelsLast>
struct Plane {
  T* data;
  int64_t stride_n, stride_c, stride_s;
  explicit Plane(const at::Tensor& t)
      : data(t.data_ptr<T>()), stride_n(t.stride(0)), stride_c(t.stride(1)), stride_s(t.stride(3)) {
    TORCH_INTERNAL_ASSERT(t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3),
                          "dense_ops: H and W strides of a kernel operand are not mergeable");
    if (t.size(3) == 1) stride_s = t.stride(2);
    TORCH_INTERNAL_ASSERT(kChannelsLast ? (t.size(1) == 1 || stride_c == 1) : (t.size(2) * t.size(3) == 1 || stride_s == 1),
                          "dense_ops: kernel operand has an unexpected memory layout");
  }
  T& operator()(int64_t n, int64_t c, int64_t s) const {
    return data[n * stride_n + (kChannelsLast ? c : c * stride_c) + (kChannelsLast ? s * stride_s : s)];
  }
  // Channels-last: brings `length` channels from c of the pixel kPrefetchPixels after (n, s) into
  // L2 (past the last pixel, an address outside the tensor: a prefetch never faults).
  void prefetch_ahead(int64_t n, int64_t c, int64_t s, int64_t length) const {
#if defined(__GNUC__) || defined(__clang__)
    if constexpr (kChannelsLast) {
      if (stride_s == length) return;  // dense rows (above)
      const auto offset = static_cast<uintptr_t>((n * stride_n + c + (s + kPrefetchPixels) * stride_s) * sizeof(T));
      const uintptr_t row = reinterpret_cast<uintptr_t>(data) + offset;
      for (uintptr_t byte = 0; byte < static_cast<uintptr_t>(length) * sizeof(T); byte += kCacheLine) {
        __builtin_prefetch(reinterpret_cast<const void*>(row + byte), /*rw=*/0, /*locality (L2)=*/2);
      }
    }
#endif
  }
};

struct Extent {
  int64_t batch, channels, spatial;
  explicit Extent(const at::Tensor& t) : batch(t.size(0)), channels(t.size(1)), spatial(t.size(2) * t.size(3)) {}
  int64_t per_channel() const { return batch * spatial; }  // also the number of pixels
};

// Elements a thread should get at least: fewer do not pay for waking it.
constexpr int64_t kParallelGrain = 32768;

// The threads split the channels in NCHW, where a channel's pixels are contiguous, and the pixels
// in channels-last, where a pixel's channels are: either way no two threads write one cache line.

// Runs range(begin, end) over [0, items) split into chunks of at least `grain` items, about
// kChunksPerThread a thread, claimed by the threads as they go (parallel_chunks.h).
constexpr int64_t kChunksPerThread = 8;
template <typename Range>
void parallel_ranges(int64_t items, int64_t grain, const Range& range) {
  const int64_t wanted = kChunksPerThread * at::get_num_threads();
  const int64_t chunk = std::max({int64_t(1), grain, (items + wanted - 1) / wanted});
  parallel_chunks((items + chunk - 1) / chunk,
                  [&](int64_t i) { range(i * chunk, std::min(items, (i + 1) * chunk)); });
}

// Runs chunk(c_begin, c_end) in parallel over channel ranges of a useful size (NCHW).
template <typename Chunk>
void parallel_over_channels(const Extent& e, const Chunk& chunk) {
  parallel_ranges(e.channels, kParallelGrain / std::max<int64_t>(1, e.per_channel()), chunk);
}

// Runs pixel(n, s) for pixels [p_begin, p_end) in order, stepping (n, s) without a division per
// pixel (which costs as much as a short channels-last run).
template <typename Pixel>
void for_each_pixel(const Extent& e, int64_t p_begin, int64_t p_end, const Pixel& pixel) {
  int64_t n = p_begin / e.spatial, s = p_begin % e.spatial;
  for (int64_t p = p_begin; p < p_end; ++p) {
    pixel(n, s);
    if (++s == e.spatial) s = 0, ++n;
  }
}

// Runs pixel(n, s) for every pixel, in parallel over pixel ranges of a useful size (channels-last).
template <typename Pixel>
void parallel_over_pixels(const Extent& e, const Pixel& pixel) {
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, e.channels));
  parallel_ranges(e.per_channel(), grain, [&](int64_t p_begin, int64_t p_end) { for_each_pixel(e, p_begin, p_end, pixel); });
}

// Channels-last reductions: the pixels split into at most kPixelBlocks fixed blocks, and the
// per-block partial sums, added in block order, are the same for any number of threads.
// add_block(p_begin, p_end, partial) adds one block's sums into its `width` partials.
constexpr int64_t kPixelBlocks = 64, kMinBlockPixels = 64;
template <typename sum_t, typename AddBlock>
std::vector<sum_t> sum_over_pixel_blocks(const Extent& e, int64_t width, const AddBlock& add_block) {
  const int64_t pixels = e.per_channel();
  const int64_t blocks = std::clamp<int64_t>(pixels / kMinBlockPixels, 1, kPixelBlocks);
  std::vector<sum_t> partial(blocks * width, sum_t(0)), total(width, sum_t(0));
  parallel_chunks(blocks, [&](int64_t b) { add_block(pixels * b / blocks, pixels * (b + 1) / blocks, &partial[b * width]); });
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[b * width + i];
  return total;
}

template <typename acc_t>
std::vector<math::BnAffine<acc_t>> affines(const BnParams& bn, int64_t channels) {
  const acc_t* w = bn.weight.data_ptr<acc_t>();
  const acc_t* b = bn.bias.data_ptr<acc_t>();
  const acc_t* m = bn.mean.data_ptr<acc_t>();
  const acc_t* v = bn.var.data_ptr<acc_t>();
  std::vector<math::BnAffine<acc_t>> out;
  out.reserve(channels);
  for (int64_t c = 0; c < channels; ++c) out.push_back(math::bn_affine(w[c], b[c], m[c], v[c], acc_t(bn.eps)));
  return out;
}

// The affine of statistics only (weight 1, bias 0): x_hat = normalized(x).
template <typename acc_t>
std::vector<math::BnAffine<acc_t>> normalizers(const BnParams& st, int64_t channels) {
  const acc_t* m = st.mean.data_ptr<acc_t>();
  const acc_t* v = st.var.data_ptr<acc_t>();
  std::vector<math::BnAffine<acc_t>> out;
  out.reserve(channels);
  for (int64_t c = 0; c < channels; ++c) out.push_back(math::bn_affine(acc_t(1), acc_t(0), m[c], v[c], acc_t(st.eps)));
  return out;
}

// Per-channel affines as columns (structure of arrays), so loops over channels vectorize.
template <typename acc_t>
struct AffineColumns {
  std::vector<acc_t> mean, invstd, scale, shift;
  explicit AffineColumns(const std::vector<math::BnAffine<acc_t>>& rows) {
    for (const auto& a : rows) {
      mean.push_back(a.mean), invstd.push_back(a.invstd), scale.push_back(a.scale), shift.push_back(a.shift);
    }
  }
  math::BnAffine<acc_t> at(int64_t i) const { return {mean[i], invstd[i], scale[i], shift[i]}; }
};


// Calls run(n, c, s, length, value_at) over every contiguous run of the elements, in parallel:
// one channel's pixels of one sample (NCHW) or all channels of one pixel (channels-last).
// value_at(j) is channel_value(channel of the run's j-th element); the unit-stride loops over a
// run vectorize when channel_value reads plain arrays.
template <bool kChannelsLast, typename ChannelValue, typename Run>
void parallel_runs(const Extent& e, const ChannelValue& channel_value, const Run& run) {
  if (kChannelsLast) {
    parallel_over_pixels(e, [&](int64_t n, int64_t s) { run(n, 0, s, e.channels, channel_value); });
  } else {
    parallel_over_channels(e, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const auto value = channel_value(c);
        const auto value_at = [value](int64_t) { return value; };
        for (int64_t n = 0; n < e.batch; ++n) run(n, c, 0, e.spatial, value_at);
      }
    });
  }
}

// The sum of value(i) over [0, length) in independent lanes, so that the loop vectorizes (one
// running sum would be a serial chain of adds).
template <typename sum_t, typename Value>
sum_t lane_sum(int64_t length, const Value& value) {
  constexpr int64_t kLanes = 8;
  sum_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += value(i + j);
  for (; i < length; ++i) lanes[0] += value(i);
  sum_t total = 0;
  for (const sum_t lane : lanes) total += lane;
  return total;
}

// Per-channel mean and biased variance, two passes for an accurate variance: NCHW by channel
// ranges, channels-last by pixel blocks.
template <typename scalar_t, typename sum_t, bool kChannelsLast>
void moments(const Plane<scalar_t, kChannelsLast>& in, const Extent& e, sum_t* mean, sum_t* var) {
  const sum_t count = static_cast<sum_t>(e.per_channel());
  if (kChannelsLast) {
    const auto add_pixels = [&](int64_t p_begin, int64_t p_end, const auto& add) {
      for_each_pixel(e, p_begin, p_end, [&](int64_t n, int64_t s) {
        in.prefetch_ahead(n, 0, s, e.channels);
        const scalar_t* __restrict__ x = &in(n, 0, s);
        for (int64_t c = 0; c < e.channels; ++c) add(c, static_cast<sum_t>(x[c]));
      });
    };
    const auto sums = sum_over_pixel_blocks<sum_t>(e, e.channels, [&](int64_t p0, int64_t p1, sum_t* partial) {
      add_pixels(p0, p1, [&](int64_t c, sum_t x) { partial[c] += x; });
    });
    for (int64_t c = 0; c < e.channels; ++c) mean[c] = sums[c] / count;
    const auto squares = sum_over_pixel_blocks<sum_t>(e, e.channels, [&](int64_t p0, int64_t p1, sum_t* partial) {
      add_pixels(p0, p1, [&](int64_t c, sum_t x) { partial[c] += (x - mean[c]) * (x - mean[c]); });
    });
    for (int64_t c = 0; c < e.channels; ++c) var[c] = squares[c] / count;
    return;
  }
  parallel_over_channels(e, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      sum_t sum = 0, squares = 0;
      for (int64_t n = 0; n < e.batch; ++n) {
        const scalar_t* __restrict__ x = &in(n, c, 0);
        sum += lane_sum<sum_t>(e.spatial, [&](int64_t i) { return static_cast<sum_t>(x[i]); });
      }
      mean[c] = sum / count;
      for (int64_t n = 0; n < e.batch; ++n) {
        const scalar_t* __restrict__ x = &in(n, c, 0);
        squares += lane_sum<sum_t>(e.spatial, [&](int64_t i) {
          const sum_t d = static_cast<sum_t>(x[i]) - mean[c];
          return d * d;
        });
      }
      var[c] = squares / count;
    }
  });
}

void channel_moments(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_channel_moments", [&] {
    using stat_t = at::opmath_type<scalar_t>;
    using sum_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    with_flag(channels_last, [&](auto layout) {
      constexpr bool kChannelsLast = decltype(layout)::value;
      std::vector<sum_t> batch_mean(e.channels), batch_var(e.channels);
      moments(Plane<scalar_t, kChannelsLast>(x), e, batch_mean.data(), batch_var.data());
      stat_t* mean_out = mean.data_ptr<stat_t>();
      stat_t* var_out = var.data_ptr<stat_t>();
      for (int64_t c = 0; c < e.channels; ++c) {
        mean_out[c] = static_cast<stat_t>(batch_mean[c]);
        var_out[c] = static_cast<stat_t>(batch_var[c]);
      }
    });
  });
}

void bn_relu_forward(const at::Tensor& x, const BnParams& bn, const at::Tensor& out, bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(channels_last, [&](auto layout) {
      constexpr bool kChannelsLast = decltype(layout)::value;
      const Plane<scalar_t, kChannelsLast> in(x), result(out);
      const AffineColumns<acc_t> columns(affines<acc_t>(bn, e.channels));
      const auto affine = [&](int64_t c) { return columns.at(c); };
      parallel_runs<kChannelsLast>(e, affine, [&](int64_t n, int64_t c, int64_t s, int64_t length, auto affine_at) {
        in.prefetch_ahead(n, c, s, length);
        const scalar_t* __restrict__ x_run = &in(n, c, s);
        scalar_t* __restrict__ out_run = &result(n, c, s);
        for (int64_t j = 0; j < length; ++j) {
          out_run[j] = static_cast<scalar_t>(math::bn_relu(static_cast<acc_t>(x_run[j]), affine_at(j)));
        }
      });
    });
  });
}

// The fused backward of one element: dy = dz masked by the ReLU; acc gets scale * dy (added
// to what it holds when kAccumulate). Returns dy; dy_xhat gets dy * x_hat.
template <bool kAccumulate, typename scalar_t, typename acc_t>
inline acc_t backward_element(scalar_t x, scalar_t dz, acc_t& acc, const math::BnAffine<acc_t>& a, acc_t& dy_xhat) {
  const acc_t xv = static_cast<acc_t>(x);
  const acc_t dy = math::relu_masked_grad(xv, static_cast<acc_t>(dz), a);
  dy_xhat = dy * math::normalized(xv, a);
  acc = (kAccumulate ? acc : acc_t(0)) + a.scale * dy;
  return dy;
}

// NCHW: one contiguous run of one channel. Independent lanes let the compiler vectorize
// the two reductions (a single running sum would be a serial chain); lane sums go to double.
template <bool kAccumulate, typename scalar_t, typename acc_t>
void backward_channel_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dz, acc_t* __restrict__ acc,
                          int64_t length, const math::BnAffine<acc_t>& a, double& sum_dy, double& sum_dy_xhat) {
  constexpr int64_t kLanes = 16;
  acc_t dy_lanes[kLanes] = {}, dy_xhat_lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      acc_t dy_xhat;
      dy_lanes[j] += backward_element<kAccumulate>(x[i + j], dz[i + j], acc[i + j], a, dy_xhat);
      dy_xhat_lanes[j] += dy_xhat;
    }
  }
  for (; i < length; ++i) {
    acc_t dy_xhat;
    dy_lanes[0] += backward_element<kAccumulate>(x[i], dz[i], acc[i], a, dy_xhat);
    dy_xhat_lanes[0] += dy_xhat;
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    sum_dy += static_cast<double>(dy_lanes[j]);
    sum_dy_xhat += static_cast<double>(dy_xhat_lanes[j]);
  }
}

// Channels-last: all channels of one pixel; every channel has its own sums (acc_t partials over
// a tile of pixels, flushed to double by the caller).
template <bool kAccumulate, typename scalar_t, typename acc_t>
void backward_pixel_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dz, acc_t* __restrict__ acc,
                        int64_t length, const AffineColumns<acc_t>& a, acc_t* __restrict__ sum_dy,
                        acc_t* __restrict__ sum_dy_xhat) {
  for (int64_t j = 0; j < length; ++j) {
    acc_t dy_xhat;
    sum_dy[j] += backward_element<kAccumulate>(x[j], dz[j], acc[j], a.at(j), dy_xhat);
    sum_dy_xhat[j] += dy_xhat;
  }
}

// Channels-last backward sums, added to sum_dy and sum_dy_xhat (float64): add_tile(p_begin,
// p_end, dy, dy_xhat) adds the per-channel sums of at most `tile` pixels (acc_t) into dy and
// dy_xhat, which are flushed to float64 partials per tile and added up by pixel blocks
// (sum_over_pixel_blocks: the same for any number of threads).
template <typename acc_t, typename AddTile>
void add_channels_last_sums(const Extent& e, int64_t tile, const AddTile& add_tile, const at::Tensor& sum_dy_xhat,
                            const at::Tensor& sum_dy) {
  const int64_t channels = e.channels;
  const auto sums = sum_over_pixel_blocks<double>(e, 2 * channels, [&](int64_t p_begin, int64_t p_end, double* partial) {
    std::vector<acc_t> tile_dy(channels), tile_dy_xhat(channels);
    for (int64_t start = p_begin; start < p_end; start += tile) {
      std::fill(tile_dy.begin(), tile_dy.end(), acc_t(0));
      std::fill(tile_dy_xhat.begin(), tile_dy_xhat.end(), acc_t(0));
      add_tile(start, std::min(start + tile, p_end), tile_dy.data(), tile_dy_xhat.data());
      for (int64_t c = 0; c < channels; ++c) {
        partial[c] += static_cast<double>(tile_dy[c]);
        partial[channels + c] += static_cast<double>(tile_dy_xhat[c]);
      }
    }
  });
  double* total_dy = sum_dy.data_ptr<double>();
  double* total_dy_xhat = sum_dy_xhat.data_ptr<double>();
  for (int64_t c = 0; c < channels; ++c) {
    total_dy[c] += sums[c];
    total_dy_xhat[c] += sums[channels + c];
  }
}

void bn_relu_backward(const at::Tensor& x, const at::Tensor& grad_out, const BnParams& bn,
                      const at::Tensor& accumulated, bool accumulate, const at::Tensor& sum_dy_xhat,
                      const at::Tensor& sum_dy, bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(channels_last, [&](auto layout) {
      constexpr bool kChannelsLast = decltype(layout)::value;
      with_flag(accumulate, [&](auto accumulate_flag) {
        constexpr bool kAccumulate = decltype(accumulate_flag)::value;
        const Plane<scalar_t, kChannelsLast> in(x), dz(grad_out);
        const Plane<acc_t, kChannelsLast> acc(accumulated);
        const auto channel_affines = affines<acc_t>(bn, e.channels);
        if constexpr (kChannelsLast) {
          const AffineColumns<acc_t> columns(channel_affines);
          constexpr int64_t kTile = 64;  // pixels summed in acc_t before the float64 partials
          add_channels_last_sums<acc_t>(e, kTile, [&](int64_t p_begin, int64_t p_end, acc_t* dy, acc_t* dy_xhat) {
            for_each_pixel(e, p_begin, p_end, [&](int64_t n, int64_t s) {
              in.prefetch_ahead(n, 0, s, e.channels);
              acc.prefetch_ahead(n, 0, s, e.channels);
              backward_pixel_run<kAccumulate>(&in(n, 0, s), &dz(n, 0, s), &acc(n, 0, s), e.channels, columns, dy,
                                              dy_xhat);
            });
          }, sum_dy_xhat, sum_dy);
        } else {
          double* total_dy_xhat = sum_dy_xhat.data_ptr<double>();
          double* total_dy = sum_dy.data_ptr<double>();
          parallel_over_channels(e, [&](int64_t c_begin, int64_t c_end) {
            for (int64_t c = c_begin; c < c_end; ++c) {
              double channel_dy = 0, channel_dy_xhat = 0;
              for (int64_t n = 0; n < e.batch; ++n)
                backward_channel_run<kAccumulate>(&in(n, c, 0), &dz(n, c, 0), &acc(n, c, 0), e.spatial,
                                                  channel_affines[c], channel_dy, channel_dy_xhat);
              total_dy[c] += channel_dy;
              total_dy_xhat[c] += channel_dy_xhat;
            }
          });
        }
      });
    });
  });
}

template <typename acc_t>
struct InputGradColumn {
  math::BnAffine<acc_t> norm;  // x_hat = normalized(x, norm)
  acc_t proj_mean, proj_xhat;
};

void bn_input_grad(const at::Tensor& x, const BnParams& stats, const at::Tensor& accumulated, const at::Tensor& direct,
                   const at::Tensor& proj_mean, const at::Tensor& proj_xhat, const at::Tensor& out,
                   bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_input_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Compile-time flags keep the inner loops free of branches, so that they vectorize. Eval
    // mode has no projections (the statistics are constants) and x does not enter the gradient.
    with_flag(channels_last, [&](auto layout) {
      with_flag(direct.defined(), [&](auto direct_flag) {
        with_flag(proj_mean.defined(), [&](auto projections) {
          constexpr bool kChannelsLast = decltype(layout)::value, kDirect = decltype(direct_flag)::value;
          constexpr bool kProjections = decltype(projections)::value;
          const Plane<scalar_t, kChannelsLast> in(x), result(out), dir(kDirect ? direct : out);
          const Plane<acc_t, kChannelsLast> acc(accumulated);
          const acc_t* pm = kProjections ? proj_mean.data_ptr<acc_t>() : nullptr;
          const acc_t* px = kProjections ? proj_xhat.data_ptr<acc_t>() : nullptr;
          const AffineColumns<acc_t> norm(kProjections ? normalizers<acc_t>(stats, e.channels)
                                                       : std::vector<math::BnAffine<acc_t>>(e.channels));
          const auto column = [&](int64_t c) {
            return kProjections ? InputGradColumn<acc_t>{norm.at(c), pm[c], px[c]} : InputGradColumn<acc_t>{};
          };
          parallel_runs<kChannelsLast>(e, column, [&](int64_t n, int64_t c, int64_t s, int64_t length, auto column_at) {
            if (kProjections) in.prefetch_ahead(n, c, s, length);
            if (kDirect) dir.prefetch_ahead(n, c, s, length);
            acc.prefetch_ahead(n, c, s, length);
            const scalar_t* __restrict__ x_run = &in(n, c, s);
            const scalar_t* __restrict__ direct_run = &dir(n, c, s);
            const acc_t* __restrict__ acc_run = &acc(n, c, s);
            scalar_t* __restrict__ out_run = &result(n, c, s);
            for (int64_t j = 0; j < length; ++j) {
              const acc_t direct_grad = kDirect ? static_cast<acc_t>(direct_run[j]) : acc_t(0);
              if constexpr (kProjections) {
                const auto col = column_at(j);
                const acc_t x_hat = math::normalized(static_cast<acc_t>(x_run[j]), col.norm);
                out_run[j] = static_cast<scalar_t>(
                    math::final_input_grad(direct_grad, acc_run[j], x_hat, col.proj_mean, col.proj_xhat));
              } else {
                out_run[j] = static_cast<scalar_t>(direct_grad + acc_run[j]);
              }
            }
          });
        });
      });
    });
  });
}

// ---- The transition's BN-ReLU-avgpool2x2 (common/bn_math.h) ------------------------------
// Input pixel (h, w) is element s = h * W + w of a plane. NCHW loops walk a plane row by row
// (two input rows per pooled row); channels-last loops take one pixel's channels at a time.

struct PoolExtent {
  int64_t width, pooled_height, pooled_width;
  PoolExtent(const at::Tensor& x, const at::Tensor& pooled)
      : width(x.size(3)), pooled_height(pooled.size(2)), pooled_width(pooled.size(3)) {}
  // Input pixel (2i + a, 2j + b) of pooled pixel (i, j).
  int64_t input_pixel(int64_t i, int64_t j, int64_t a, int64_t b) const { return (2 * i + a) * width + 2 * j + b; }
  // The pooled pixel of input pixel s, or -1 where the pool crops it.
  int64_t pooled_of(int64_t s) const {
    const int64_t i = s / width / 2, j = s % width / 2;
    return i < pooled_height && j < pooled_width ? i * pooled_width + j : -1;
  }
};

// dy of element x of a pixel whose pooled pixel has gradient grad_pooled.
template <typename acc_t, typename scalar_t>
inline acc_t pooled_dy(scalar_t x, scalar_t grad_pooled, const math::BnAffine<acc_t>& a) {
  return math::relu_masked_grad(static_cast<acc_t>(x), math::unpooled_grad(static_cast<acc_t>(grad_pooled)), a);
}

void bn_relu_pool(const at::Tensor& x, const BnParams& bn, const at::Tensor& pooled, bool channels_last) {
  const Extent e(x), pooled_extent(pooled);
  const PoolExtent pe(x, pooled);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(channels_last, [&](auto layout) {
      constexpr bool kChannelsLast = decltype(layout)::value;
      const Plane<scalar_t, kChannelsLast> in(x), result(pooled);
      const AffineColumns<acc_t> columns(affines<acc_t>(bn, e.channels));
      if constexpr (kChannelsLast) {
        parallel_over_pixels(pooled_extent, [&](int64_t n, int64_t p) {
          const int64_t i = p / pe.pooled_width, j = p % pe.pooled_width;
          const scalar_t* __restrict__ x00 = &in(n, 0, pe.input_pixel(i, j, 0, 0));
          const scalar_t* __restrict__ x01 = &in(n, 0, pe.input_pixel(i, j, 0, 1));
          const scalar_t* __restrict__ x10 = &in(n, 0, pe.input_pixel(i, j, 1, 0));
          const scalar_t* __restrict__ x11 = &in(n, 0, pe.input_pixel(i, j, 1, 1));
          scalar_t* __restrict__ out = &result(n, 0, p);
          for (int64_t c = 0; c < e.channels; ++c) {
            const auto z = [&](const scalar_t* xp) { return math::bn_relu(static_cast<acc_t>(xp[c]), columns.at(c)); };
            out[c] = static_cast<scalar_t>(math::pool_mean(z(x00), z(x01), z(x10), z(x11)));
          }
        });
      } else {
        parallel_over_channels(e, [&](int64_t c_begin, int64_t c_end) {
          for (int64_t c = c_begin; c < c_end; ++c) {
            const auto a = columns.at(c);
            const auto z = [&](scalar_t v) { return math::bn_relu(static_cast<acc_t>(v), a); };
            for (int64_t n = 0; n < e.batch; ++n)
              for (int64_t i = 0; i < pe.pooled_height; ++i) {
                const scalar_t* __restrict__ top = &in(n, c, pe.input_pixel(i, 0, 0, 0));
                const scalar_t* __restrict__ bottom = top + pe.width;
                scalar_t* __restrict__ out = &result(n, c, i * pe.pooled_width);
                for (int64_t j = 0; j < pe.pooled_width; ++j)
                  out[j] = static_cast<scalar_t>(
                      math::pool_mean(z(top[2 * j]), z(top[2 * j + 1]), z(bottom[2 * j]), z(bottom[2 * j + 1])));
              }
          }
        });
      }
    });
  });
}

// Adds one channels-last input pixel's dy and dy * x_hat, channel by channel (g: its pooled
// pixel's gradients). A plain loop over channels, so that it vectorizes.
template <typename scalar_t, typename acc_t>
void pool_sums_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t length,
                   const AffineColumns<acc_t>& a, acc_t* __restrict__ dy_sum, acc_t* __restrict__ dy_xhat_sum) {
  for (int64_t c = 0; c < length; ++c) {
    const acc_t dy = pooled_dy(x[c], g[c], a.at(c));
    dy_sum[c] += dy;
    dy_xhat_sum[c] += dy * math::normalized(static_cast<acc_t>(x[c]), a.at(c));
  }
}

// The sums of the four inputs of each pooled pixel of a channels-last row of pooled pixels
// [q_begin, q_end) into dy_sum[c] and dy_xhat_sum[c].
template <typename scalar_t, typename acc_t>
void pool_sums_pixels(const Plane<scalar_t, true>& in, const Plane<scalar_t, true>& grad, const Extent& pooled,
                      const PoolExtent& pe, const AffineColumns<acc_t>& a, int64_t q_begin, int64_t q_end,
                      acc_t* __restrict__ dy_sum, acc_t* __restrict__ dy_xhat_sum) {
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t n = q / pooled.spatial, p = q % pooled.spatial;
    const int64_t i = p / pe.pooled_width, j = p % pe.pooled_width;
    const scalar_t* __restrict__ g = &grad(n, 0, p);
    for (int64_t a_row = 0; a_row < 2; ++a_row)
      for (int64_t b_col = 0; b_col < 2; ++b_col) {
        pool_sums_run(&in(n, 0, pe.input_pixel(i, j, a_row, b_col)), g, pooled.channels, a, dy_sum, dy_xhat_sum);
      }
  }
}

// The sums of one NCHW pooled row: input rows top and bottom, pooled gradients g, in lanes.
template <typename scalar_t, typename acc_t>
void pool_sums_row(const scalar_t* __restrict__ top, const scalar_t* __restrict__ bottom,
                   const scalar_t* __restrict__ g, int64_t pooled_width, const math::BnAffine<acc_t>& a,
                   double& sum_dy, double& sum_dy_xhat) {
  constexpr int64_t kLanes = 8;
  acc_t dy_lanes[kLanes] = {}, dy_xhat_lanes[kLanes] = {};
  const auto window = [&](int64_t j, int64_t lane) {
    const acc_t dz = math::unpooled_grad(static_cast<acc_t>(g[j]));
    for (const scalar_t xv : {top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]}) {
      const acc_t x = static_cast<acc_t>(xv), dy = math::relu_masked_grad(x, dz, a);
      dy_lanes[lane] += dy;
      dy_xhat_lanes[lane] += dy * math::normalized(x, a);
    }
  };
  int64_t j = 0;
  for (; j + kLanes <= pooled_width; j += kLanes)
    for (int64_t lane = 0; lane < kLanes; ++lane) window(j + lane, lane);
  for (; j < pooled_width; ++j) window(j, 0);
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    sum_dy += static_cast<double>(dy_lanes[lane]);
    sum_dy_xhat += static_cast<double>(dy_xhat_lanes[lane]);
  }
}

void bn_relu_pool_sums(const at::Tensor& x, const at::Tensor& grad_pooled, const BnParams& bn,
                       const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy, bool channels_last) {
  const Extent e(x), pooled_extent(grad_pooled);
  const PoolExtent pe(x, grad_pooled);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_pool_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_flag(channels_last, [&](auto layout) {
      constexpr bool kChannelsLast = decltype(layout)::value;
      const Plane<scalar_t, kChannelsLast> in(x), grad(grad_pooled);
      const AffineColumns<acc_t> columns(affines<acc_t>(bn, e.channels));
      if constexpr (kChannelsLast) {
        constexpr int64_t kTile = 16;  // pooled pixels summed in acc_t before the float64 partials
        add_channels_last_sums<acc_t>(pooled_extent, kTile, [&](int64_t q_begin, int64_t q_end, acc_t* dy,
                                                                acc_t* dy_xhat) {
          pool_sums_pixels(in, grad, pooled_extent, pe, columns, q_begin, q_end, dy, dy_xhat);
        }, sum_dy_xhat, sum_dy);
      } else {
        double* total_dy_xhat = sum_dy_xhat.data_ptr<double>();
        double* total_dy = sum_dy.data_ptr<double>();
        parallel_over_channels(e, [&](int64_t c_begin, int64_t c_end) {
          for (int64_t c = c_begin; c < c_end; ++c) {
            double channel_dy = 0, channel_dy_xhat = 0;
            for (int64_t n = 0; n < e.batch; ++n)
              for (int64_t i = 0; i < pe.pooled_height; ++i) {
                const scalar_t* top = &in(n, c, pe.input_pixel(i, 0, 0, 0));
                pool_sums_row(top, top + pe.width, &grad(n, c, i * pe.pooled_width), pe.pooled_width, columns.at(c),
                              channel_dy, channel_dy_xhat);
              }
            total_dy[c] += channel_dy;
            total_dy_xhat[c] += channel_dy_xhat;
          }
        });
      }
    });
  });
}

// The input gradient of one element with its dy; kProjections: training (batch statistics).
// Eval mode's x enters only through the ReLU mask (not even a NaN of x_hat).
template <bool kProjections, typename acc_t, typename scalar_t>
inline scalar_t pool_input_grad(scalar_t x, acc_t dy, const InputGradColumn<acc_t>& col) {
  return static_cast<scalar_t>(kProjections ? math::pooled_input_grad(static_cast<acc_t>(x), dy, col.norm,
                                                                      col.proj_mean, col.proj_xhat)
                                            : col.norm.scale * dy);
}

// The input gradients of one channels-last pixel that the pool keeps (g: its pooled pixel's
// gradients; pm and px: the projections, read in training only).
template <bool kProjections, typename scalar_t, typename acc_t>
void pool_input_grad_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                         int64_t length, const AffineColumns<acc_t>& a, const acc_t* __restrict__ pm,
                         const acc_t* __restrict__ px) {
  for (int64_t c = 0; c < length; ++c) {
    const InputGradColumn<acc_t> col{a.at(c), kProjections ? pm[c] : acc_t(0), kProjections ? px[c] : acc_t(0)};
    out[c] = pool_input_grad<kProjections>(x[c], pooled_dy(x[c], g[c], col.norm), col);
  }
}

void bn_relu_pool_input_grad(const at::Tensor& x, const at::Tensor& grad_pooled, const BnParams& bn,
                             const at::Tensor& proj_mean, const at::Tensor& proj_xhat, const at::Tensor& out,
                             bool channels_last) {
  const Extent e(x);
  const PoolExtent pe(x, grad_pooled);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_pool_input_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool has_proj = proj_mean.defined();  // eval mode has none: the statistics are constants
    with_flag(channels_last, [&](auto layout) {
      with_flag(has_proj, [&](auto projections) {
        constexpr bool kChannelsLast = decltype(layout)::value, kProjections = decltype(projections)::value;
        const Plane<scalar_t, kChannelsLast> in(x), grad(grad_pooled), result(out);
        const AffineColumns<acc_t> columns(affines<acc_t>(bn, e.channels));
        const acc_t* __restrict__ pm = kProjections ? proj_mean.data_ptr<acc_t>() : nullptr;
        const acc_t* __restrict__ px = kProjections ? proj_xhat.data_ptr<acc_t>() : nullptr;
        const auto column = [&](int64_t c) {
          return InputGradColumn<acc_t>{columns.at(c), kProjections ? pm[c] : acc_t(0), kProjections ? px[c] : acc_t(0)};
        };
        if constexpr (kChannelsLast) {
          parallel_over_pixels(e, [&](int64_t n, int64_t s) {
            const int64_t p = pe.pooled_of(s);
            const scalar_t* __restrict__ xp = &in(n, 0, s);
            scalar_t* __restrict__ o = &result(n, 0, s);
            if (p < 0) {  // cropped by the pool: no gradient of its own
              for (int64_t c = 0; c < e.channels; ++c) o[c] = pool_input_grad<kProjections>(xp[c], acc_t(0), column(c));
              return;
            }
            pool_input_grad_run<kProjections>(xp, &grad(n, 0, p), o, e.channels, columns, pm, px);
          });
        } else {
          const int64_t height = x.size(2);
          parallel_over_channels(e, [&](int64_t c_begin, int64_t c_end) {
            // A row's dz, unpooled (cropped columns and rows: 0), so that the loop over the row vectorizes.
            std::vector<acc_t> row_dz(pe.width, acc_t(0)), no_dz(pe.width, acc_t(0));
            for (int64_t c = c_begin; c < c_end; ++c) {
              const auto col = column(c);
              for (int64_t n = 0; n < e.batch; ++n)
                for (int64_t h = 0; h < height; ++h) {
                  const bool pooled_row = h / 2 < pe.pooled_height;
                  if (pooled_row && h % 2 == 0) {
                    const scalar_t* __restrict__ g = &grad(n, c, h / 2 * pe.pooled_width);
                    for (int64_t j = 0; j < pe.pooled_width; ++j)
                      row_dz[2 * j] = row_dz[2 * j + 1] = math::unpooled_grad(static_cast<acc_t>(g[j]));
                  }
                  const acc_t* __restrict__ dz = pooled_row ? row_dz.data() : no_dz.data();
                  const scalar_t* __restrict__ row = &in(n, c, h * pe.width);
                  scalar_t* __restrict__ o = &result(n, c, h * pe.width);
                  for (int64_t w = 0; w < pe.width; ++w) {
                    const acc_t dy = math::relu_masked_grad(static_cast<acc_t>(row[w]), dz[w], col.norm);
                    o[w] = pool_input_grad<kProjections>(row[w], dy, col);
                  }
                }
            }
          });
        }
      });
    });
  });
}

}  // namespace

const BnKernels& bn_kernels() {
  static const BnKernels kernels{channel_moments, bn_relu_forward,   bn_relu_backward,  bn_input_grad,
                                 bn_relu_pool,    bn_relu_pool_sums, bn_relu_pool_input_grad};
  return kernels;
}

}  // namespace DENSE_OPS_ISA
}  // namespace dense_ops
DENSE_OPS_ISA_END

// CUDA batch-norm kernels of the dense block, with the arithmetic of common/bn_math.h (the
// same functions the CPU kernels call). Registered for CUDA.
//
// Every kernel runs on a 2-D grid of (channel tiles) x (pixel chunks), so a slice of a few
// channels still fills the GPU, and walks memory in its unit-stride order:
//   NCHW:          a thread block takes one channel; its threads stride over that channel's
//                  pixels (n, h, w), contiguous within each sample's plane;
//   channels-last: a thread block takes 32 consecutive channels x 8 pixel rows; a warp reads
//                  32 consecutive channels of one pixel (coalesced).
// Per-channel reductions (moments, the two backward sums) are two-stage: each block reduces its
// chunk in shared memory and writes one partial per channel; a second kernel merges the chunks
// in a fixed order (deterministic), Welford-style for the moments (as ATen's and apex's
// batch-norm kernels do). Index arithmetic is 32-bit wherever the operands' offsets fit.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <initializer_list>

#include "common/bn_math.h"
#include "cuda/device_checks.h"
#include "dense_block.h"

namespace dense_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;        // resident blocks we aim for on each multiprocessor
constexpr int64_t kMaxPixelChunks = 65535;  // gridDim.y limit

// How a thread block covers (channel, pixel) pairs in each layout (see the top of the file).
template <bool kChannelsLast>
struct Tile {
  static constexpr int kChannelLanes = kChannelsLast ? 32 : 1;
  static constexpr int kPixelLanes = kThreads / kChannelLanes;
  __device__ static int channel_lane() { return kChannelsLast ? threadIdx.x % kChannelLanes : 0; }
  __device__ static int pixel_lane() { return threadIdx.x / kChannelLanes; }
  __device__ static int64_t channel() { return int64_t(blockIdx.x) * kChannelLanes + channel_lane(); }
  // The first pixel of this thread and the step to its next one (grid-stride over chunks).
  __device__ static int64_t first_pixel() { return int64_t(blockIdx.y) * kPixelLanes + pixel_lane(); }
  __device__ static int64_t pixel_step() { return int64_t(gridDim.y) * kPixelLanes; }
};

// Element (c, p) of a [N, C, H, W] operand, pixel p = n * H*W + s, with index_t arithmetic.
template <typename T, typename index_t>
struct Plane {
  T* data;
  index_t stride_n, stride_c, stride_s, spatial;
  __device__ __forceinline__ T& operator()(index_t c, index_t p) const {
    const index_t n = p / spatial, s = p - n * spatial;
    return data[n * stride_n + c * stride_c + s * stride_s];
  }
};

template <typename T, typename index_t>
Plane<T, index_t> plane(const at::Tensor& t) {
  TORCH_CHECK(t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3),
              "dense_ops: H and W strides of a kernel operand are not mergeable");
  const int64_t stride_s = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  return Plane<T, index_t>{static_cast<T*>(t.data_ptr<std::remove_const_t<T>>()), index_t(t.stride(0)),
                           index_t(t.stride(1)), index_t(stride_s), index_t(t.size(2) * t.size(3))};
}

// Whether int32 index arithmetic is safe for every operand: element offsets and pixel counts
// stay below INT_MAX / 2, so a grid-stride step past the end cannot overflow either.
bool fits_int32(std::initializer_list<at::Tensor> operands) {
  constexpr int64_t kLimit = INT_MAX / 2;
  for (const auto& t : operands) {
    if (!t.defined()) continue;
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    if (last >= kLimit || t.numel() >= kLimit) return false;
  }
  return true;
}

template <typename F>
void with_index_type(bool narrow, const F& f) {
  if (narrow) f(int32_t{}); else f(int64_t{});
}

template <typename F>
void with_layout(bool channels_last, const F& f) {
  if (channels_last) f(std::true_type{}); else f(std::false_type{});
}

// Pixels of an [N, C, H, W] operand: the extent of a kernel's pixel loop.
int64_t pixels_of(const at::Tensor& t) { return t.size(0) * t.size(2) * t.size(3); }

// Grid of a kernel over x: enough pixel chunks that all channel tiles together fill the GPU.
template <bool kChannelsLast>
dim3 grid_for(const at::Tensor& x) {
  using T = Tile<kChannelsLast>;
  const int64_t channels = x.size(1), pixels = pixels_of(x);
  const int64_t channel_tiles = (channels + T::kChannelLanes - 1) / T::kChannelLanes;
  const int64_t wanted = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * kBlocksPerSm;
  const int64_t useful = (pixels + T::kPixelLanes - 1) / T::kPixelLanes;
  const int64_t chunks = std::clamp<int64_t>((wanted + channel_tiles - 1) / channel_tiles, 1,
                                             std::min(useful, kMaxPixelChunks));
  return dim3(static_cast<unsigned>(channel_tiles), static_cast<unsigned>(chunks));
}

// Reduces values over the pixel lanes of the block, per channel lane; lanes with pixel_lane 0
// get the totals. `buffer` holds kThreads values per array.
template <bool kChannelsLast, typename Merge>
__device__ void reduce_pixel_lanes(const Merge& merge) {
  using T = Tile<kChannelsLast>;
  __syncthreads();
  for (int stride = T::kPixelLanes / 2; stride > 0; stride >>= 1) {
    if (T::pixel_lane() < stride) merge(threadIdx.x, threadIdx.x + stride * T::kChannelLanes);
    __syncthreads();
  }
}

// ---- channel moments: Welford per thread, merged over the block, then over the chunks --------

template <typename sum_t>
struct Welford {
  sum_t count, mean, m2;
  __device__ __forceinline__ void add(sum_t x) {
    count += 1;
    const sum_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }
  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.count == 0) return;
    const sum_t total = count + o.count, delta = o.mean - mean, share = o.count / total;
    mean += delta * share;
    m2 += o.m2 + delta * delta * count * share;
    count = total;
  }
};

// partial[chunk * C + c]: the Welford state of channel c over pixel chunk blockIdx.y.
template <typename scalar_t, typename sum_t, typename index_t, bool kChannelsLast>
__global__ void moments_partial_kernel(Plane<const scalar_t, index_t> x, index_t channels, index_t pixels,
                                       Welford<sum_t>* partial) {
  using T = Tile<kChannelsLast>;
  __shared__ sum_t counts[kThreads], means[kThreads], m2s[kThreads];
  const index_t c = T::channel();
  Welford<sum_t> w{0, 0, 0};
  if (c < channels) {
    for (index_t p = T::first_pixel(); p < pixels; p += T::pixel_step()) w.add(static_cast<sum_t>(x(c, p)));
  }
  counts[threadIdx.x] = w.count, means[threadIdx.x] = w.mean, m2s[threadIdx.x] = w.m2;
  reduce_pixel_lanes<kChannelsLast>([&](int into, int from) {
    Welford<sum_t> a{counts[into], means[into], m2s[into]};
    a.merge(Welford<sum_t>{counts[from], means[from], m2s[from]});
    counts[into] = a.count, means[into] = a.mean, m2s[into] = a.m2;
  });
  if (T::pixel_lane() == 0 && c < channels) {
    partial[int64_t(blockIdx.y) * channels + c] = Welford<sum_t>{counts[threadIdx.x], means[threadIdx.x], m2s[threadIdx.x]};
  }
}

template <typename sum_t, typename stat_t>
__global__ void moments_final_kernel(const Welford<sum_t>* partial, int64_t chunks, int64_t channels, stat_t* mean,
                                     stat_t* var) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += int64_t(gridDim.x) * blockDim.x) {
    Welford<sum_t> w = partial[c];
    for (int64_t chunk = 1; chunk < chunks; ++chunk) w.merge(partial[chunk * channels + c]);
    mean[c] = static_cast<stat_t>(w.mean);
    var[c] = static_cast<stat_t>(w.m2 / w.count);
  }
}

unsigned blocks_for_channels(int64_t channels) { return static_cast<unsigned>((channels + kThreads - 1) / kThreads); }

// ---- the element-wise kernels -------------------------------------------------------------

template <typename acc_t>
struct DeviceBn {
  const acc_t *weight, *bias, *mean, *var;
  acc_t eps;
  __device__ __forceinline__ math::BnAffine<acc_t> affine(int64_t c) const {
    return math::bn_affine(weight ? weight[c] : acc_t(1), bias ? bias[c] : acc_t(0), mean[c], var[c], eps);
  }
};

template <typename acc_t>
DeviceBn<acc_t> device_bn(const BnParams& bn) {
  return DeviceBn<acc_t>{bn.weight.defined() ? bn.weight.data_ptr<acc_t>() : nullptr,
                         bn.bias.defined() ? bn.bias.data_ptr<acc_t>() : nullptr,
                         bn.mean.defined() ? bn.mean.data_ptr<acc_t>() : nullptr,
                         bn.var.defined() ? bn.var.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(bn.eps)};
}

template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void bn_relu_forward_kernel(Plane<const scalar_t, index_t> x, DeviceBn<acc_t> bn,
                                       Plane<scalar_t, index_t> out, index_t channels, index_t pixels) {
  using T = Tile<kChannelsLast>;
  const index_t c = T::channel();
  if (c >= channels) return;
  const auto a = bn.affine(c);
  for (index_t p = T::first_pixel(); p < pixels; p += T::pixel_step()) {
    out(c, p) = static_cast<scalar_t>(math::bn_relu(static_cast<acc_t>(x(c, p)), a));
  }
}

// Reduces the threads' sums of dy * x_hat and dy over the block's pixel lanes and writes the
// block's partials of channel c, one per pixel chunk (blockIdx.y); add_partials_kernel adds them up.
template <bool kChannelsLast, typename acc_t, typename index_t>
__device__ void write_chunk_sums(index_t c, index_t channels, acc_t dy_xhat, acc_t dy, acc_t* partial_dy_xhat,
                                 acc_t* partial_dy) {
  __shared__ acc_t sums_dy_xhat[kThreads], sums_dy[kThreads];
  sums_dy_xhat[threadIdx.x] = dy_xhat, sums_dy[threadIdx.x] = dy;
  reduce_pixel_lanes<kChannelsLast>([&](int into, int from) {
    sums_dy_xhat[into] += sums_dy_xhat[from];
    sums_dy[into] += sums_dy[from];
  });
  if (Tile<kChannelsLast>::pixel_lane() == 0 && c < channels) {
    partial_dy_xhat[int64_t(blockIdx.y) * channels + c] = sums_dy_xhat[threadIdx.x];
    partial_dy[int64_t(blockIdx.y) * channels + c] = sums_dy[threadIdx.x];
  }
}

// dy = grad_out * relu mask; accumulated = (accumulate ? accumulated : 0) + scale * dy; and per
// chunk and channel the partial sums of dy * x_hat and dy.
template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void bn_relu_backward_kernel(Plane<const scalar_t, index_t> x, Plane<const scalar_t, index_t> grad_out,
                                        DeviceBn<acc_t> bn, Plane<acc_t, index_t> accumulated, bool accumulate,
                                        index_t channels, index_t pixels, acc_t* partial_dy_xhat, acc_t* partial_dy) {
  using T = Tile<kChannelsLast>;
  const index_t c = T::channel();
  acc_t dy_xhat = 0, dy_total = 0;
  if (c < channels) {
    const auto a = bn.affine(c);
    for (index_t p = T::first_pixel(); p < pixels; p += T::pixel_step()) {
      const acc_t xv = static_cast<acc_t>(x(c, p));
      const acc_t dy = math::relu_masked_grad(xv, static_cast<acc_t>(grad_out(c, p)), a);
      dy_total += dy;
      dy_xhat += dy * math::normalized(xv, a);
      acc_t& slot = accumulated(c, p);
      slot = (accumulate ? slot : acc_t(0)) + a.scale * dy;
    }
  }
  write_chunk_sums<kChannelsLast>(c, channels, dy_xhat, dy_total, partial_dy_xhat, partial_dy);
}

// total[c] += the chunks' partials of channel c, added in chunk order (float64 totals).
template <typename acc_t>
__global__ void add_partials_kernel(const acc_t* partial_dy_xhat, const acc_t* partial_dy, int64_t chunks,
                                    int64_t channels, double* total_dy_xhat, double* total_dy) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < channels; c += int64_t(gridDim.x) * blockDim.x) {
    double dy_xhat = 0, dy = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      dy_xhat += static_cast<double>(partial_dy_xhat[chunk * channels + c]);
      dy += static_cast<double>(partial_dy[chunk * channels + c]);
    }
    total_dy_xhat[c] += dy_xhat;
    total_dy[c] += dy;
  }
}

template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void bn_input_grad_kernel(Plane<const scalar_t, index_t> x, DeviceBn<acc_t> stats,
                                     Plane<const acc_t, index_t> accumulated, Plane<const scalar_t, index_t> direct,
                                     bool has_direct, const acc_t* proj_mean, const acc_t* proj_xhat,
                                     Plane<scalar_t, index_t> out, index_t channels, index_t pixels) {
  using T = Tile<kChannelsLast>;
  const index_t c = T::channel();
  if (c >= channels) return;
  const bool has_proj = proj_mean != nullptr;
  const auto norm = has_proj ? stats.affine(c) : math::BnAffine<acc_t>{0, 1, 1, 0};
  const acc_t mean_term = has_proj ? proj_mean[c] : acc_t(0), xhat_term = has_proj ? proj_xhat[c] : acc_t(0);
  for (index_t p = T::first_pixel(); p < pixels; p += T::pixel_step()) {
    const acc_t d = has_direct ? static_cast<acc_t>(direct(c, p)) : acc_t(0);
    const acc_t xhat = has_proj ? math::normalized(static_cast<acc_t>(x(c, p)), norm) : acc_t(0);
    out(c, p) = static_cast<scalar_t>(math::final_input_grad(d, accumulated(c, p), xhat, mean_term, xhat_term));
  }
}

// ---- the transition's BN-ReLU-avgpool2x2 (common/bn_math.h) -------------------------------

// Where the pixels of a pool window are: pixel p = n * H*W + h * W + w of the input, pixel
// q = n * Hp*Wp + i * Wp + j of the pooled tensor.
template <typename index_t>
struct PoolGeometry {
  index_t width, spatial, pooled_height, pooled_width, pooled_spatial;
  // Input pixel (2i + a, 2j + b) of pooled pixel q.
  __device__ __forceinline__ index_t input_pixel(index_t q, index_t a, index_t b) const {
    const index_t n = q / pooled_spatial, s = q - n * pooled_spatial;
    const index_t i = s / pooled_width, j = s - i * pooled_width;
    return n * spatial + (2 * i + a) * width + 2 * j + b;
  }
  // The pooled pixel of input pixel p, or -1 where the pool crops it.
  __device__ __forceinline__ index_t pooled_of(index_t p) const {
    const index_t n = p / spatial, s = p - n * spatial;
    const index_t i = s / width / 2, j = (s % width) / 2;
    return i < pooled_height && j < pooled_width ? n * pooled_spatial + i * pooled_width + j : index_t(-1);
  }
};

template <typename index_t>
PoolGeometry<index_t> pool_geometry(const at::Tensor& x, const at::Tensor& pooled) {
  return PoolGeometry<index_t>{index_t(x.size(3)), index_t(x.size(2) * x.size(3)), index_t(pooled.size(2)),
                               index_t(pooled.size(3)), index_t(pooled.size(2) * pooled.size(3))};
}

// One thread per (channel, pooled pixel).
template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void bn_relu_pool_kernel(Plane<const scalar_t, index_t> x, DeviceBn<acc_t> bn,
                                    Plane<scalar_t, index_t> pooled, PoolGeometry<index_t> geometry,
                                    index_t channels, index_t pooled_pixels) {
  using T = Tile<kChannelsLast>;
  const index_t c = T::channel();
  if (c >= channels) return;
  const auto a = bn.affine(c);
  for (index_t q = T::first_pixel(); q < pooled_pixels; q += T::pixel_step()) {
    const auto z = [&](index_t row, index_t col) {
      return math::bn_relu(static_cast<acc_t>(x(c, geometry.input_pixel(q, row, col))), a);
    };
    pooled(c, q) = static_cast<scalar_t>(math::pool_mean(z(0, 0), z(0, 1), z(1, 0), z(1, 1)));
  }
}

// Per chunk and channel, the partial sums of dy * x_hat and dy over the chunk's pool windows.
template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void bn_relu_pool_sums_kernel(Plane<const scalar_t, index_t> x, Plane<const scalar_t, index_t> grad_pooled,
                                         DeviceBn<acc_t> bn, PoolGeometry<index_t> geometry, index_t channels,
                                         index_t pooled_pixels, acc_t* partial_dy_xhat, acc_t* partial_dy) {
  using T = Tile<kChannelsLast>;
  const index_t c = T::channel();
  acc_t dy_xhat = 0, dy_total = 0;
  if (c < channels) {
    const auto a = bn.affine(c);
    for (index_t q = T::first_pixel(); q < pooled_pixels; q += T::pixel_step()) {
      const acc_t dz = math::unpooled_grad(static_cast<acc_t>(grad_pooled(c, q)));
      for (index_t row = 0; row < 2; ++row)
        for (index_t col = 0; col < 2; ++col) {
          const acc_t xv = static_cast<acc_t>(x(c, geometry.input_pixel(q, row, col)));
          const acc_t dy = math::relu_masked_grad(xv, dz, a);
          dy_total += dy;
          dy_xhat += dy * math::normalized(xv, a);
        }
    }
  }
  write_chunk_sums<kChannelsLast>(c, channels, dy_xhat, dy_total, partial_dy_xhat, partial_dy);
}

// One thread per (channel, input pixel); proj_mean is null in eval mode.
template <typename scalar_t, typename acc_t, typename index_t, bool kChannelsLast>
__global__ void bn_relu_pool_input_grad_kernel(Plane<const scalar_t, index_t> x,
                                               Plane<const scalar_t, index_t> grad_pooled, DeviceBn<acc_t> bn,
                                               PoolGeometry<index_t> geometry, const acc_t* proj_mean,
                                               const acc_t* proj_xhat, Plane<scalar_t, index_t> out,
                                               index_t channels, index_t pixels) {
  using T = Tile<kChannelsLast>;
  const index_t c = T::channel();
  if (c >= channels) return;
  const auto a = bn.affine(c);
  const bool has_proj = proj_mean != nullptr;
  const acc_t mean_term = has_proj ? proj_mean[c] : acc_t(0), xhat_term = has_proj ? proj_xhat[c] : acc_t(0);
  for (index_t p = T::first_pixel(); p < pixels; p += T::pixel_step()) {
    const index_t q = geometry.pooled_of(p);
    const acc_t xv = static_cast<acc_t>(x(c, p));
    const acc_t dy =
        q < 0 ? acc_t(0) : math::relu_masked_grad(xv, math::unpooled_grad(static_cast<acc_t>(grad_pooled(c, q))), a);
    // Eval mode: x enters only through the ReLU mask (not even a NaN of x_hat).
    out(c, p) = static_cast<scalar_t>(has_proj ? math::pooled_input_grad(xv, dy, a, mean_term, xhat_term)
                                               : a.scale * dy);
  }
}

// ---- launchers ----------------------------------------------------------------------------

// The per-channel sums of a two-stage kernel: launch(partial_dy_xhat, partial_dy) runs it over
// `grid`, writing one partial per pixel chunk and channel (write_chunk_sums); add_partials_kernel
// then adds them in chunk order into the float64 totals.
template <typename acc_t, typename Launch>
void sum_chunk_partials(const at::Tensor& x, const dim3& grid, const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy,
                        const Launch& launch) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t channels = x.size(1);
  const at::Tensor partial =
      at::empty({2, int64_t(grid.y), channels}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  launch(partial[0].data_ptr<acc_t>(), partial[1].data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  add_partials_kernel<acc_t><<<blocks_for_channels(channels), kThreads, 0, stream>>>(
      partial[0].data_ptr<acc_t>(), partial[1].data_ptr<acc_t>(), grid.y, channels, sum_dy_xhat.data_ptr<double>(),
      sum_dy.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs launch(scalar_t, index_t, channels_last) for x's dtype, the narrowest index type that
// fits every operand, and the layout; nothing for an empty x.
template <typename F>
void dispatch(const at::Tensor& x, bool channels_last, std::initializer_list<at::Tensor> operands, const F& launch) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_kernels_cuda", [&] {
    with_index_type(fits_int32(operands), [&](auto index) {
      with_layout(channels_last, [&](auto layout) { launch(scalar_t{}, index, layout); });
    });
  });
}

void channel_moments(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, bool channels_last) {
  check_same_cuda_device("dense_ops channel_moments", {{"x", x}, {"mean", mean}, {"var", var}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, channels_last, {x}, [&](auto scalar, auto index, auto layout) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    using stat_t = at::opmath_type<scalar_t>;
    using sum_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    constexpr bool kChannelsLast = decltype(layout)::value;
    const dim3 grid = grid_for<kChannelsLast>(x);
    const int64_t channels = x.size(1);
    const at::Tensor partial =
        at::empty({int64_t(grid.y) * channels * int64_t(sizeof(Welford<sum_t>))}, x.options().dtype(at::kByte));
    auto* states = reinterpret_cast<Welford<sum_t>*>(partial.data_ptr());
    moments_partial_kernel<scalar_t, sum_t, index_t, kChannelsLast><<<grid, kThreads, 0, stream>>>(
        plane<const scalar_t, index_t>(x), index_t(channels), index_t(pixels_of(x)), states);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    moments_final_kernel<sum_t, stat_t><<<blocks_for_channels(channels), kThreads, 0, stream>>>(
        states, grid.y, channels, mean.data_ptr<stat_t>(), var.data_ptr<stat_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_relu_forward(const at::Tensor& x, const BnParams& bn, const at::Tensor& out, bool channels_last) {
  check_same_cuda_device("dense_ops bn_relu_forward", {{"x", x}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias},
                                                      {"bn.mean", bn.mean}, {"bn.var", bn.var}, {"out", out}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, channels_last, {x, out}, [&](auto scalar, auto index, auto layout) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kChannelsLast = decltype(layout)::value;
    bn_relu_forward_kernel<scalar_t, acc_t, index_t, kChannelsLast><<<grid_for<kChannelsLast>(x), kThreads, 0, stream>>>(
        plane<const scalar_t, index_t>(x), device_bn<acc_t>(bn), plane<scalar_t, index_t>(out), index_t(x.size(1)),
        index_t(pixels_of(x)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_relu_backward(const at::Tensor& x, const at::Tensor& grad_out, const BnParams& bn,
                      const at::Tensor& accumulated, bool accumulate, const at::Tensor& sum_dy_xhat,
                      const at::Tensor& sum_dy, bool channels_last) {
  check_same_cuda_device("dense_ops bn_relu_backward",
                         {{"x", x}, {"grad_out", grad_out}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias},
                          {"bn.mean", bn.mean}, {"bn.var", bn.var}, {"accumulated", accumulated},
                          {"sum_dy_xhat", sum_dy_xhat}, {"sum_dy", sum_dy}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, channels_last, {x, grad_out, accumulated},
           [&](auto scalar, auto index, auto layout) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kChannelsLast = decltype(layout)::value;
    const dim3 grid = grid_for<kChannelsLast>(x);
    sum_chunk_partials<acc_t>(x, grid, sum_dy_xhat, sum_dy, [&](acc_t* partial_dy_xhat, acc_t* partial_dy) {
      bn_relu_backward_kernel<scalar_t, acc_t, index_t, kChannelsLast><<<grid, kThreads, 0, stream>>>(
          plane<const scalar_t, index_t>(x), plane<const scalar_t, index_t>(grad_out), device_bn<acc_t>(bn),
          plane<acc_t, index_t>(accumulated), accumulate, index_t(x.size(1)), index_t(pixels_of(x)), partial_dy_xhat,
          partial_dy);
    });
  });
}

void bn_input_grad(const at::Tensor& x, const BnParams& stats, const at::Tensor& accumulated, const at::Tensor& direct,
                   const at::Tensor& proj_mean, const at::Tensor& proj_xhat, const at::Tensor& out,
                   bool channels_last) {
  check_same_cuda_device("dense_ops bn_input_grad",
                         {{"x", x}, {"stats.weight", stats.weight}, {"stats.bias", stats.bias},
                          {"stats.mean", stats.mean}, {"stats.var", stats.var}, {"accumulated", accumulated},
                          {"direct", direct}, {"proj_mean", proj_mean}, {"proj_xhat", proj_xhat}, {"out", out}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool has_direct = direct.defined();
  dispatch(x, channels_last, {x, accumulated, direct, out},
           [&](auto scalar, auto index, auto layout) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kChannelsLast = decltype(layout)::value;
    bn_input_grad_kernel<scalar_t, acc_t, index_t, kChannelsLast><<<grid_for<kChannelsLast>(x), kThreads, 0, stream>>>(
        plane<const scalar_t, index_t>(x), device_bn<acc_t>(stats), plane<const acc_t, index_t>(accumulated),
        plane<const scalar_t, index_t>(has_direct ? direct : out), has_direct,
        proj_mean.defined() ? proj_mean.data_ptr<acc_t>() : nullptr,
        proj_xhat.defined() ? proj_xhat.data_ptr<acc_t>() : nullptr, plane<scalar_t, index_t>(out),
        index_t(x.size(1)), index_t(pixels_of(x)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_relu_pool(const at::Tensor& x, const BnParams& bn, const at::Tensor& pooled, bool channels_last) {
  check_same_cuda_device("dense_ops bn_relu_pool", {{"x", x}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias},
                                                   {"bn.mean", bn.mean}, {"bn.var", bn.var}, {"pooled", pooled}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, channels_last, {x, pooled}, [&](auto scalar, auto index, auto layout) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kChannelsLast = decltype(layout)::value;
    bn_relu_pool_kernel<scalar_t, acc_t, index_t, kChannelsLast><<<grid_for<kChannelsLast>(pooled), kThreads, 0, stream>>>(
        plane<const scalar_t, index_t>(x), device_bn<acc_t>(bn), plane<scalar_t, index_t>(pooled),
        pool_geometry<index_t>(x, pooled), index_t(x.size(1)), index_t(pixels_of(pooled)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_relu_pool_sums(const at::Tensor& x, const at::Tensor& grad_pooled, const BnParams& bn,
                       const at::Tensor& sum_dy_xhat, const at::Tensor& sum_dy, bool channels_last) {
  check_same_cuda_device("dense_ops bn_relu_pool_sums",
                         {{"x", x}, {"grad_pooled", grad_pooled}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias},
                          {"bn.mean", bn.mean}, {"bn.var", bn.var}, {"sum_dy_xhat", sum_dy_xhat}, {"sum_dy", sum_dy}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, channels_last, {x, grad_pooled}, [&](auto scalar, auto index, auto layout) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kChannelsLast = decltype(layout)::value;
    const dim3 grid = grid_for<kChannelsLast>(grad_pooled);
    sum_chunk_partials<acc_t>(x, grid, sum_dy_xhat, sum_dy, [&](acc_t* partial_dy_xhat, acc_t* partial_dy) {
      bn_relu_pool_sums_kernel<scalar_t, acc_t, index_t, kChannelsLast><<<grid, kThreads, 0, stream>>>(
          plane<const scalar_t, index_t>(x), plane<const scalar_t, index_t>(grad_pooled), device_bn<acc_t>(bn),
          pool_geometry<index_t>(x, grad_pooled), index_t(x.size(1)), index_t(pixels_of(grad_pooled)),
          partial_dy_xhat, partial_dy);
    });
  });
}

void bn_relu_pool_input_grad(const at::Tensor& x, const at::Tensor& grad_pooled, const BnParams& bn,
                             const at::Tensor& proj_mean, const at::Tensor& proj_xhat, const at::Tensor& out,
                             bool channels_last) {
  check_same_cuda_device("dense_ops bn_relu_pool_input_grad",
                         {{"x", x}, {"grad_pooled", grad_pooled}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias},
                          {"bn.mean", bn.mean}, {"bn.var", bn.var}, {"proj_mean", proj_mean},
                          {"proj_xhat", proj_xhat}, {"out", out}});
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, channels_last, {x, grad_pooled, out}, [&](auto scalar, auto index, auto layout) {
    using scalar_t = decltype(scalar);
    using index_t = decltype(index);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kChannelsLast = decltype(layout)::value;
    bn_relu_pool_input_grad_kernel<scalar_t, acc_t, index_t, kChannelsLast>
        <<<grid_for<kChannelsLast>(x), kThreads, 0, stream>>>(
            plane<const scalar_t, index_t>(x), plane<const scalar_t, index_t>(grad_pooled), device_bn<acc_t>(bn),
            pool_geometry<index_t>(x, grad_pooled), proj_mean.defined() ? proj_mean.data_ptr<acc_t>() : nullptr,
            proj_xhat.defined() ? proj_xhat.data_ptr<acc_t>() : nullptr, plane<scalar_t, index_t>(out),
            index_t(x.size(1)), index_t(pixels_of(x)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const BnKernels& cuda_kernels() {
  static const BnKernels kernels{channel_moments, bn_relu_forward,   bn_relu_backward,  bn_input_grad,
                                 bn_relu_pool,    bn_relu_pool_sums, bn_relu_pool_input_grad};
  return kernels;
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CUDA, m) {
  register_dense_block_ops<cuda_kernels>(m);
}

}  // namespace dense_ops

// CUDA batch-norm kernels of the dense block: one thread block per channel, the arithmetic
// from common/bn_math.h (the same functions the CPU kernels call). Registered for CUDA.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/bn_math.h"
#include "cuda/device_checks.h"
#include "dense_block.h"

namespace dense_ops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// Element (n, c, s) of a [N, C, H*W] view with 64-bit strides.
template <typename T>
struct Plane {
  T* data;
  int64_t stride_n, stride_c, stride_s;
  __device__ __forceinline__ T& operator()(int64_t n, int64_t c, int64_t s) const {
    return data[n * stride_n + c * stride_c + s * stride_s];
  }
};

template <typename T>
Plane<T> plane(const at::Tensor& t) {
  TORCH_CHECK(t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3),
              "dense_ops: H and W strides of a kernel operand are not mergeable");
  return Plane<T>{static_cast<T*>(t.data_ptr<std::remove_const_t<T>>()), t.stride(0), t.stride(1), t.size(3) == 1 ? t.stride(2) : t.stride(3)};
}

struct Extent {
  int64_t batch, channels, spatial;
  __host__ explicit Extent(const at::Tensor& t) : batch(t.size(0)), channels(t.size(1)), spatial(t.size(2) * t.size(3)) {}
  __device__ __forceinline__ int64_t per_channel() const { return batch * spatial; }
};

// Sum over the thread block; every thread gets the total.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* buffer) {
  buffer[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buffer[threadIdx.x] += buffer[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = buffer[0];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename stat_t, typename sum_t>
__global__ void channel_moments_kernel(Plane<const scalar_t> x, Extent e, stat_t* mean, stat_t* var) {
  __shared__ sum_t buffer[kThreads];
  const int64_t m = e.per_channel();
  for (int64_t c = blockIdx.x; c < e.channels; c += gridDim.x) {
    sum_t partial = 0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) partial += static_cast<sum_t>(x(i / e.spatial, c, i % e.spatial));
    const sum_t mu = block_sum(partial, buffer) / static_cast<sum_t>(m);
    partial = 0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const sum_t d = static_cast<sum_t>(x(i / e.spatial, c, i % e.spatial)) - mu;
      partial += d * d;
    }
    const sum_t squares = block_sum(partial, buffer);
    if (threadIdx.x == 0) {
      mean[c] = static_cast<stat_t>(mu);
      var[c] = static_cast<stat_t>(squares / static_cast<sum_t>(m));
    }
  }
}

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

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_forward_kernel(Plane<const scalar_t> x, DeviceBn<acc_t> bn, Plane<scalar_t> out, Extent e) {
  const int64_t m = e.per_channel();
  for (int64_t c = blockIdx.x; c < e.channels; c += gridDim.x) {
    const auto a = bn.affine(c);
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const int64_t n = i / e.spatial, s = i % e.spatial;
      out(n, c, s) = static_cast<scalar_t>(math::bn_relu(static_cast<acc_t>(x(n, c, s)), a));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_backward_kernel(Plane<const scalar_t> x, Plane<const scalar_t> grad_out, DeviceBn<acc_t> bn,
                                        Plane<acc_t> accumulated, bool accumulate, double* total_dy_xhat,
                                        double* total_dy, Extent e) {
  __shared__ acc_t buffer[kThreads];
  const int64_t m = e.per_channel();
  for (int64_t c = blockIdx.x; c < e.channels; c += gridDim.x) {
    const auto a = bn.affine(c);
    acc_t sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const int64_t n = i / e.spatial, s = i % e.spatial;
      const acc_t xv = static_cast<acc_t>(x(n, c, s));
      const acc_t dy = math::relu_masked_grad(xv, static_cast<acc_t>(grad_out(n, c, s)), a);
      sum_dy += dy;
      sum_dy_xhat += dy * math::normalized(xv, a);
      acc_t& slot = accumulated(n, c, s);
      slot = (accumulate ? slot : acc_t(0)) + a.scale * dy;
    }
    sum_dy = block_sum(sum_dy, buffer);
    sum_dy_xhat = block_sum(sum_dy_xhat, buffer);
    if (threadIdx.x == 0) {  // one block owns channel c: no race
      total_dy_xhat[c] += static_cast<double>(sum_dy_xhat);
      total_dy[c] += static_cast<double>(sum_dy);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_input_grad_kernel(Plane<const scalar_t> x, DeviceBn<acc_t> stats, Plane<const acc_t> accumulated,
                                     Plane<const scalar_t> direct, bool has_direct, const acc_t* proj_mean,
                                     const acc_t* proj_xhat, Plane<scalar_t> out, Extent e) {
  const int64_t m = e.per_channel();
  for (int64_t c = blockIdx.x; c < e.channels; c += gridDim.x) {
    const bool has_proj = proj_mean != nullptr;
    const auto norm = has_proj ? stats.affine(c) : math::BnAffine<acc_t>{0, 1, 1, 0};
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      const int64_t n = i / e.spatial, s = i % e.spatial;
      const acc_t d = has_direct ? static_cast<acc_t>(direct(n, c, s)) : acc_t(0);
      const acc_t xhat = has_proj ? math::normalized(static_cast<acc_t>(x(n, c, s)), norm) : acc_t(0);
      out(n, c, s) = static_cast<scalar_t>(math::final_input_grad(d, accumulated(n, c, s), xhat,
                                                                  has_proj ? proj_mean[c] : acc_t(0),
                                                                  has_proj ? proj_xhat[c] : acc_t(0)));
    }
  }
}

// Launch configuration shared by all kernels; false when there is nothing to do.
bool prepare_launch(const at::Tensor& x, dim3& grid) {
  if (x.numel() == 0) return false;
  grid = dim3(static_cast<unsigned>(std::min<int64_t>(x.size(1), kMaxBlocks)));
  return true;
}

void channel_moments(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, bool) {
  check_same_cuda_device("dense_ops channel_moments", {{"x", x}, {"mean", mean}, {"var", var}});
  dim3 grid;
  if (!prepare_launch(x, grid)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_channel_moments_cuda", [&] {
    using stat_t = at::opmath_type<scalar_t>;
    using sum_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    channel_moments_kernel<scalar_t, stat_t, sum_t><<<grid, kThreads, 0, stream>>>(
        plane<const scalar_t>(x), Extent(x), mean.data_ptr<stat_t>(), var.data_ptr<stat_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_relu_forward(const at::Tensor& x, const BnParams& bn, const at::Tensor& out, bool) {
  check_same_cuda_device("dense_ops bn_relu_forward", {{"x", x}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias},
                                                      {"bn.mean", bn.mean}, {"bn.var", bn.var}, {"out", out}});
  dim3 grid;
  if (!prepare_launch(x, grid)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_relu_forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        plane<const scalar_t>(x), device_bn<acc_t>(bn), plane<scalar_t>(out), Extent(x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_relu_backward(const at::Tensor& x, const at::Tensor& grad_out, const BnParams& bn,
                      const at::Tensor& accumulated, bool accumulate, const at::Tensor& sum_dy_xhat,
                      const at::Tensor& sum_dy, bool) {
  check_same_cuda_device("dense_ops bn_relu_backward",
                         {{"x", x}, {"grad_out", grad_out}, {"bn.weight", bn.weight}, {"bn.bias", bn.bias},
                          {"bn.mean", bn.mean}, {"bn.var", bn.var}, {"accumulated", accumulated},
                          {"sum_dy_xhat", sum_dy_xhat}, {"sum_dy", sum_dy}});
  dim3 grid;
  if (!prepare_launch(x, grid)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_relu_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        plane<const scalar_t>(x), plane<const scalar_t>(grad_out), device_bn<acc_t>(bn), plane<acc_t>(accumulated),
        accumulate, sum_dy_xhat.data_ptr<double>(), sum_dy.data_ptr<double>(), Extent(x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_input_grad(const at::Tensor& x, const BnParams& stats, const at::Tensor& accumulated, const at::Tensor& direct,
                   const at::Tensor& proj_mean, const at::Tensor& proj_xhat, const at::Tensor& out, bool) {
  check_same_cuda_device("dense_ops bn_input_grad",
                         {{"x", x}, {"stats.weight", stats.weight}, {"stats.bias", stats.bias},
                          {"stats.mean", stats.mean}, {"stats.var", stats.var}, {"accumulated", accumulated},
                          {"direct", direct}, {"proj_mean", proj_mean}, {"proj_xhat", proj_xhat}, {"out", out}});
  dim3 grid;
  if (!prepare_launch(x, grid)) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_input_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool has_direct = direct.defined();
    bn_input_grad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        plane<const scalar_t>(x), device_bn<acc_t>(stats), plane<const acc_t>(accumulated),
        plane<const scalar_t>(has_direct ? direct : out), has_direct,
        proj_mean.defined() ? proj_mean.data_ptr<acc_t>() : nullptr,
        proj_xhat.defined() ? proj_xhat.data_ptr<acc_t>() : nullptr, plane<scalar_t>(out), Extent(x));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const BnKernels& cuda_kernels() {
  static const BnKernels kernels{channel_moments, bn_relu_forward, bn_relu_backward, bn_input_grad};
  return kernels;
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CUDA, m) {
  register_dense_block_ops<cuda_kernels>(m);
}

}  // namespace dense_ops

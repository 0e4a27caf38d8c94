// CUDA kernels of the condensed 1x1 convolution: the gather + BN + ReLU operand load and the
// shuffled scatter, with the index math of common/condense_math.h; the rest of the op, the GEMM
// through at::bmm (cuBLAS) included, is condensed_conv.cpp's. Registered for the CUDA key.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>

#include "common/condense_math.h"
#include "condensed_conv.h"
#include "cuda/device_checks.h"

namespace dense_ops {
namespace {

using condense::PackedLayout;
using condense::PlaneStrides;

constexpr int kThreads = 256;

// Enough blocks to fill the GPU; the kernels use grid-stride loops with 64-bit indices.
unsigned int blocks_for(int64_t elements) {
  const int64_t wanted = (elements + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// Walks the packed operand in memory order (coalesced writes).
template <typename scalar_t, typename acc_t>
__global__ void gather_kernel(const scalar_t* __restrict__ x, PlaneStrides in, int64_t in_channels,
                              const int64_t* __restrict__ index, const acc_t* __restrict__ scale,
                              const acc_t* __restrict__ shift, scalar_t* __restrict__ operand, PackedLayout layout,
                              int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t group, k, m;
    layout.locate(i, group, k, m);
    const int64_t row = group * layout.rows + k;
    const int64_t channel = index[row];
    CUDA_KERNEL_ASSERT(channel >= 0 && channel < in_channels && "condensed_conv: index out of range");
    const acc_t value = static_cast<acc_t>(x[in.offset(channel, m)]);
    operand[i] = static_cast<scalar_t>(condense::folded_bn_relu(value, scale[row], shift[row]));
  }
}

// Walks the packed result in memory order and writes each value to its shuffled channel, as it
// is or, with out_scale (the epilogue), as relu(value * out_scale + out_shift) of that channel.
template <typename scalar_t, typename acc_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ result, PackedLayout layout, int64_t groups,
                               const acc_t* __restrict__ out_scale, const acc_t* __restrict__ out_shift,
                               scalar_t* __restrict__ out, PlaneStrides out_strides, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t group, j, m;
    layout.locate(i, group, j, m);
    const int64_t channel = condense::shuffled_channel(group, j, groups);
    scalar_t value = result[i];
    if (out_scale != nullptr) {
      value = static_cast<scalar_t>(
          condense::folded_bn_relu(static_cast<acc_t>(value), out_scale[channel], out_shift[channel]));
    }
    out[out_strides.offset(channel, m)] = value;
  }
}

// gather_cuda and scatter_cuda run inside the ops below, which have checked the operands' devices.
void gather_cuda(const at::Tensor& input, const PlaneStrides& in, const at::Tensor& index, const at::Tensor& scale,
                 const at::Tensor& shift, at::Tensor& operand, const PackedLayout& layout) {
  const int64_t total = operand.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "condensed_conv_gather_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), in, input.size(1), index.const_data_ptr<int64_t>(),
        scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), operand.data_ptr<scalar_t>(), layout, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scatter_cuda(const at::Tensor& result, const PackedLayout& layout, int64_t groups,
                  const condense::Epilogue& epilogue, at::Tensor& out, const PlaneStrides& out_strides) {
  const int64_t total = result.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(result.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "condensed_conv_scatter_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* out_scale = epilogue.defined() ? epilogue.scale.const_data_ptr<acc_t>() : nullptr;
    const acc_t* out_shift = epilogue.defined() ? epilogue.shift.const_data_ptr<acc_t>() : nullptr;
    scatter_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        result.const_data_ptr<scalar_t>(), layout, groups, out_scale, out_shift, out.data_ptr<scalar_t>(),
        out_strides, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const condense::Kernels kCudaKernels{&gather_cuda, &scatter_cuda};

// Index range: checked on the device (CUDA_KERNEL_ASSERT in the gather), so no host sync per call.
at::Tensor condensed_conv_cuda(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                               const at::Tensor& shift, const at::Tensor& weight, int64_t groups,
                               const condense::OptionalTensor& out_scale, const condense::OptionalTensor& out_shift) {
  check_same_cuda_device("condensed_conv", {{"input", input}, {"index", index}, {"scale", scale}, {"shift", shift},
                                            {"weight", weight}, {"out_scale", out_scale.value_or(at::Tensor())},
                                            {"out_shift", out_shift.value_or(at::Tensor())}});
  const c10::cuda::CUDAGuard guard(input.device());
  return condense::run(kCudaKernels, input, index, scale, shift, weight, groups, out_scale, out_shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CUDA, m) {
  m.impl("condensed_conv", &condensed_conv_cuda);
}

}  // namespace dense_ops

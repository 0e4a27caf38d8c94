// The condensed 1x1 convolution's host side, written once for both devices (condensed_conv.cpp):
// argument checks, the packed buffers and the grouped GEMM through ATen (at::bmm: MKL/oneDNN on
// CPU, cuBLAS on CUDA). Each device supplies only its gather and scatter kernels (cpu/ and cuda/),
// with the index math of common/condense_math.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/condense_math.h"

namespace dense_ops {
namespace condense {

using OptionalTensor = std::optional<at::Tensor>;

// Per output channel affine + ReLU applied by the scatter (the next layer's BN and ReLU);
// undefined tensors: none, the result is written as it is.
struct Epilogue {
  at::Tensor scale, shift;  // [O] in the accumulation dtype, indexed by output channel
  bool defined() const { return scale.defined(); }
};

// Kernels of one backend. gather fills the packed operand from `input` (validating the index);
// scatter writes the packed result into `out` at the shuffled channel positions.
struct Kernels {
  void (*gather)(const at::Tensor& input, const PlaneStrides& in, const at::Tensor& index, const at::Tensor& scale,
                 const at::Tensor& shift, at::Tensor& operand, const PackedLayout& layout);
  void (*scatter)(const at::Tensor& result, const PackedLayout& layout, int64_t groups, const Epilogue& epilogue,
                  at::Tensor& out, const PlaneStrides& out_strides);
};

// The whole op (its schema: dense_ops.cpp), run with one device's kernels.
at::Tensor run(const Kernels& kernels, const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
               const at::Tensor& shift, const at::Tensor& weight, int64_t groups, const OptionalTensor& out_scale,
               const OptionalTensor& out_shift);

}  // namespace condense
}  // namespace dense_ops

// The condensed 1x1 convolution's host side, written once for both devices (condensed_conv.cpp):
// argument checks and the output (prepare), and the CUDA form of the op (run): the whole layer's
// packed operand, one grouped GEMM through at::bmm (cuBLAS), the shuffled scatter. CUDA supplies
// the gather and scatter kernels (cuda/); the CPU runs the same three steps tile by tile, so that
// the packed buffers stay in cache (cpu/condensed_conv_impl.h). Both use the index math of
// common/condense_math.h.
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

// The op's arguments, checked and in the forms the kernels read, and its output, allocated.
struct Call {
  at::Tensor input;                // [N, C, H, W] whose H and W strides merge
  at::Tensor index, scale, shift;  // [G*K], contiguous; scale and shift in the accumulation dtype
  at::Tensor weight;               // [O, K], contiguous
  Epilogue epilogue;
  at::Tensor out;  // [N, O, H, W], channels-last when the input is
  int64_t groups, kept, per_group_out;
  bool pixel_major;  // channels-last input: pack pixel-major

  int64_t pixels() const { return input.size(0) * input.size(2) * input.size(3); }
  PackedLayout operand_layout() const { return {kept, pixels(), pixel_major}; }
  PackedLayout result_layout() const { return {per_group_out, pixels(), pixel_major}; }
};

// Checks the op's arguments (schema: dense_ops.cpp) and allocates the output.
Call prepare(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale, const at::Tensor& shift,
             const at::Tensor& weight, int64_t groups, const OptionalTensor& out_scale,
             const OptionalTensor& out_shift);

// [N, C, S] strides of an NCHW-shaped tensor whose H and W strides merge.
PlaneStrides plane_strides(const at::Tensor& t);

// Kernels of the whole-layer form. gather fills the packed operand from `input` (validating the
// index); scatter writes the packed result into `out` at the shuffled channel positions.
struct Kernels {
  void (*gather)(const at::Tensor& input, const PlaneStrides& in, const at::Tensor& index, const at::Tensor& scale,
                 const at::Tensor& shift, at::Tensor& operand, const PackedLayout& layout);
  void (*scatter)(const at::Tensor& result, const PackedLayout& layout, int64_t groups, const Epilogue& epilogue,
                  at::Tensor& out, const PlaneStrides& out_strides);
};

// The whole op in its whole-layer form: gather into the packed operand, one at::bmm, scatter.
at::Tensor run(const Kernels& kernels, const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
               const at::Tensor& shift, const at::Tensor& weight, int64_t groups, const OptionalTensor& out_scale,
               const OptionalTensor& out_shift);

}  // namespace condense
}  // namespace dense_ops

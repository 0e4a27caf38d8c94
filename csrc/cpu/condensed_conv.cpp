// CPU kernels of the condensed 1x1 convolution: the gather + BN + ReLU operand load and the
// shuffled scatter, own loops parallelized with at::parallel_for; the index math from
// common/condense_math.h and the GEMM through ATen. Registered for the CPU key.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/condense_math.h"

namespace dense_ops {
namespace {

using condense::PackedLayout;
using condense::PlaneStrides;

// Calls body(row, m) for every element of a packed [rows, M] buffer (all groups' rows
// stacked), in parallel, walking the unit-stride dimension innermost.
template <typename Body>
void for_each_packed(int64_t rows, const PackedLayout& layout, const Body& body) {
  const int64_t pixels = layout.pixels;
  if (layout.pixel_major) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows));
    at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t row = 0; row < rows; ++row) body(row, m);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, pixels));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t m = 0; m < pixels; ++m) body(row, m);
    });
  }
}

void check_index_range(const at::Tensor& index, int64_t in_channels) {
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < in_channels, "condensed_conv: index[", i, "] = ", idx[i],
                " is out of range for an input with ", in_channels, " channels");
  }
}

void gather_cpu(const at::Tensor& input, const PlaneStrides& in, const at::Tensor& index, const at::Tensor& scale,
                const at::Tensor& shift, at::Tensor& operand, const PackedLayout& layout) {
  check_index_range(index, input.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "condensed_conv_gather", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* idx = index.const_data_ptr<int64_t>();
    const acc_t* sc = scale.const_data_ptr<acc_t>();
    const acc_t* sh = shift.const_data_ptr<acc_t>();
    scalar_t* a = operand.data_ptr<scalar_t>();
    const int64_t kept = layout.rows;
    for_each_packed(index.numel(), layout, [&](int64_t row, int64_t m) {
      const acc_t value = static_cast<acc_t>(x[in.offset(idx[row], m)]);
      a[layout.offset(row / kept, row % kept, m)] =
          static_cast<scalar_t>(condense::folded_bn_relu(value, sc[row], sh[row]));
    });
  });
}

void scatter_cpu(const at::Tensor& result, const PackedLayout& layout, int64_t groups, at::Tensor& out,
                 const PlaneStrides& out_strides) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "condensed_conv_scatter", [&] {
    const scalar_t* r = result.const_data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t per_group = layout.rows;
    // Walk the output channels in order (row = shuffled channel) so the writes are sequential.
    for_each_packed(groups * per_group, layout, [&](int64_t channel, int64_t m) {
      const int64_t group = channel % groups;
      const int64_t j = channel / groups;
      y[out_strides.offset(condense::shuffled_channel(group, j, groups), m)] = r[layout.offset(group, j, m)];
    });
  });
}

const condense::Kernels kCpuKernels{&gather_cpu, &scatter_cpu};

at::Tensor condensed_conv_cpu(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& weight, int64_t groups) {
  return condense::run(kCpuKernels, input, index, scale, shift, weight, groups);
}

void condensed_conv_into_cpu(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                             const at::Tensor& shift, const at::Tensor& weight, int64_t groups, at::Tensor out,
                             int64_t out_offset) {
  condense::run_into_checked(kCpuKernels, input, index, scale, shift, weight, groups, out, out_offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CPU, m) {
  m.impl("condensed_conv", &condensed_conv_cpu);
  m.impl("condensed_conv_into", &condensed_conv_into_cpu);
}

}  // namespace dense_ops

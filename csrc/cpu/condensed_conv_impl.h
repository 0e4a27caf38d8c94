// CPU kernels of the condensed 1x1 convolution: the gather + BN + ReLU operand load and the
// shuffled scatter, own loops parallelized with at::parallel_for; the index math from
// common/condense_math.h, the rest of the op from condensed_conv.cpp. Built once per ISA
// (cpu/isa.h); cpu/condensed_conv.cpp registers them.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/condense_math.h"
#include "condensed_conv.h"
#include "cpu/static_flags.h"
#include "cpu/isa_target.h"  // last: it sets the ISA of the code below

DENSE_OPS_ISA_BEGIN
namespace dense_ops {
namespace DENSE_OPS_ISA {
namespace {

using condense::PackedLayout;
using condense::PlaneStrides;

// Runs body(begin, end) over [0, count) in parallel chunks of about `work_per_chunk` elements.
template <typename Body>
void parallel_chunks(int64_t count, int64_t work_per_item, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
  at::parallel_for(0, count, grain, body);
}

void check_index_range(const at::Tensor& index, int64_t in_channels) {
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < in_channels, "condensed_conv: index[", i, "] = ", idx[i],
                " is out of range for an input with ", in_channels, " channels");
  }
}

// The loops below walk whole images (n) and pixel runs (s) so that no element needs an integer
// division; offsets come from the shared PlaneStrides/PackedLayout at the start of each run.
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
    const int64_t rows = index.numel(), kept = layout.rows, images = layout.pixels / in.spatial;
    if (!layout.pixel_major) {  // a[row][m]: one gathered channel per task, unit stride over m
      with_unit_stride(in.s, [&](auto pixel_stride) {
        parallel_chunks(rows, layout.pixels, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const acc_t row_scale = sc[row], row_shift = sh[row];
            scalar_t* __restrict__ dst = a + layout.offset(row / kept, row % kept, 0);
            for (int64_t n = 0; n < images; ++n) {
              const scalar_t* __restrict__ src = x + in.offset(idx[row], n * in.spatial);
              for (int64_t s = 0; s < in.spatial; ++s) {
                const acc_t value = static_cast<acc_t>(src[s * pixel_stride]);
                dst[n * in.spatial + s] = static_cast<scalar_t>(condense::folded_bn_relu(value, row_scale, row_shift));
              }
            }
          }
        });
      });
    } else {  // a[g][m][k]: one pixel per task, every gathered channel of it
      parallel_chunks(layout.pixels, rows, [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          const scalar_t* src = x + in.offset(0, m);
          for (int64_t g = 0; g * kept < rows; ++g) {
            scalar_t* dst = a + layout.offset(g, 0, m);
            for (int64_t k = 0; k < kept; ++k) {
              const int64_t row = g * kept + k;
              dst[k] = static_cast<scalar_t>(
                  condense::folded_bn_relu(static_cast<acc_t>(src[idx[row] * in.c]), sc[row], sh[row]));
            }
          }
        }
      });
    }
  });
}

// The scatter's store: the result as it is, or relu(r * scale + shift) of its output channel.
template <bool kEpilogue, typename scalar_t, typename acc_t>
inline scalar_t output_value(scalar_t r, acc_t scale, acc_t shift) {
  if (!kEpilogue) return r;
  return static_cast<scalar_t>(condense::folded_bn_relu(static_cast<acc_t>(r), scale, shift));
}

void scatter_cpu(const at::Tensor& result, const PackedLayout& layout, int64_t groups,
                 const condense::Epilogue& epilogue, at::Tensor& out, const PlaneStrides& out_strides) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "condensed_conv_scatter", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = result.const_data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    const acc_t* out_scale = epilogue.defined() ? epilogue.scale.const_data_ptr<acc_t>() : nullptr;
    const acc_t* out_shift = epilogue.defined() ? epilogue.shift.const_data_ptr<acc_t>() : nullptr;
    const int64_t per_group = layout.rows, channels = groups * per_group;
    const int64_t spatial = out_strides.spatial, images = layout.pixels / spatial;
    with_flag(epilogue.defined(), [&](auto epilogue_flag) {
      constexpr bool kEpilogue = decltype(epilogue_flag)::value;
      if (!layout.pixel_major) {  // one output channel per task
        with_unit_stride(out_strides.s, [&](auto pixel_stride) {
          parallel_chunks(channels, layout.pixels, [&](int64_t begin, int64_t end) {
            for (int64_t row = begin; row < end; ++row) {
              const int64_t group = row / per_group, j = row % per_group;
              const scalar_t* __restrict__ src = r + layout.offset(group, j, 0);
              const int64_t channel = condense::shuffled_channel(group, j, groups);
              const acc_t scale = kEpilogue ? out_scale[channel] : acc_t(1);
              const acc_t shift = kEpilogue ? out_shift[channel] : acc_t(0);
              for (int64_t n = 0; n < images; ++n) {
                scalar_t* __restrict__ dst = y + out_strides.offset(channel, n * spatial);
                for (int64_t s = 0; s < spatial; ++s)
                  dst[s * pixel_stride] = output_value<kEpilogue>(src[n * spatial + s], scale, shift);
              }
            }
          });
        });
      } else {  // one pixel per task, its output channels in order
        parallel_chunks(layout.pixels, channels, [&](int64_t begin, int64_t end) {
          for (int64_t m = begin; m < end; ++m) {
            scalar_t* dst = y + out_strides.offset(0, m);
            for (int64_t j = 0; j < per_group; ++j) {
              for (int64_t group = 0; group < groups; ++group) {
                const int64_t channel = condense::shuffled_channel(group, j, groups);
                dst[channel * out_strides.c] = output_value<kEpilogue>(
                    r[layout.offset(group, j, m)], kEpilogue ? out_scale[channel] : acc_t(1),
                    kEpilogue ? out_shift[channel] : acc_t(0));
              }
            }
          }
        });
      }
    });
  });
}

}  // namespace

const condense::Kernels& condensed_kernels() {
  static const condense::Kernels kernels{&gather_cpu, &scatter_cpu};
  return kernels;
}

}  // namespace DENSE_OPS_ISA
}  // namespace dense_ops
DENSE_OPS_ISA_END

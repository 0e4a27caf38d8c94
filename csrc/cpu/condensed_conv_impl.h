// CPU kernel of the condensed 1x1 convolution. The op's three steps (common/condense_math.h) run
// tile by tile: a task gathers one group's kept channels of a tile of pixels (with BN + ReLU) into
// a small packed operand, multiplies it by the group's weight (at::mm: MKL/oneDNN, one thread per
// task) and scatters the result, shuffled and with the epilogue, into the output. The packed
// buffers stay in L2, so memory traffic is the input's read and the output's write; the tasks
// (tiles x groups) run in parallel with at::parallel_for. Built once per ISA (cpu/isa.h);
// cpu/condensed_conv.cpp registers it.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/condense_math.h"
#include "condensed_conv.h"
#include "cpu/static_flags.h"
#include "cpu/isa_target.h"  // last: it sets the ISA of the code below

DENSE_OPS_ISA_BEGIN
namespace dense_ops {
namespace DENSE_OPS_ISA {
namespace {

using condense::Call;
using condense::PlaneStrides;

// The packed operand and result of one tile (kept + per_group_out rows) fit in about this much
// of a core's L2, with room left for the weight and the input's lines.
constexpr int64_t kTileBytes = 256 * 1024;
// Fewer pixels per tile would spend more on the GEMM call than on its work.
constexpr int64_t kMinTilePixels = 64;

int64_t tile_pixels(const Call& call) {
  const int64_t bytes_per_pixel = (call.kept + call.per_group_out) * call.input.element_size();
  return std::min(call.pixels(), std::max(kMinTilePixels, kTileBytes / bytes_per_pixel));
}

void check_index_range(const at::Tensor& index, int64_t in_channels) {
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < in_channels, "condensed_conv: index[", i, "] = ", idx[i],
                " is out of range for an input with ", in_channels, " channels");
  }
}

// One group's share of a tile of pixels [first, first + count): where it reads and writes.
template <typename scalar_t>
struct TileTask {
  using acc_t = at::opmath_type<scalar_t>;
  const Call& call;
  int64_t group, first, count;

  // Calls visit(t, m, length) for each run of pixels t..t+length of the tile (pixel m = first + t
  // onwards) that lies in one image, so that no pixel needs an integer division.
  template <typename Visit>
  void for_each_run(int64_t spatial, const Visit& visit) const {
    for (int64_t t = 0; t < count;) {
      const int64_t m = first + t, pixel = m % spatial, length = std::min(spatial - pixel, count - t);
      visit(t, m, length);
      t += length;
    }
  }

  // a[k][t] (channel-major) or a[t][k] (pixel-major) = relu(x[index[g*K + k], pixel] * scale + shift).
  void gather(const PlaneStrides& in, scalar_t* a) const {
    const scalar_t* x = call.input.const_data_ptr<scalar_t>();
    const int64_t* idx = call.index.const_data_ptr<int64_t>() + group * call.kept;
    const acc_t* sc = call.scale.const_data_ptr<acc_t>() + group * call.kept;
    const acc_t* sh = call.shift.const_data_ptr<acc_t>() + group * call.kept;
    const int64_t kept = call.kept;
    if (!call.pixel_major) {
      with_unit_stride(in.s, [&](auto pixel_stride) {
        for (int64_t k = 0; k < kept; ++k) {
          for_each_run(in.spatial, [&](int64_t t, int64_t m, int64_t length) {
            const scalar_t* __restrict__ src = x + in.offset(idx[k], m);
            scalar_t* __restrict__ dst = a + k * count + t;
            for (int64_t i = 0; i < length; ++i) {
              dst[i] = static_cast<scalar_t>(
                  condense::folded_bn_relu(static_cast<acc_t>(src[i * pixel_stride]), sc[k], sh[k]));
            }
          });
        }
      });
    } else {
      for (int64_t t = 0; t < count; ++t) {
        const scalar_t* src = x + in.offset(0, first + t);
        for (int64_t k = 0; k < kept; ++k) {
          a[t * kept + k] = static_cast<scalar_t>(
              condense::folded_bn_relu(static_cast<acc_t>(src[idx[k] * in.c]), sc[k], sh[k]));
        }
      }
    }
  }

  // r = the group's weight times a: r[j][t] (channel-major) or r[t][j] (pixel-major).
  void multiply(const scalar_t* a, scalar_t* r) const {
    const auto options = call.input.options();
    const int64_t kept = call.kept, outputs = call.per_group_out;
    const at::Tensor weight = at::from_blob(
        const_cast<scalar_t*>(call.weight.const_data_ptr<scalar_t>()) + group * outputs * kept, {outputs, kept},
        options);
    const at::Tensor operand = at::from_blob(const_cast<scalar_t*>(a), call.pixel_major ? at::IntArrayRef{count, kept}
                                                                                       : at::IntArrayRef{kept, count},
                                             options);
    at::Tensor result = at::from_blob(r, call.pixel_major ? at::IntArrayRef{count, outputs}
                                                          : at::IntArrayRef{outputs, count}, options);
    if (call.pixel_major) at::mm_out(result, operand, weight.t());
    else at::mm_out(result, weight, operand);
  }

  // out[n, shuffled_channel(g, j), pixel] = r's value for (j, pixel), through the epilogue if any.
  template <bool kEpilogue>
  void scatter(const scalar_t* r, const PlaneStrides& out) const {
    scalar_t* y = call.out.data_ptr<scalar_t>();
    const acc_t* out_scale = kEpilogue ? call.epilogue.scale.const_data_ptr<acc_t>() : nullptr;
    const acc_t* out_shift = kEpilogue ? call.epilogue.shift.const_data_ptr<acc_t>() : nullptr;
    const int64_t outputs = call.per_group_out;
    const auto value = [&](scalar_t v, int64_t channel) {
      if (!kEpilogue) return v;
      return static_cast<scalar_t>(
          condense::folded_bn_relu(static_cast<acc_t>(v), out_scale[channel], out_shift[channel]));
    };
    if (!call.pixel_major) {
      with_unit_stride(out.s, [&](auto pixel_stride) {
        for (int64_t j = 0; j < outputs; ++j) {
          const int64_t channel = condense::shuffled_channel(group, j, call.groups);
          for_each_run(out.spatial, [&](int64_t t, int64_t m, int64_t length) {
            const scalar_t* __restrict__ src = r + j * count + t;
            scalar_t* __restrict__ dst = y + out.offset(channel, m);
            for (int64_t i = 0; i < length; ++i) dst[i * pixel_stride] = value(src[i], channel);
          });
        }
      });
    } else {
      for (int64_t t = 0; t < count; ++t) {
        scalar_t* dst = y + out.offset(0, first + t);
        for (int64_t j = 0; j < outputs; ++j) {
          const int64_t channel = condense::shuffled_channel(group, j, call.groups);
          dst[channel * out.c] = value(r[t * outputs + j], channel);
        }
      }
    }
  }
};

at::Tensor condensed_conv_tiled(const Call& call) {
  check_index_range(call.index, call.input.size(1));
  const PlaneStrides in = condense::plane_strides(call.input), out = condense::plane_strides(call.out);
  const int64_t tile = tile_pixels(call), tiles = (call.pixels() + tile - 1) / tile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "condensed_conv_cpu", [&] {
    with_flag(call.epilogue.defined(), [&](auto epilogue_flag) {
      // The tasks are fixed by the sizes alone, so results do not depend on the thread count.
      at::parallel_for(0, tiles * call.groups, 1, [&](int64_t begin, int64_t end) {
        at::Tensor buffers = at::empty({(call.kept + call.per_group_out) * tile}, call.input.options());
        scalar_t* a = buffers.data_ptr<scalar_t>();
        scalar_t* r = a + call.kept * tile;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t first = task / call.groups * tile;
          const TileTask<scalar_t> tile_task{call, task % call.groups, first, std::min(tile, call.pixels() - first)};
          tile_task.gather(in, a);
          tile_task.multiply(a, r);
          tile_task.template scatter<decltype(epilogue_flag)::value>(r, out);
        }
      });
    });
  });
  return call.out;
}

}  // namespace

at::Tensor condensed_conv(const Call& call) {
  if (call.out.numel() == 0) return call.out;
  return condensed_conv_tiled(call);
}

}  // namespace DENSE_OPS_ISA
}  // namespace dense_ops
DENSE_OPS_ISA_END

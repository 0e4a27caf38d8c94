// CPU kernel of the 3x3 grouped convolution for thin groups (group_conv.h). A task computes one
// group of one image over a band of rows: it copies the group's input rows, with the band's halo
// rows and a zero column on each side, into a small per-thread buffer that stays in L2, then
// computes every output channel of the group from it. In that zero-padded buffer, output pixel
// (y, x) at flat position q = y * padded_width + x reads input q + dy * padded_width + dx for every
// tap, so the whole band is one flat run of vectors with no edge cases (the flat positions of the
// two padding columns compute values that are not stored). Register tiles of 2 output channels x
// 6 vectors accumulate over the group's inputs and the 9 taps, one output value in one order for
// any band split: results do not depend on the thread count. Built once per ISA (cpu/isa.h);
// cpu/group_conv.cpp registers it.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu/static_flags.h"
#include "group_conv.h"
#include "cpu/isa_target.h"  // last: it sets the ISA of the code below

DENSE_OPS_ISA_BEGIN
namespace dense_ops {
namespace DENSE_OPS_ISA {
namespace {

// A band's padded input stays about this size, in L2 beside the output's lines.
constexpr int64_t kBandBytes = 256 * 1024;
// Enough tasks per thread to even out the bands' different costs.
constexpr int64_t kTasksPerThread = 4;
// The register tile: kTileChannels output channels x kTileVectors vectors of 32 bytes (12
// accumulators, the 2 broadcast weights and one input vector fit AVX2's 16 registers).
constexpr int kTileChannels = 2;
constexpr int kTileVectors = 6;

struct Geometry {
  int64_t batch, groups, group_inputs, group_outputs, height, width;
  int64_t padded_width;  // width + 2: the zero column on each side
  int64_t band_rows, bands;

  int64_t tasks() const { return batch * groups * bands; }
  // One input channel of a band in the buffer: its rows with the halo, then slack for the last
  // vectors' reads past the final row.
  int64_t plane(int64_t tile_positions) const { return (band_rows + 2) * padded_width + tile_positions + 2; }
};

Geometry geometry(const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  Geometry g;
  g.batch = input.size(0), g.groups = groups, g.height = input.size(2), g.width = input.size(3);
  g.group_inputs = input.size(1) / groups, g.group_outputs = weight.size(0) / groups;
  g.padded_width = g.width + 2;
  const int64_t row_bytes = g.group_inputs * g.padded_width * input.element_size();
  const int64_t rows_in_cache = std::max<int64_t>(1, kBandBytes / row_bytes - 2);
  // Bands only split an image further when images x groups alone leave threads idle.
  const int64_t wanted_tasks = kTasksPerThread * at::get_num_threads();
  const int64_t bands_wanted = (wanted_tasks + g.batch * groups - 1) / (g.batch * groups);
  const int64_t rows_for_tasks = std::max<int64_t>(1, (g.height + bands_wanted - 1) / bands_wanted);
  g.band_rows = std::min({g.height, rows_in_cache, rows_for_tasks});
  g.bands = (g.height + g.band_rows - 1) / g.band_rows;
  return g;
}

template <typename scalar_t>
struct GroupConv {
  typedef scalar_t vec_t __attribute__((vector_size(32)));
  static constexpr int64_t kLanes = 32 / sizeof(scalar_t);
  static constexpr int64_t kTilePositions = kTileVectors * kLanes;

  const Geometry& geo;
  const at::Tensor& input;
  const at::Tensor& weight;  // [O, I, 3, 3], contiguous
  const at::Tensor& out;

  // The band's rows [first_row - 1, first_row + rows] of the group's input channels, zero-padded.
  void fill(int64_t image, int64_t group, int64_t first_row, int64_t rows, scalar_t* buffer) const {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t plane = geo.plane(kTilePositions), wp = geo.padded_width, width = geo.width;
    const int64_t s_n = input.stride(0), s_c = input.stride(1), s_h = input.stride(2), s_w = input.stride(3);
    for (int64_t i = 0; i < geo.group_inputs; ++i) {
      scalar_t* dst_plane = buffer + i * plane;
      const scalar_t* src_plane = x + image * s_n + (group * geo.group_inputs + i) * s_c;
      for (int64_t r = 0; r < rows + 2; ++r) {
        scalar_t* dst = dst_plane + r * wp;
        const int64_t y = first_row - 1 + r;
        if (y < 0 || y >= geo.height) {
          std::fill(dst, dst + wp, scalar_t(0));
          continue;
        }
        const scalar_t* src = src_plane + y * s_h;
        dst[0] = scalar_t(0), dst[width + 1] = scalar_t(0);
        with_unit_stride(s_w, [&](auto column_stride) {
          for (int64_t xi = 0; xi < width; ++xi) dst[1 + xi] = src[xi * column_stride];
        });
      }
      std::fill(dst_plane + (rows + 2) * wp, dst_plane + plane, scalar_t(0));
    }
  }

  // Output channels [channel, channel + kChannels) of the band at flat positions [q0, q0 + kTilePositions).
  template <int kChannels>
  void tile(const scalar_t* buffer, int64_t channel, int64_t q0, vec_t (&acc)[kChannels][kTileVectors]) const {
    const int64_t plane = geo.plane(kTilePositions), wp = geo.padded_width, inputs = geo.group_inputs;
    const scalar_t* w = weight.const_data_ptr<scalar_t>() + channel * inputs * 9;
    for (int c = 0; c < kChannels; ++c) {
      for (int v = 0; v < kTileVectors; ++v) acc[c][v] = vec_t{};
    }
    for (int64_t i = 0; i < inputs; ++i) {
      const scalar_t* src = buffer + i * plane + q0;
      const scalar_t* w_i = w + i * 9;
      for (int dy = 0; dy < 3; ++dy) {
        for (int dx = 0; dx < 3; ++dx) {
          const scalar_t* s = src + dy * wp + dx;
          vec_t b[kChannels];
          // value - 0 is value exactly, so this is one broadcast (0 + value would round -0 to +0).
          for (int c = 0; c < kChannels; ++c) b[c] = w_i[c * inputs * 9 + dy * 3 + dx] - vec_t{};
          for (int v = 0; v < kTileVectors; ++v) {
            vec_t x;
            std::memcpy(&x, s + v * kLanes, sizeof(vec_t));
            for (int c = 0; c < kChannels; ++c) acc[c][v] += b[c] * x;
          }
        }
      }
    }
  }

  // Stores a tile's values at the band's real pixels (x < width, q < rows * padded_width), a row
  // segment at a time.
  template <int kChannels>
  void store(const vec_t (&acc)[kChannels][kTileVectors], int64_t image, int64_t channel, int64_t first_row,
             int64_t rows, int64_t q0) const {
    const int64_t wp = geo.padded_width, s_h = out.stride(2), s_w = out.stride(3);
    scalar_t* y_base = out.data_ptr<scalar_t>() + image * out.stride(0) + channel * out.stride(1);
    const int64_t end = std::min(kTilePositions, rows * wp - q0);
    for (int c = 0; c < kChannels; ++c) {
      scalar_t values[kTilePositions];
      std::memcpy(values, acc[c], sizeof(values));
      with_unit_stride(s_w, [&](auto column_stride) {
        for (int64_t t = 0; t < end;) {
          const int64_t row = (q0 + t) / wp, column = (q0 + t) % wp, segment = std::min(end - t, wp - column);
          scalar_t* dst = y_base + c * out.stride(1) + (first_row + row) * s_h;
          for (int64_t x = column; x < std::min(column + segment, geo.width); ++x) {
            dst[x * column_stride] = values[t + x - column];
          }
          t += segment;
        }
      });
    }
  }

  template <int kChannels>
  void channels(const scalar_t* buffer, int64_t image, int64_t channel, int64_t first_row, int64_t rows) const {
    for (int64_t q0 = 0; q0 < rows * geo.padded_width; q0 += kTilePositions) {
      vec_t acc[kChannels][kTileVectors];
      tile<kChannels>(buffer, channel, q0, acc);
      store<kChannels>(acc, image, channel, first_row, rows, q0);
    }
  }

  void task(int64_t index, scalar_t* buffer) const {
    const int64_t band = index % geo.bands, group = index / geo.bands % geo.groups, image = index / geo.bands / geo.groups;
    const int64_t first_row = band * geo.band_rows, rows = std::min(geo.band_rows, geo.height - first_row);
    fill(image, group, first_row, rows, buffer);
    const int64_t first = group * geo.group_outputs, end = first + geo.group_outputs;
    int64_t channel = first;
    for (; channel + kTileChannels <= end; channel += kTileChannels) {
      channels<kTileChannels>(buffer, image, channel, first_row, rows);
    }
    for (; channel < end; ++channel) channels<1>(buffer, image, channel, first_row, rows);
  }
};

}  // namespace

at::Tensor group_conv3x3(const at::Tensor& input, const at::Tensor& weight_in, int64_t groups) {
  const at::Tensor out = group_conv::empty_output(input, weight_in);
  if (out.numel() == 0) return out;
  const at::Tensor weight = weight_in.contiguous();
  const Geometry geo = geometry(input, weight, groups);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "group_conv3x3_cpu", [&] {
    const GroupConv<scalar_t> conv{geo, input, weight, out};
    const int64_t buffer_size = geo.group_inputs * geo.plane(GroupConv<scalar_t>::kTilePositions);
    at::parallel_for(0, geo.tasks(), 1, [&](int64_t begin, int64_t end) {
      at::Tensor buffer = at::empty({buffer_size}, input.options());
      for (int64_t task = begin; task < end; ++task) conv.task(task, buffer.data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace DENSE_OPS_ISA
}  // namespace dense_ops
DENSE_OPS_ISA_END

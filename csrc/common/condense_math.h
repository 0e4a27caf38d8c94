// Index and element math of the condensed 1x1 convolution, shared by the CPU and CUDA kernels.
//
// A condensed layer with G groups keeps K input channels per group (index[g*K + k] is the
// k-th input channel read by group g; a channel may be read by several groups) and produces
// D = O/G outputs per group. The three steps of the op:
//   1. gather:  a[g, k, m] = relu(x[n, index[g*K + k], s] * scale[g*K + k] + shift[g*K + k]),
//               with m = n*S + s running over the N*S pixels (S = H*W);
//   2. GEMM:    r[g, j, m] = sum_k weight[g*D + j, k] * a[g, k, m]   (one GEMM per group);
//   3. scatter: out[n, c, s] = r[g, j, m] with c = shuffled_channel(g, j), or, with an epilogue
//               (the next layer's eval-mode BN and ReLU), relu(r[g, j, m] * out_scale[c] + out_shift[c]).
// The channel shuffle that follows the grouped convolution of the paper (conv channel g*D + j
// moves to j*G + g) is folded into step 3's addresses, so it never runs as a separate pass.
//
// The packed buffers a [G, K, M] and r [G, D, M] are stored either channel-major (m has unit
// stride, good for NCHW tensors) or pixel-major (k or j has unit stride, good for channels-last).
#pragma once

#include <cstdint>

#include "common/bn_math.h"

namespace dense_ops {
namespace condense {

// Output channel of the j-th output of group g after the channel shuffle.
DENSE_OPS_HOST_DEVICE int64_t shuffled_channel(int64_t group, int64_t j, int64_t groups) {
  return j * groups + group;
}

// The eval-mode batch norm folded into one affine map per gathered channel, then ReLU;
// the same expression as the dense block's BN-ReLU (common/bn_math.h).
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t folded_bn_relu(acc_t x, acc_t scale, acc_t shift) {
  math::BnAffine<acc_t> affine;
  affine.mean = acc_t(0);
  affine.invstd = acc_t(1);
  affine.scale = scale;
  affine.shift = shift;
  return math::bn_relu(x, affine);
}

// Layout of one packed [G, rows, M] buffer (rows = K for the operand, D for the result).
struct PackedLayout {
  int64_t rows;
  int64_t pixels;  // M = N*S
  bool pixel_major;

  DENSE_OPS_HOST_DEVICE int64_t offset(int64_t group, int64_t row, int64_t m) const {
    const int64_t base = group * rows * pixels;
    return pixel_major ? base + m * rows + row : base + row * pixels + m;
  }

  // Inverse of offset(): the (group, row, m) stored at a linear position, for kernels that
  // walk a buffer in memory order.
  DENSE_OPS_HOST_DEVICE void locate(int64_t linear, int64_t& group, int64_t& row, int64_t& m) const {
    const int64_t per_group = rows * pixels;
    group = linear / per_group;
    const int64_t rest = linear - group * per_group;
    if (pixel_major) {
      m = rest / rows;
      row = rest - m * rows;
    } else {
      row = rest / pixels;
      m = rest - row * pixels;
    }
  }
};

// Strided [N, C, S] view of an NCHW-shaped tensor whose H and W strides merge into one.
struct PlaneStrides {
  int64_t n, c, s;
  int64_t spatial;  // S

  // Element (image, channel, pixel) for the flat pixel number m = image*S + pixel.
  DENSE_OPS_HOST_DEVICE int64_t offset(int64_t channel, int64_t m) const {
    const int64_t image = m / spatial;
    return image * n + channel * c + (m - image * spatial) * s;
  }
};

}  // namespace condense
}  // namespace dense_ops

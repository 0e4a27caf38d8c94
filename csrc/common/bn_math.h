// Per-element and per-channel batch-norm math shared by the CPU and CUDA kernels.
//
// Notation, for one channel with M = N*H*W elements:
//   x_hat = (x - mean) * invstd,  y = weight * x_hat + bias = x * scale + shift,  z = relu(y).
// Backward, for dz = dL/dz:  dy = dz * [y > 0]; the affine gradients are sum(dy * x_hat) and sum(dy).
// With batch statistics the input gradient is
//   dx = scale * dy - scale * sum(dy) / M - x_hat * scale * sum(dy * x_hat) / M.
// Every layer that reads channel c shares its batch statistics, so the three terms are
// accumulated over all readers (scale * dy into one gradient buffer by the kernels, the two
// per-channel projections scale * sum / M into two small vectors) and combined once, by
// final_input_grad, when channel c's gradient is final.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DENSE_OPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DENSE_OPS_HOST_DEVICE inline
#endif

namespace dense_ops {
namespace math {

template <typename acc_t>
struct BnAffine {
  acc_t mean;
  acc_t invstd;
  acc_t scale;  // weight * invstd
  acc_t shift;  // bias - mean * scale
};

template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t inverse_std(acc_t var, acc_t eps) {
  return acc_t(1) / ::sqrt(var + eps);
}

template <typename acc_t>
DENSE_OPS_HOST_DEVICE BnAffine<acc_t> bn_affine(acc_t weight, acc_t bias, acc_t mean, acc_t var, acc_t eps) {
  BnAffine<acc_t> a;
  a.mean = mean;
  a.invstd = inverse_std(var, eps);
  a.scale = weight * a.invstd;
  a.shift = bias - mean * a.scale;
  return a;
}

// The batch-norm output y; forward and backward use this one expression so that the
// ReLU mask recomputed in backward is bit-identical to the forward one.
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t bn_output(acc_t x, const BnAffine<acc_t>& a) {
  return x * a.scale + a.shift;
}

// Written as "<= 0 ? 0" so that NaN propagates, as torch.relu does.
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t bn_relu(acc_t x, const BnAffine<acc_t>& a) {
  const acc_t y = bn_output(x, a);
  return y <= acc_t(0) ? acc_t(0) : y;
}

// dy = dz masked by the ReLU; passes wherever the output is not <= 0, as relu's backward does.
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t relu_masked_grad(acc_t x, acc_t dz, const BnAffine<acc_t>& a) {
  return bn_output(x, a) <= acc_t(0) ? acc_t(0) : dz;
}

template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t normalized(acc_t x, const BnAffine<acc_t>& a) {
  return (x - a.mean) * a.invstd;
}

// The final input gradient of one element: the direct gradient plus the accumulated
// scale * dy, minus the batch-statistics projections (zero in eval mode).
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t final_input_grad(acc_t direct, acc_t accumulated, acc_t x_hat, acc_t proj_mean,
                                             acc_t proj_xhat) {
  return direct + accumulated - proj_mean - x_hat * proj_xhat;
}

// ---- The transition's BN-ReLU-avgpool2x2 (bn_relu_pool) --------------------------------------
// Pooled pixel (i, j) averages z over input pixels (2i + a, 2j + b), a, b in {0, 1}; rows and
// columns past 2 * (H / 2) and 2 * (W / 2) are cropped, as avg_pool2d(2) does: they enter the
// batch statistics but get no gradient. Backward, dz of an input pixel is the gradient of its
// pooled pixel divided by the pool's area, and the input gradient is
//   dx = scale * dy - scale * sum(dy) / M - x_hat * scale * sum(dy * x_hat) / M  (as above).
constexpr int kPoolArea = 4;

// The mean of a 2x2 window, summed in ATen's order (row by row) and divided by the area.
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t pool_mean(acc_t top_left, acc_t top_right, acc_t bottom_left, acc_t bottom_right) {
  return (((top_left + top_right) + bottom_left) + bottom_right) / acc_t(kPoolArea);
}

// dz of one input pixel of a pooled pixel with gradient grad_pooled.
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t unpooled_grad(acc_t grad_pooled) {
  return grad_pooled / acc_t(kPoolArea);
}

// The input gradient of one element given its dy, with the batch-statistics projections
// (proj_mean = scale * sum(dy) / M, proj_xhat = scale * sum(dy * x_hat) / M; zero in eval mode).
template <typename acc_t>
DENSE_OPS_HOST_DEVICE acc_t pooled_input_grad(acc_t x, acc_t dy, const BnAffine<acc_t>& a, acc_t proj_mean,
                                              acc_t proj_xhat) {
  return final_input_grad(acc_t(0), a.scale * dy, normalized(x, a), proj_mean, proj_xhat);
}

}  // namespace math
}  // namespace dense_ops

// CPU batch-norm kernels of the dense block: own loops parallelized over channels with
// at::parallel_for, the arithmetic from common/bn_math.h. Registered for the CPU key.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/bn_math.h"
#include "dense_block.h"

namespace dense_ops {
namespace {

// Element (n, c, s) of a [N, C, H*W] view. The unit stride is a compile-time constant
// (over s for NCHW, over c for channels-last) so the inner loops vectorize.
template <typename T, bool kChannelsLast>
struct Plane {
  T* data;
  int64_t stride_n, stride_c, stride_s;
  explicit Plane(const at::Tensor& t)
      : data(t.data_ptr<T>()), stride_n(t.stride(0)), stride_c(t.stride(1)), stride_s(t.stride(3)) {
    TORCH_INTERNAL_ASSERT(t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3),
                          "dense_ops: H and W strides of a kernel operand are not mergeable");
    if (t.size(3) == 1) stride_s = t.stride(2);
    TORCH_INTERNAL_ASSERT(kChannelsLast ? (t.size(1) == 1 || stride_c == 1) : (t.size(2) * t.size(3) == 1 || stride_s == 1),
                          "dense_ops: kernel operand has an unexpected memory layout");
  }
  T& operator()(int64_t n, int64_t c, int64_t s) const {
    return data[n * stride_n + (kChannelsLast ? c : c * stride_c) + (kChannelsLast ? s * stride_s : s)];
  }
};

struct Extent {
  int64_t batch, channels, spatial;
  explicit Extent(const at::Tensor& t) : batch(t.size(0)), channels(t.size(1)), spatial(t.size(2) * t.size(3)) {}
  int64_t per_channel() const { return batch * spatial; }
};

// Calls body(c, n, s) for every element of channels [c_begin, c_end) in memory order.
template <bool kChannelsLast, typename Body>
inline void visit(const Extent& e, int64_t c_begin, int64_t c_end, const Body& body) {
  if (kChannelsLast) {
    for (int64_t n = 0; n < e.batch; ++n)
      for (int64_t s = 0; s < e.spatial; ++s)
        for (int64_t c = c_begin; c < c_end; ++c) body(c, n, s);
  } else {
    for (int64_t c = c_begin; c < c_end; ++c)
      for (int64_t n = 0; n < e.batch; ++n)
        for (int64_t s = 0; s < e.spatial; ++s) body(c, n, s);
  }
}

// Runs chunk(c_begin, c_end) in parallel over channel ranges of a useful size.
template <typename Chunk>
void parallel_over_channels(const Extent& e, const Chunk& chunk) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, e.per_channel()));
  at::parallel_for(0, e.channels, grain, chunk);
}

// Calls f with std::true_type or std::false_type: a runtime flag as a compile-time constant.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{}); else f(std::false_type{});
}

template <typename F>
void with_layout(bool channels_last, const F& f) { with_flag(channels_last, f); }

template <typename acc_t>
std::vector<math::BnAffine<acc_t>> affines(const BnParams& bn, int64_t c_begin, int64_t c_end) {
  const acc_t* w = bn.weight.data_ptr<acc_t>();
  const acc_t* b = bn.bias.data_ptr<acc_t>();
  const acc_t* m = bn.mean.data_ptr<acc_t>();
  const acc_t* v = bn.var.data_ptr<acc_t>();
  std::vector<math::BnAffine<acc_t>> out;
  out.reserve(c_end - c_begin);
  for (int64_t c = c_begin; c < c_end; ++c) out.push_back(math::bn_affine(w[c], b[c], m[c], v[c], acc_t(bn.eps)));
  return out;
}

// The affine of statistics only (weight 1, bias 0): x_hat = normalized(x).
template <typename acc_t>
std::vector<math::BnAffine<acc_t>> normalizers(const BnParams& st, int64_t c_begin, int64_t c_end) {
  const acc_t* m = st.mean.data_ptr<acc_t>();
  const acc_t* v = st.var.data_ptr<acc_t>();
  std::vector<math::BnAffine<acc_t>> out;
  out.reserve(c_end - c_begin);
  for (int64_t c = c_begin; c < c_end; ++c) out.push_back(math::bn_affine(acc_t(1), acc_t(0), m[c], v[c], acc_t(st.eps)));
  return out;
}

void channel_moments(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_channel_moments", [&] {
    using stat_t = at::opmath_type<scalar_t>;
    using sum_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    with_layout(channels_last, [&](auto layout) {
      constexpr bool kCL = decltype(layout)::value;
      const Plane<scalar_t, kCL> in(x);
      stat_t* mean_out = mean.data_ptr<stat_t>();
      stat_t* var_out = var.data_ptr<stat_t>();
      const sum_t count = static_cast<sum_t>(e.per_channel());
      parallel_over_channels(e, [&](int64_t c0, int64_t c1) {
        std::vector<sum_t> sum(c1 - c0, 0), squares(c1 - c0, 0);
        visit<kCL>(e, c0, c1, [&](int64_t c, int64_t n, int64_t s) { sum[c - c0] += static_cast<sum_t>(in(n, c, s)); });
        for (auto& v : sum) v /= count;  // now the mean; two passes for an accurate variance
        visit<kCL>(e, c0, c1, [&](int64_t c, int64_t n, int64_t s) {
          const sum_t d = static_cast<sum_t>(in(n, c, s)) - sum[c - c0];
          squares[c - c0] += d * d;
        });
        for (int64_t c = c0; c < c1; ++c) {
          mean_out[c] = static_cast<stat_t>(sum[c - c0]);
          var_out[c] = static_cast<stat_t>(squares[c - c0] / count);
        }
      });
    });
  });
}

void bn_relu_forward(const at::Tensor& x, const BnParams& bn, const at::Tensor& out, bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(channels_last, [&](auto layout) {
      constexpr bool kCL = decltype(layout)::value;
      const Plane<scalar_t, kCL> in(x), result(out);
      parallel_over_channels(e, [&](int64_t c0, int64_t c1) {
        const auto a = affines<acc_t>(bn, c0, c1);
        visit<kCL>(e, c0, c1, [&](int64_t c, int64_t n, int64_t s) {
          result(n, c, s) = static_cast<scalar_t>(math::bn_relu(static_cast<acc_t>(in(n, c, s)), a[c - c0]));
        });
      });
    });
  });
}

// The fused backward of one element: dy = dz masked by the ReLU; acc gets scale * dy (added
// to what it holds when kAccumulate). Returns dy; dy_xhat gets dy * x_hat.
template <bool kAccumulate, typename scalar_t, typename acc_t>
inline acc_t backward_element(scalar_t x, scalar_t dz, acc_t& acc, const math::BnAffine<acc_t>& a, acc_t& dy_xhat) {
  const acc_t xv = static_cast<acc_t>(x);
  const acc_t dy = math::relu_masked_grad(xv, static_cast<acc_t>(dz), a);
  dy_xhat = dy * math::normalized(xv, a);
  acc = (kAccumulate ? acc : acc_t(0)) + a.scale * dy;
  return dy;
}

// NCHW: one contiguous run of one channel. Independent lanes let the compiler vectorize
// the two reductions (a single running sum would be a serial chain); lane sums go to double.
template <bool kAccumulate, typename scalar_t, typename acc_t>
void backward_channel_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dz, acc_t* __restrict__ acc,
                          int64_t length, const math::BnAffine<acc_t>& a, double& sum_dy, double& sum_dy_xhat) {
  constexpr int64_t kLanes = 16;
  acc_t dy_lanes[kLanes] = {}, dy_xhat_lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      acc_t dy_xhat;
      dy_lanes[j] += backward_element<kAccumulate>(x[i + j], dz[i + j], acc[i + j], a, dy_xhat);
      dy_xhat_lanes[j] += dy_xhat;
    }
  }
  for (; i < length; ++i) {
    acc_t dy_xhat;
    dy_lanes[0] += backward_element<kAccumulate>(x[i], dz[i], acc[i], a, dy_xhat);
    dy_xhat_lanes[0] += dy_xhat;
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    sum_dy += static_cast<double>(dy_lanes[j]);
    sum_dy_xhat += static_cast<double>(dy_xhat_lanes[j]);
  }
}

// Channels-last: the channels [c0, c0 + length) of one pixel; every channel has its own sums.
template <bool kAccumulate, typename scalar_t, typename acc_t>
void backward_pixel_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dz, acc_t* __restrict__ acc,
                        int64_t length, const math::BnAffine<acc_t>* __restrict__ a, double* __restrict__ sum_dy,
                        double* __restrict__ sum_dy_xhat) {
  for (int64_t j = 0; j < length; ++j) {
    acc_t dy_xhat;
    sum_dy[j] += static_cast<double>(backward_element<kAccumulate>(x[j], dz[j], acc[j], a[j], dy_xhat));
    sum_dy_xhat[j] += static_cast<double>(dy_xhat);
  }
}

void bn_relu_backward(const at::Tensor& x, const at::Tensor& grad_out, const BnParams& bn,
                      const at::Tensor& accumulated, bool accumulate, const at::Tensor& sum_dy_xhat,
                      const at::Tensor& sum_dy, bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_relu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(channels_last, [&](auto layout) {
      constexpr bool kCL = decltype(layout)::value;
      with_flag(accumulate, [&](auto accumulate_flag) {
        constexpr bool kAccumulate = decltype(accumulate_flag)::value;
        const Plane<scalar_t, kCL> in(x), dz(grad_out);
        const Plane<acc_t, kCL> acc(accumulated);
        double* total_dy_xhat = sum_dy_xhat.data_ptr<double>();
        double* total_dy = sum_dy.data_ptr<double>();
        parallel_over_channels(e, [&](int64_t c0, int64_t c1) {
          const auto a = affines<acc_t>(bn, c0, c1);
          std::vector<double> partial_dy(c1 - c0, 0), partial_dy_xhat(c1 - c0, 0);
          if (kCL) {
            for (int64_t n = 0; n < e.batch; ++n)
              for (int64_t s = 0; s < e.spatial; ++s)
                backward_pixel_run<kAccumulate>(&in(n, c0, s), &dz(n, c0, s), &acc(n, c0, s), c1 - c0, a.data(),
                                                partial_dy.data(), partial_dy_xhat.data());
          } else {
            for (int64_t c = c0; c < c1; ++c)
              for (int64_t n = 0; n < e.batch; ++n)
                backward_channel_run<kAccumulate>(&in(n, c, 0), &dz(n, c, 0), &acc(n, c, 0), e.spatial, a[c - c0],
                                                  partial_dy[c - c0], partial_dy_xhat[c - c0]);
          }
          for (int64_t c = c0; c < c1; ++c) {
            total_dy_xhat[c] += partial_dy_xhat[c - c0];
            total_dy[c] += partial_dy[c - c0];
          }
        });
      });
    });
  });
}

void bn_input_grad(const at::Tensor& x, const BnParams& stats, const at::Tensor& accumulated, const at::Tensor& direct,
                   const at::Tensor& proj_mean, const at::Tensor& proj_xhat, const at::Tensor& out,
                   bool channels_last) {
  const Extent e(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_ops_bn_input_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_layout(channels_last, [&](auto layout) {
      constexpr bool kCL = decltype(layout)::value;
      const Plane<scalar_t, kCL> in(x), result(out);
      const Plane<acc_t, kCL> acc(accumulated);
      const bool has_direct = direct.defined();
      const Plane<scalar_t, kCL> dir(has_direct ? direct : out);
      const bool has_proj = proj_mean.defined();
      const acc_t* pm = has_proj ? proj_mean.data_ptr<acc_t>() : nullptr;
      const acc_t* px = has_proj ? proj_xhat.data_ptr<acc_t>() : nullptr;
      parallel_over_channels(e, [&](int64_t c0, int64_t c1) {
        if (!has_proj) {  // eval mode: statistics are constants
          visit<kCL>(e, c0, c1, [&](int64_t c, int64_t n, int64_t s) {
            const acc_t d = has_direct ? static_cast<acc_t>(dir(n, c, s)) : acc_t(0);
            result(n, c, s) = static_cast<scalar_t>(d + acc(n, c, s));
          });
          return;
        }
        const auto norm = normalizers<acc_t>(stats, c0, c1);
        visit<kCL>(e, c0, c1, [&](int64_t c, int64_t n, int64_t s) {
          const acc_t d = has_direct ? static_cast<acc_t>(dir(n, c, s)) : acc_t(0);
          const acc_t xhat = math::normalized(static_cast<acc_t>(in(n, c, s)), norm[c - c0]);
          result(n, c, s) = static_cast<scalar_t>(math::final_input_grad(d, acc(n, c, s), xhat, pm[c], px[c]));
        });
      });
    });
  });
}

const BnKernels& cpu_kernels() {
  static const BnKernels kernels{channel_moments, bn_relu_forward, bn_relu_backward, bn_input_grad};
  return kernels;
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CPU, m) {
  register_dense_block_ops<cpu_kernels>(m);
}

}  // namespace dense_ops

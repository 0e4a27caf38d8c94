// Registers the CPU condensed 1x1 convolution (cpu/condensed_conv_impl.h) for the CPU key, in the
// ISA build that this CPU runs (cpu/isa.h).
#include <torch/library.h>

#include "condensed_conv.h"
#include "cpu/isa.h"

namespace dense_ops {
namespace baseline {
at::Tensor condensed_conv(const condense::Call& call);
}
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
namespace avx2 {
at::Tensor condensed_conv(const condense::Call& call);
}
#endif

namespace {

at::Tensor condensed_conv_cpu(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& weight, int64_t groups,
                              const condense::OptionalTensor& out_scale, const condense::OptionalTensor& out_shift) {
  const condense::Call call = condense::prepare(input, index, scale, shift, weight, groups, out_scale, out_shift);
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
  if (use_avx2_kernels()) return avx2::condensed_conv(call);
#endif
  return baseline::condensed_conv(call);
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CPU, m) {
  m.impl("condensed_conv", &condensed_conv_cpu);
}

}  // namespace dense_ops

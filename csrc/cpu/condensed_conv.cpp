// Registers the CPU condensed 1x1 convolution (cpu/condensed_conv_impl.h) for the CPU key, in the
// ISA build that this CPU runs (cpu/isa.h).
#include <torch/library.h>

#include "condensed_conv.h"
#include "cpu/isa.h"

namespace dense_ops {
namespace baseline {
const condense::Kernels& condensed_kernels();
}
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
namespace avx2 {
const condense::Kernels& condensed_kernels();
}
#endif

namespace {

at::Tensor condensed_conv_cpu(const at::Tensor& input, const at::Tensor& index, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& weight, int64_t groups,
                              const condense::OptionalTensor& out_scale, const condense::OptionalTensor& out_shift) {
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
  const condense::Kernels& kernels = use_avx2_kernels() ? avx2::condensed_kernels() : baseline::condensed_kernels();
#else
  const condense::Kernels& kernels = baseline::condensed_kernels();
#endif
  return condense::run(kernels, input, index, scale, shift, weight, groups, out_scale, out_shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CPU, m) {
  m.impl("condensed_conv", &condensed_conv_cpu);
}

}  // namespace dense_ops

// Registers the CPU 3x3 grouped convolution: thin groups through the direct kernel
// (cpu/group_conv_impl.h) in the ISA build that this CPU runs (cpu/isa.h), wider ones and
// low-precision dtypes through at::convolution (group_conv.h).
#include <torch/library.h>

#include "cpu/isa.h"
#include "group_conv.h"

namespace dense_ops {
namespace baseline {
at::Tensor group_conv3x3(const at::Tensor& input, const at::Tensor& weight, int64_t groups);
}
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
namespace avx2 {
at::Tensor group_conv3x3(const at::Tensor& input, const at::Tensor& weight, int64_t groups);
}
#endif

namespace {

at::Tensor group_conv3x3_cpu(const at::Tensor& input, const at::Tensor& weight, int64_t groups) {
  group_conv::check_arguments(input, weight, groups);
  if (!group_conv::uses_direct_kernel(input.size(1) / groups, input.scalar_type())) {
    return group_conv::through_aten(input, weight, groups);
  }
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
  if (use_avx2_kernels()) return avx2::group_conv3x3(input, weight, groups);
#endif
  return baseline::group_conv3x3(input, weight, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CPU, m) {
  m.impl("group_conv3x3", &group_conv3x3_cpu);
}

}  // namespace dense_ops

// Registers the CPU batch-norm kernels of the dense block (cpu/bn_kernels_impl.h) for the CPU key,
// in the ISA build that this CPU runs (cpu/isa.h).
#include <torch/library.h>

#include "cpu/isa.h"
#include "dense_block.h"

namespace dense_ops {
namespace baseline {
const BnKernels& bn_kernels();
}
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
namespace avx2 {
const BnKernels& bn_kernels();
}
#endif

namespace {

const BnKernels& cpu_kernels() {
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
  if (use_avx2_kernels()) return avx2::bn_kernels();
#endif
  return baseline::bn_kernels();
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ops, CPU, m) {
  register_dense_block_ops<cpu_kernels>(m);
}

}  // namespace dense_ops

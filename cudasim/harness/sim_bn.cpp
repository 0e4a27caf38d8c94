#include "torch_first.h"
#include "cudasim/runtime.h"
#include "bn_kernels.cu.cc"  // gen/: csrc/cuda/bn_kernels.cu with its launches rewritten
#include "exports.h"

namespace dense_ops {
const BnKernels& sim_bn_kernels() { return cuda_kernels(); }
}  // namespace dense_ops

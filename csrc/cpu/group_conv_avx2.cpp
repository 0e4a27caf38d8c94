// The CPU grouped 3x3 conv kernel for AVX2+FMA (cpu/isa.h); empty where that build is not made.
#include "cpu/isa.h"
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
#define DENSE_OPS_BUILD_AVX2
#include "cpu/group_conv_impl.h"
#endif

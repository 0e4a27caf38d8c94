// The CPU batch-norm kernels for the baseline ISA (cpu/isa.h).
#include "cpu/bn_kernels_impl.h"

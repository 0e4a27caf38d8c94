// The CPU condensed-conv kernels for the baseline ISA (cpu/isa.h).
#include "cpu/condensed_conv_impl.h"

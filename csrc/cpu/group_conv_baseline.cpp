// The CPU grouped 3x3 conv kernel for the baseline ISA (cpu/isa.h).
#include "cpu/group_conv_impl.h"

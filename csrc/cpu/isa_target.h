// The ISA that this translation unit builds the CPU kernels for (cpu/isa.h): a cpu/*_avx2.cpp file
// defines DENSE_OPS_BUILD_AVX2 before it includes a kernel implementation header.
//
// The implementation header includes this after all its other headers and puts its code between
// DENSE_OPS_ISA_BEGIN and DENSE_OPS_ISA_END, in namespace dense_ops::DENSE_OPS_ISA. So only our own
// code is built for AVX2: a shared inline function from a header keeps its baseline code, and no
// AVX2 copy of it can reach code that runs on a CPU without AVX2. No include guard: one per TU.
#if defined(DENSE_OPS_BUILD_AVX2)
#define DENSE_OPS_ISA avx2
#define DENSE_OPS_ISA_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define DENSE_OPS_ISA_END _Pragma("GCC pop_options")
#else
#define DENSE_OPS_ISA baseline
#define DENSE_OPS_ISA_BEGIN
#define DENSE_OPS_ISA_END
#endif

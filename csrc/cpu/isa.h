// The CPU kernels are compiled twice: for the baseline ISA, and on x86-64 with GCC also for
// AVX2+FMA, which torch's own kernels use on nearly every x86 CPU since 2013 (the baseline, SSE2,
// has no FMA and half the vector width; a training step of issue 2's block ran 10-15% faster with
// AVX2 on the 2-core AMD EPYC of the README's results). At load time
// the registration picks the build that torch's CPU capability allows (ATEN_CPU_CAPABILITY=default
// lowers both torch's kernels and ours).
//
// A kernel file does this by including its implementation header twice, once per ISA
// (cpu/<name>_baseline.cpp and cpu/<name>_avx2.cpp, see cpu/isa_target.h).
#pragma once

#include <ATen/Version.h>

#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DENSE_OPS_HAVE_AVX2_KERNELS 1
#endif

namespace dense_ops {

// The ISA the CPU kernels run with: "avx2" where built and torch's capability is AVX2 or above.
inline const char* cpu_kernel_isa() {
#ifdef DENSE_OPS_HAVE_AVX2_KERNELS
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX2" || capability == "AVX512") return "avx2";
#endif
  return "baseline";
}

inline bool use_avx2_kernels() {
  static const bool avx2 = std::string(cpu_kernel_isa()) == "avx2";
  return avx2;
}

}  // namespace dense_ops

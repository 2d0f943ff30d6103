/* run_avx2.c: run.c's kernels for x86-64-v3, AVX2 and FMA (Intel Haswell and later, AMD Zen 1 to 3), one of the
   tables of the dispatching build (see run_isa.h). */
#if defined(__x86_64__)
#pragma GCC target("arch=x86-64-v3")
#include "run_isa.h"
#if !defined(__AVX2__) || !defined(__FMA__)
#error "this compiler's #pragma GCC target does not define __AVX2__: build run.c alone (make runnative)"
#endif
const Kernels kernels_avx2 = THESE_KERNELS;
#endif

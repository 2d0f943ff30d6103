/* run_avx512.c: run.c's kernels for x86-64-v4 with AVX-512 VNNI (Intel Ice Lake and later, AMD Zen 4 and later),
   one of the tables of the dispatching build (see run_isa.h). */
#if defined(__x86_64__)
#pragma GCC target("arch=x86-64-v4,avx512vnni")
#include "run_isa.h"
#if !defined(HAVE_AVX512_VNNI)
#error "this compiler's #pragma GCC target does not define __AVX512VNNI__: build run.c alone (make runnative)"
#endif
const Kernels kernels_avx512 = THESE_KERNELS;
#endif

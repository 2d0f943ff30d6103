/* run_avxvnni.c: run.c's kernels for x86-64-v3 with AVX-VNNI (Intel Alder Lake and later without AVX-512, AMD Zen
   5), one of the tables of the dispatching build (see run_isa.h): the AVX2 kernels, their int8 products in 256-bit
   vpdpbusd. */
#if defined(__x86_64__)
#pragma GCC target("arch=x86-64-v3,avxvnni")
#include "run_isa.h"
#if !defined(__AVXVNNI__)
#error "this compiler's #pragma GCC target does not define __AVXVNNI__: build run.c alone (make runnative)"
#endif
const Kernels kernels_avxvnni = THESE_KERNELS;
#endif

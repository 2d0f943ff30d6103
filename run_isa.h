/* run_isa.h: the kernels of run_kernels.h and run_attention.h as one table per instruction set.

   The kernels pick their SIMD code with the preprocessor (#if defined(__AVX512F__) ...), so one compile makes one
   set. `make run` on x86-64 compiles them four times into one binary: run.c for baseline x86-64 (the portable
   kernels: SSE2 vectors), run_avx2.c for x86-64-v3 (AVX2, FMA), run_avxvnni.c for x86-64-v3 with AVX-VNNI and
   run_avx512.c for x86-64-v4 with AVX-512 VNNI, each under its own `#pragma GCC target` (which defines __AVX2__
   etc. as -march would), each a table of its kernels. run.c picks a table when it loads a model (kernels_select:
   the best this CPU runs, or ARIANNA_ISA's) and calls the kernels through it; a build without -DARIANNA_DISPATCH
   has one table, its own. */
#ifndef RUN_ISA_H
#define RUN_ISA_H
#include "run_kernels.h"
#include "run_attention.h"

typedef struct {
    const char *name;   /* what ARIANNA_ISA calls it: avx512, avxvnni, avx2, scalar (or what -march made of one build) */
    int packed_q8_bias; /* the int8 kernels read weights repacked by pack_q8 with this bias; -1: the plain layout */
    void (*matmul_rows_f32)(float *out, const Matrix *m, const float *x, int n_tok, int r0, int r1);
    void (*matmul_rows_q8)(float *out, const Matrix *m, const QuantizedRows *x, int n_tok, int gs, int r0, int r1);
    void (*quantize_row)(int8_t *q, float *s, int32_t *start, const float *x, int n, int gs);
    void (*rmsnorm)(float *out, const float *x, const float *weight, int n, float eps);
    void (*rope_range)(const float *rope_cos, const float *rope_sin, float *v, int n_tok, int width, int head, int pos,
                       int r0, int r1);
    void (*swiglu)(float *h, const float *gate, int n);
    void (*attention_tile)(float *out, const float *q, int qstride, const float *kt, const float *vc, int kv_dim,
                           int head, int end0, int n, float *att, int seq_len);
    void (*cache_keys)(float *cache, int kv_dim, const float *k, int n_tok, int pos, int c0, int c1);
} Kernels;

/* The name of what this compile's kernels use. */
#if defined(HAVE_AVX512_VNNI)
#define KERNELS_NAME "avx512"
#elif defined(__AVX512F__)
#define KERNELS_NAME "avx512f"
#elif defined(__AVX2__) && defined(__AVXVNNI__)
#define KERNELS_NAME "avxvnni"
#elif defined(__AVX2__)
#define KERNELS_NAME "avx2"
#elif defined(__ARM_NEON)
#define KERNELS_NAME "neon"
#else
#define KERNELS_NAME "scalar"
#endif

#ifdef PACKED_Q8_BIAS
#define KERNELS_PACKED_Q8_BIAS PACKED_Q8_BIAS
#else
#define KERNELS_PACKED_Q8_BIAS (-1)
#endif

/* This compile's table. */
#define THESE_KERNELS                                                                                                  \
    {KERNELS_NAME, KERNELS_PACKED_Q8_BIAS, matmul_rows_f32, matmul_rows_q8, quantize_row, rmsnorm, rope_range, swiglu, \
     attention_tile, cache_keys}
#endif

/* run_kernels.h: the matrix products and element-wise kernels of run.c's forward pass.

   Each kernel has a SIMD path chosen at compile time by what -march allows (AVX-512, AVX-512 VNNI, AVX2 with or
   without AVX-VNNI, NEON on aarch64 with or without the dot-product extension, or the compiler's own vectors) and a
   portable twin; the tests build run.c both ways and compare each with PyTorch (the aarch64 builds under qemu:
   tests/test_neon.py). Part of run.c's single compile unit (run.c includes it), so everything here is static. */
#ifndef RUN_KERNELS_H
#define RUN_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define HAVE_NEON 1 /* A64's NEON: every aarch64 CPU has it (across-lane sums, fma, division) */
#endif
/* The int8 kernels on repacked weights (pack_q8): AVX-512 VNNI, else AVX2 (with AVX-VNNI's 256-bit vpdpbusd where
   the CPU has it); without either, a plain loop. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_AVX512_VNNI 1
#define PACKED_Q8_BIAS 128 /* vpdpbusd's first operand is unsigned */
#elif defined(__AVX2__)
#define HAVE_AVX2_INT8 1
#if defined(__AVXVNNI__)
#define PACKED_Q8_BIAS 128 /* as AVX-512 VNNI's */
#else
#define PACKED_Q8_BIAS 0
#endif
#elif defined(HAVE_NEON)
#define HAVE_NEON_INT8 1
#define PACKED_Q8_BIAS 0 /* sdot (and smull) multiply signed by signed bytes */
#endif

static inline int clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }
static inline int min_int(int a, int b) { return a < b ? a : b; }

/* One weight matrix [rows, cols]: fp32 (f) or Q8_0 (q with scales s, one per group_size values). With AVX-512
   VNNI, AVX2 or NEON, Q8_0 matrices the kernels read are also repacked at load (see pack_q8): packed
   [rows/16][cols/4][16][4] bytes, packed_scales [rows/16][cols/group_size][16]. */
typedef struct {
    const float *f;
    const int8_t *q;
    const float *s;
    const uint8_t *packed;
    const float *packed_scales;
    int rows, cols;
} Matrix;

/* GCC/Clang vector extensions: the compiler maps these to AVX-512, AVX2 or SSE, whatever -march allows. */
#if defined(__AVX512F__)
#define VLEN 16
#elif defined(__AVX__)
#define VLEN 8
#else
#define VLEN 4
#endif
typedef float vfloat __attribute__((vector_size(VLEN * 4)));
typedef float vfloat_unaligned __attribute__((vector_size(VLEN * 4), aligned(4), may_alias));
#define LOADV(p) (*(const vfloat_unaligned *)(p))

typedef float vfloat4 __attribute__((vector_size(16)));

/* Sum of the lanes by halving (a few shuffles) rather than lane by lane. */
static inline float hsum(vfloat v) {
#if VLEN == 16
    typedef float vfloat8 __attribute__((vector_size(32)));
    vfloat8 lo8, hi8;
    memcpy(&lo8, &v, 32), memcpy(&hi8, (char *)&v + 32, 32);
    lo8 += hi8;
#elif VLEN == 8
    vfloat lo8 = v;
#endif
#if VLEN >= 8
    vfloat4 lo, hi;
    memcpy(&lo, &lo8, 16), memcpy(&hi, (char *)&lo8 + 16, 16);
    lo += hi;
#else
    vfloat4 lo = v;
#endif
    return (lo[0] + lo[2]) + (lo[1] + lo[3]);
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* exp(x) = 2^n exp(r), r = x - n ln 2 (ln 2 in two parts), exp(r) ~ 1 + r + r^2 p(r): Cephes' expf, to about 1 ulp. */
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
static const float exp_poly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
#endif

#if defined(__AVX512F__)
/* The first min(count, 16) lanes (none for count <= 0): the whole vector, or the tail of a loop over 16 at a time. */
static inline __mmask16 first_lanes(int count) {
    return count >= 16 ? 0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1);
}

/* Lane j of the result is the sum of the lanes of v[j]: 16 horizontal sums in 45 shuffles and adds. */
static inline __m512 hsum16(const __m512 v[16]) {
    __m512 a[8], b[4];
    for (int j = 0; j < 8; j++)
        a[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++)
        b[j] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

/* exp(x) for x <= 0 (exp_poly above), 2^n applied by scalef. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x));
    __m512 p = _mm512_set1_ps(exp_poly[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly[i]));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(HAVE_NEON)
/* exp(x) for x <= 0, exp_nonpositive's polynomial on 4 lanes; 2^n (n >= -126 after the clamp) is built in the
   exponent bits. */
static inline float32x4_t exp_nonpositive_neon(float32x4_t x) {
    x = vmaxq_f32(x, vdupq_n_f32(-87.0f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), vmulq_f32(p, r), r);
    const int32x4_t two_n = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(two_n));
}
#endif

/* out[c*ostride + r] = dot(w row r, x row c) for R rows of w and C rows of x: R*C accumulators in registers,
   so each loaded weight vector is used C times. R and C are constants once inlined. */
#if defined(__AVX512F__)
/* AVX-512 spelled out: GCC reloads vector-extension operands from memory instead of keeping them in registers. */
static inline __attribute__((always_inline)) void tile_f32(float *out, int ostride, const float *w, const float *x,
                                                           int xstride, int n, int R, int C) {
    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 16) {
        const __mmask16 mask = first_lanes(n - k);
        __m512 xv[4];
        for (int c = 0; c < C; c++) xv[c] = _mm512_maskz_loadu_ps(mask, x + (size_t)c * xstride + k);
        for (int r = 0; r < R; r++) {
            const __m512 wv = _mm512_maskz_loadu_ps(mask, w + (size_t)r * n + k);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(wv, xv[c], acc[r][c]);
        }
    }
    if (R == 4 && C == 4) { /* the 16 sums in one go: lanes 4c..4c+3 are token c's 4 rows */
        __m512 all[16];
        for (int c = 0; c < 4; c++)
            for (int r = 0; r < 4; r++) all[4 * c + r] = acc[r][c];
        const __m512 sums = hsum16(all);
        _mm_storeu_ps(out, _mm512_extractf32x4_ps(sums, 0));
        _mm_storeu_ps(out + (size_t)ostride, _mm512_extractf32x4_ps(sums, 1));
        _mm_storeu_ps(out + (size_t)2 * ostride, _mm512_extractf32x4_ps(sums, 2));
        _mm_storeu_ps(out + (size_t)3 * ostride, _mm512_extractf32x4_ps(sums, 3));
        return;
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[(size_t)c * ostride + r] = _mm512_reduce_add_ps(acc[r][c]);
}
#define TILE_TOKENS 4
#elif defined(__AVX2__) && defined(__FMA__)
/* The first count lanes (count <= 8) for maskload: lane i is set where i < count. */
static inline __m256i first_lanes8(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The sums of the lanes of a, b, c, d as one vector, each in the same order (pairs, then pairs of pairs, then
   the two halves) whichever of the four it is, so a row's result does not depend on the tile it is in. */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* exp_nonpositive in 8 lanes: the same polynomial, 2^n put into the exponent bits (n >= -126, so it is a normal
   float and the product rounds as scalef's does). */
static inline __m256 exp_nonpositive8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x));
    __m256 p = _mm256_set1_ps(exp_poly[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_poly[i]));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* AVX2 has 16 vector registers: 4 rows by 3 tokens take 12 accumulators, the 3 tokens' inputs and one weight
   vector, so each weight load feeds 3 multiply-adds and each input load 4 (4 by 4 spills). */
static inline __attribute__((always_inline)) void tile_f32(float *out, int ostride, const float *w, const float *x,
                                                           int xstride, int n, int R, int C) {
    __m256 acc[4][3];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 xv[3];
        /* Each vector loaded once into a register: GCC's tuning for Zen otherwise folds a load into every
           multiply-add (15-16 loads for 12 multiply-adds instead of 7), which the load ports cannot keep up with. */
        for (int c = 0; c < C; c++) {
            xv[c] = _mm256_loadu_ps(x + (size_t)c * xstride + k);
            __asm__("" : "+x"(xv[c]));
        }
        for (int r = 0; r < R; r++) {
            __m256 wv = _mm256_loadu_ps(w + (size_t)r * n + k);
            __asm__("" : "+x"(wv));
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
        }
    }
    if (k < n) { /* the tail in the same lanes, the rest loaded as zeros */
        const __m256i mask = first_lanes8(n - k);
        for (int r = 0; r < R; r++) {
            const __m256 wv = _mm256_maskload_ps(w + (size_t)r * n + k, mask);
            for (int c = 0; c < C; c++)
                acc[r][c] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + (size_t)c * xstride + k, mask), acc[r][c]);
        }
    }
    for (int c = 0; c < C; c++) {
        if (R == 4) {
            _mm_storeu_ps(out + (size_t)c * ostride, hsum4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
            continue;
        }
        for (int r = 0; r < R; r++)
            out[(size_t)c * ostride + r] = _mm_cvtss_f32(hsum4(acc[r][c], acc[r][c], acc[r][c], acc[r][c]));
    }
}
#define TILE_TOKENS 3
#else
static inline __attribute__((always_inline)) void tile_f32(float *out, int ostride, const float *w, const float *x,
                                                           int xstride, int n, int R, int C) {
    vfloat acc[8][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = (vfloat){0};
    int k = 0;
    for (; k + VLEN <= n; k += VLEN) {
        vfloat xv[4];
        for (int c = 0; c < C; c++) xv[c] = LOADV(x + (size_t)c * xstride + k);
        for (int r = 0; r < R; r++) {
            vfloat wv = LOADV(w + (size_t)r * n + k);
            for (int c = 0; c < C; c++) acc[r][c] += wv * xv[c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = hsum(acc[r][c]);
            for (int kk = k; kk < n; kk++) s += w[(size_t)r * n + kk] * x[(size_t)c * xstride + kk];
            out[(size_t)c * ostride + r] = s;
        }
}
#define TILE_TOKENS 4
#endif

/* dot(w, x) over n floats, for the mat-vec of a single token. Its caller walks the rows one after the other:
   the hardware prefetchers follow one stream per core far better than several interleaved rows, which
   matters once a matrix streams from memory. x stays in L1. */
static inline float dot_f32(const float *w, const float *x, int n) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    for (; k < n; k += 16) {
        const __mmask16 mask = first_lanes(n - k);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w + k), _mm512_maskz_loadu_ps(mask, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    /* Four chains: one would wait out the multiply-add's latency on every vector of the row. */
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int k = 0;
    for (; k + 32 <= n; k += 32)
        for (int j = 0; j < 4; j++) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8 * j), _mm256_loadu_ps(x + k + 8 * j), a[j]);
    for (; k + 8 <= n; k += 8) a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a[0]);
    if (k < n) {
        const __m256i mask = first_lanes8(n - k);
        a[1] = _mm256_fmadd_ps(_mm256_maskload_ps(w + k, mask), _mm256_maskload_ps(x + k, mask), a[1]);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    return _mm_cvtss_f32(hsum4(sum, sum, sum, sum));
#elif defined(HAVE_NEON)
    /* 8 chains against fmla's latency (3-4 cycles) on 2-4 pipes; the compiler's vectors made one chain here. */
    float32x4_t a[8];
    for (int j = 0; j < 8; j++) a[j] = vdupq_n_f32(0.0f);
    int k = 0;
    for (; k + 32 <= n; k += 32)
        for (int j = 0; j < 8; j++) a[j] = vfmaq_f32(a[j], vld1q_f32(w + k + 4 * j), vld1q_f32(x + k + 4 * j));
    for (; k + 4 <= n; k += 4) a[0] = vfmaq_f32(a[0], vld1q_f32(w + k), vld1q_f32(x + k));
    float sum = vaddvq_f32(vaddq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])),
                                     vaddq_f32(vaddq_f32(a[4], a[5]), vaddq_f32(a[6], a[7]))));
    for (; k < n; k++) sum += w[k] * x[k];
    return sum;
#else
    float dot;
    tile_f32(&dot, 1, w, x, 0, n, 1, 1);
    return dot;
#endif
}

/* Rows [r0, r1) of out[t][r] = W[r] . x[t] for t < n_tok, fp32 weights. */
static void matmul_rows_f32(float *out, const Matrix *m, const float *x, int n_tok, int r0, int r1) {
    const int n = m->cols;
    if (n_tok == 1) { /* one row after the other: a single sequential stream keeps the prefetchers at full speed */
        for (int r = r0; r < r1; r++) out[r] = dot_f32(m->f + (size_t)r * n, x, n);
        return;
    }
    for (int r = r0; r < r1; r += 4) {
        const int R = r1 - r;
        const float *w = m->f + (size_t)r * n;
        int t = 0;
        if (R >= 4) {
            for (; t + TILE_TOKENS <= n_tok; t += TILE_TOKENS)
                tile_f32(out + (size_t)t * m->rows + r, m->rows, w, x + (size_t)t * n, n, n, 4, TILE_TOKENS);
            for (; t < n_tok; t++) tile_f32(out + (size_t)t * m->rows + r, m->rows, w, x + (size_t)t * n, n, n, 4, 1);
        } else {
            for (int rr = 0; rr < R; rr++)
                for (int tt = 0; tt < n_tok; tt++)
                    tile_f32(out + (size_t)tt * m->rows + r + rr, m->rows, w + (size_t)rr * n, x + (size_t)tt * n, n, n, 1, 1);
        }
    }
}

/* Activations quantized to Q8_0 like the weights, so each group's dot product is exact in int32. */
typedef struct {
    int8_t *q;          /* [MAX_BATCH][cols] */
    float *s;           /* [MAX_BATCH][cols / group_size] */
    int32_t *start;     /* [MAX_BATCH][cols / group_size]: -128 * sum of the group's q (packed kernel only) */
} QuantizedRows;

#if defined(__AVX2__) && !defined(__AVX512F__)
/* The largest of a's 8 lanes (vmaxps keeps its second operand where the first is NaN). */
static inline float hmax8(__m256 a) {
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}
#endif

/* x [n] to Q8_0: q [n], scales s [n / gs], and per group -128 * (sum of its q), where the packed int8 kernel
   starts each group's sum (see pack_q8). */
static void quantize_row(int8_t *q, float *s, int32_t *start, const float *x, int n, int gs) {
#if defined(__AVX512F__)
    if (gs % 16 == 0) { /* the same arithmetic as below, 16 lanes at a time (cvtps rounds half to even, as lrintf) */
        for (int g = 0; g < n / gs; g++) {
            const float *xg = x + (size_t)g * gs;
            __m512 amax = _mm512_setzero_ps();
            for (int j = 0; j < gs; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xg + j)));
            const float scale = _mm512_reduce_max_ps(amax) / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            s[g] = scale;
            const __m512 vinv = _mm512_set1_ps(inv);
            __m512i sum = _mm512_setzero_si512();
            for (int j = 0; j < gs; j += 16) {
                const __m128i q16 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + j), vinv)));
                _mm_storeu_si128((__m128i *)(q + (size_t)g * gs + j), q16);
                sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(q16)); /* the stored bytes (NaN makes 0, not INT_MIN) */
            }
            start[g] = -128 * _mm512_reduce_add_epi32(sum);
        }
        return;
    }
#elif defined(__AVX2__)
    if (gs % 8 == 0) { /* the same arithmetic as below, 8 lanes at a time: vmaxps returns its second operand where
                          the first is NaN (so NaN is skipped, as fmaxf skips it), cvtps rounds half to even as
                          lrintf, and the byte stored is the low byte of each int32, as the cast keeps it (NaN
                          converts to 0x80000000 both ways, so it stores 0) */
        const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        const __m128i low_byte = _mm_set1_epi32(0xFF);
        for (int g = 0; g < n / gs; g++) {
            const float *xg = x + (size_t)g * gs;
            __m256 amax = _mm256_setzero_ps();
            for (int j = 0; j < gs; j += 8) amax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xg + j), magnitude), amax);
            const float scale = hmax8(amax) / 127.0f;
            const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            s[g] = scale;
            const __m256 vinv = _mm256_set1_ps(inv);
            __m256i sum = _mm256_setzero_si256();
            for (int j = 0; j < gs; j += 8) {
                const __m256i q32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + j), vinv));
                const __m128i q16 = _mm_packus_epi32(_mm_and_si128(_mm256_castsi256_si128(q32), low_byte),
                                                     _mm_and_si128(_mm256_extracti128_si256(q32, 1), low_byte));
                const __m128i q8 = _mm_packus_epi16(q16, q16);
                _mm_storel_epi64((__m128i *)(q + (size_t)g * gs + j), q8);
                sum = _mm256_add_epi32(sum, _mm256_cvtepi8_epi32(q8));
            }
            const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            start[g] = -128 * _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
        }
        return;
    }
#elif defined(HAVE_NEON)
    if (gs % 8 == 0) { /* the same arithmetic as below, 8 values at a time (vcvtnq rounds half to even, as lrintf;
                          vmaxnm skips NaN, as fmaxf) */
        for (int g = 0; g < n / gs; g++) {
            const float *xg = x + (size_t)g * gs;
            float32x4_t amax = vdupq_n_f32(0.0f);
            for (int j = 0; j < gs; j += 4) amax = vmaxnmq_f32(amax, vabsq_f32(vld1q_f32(xg + j)));
            const float scale = vmaxnmvq_f32(amax) / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            s[g] = scale;
            int32x4_t sum = vdupq_n_s32(0);
            for (int j = 0; j < gs; j += 8) {
                const int32x4_t lo = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xg + j), inv));
                const int32x4_t hi = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xg + j + 4), inv));
                const int8x8_t q8 = vqmovn_s16(vcombine_s16(vqmovn_s32(lo), vqmovn_s32(hi)));
                vst1_s8(q + (size_t)g * gs + j, q8);
                sum = vpadalq_s16(sum, vmovl_s8(q8));
            }
            start[g] = -128 * vaddvq_s32(sum);
        }
        return;
    }
#endif
    for (int g = 0; g < n / gs; g++) {
        float amax = 0.0f;
        for (int j = 0; j < gs; j++) amax = fmaxf(amax, fabsf(x[g * gs + j]));
        const float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        s[g] = scale;
        int32_t sum = 0;
        for (int j = 0; j < gs; j++) sum += q[g * gs + j] = (int8_t)lrintf(x[g * gs + j] * inv);
        start[g] = -128 * sum;
    }
}

#ifdef PACKED_Q8_BIAS
static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Bit i set for the lanes (rows 16 b + i) of block b that fall in [r0, r1). */
static inline unsigned lanes_in_range(int b, int r0, int r1) {
    const int lo = r0 - 16 * b, hi = r1 - 16 * b;
    return (hi >= 16 ? 0xFFFFu : (1u << (hi > 0 ? hi : 0)) - 1) & (lo <= 0 ? 0xFFFFu : ~((1u << lo) - 1));
}
#endif

#ifdef HAVE_AVX512_VNNI

/* acc + the 4-byte dot products of w (unsigned) and x (signed), lane by lane. Spelled in asm because GCC 12
   copies every accumulator of _mm512_dpbusd_epi32 to a new register and spills the inputs. */
static inline __m512i dpbusd(__m512i acc, __m512i w, __m512i x) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
}

/* NB blocks of 16 rows (one row per lane) from block b0, times T tokens from t0, on packed weights (see
   pack_q8). Per group: gs/4 vpdpbusd of 4 weight columns by 4 broadcast input bytes, exact in int32, plus the
   group's start value, then one multiply-add by the rows' scales times the token's scale. NB * T independent
   sums hide the latency of vpdpbusd; each weight load serves T tokens. */
static inline __attribute__((always_inline)) void blocks_q8(float *out, int ostride, const Matrix *m, int b0,
                                                           const __mmask16 *keep, const QuantizedRows *x, int t0,
                                                           int gs, int NB, int T) {
    const int cols = m->cols, groups = cols / gs, quads = gs / 4;
    __m512 acc[4][4];
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < T; t++) acc[b][t] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i dot[4][4];
        for (int b = 0; b < NB; b++)
            for (int t = 0; t < T; t++) dot[b][t] = _mm512_setzero_si512();
        for (int k = g * quads; k < (g + 1) * quads; k++) {
            __m512i xv[4];
            for (int t = 0; t < T; t++) xv[t] = _mm512_set1_epi32(load_i32(x->q + (size_t)(t0 + t) * cols + 4 * k));
            for (int b = 0; b < NB; b++) {
                const __m512i wv = _mm512_load_si512(m->packed + ((size_t)(b0 + b) * (cols / 4) + k) * 64);
                for (int t = 0; t < T; t++) dot[b][t] = dpbusd(dot[b][t], wv, xv[t]);
            }
        }
        for (int b = 0; b < NB; b++) {
            const __m512 ws = _mm512_load_ps(m->packed_scales + ((size_t)(b0 + b) * groups + g) * 16);
            for (int t = 0; t < T; t++) {
                const size_t tg = (size_t)(t0 + t) * groups + g;
                const __m512i sum = _mm512_add_epi32(dot[b][t], _mm512_set1_epi32(x->start[tg]));
                acc[b][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(ws, _mm512_set1_ps(x->s[tg])), acc[b][t]);
            }
        }
    }
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(out + (size_t)(t0 + t) * ostride + (b0 + b) * 16, keep[b], acc[b][t]);
}

/* blocks_q8 for one block and one token (generation): the block's bytes are read in order, so the whole
   matrix is one sequential stream (from memory the prefetchers keep up with one stream per core far better
   than with several), and each group's sum is split over four chains to hide vpdpbusd's latency instead.
   Integer sums are exact, so the result is bit for bit blocks_q8's. */
static inline void block_q8_token(float *out, const Matrix *m, int b, __mmask16 keep, const QuantizedRows *x, int gs) {
    const int cols = m->cols, groups = cols / gs, quads = gs / 4;
    const uint8_t *w = m->packed + (size_t)b * (cols / 4) * 64;
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i dot[4] = {_mm512_set1_epi32(x->start[g]), _mm512_setzero_si512(), _mm512_setzero_si512(),
                          _mm512_setzero_si512()};
        const int end = (g + 1) * quads;
        int k = g * quads;
        for (; k + 4 <= end; k += 4)
            for (int j = 0; j < 4; j++)
                dot[j] = dpbusd(dot[j], _mm512_load_si512(w + (size_t)(k + j) * 64),
                                _mm512_set1_epi32(load_i32(x->q + 4 * (k + j))));
        for (; k < end; k++)
            dot[0] = dpbusd(dot[0], _mm512_load_si512(w + (size_t)k * 64), _mm512_set1_epi32(load_i32(x->q + 4 * k)));
        const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(dot[0], dot[1]), _mm512_add_epi32(dot[2], dot[3]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum),
                              _mm512_mul_ps(_mm512_load_ps(m->packed_scales + ((size_t)b * groups + g) * 16), _mm512_set1_ps(x->s[g])),
                              acc);
    }
    _mm512_mask_storeu_ps(out + b * 16, keep, acc);
}

/* Rows [r0, r1) on packed weights: the blocks that overlap the range, storing only the range's rows. In a batch
   each pair of blocks is read from L3 once and then from L1 by every 4 tokens; prefetching the next pair (past
   the range too: a batch's next work item) a slice per 4 tokens hides that first read. */
static void matmul_packed_q8(float *out, const Matrix *m, const QuantizedRows *x, int n_tok, int gs, int r0, int r1) {
    const int NB = 2, b_end = (r1 + 15) / 16;
    const size_t block_bytes = (size_t)(m->cols / 4) * 64;
    const uint8_t *matrix_end = m->packed + (size_t)((m->rows + 15) / 16) * block_bytes;
    const size_t slice = ((size_t)NB * block_bytes / ((n_tok + 3) / 4) + 63) / 64 * 64; /* next pair's bytes per 4 tokens */
    for (int b = r0 / 16; b < b_end; b += NB) {
        const int nb = min_int(b_end - b, NB);
        __mmask16 keep[4];
        for (int i = 0; i < nb; i++) keep[i] = (__mmask16)lanes_in_range(b + i, r0, r1);
        int t = 0;
        if (n_tok == 1)
            for (int i = 0; i < nb; i++) block_q8_token(out, m, b + i, keep[i], x, gs);
        else if (nb == NB) {
            const uint8_t *next = m->packed + (b + NB) * block_bytes;
            for (; t + 4 <= n_tok; t += 4) {
                for (const uint8_t *end = next + slice; next < end && next < matrix_end; next += 64) __builtin_prefetch(next);
                blocks_q8(out, m->rows, m, b, keep, x, t, gs, 2, 4);
            }
            if (n_tok - t == 3) blocks_q8(out, m->rows, m, b, keep, x, t, gs, 2, 3);
            else if (n_tok - t == 2) blocks_q8(out, m->rows, m, b, keep, x, t, gs, 2, 2);
            else if (n_tok - t == 1) blocks_q8(out, m->rows, m, b, keep, x, t, gs, 2, 1);
        } else
            for (int i = 0; i < nb; i++) {
                for (t = 0; t + 4 <= n_tok; t += 4) blocks_q8(out, m->rows, m, b + i, keep + i, x, t, gs, 1, 4);
                for (; t < n_tok; t++) blocks_q8(out, m->rows, m, b + i, keep + i, x, t, gs, 1, 1);
            }
    }
}
#elif defined(HAVE_AVX2_INT8)
#if defined(__AVXVNNI__)
/* {vex}: AVX-VNNI's encoding, which CPUs without AVX-512 run. A build with -DARIANNA_EVEX_VNNI has AVX-512 VNNI's
   encoding of the same instruction instead: the tests check this path with it on CPUs that have only that. */
#ifdef ARIANNA_EVEX_VNNI
#define VPDPBUSD_YMM "vpdpbusd"
#else
#define VPDPBUSD_YMM "%{vex%} vpdpbusd"
#endif
/* acc + the 4-byte dot products of w (unsigned: packed with a bias of 128) and x (signed), lane by lane: AVX-VNNI's
   vpdpbusd, one instruction where AVX2 takes four (xabs is unused, and GCC drops what computed it). In asm for
   the reason dpbusd above gives. */
static inline __m256i madd_q8(__m256i acc, __m256i w, __m256i x, __m256i xabs) {
    (void)xabs;
    __asm__(VPDPBUSD_YMM " %[x], %[w], %[acc]" : [acc] "+x"(acc) : [w] "x"(w), [x] "x"(x));
    return acc;
}
#else
/* acc + the 4-product int32 sums of w's bytes times x's (xabs = |x|), lane by lane. vpmaddubsw multiplies unsigned
   by signed bytes into 16-bit sums of pairs: |x| times the weights given x's sign keeps those within 2 * 127 * 128,
   so they cannot saturate, and vpmaddwd by ones adds the pairs into the 4-product int32 lanes that vpdpbusd makes.
   In asm: with the intrinsics GCC 12 copies every accumulator to a new register after each add, and spills some of
   8. */
static inline __m256i madd_q8(__m256i acc, __m256i w, __m256i x, __m256i xabs) {
    __m256i t;
    __asm__("vpsignb %[x], %[w], %[t]\n\t"
            "vpmaddubsw %[t], %[xabs], %[t]\n\t"
            "vpmaddwd %[ones], %[t], %[t]\n\t"
            "vpaddd %[t], %[acc], %[acc]"
            : [acc] "+x"(acc), [t] "=&x"(t)
            : [w] "x"(w), [x] "x"(x), [xabs] "x"(xabs), [ones] "x"(_mm256_set1_epi16(1)));
    return acc;
}
#endif

/* NB blocks of 16 rows from b0 (each two halves of 8 lanes) times T tokens from t0, for CPUs with AVX2 but not
   AVX-512: per group, as blocks_q8 does, exact integer sums (madd_q8), started at the group's start value where the
   weights are biased, then one multiply-add by the rows' scales times the token's scale. |x| is taken once per
   token and 4 columns for all NB blocks (vpabsb takes the pipes that vpsignb needs, one of them shared with the
   multiplies). */
static inline __attribute__((always_inline)) void blocks_q8_avx2(float *out, int ostride, const Matrix *m, int b0,
                                                                const unsigned *keep, const QuantizedRows *x, int t0,
                                                                int gs, int NB, int T) {
    const int cols = m->cols, groups = cols / gs, quads = gs / 4;
    const size_t block_bytes = (size_t)(cols / 4) * 64;
    const uint8_t *w = m->packed + (size_t)b0 * block_bytes;
    __m256 acc[2][2][2]; /* [block][half][token] */
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < T; t++) acc[b][0][t] = acc[b][1][t] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i dot[2][2][2];
        for (int b = 0; b < NB; b++)
            for (int t = 0; t < T; t++)
                dot[b][0][t] = dot[b][1][t] = _mm256_set1_epi32(PACKED_Q8_BIAS ? x->start[(size_t)(t0 + t) * groups + g] : 0);
        for (int k = g * quads; k < (g + 1) * quads; k++) {
            /* One token: a dozen instructions per 64 bytes leave few loads in flight and the hardware prefetcher
               behind a stream from memory; asking 4 KB ahead keeps the weights coming. */
            if (T == 1 && NB == 1) _mm_prefetch((const char *)(w + (size_t)k * 64) + 4096, _MM_HINT_T0);
            for (int t = 0; t < T; t++) {
                const __m256i xv = _mm256_set1_epi32(load_i32(x->q + (size_t)(t0 + t) * cols + 4 * k));
                const __m256i xabs = _mm256_abs_epi8(xv);
                for (int b = 0; b < NB; b++)
                    for (int half = 0; half < 2; half++) {
                        const __m256i wv = _mm256_load_si256((const __m256i *)(w + b * block_bytes + (size_t)k * 64 + 32 * half));
                        dot[b][half][t] = madd_q8(dot[b][half][t], wv, xv, xabs);
                    }
            }
        }
        for (int b = 0; b < NB; b++)
            for (int half = 0; half < 2; half++) {
                const __m256 ws = _mm256_load_ps(m->packed_scales + ((size_t)(b0 + b) * groups + g) * 16 + 8 * half);
                for (int t = 0; t < T; t++) {
                    const __m256 scale = _mm256_mul_ps(ws, _mm256_set1_ps(x->s[(size_t)(t0 + t) * groups + g]));
                    acc[b][half][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[b][half][t]), scale, acc[b][half][t]);
                }
            }
    }
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < T; t++) {
            float *row = out + (size_t)(t0 + t) * ostride + (size_t)(b0 + b) * 16;
            if (keep[b] == 0xFFFFu) {
                _mm256_storeu_ps(row, acc[b][0][t]), _mm256_storeu_ps(row + 8, acc[b][1][t]);
                continue;
            }
            float rows[16];
            _mm256_storeu_ps(rows, acc[b][0][t]), _mm256_storeu_ps(rows + 8, acc[b][1][t]);
            for (int lane = 0; lane < 16; lane++)
                if (keep[b] >> lane & 1) row[lane] = rows[lane];
        }
}

/* Rows [r0, r1) on packed weights: the blocks that overlap the range, storing only the range's rows. Generating,
   block after block (one sequential stream); in a batch, pairs of blocks times pairs of tokens. Each row's sums
   take the same steps whatever tile it falls in, so a prompt gives the logits of feeding it token by token. */
static void matmul_packed_q8(float *out, const Matrix *m, const QuantizedRows *x, int n_tok, int gs, int r0, int r1) {
    const int b_end = (r1 + 15) / 16;
    for (int b = r0 / 16; b < b_end; b += 2) {
        const unsigned keep[2] = {lanes_in_range(b, r0, r1), lanes_in_range(b + 1, r0, r1)};
        int t = 0;
        if (n_tok > 1 && b + 2 <= b_end) {
            for (; t + 2 <= n_tok; t += 2) blocks_q8_avx2(out, m->rows, m, b, keep, x, t, gs, 2, 2);
            if (t < n_tok) blocks_q8_avx2(out, m->rows, m, b, keep, x, t, gs, 2, 1);
            continue;
        }
        for (int i = 0; i < 2 && b + i < b_end; i++) {
            for (t = 0; t + 2 <= n_tok; t += 2) blocks_q8_avx2(out, m->rows, m, b + i, keep + i, x, t, gs, 1, 2);
            if (t < n_tok) blocks_q8_avx2(out, m->rows, m, b + i, keep + i, x, t, gs, 1, 1);
        }
    }
}
#elif defined(HAVE_NEON_INT8)
/* A block's int32 sums for one token on the packed weights (see pack_q8): the 16 bytes at w + 16 i hold 4
   columns of rows 4i..4i+3, so a product with the 4 input bytes broadcast to every lane adds each row's 4
   products into its own lane. Held in 8 registers; row_sums(sums, i) is rows 4i..4i+3's total.
   With the dot-product extension (sdot: 16 multiply-adds per instruction), sums[i] and sums[4 + i] are the
   even and odd quads of columns, two chains against sdot's latency; without it, smull multiplies 8 bytes into
   16-bit products (|w x| <= 128 * 128 fits) and sadalp adds pairs of them into 32-bit lanes, rows 4i..4i+1 in
   sums[2 i] and 4i+2..4i+3 in sums[2 i + 1], a row's two pair sums side by side. Either way exact in int32. */
#if defined(__ARM_FEATURE_DOTPROD)
/* One quad of columns (64 bytes at w), x its 4 input bytes broadcast. */
static inline __attribute__((always_inline)) void dot_quad(int32x4_t sums[8], const uint8_t *w, int8x16_t x) {
    for (int i = 0; i < 4; i++) sums[i] = vdotq_s32(sums[i], vreinterpretq_s8_u8(vld1q_u8(w + 16 * i)), x);
}

/* Four quads (256 bytes at w), x their 16 input bytes: sdot by element takes each quad's bytes from its lane. */
static inline __attribute__((always_inline)) void dot_4quads(int32x4_t sums[8], const uint8_t *w, int8x16_t x) {
    for (int i = 0; i < 4; i++) {
        sums[i] = vdotq_laneq_s32(sums[i], vreinterpretq_s8_u8(vld1q_u8(w + 16 * i)), x, 0);
        sums[4 + i] = vdotq_laneq_s32(sums[4 + i], vreinterpretq_s8_u8(vld1q_u8(w + 64 + 16 * i)), x, 1);
        sums[i] = vdotq_laneq_s32(sums[i], vreinterpretq_s8_u8(vld1q_u8(w + 128 + 16 * i)), x, 2);
        sums[4 + i] = vdotq_laneq_s32(sums[4 + i], vreinterpretq_s8_u8(vld1q_u8(w + 192 + 16 * i)), x, 3);
    }
}

static inline int32x4_t row_sums(const int32x4_t sums[8], int i) { return vaddq_s32(sums[i], sums[4 + i]); }

/* Tokens per weight load in a batch: 16 sums, 8 accumulators, 4 weights and 2 inputs fill 30 of 32 registers. */
#define NEON_TOKENS 2
#else
static inline __attribute__((always_inline)) void dot_quad(int32x4_t sums[8], const uint8_t *w, int8x16_t x) {
    for (int i = 0; i < 4; i++) {
        const int8x16_t wv = vreinterpretq_s8_u8(vld1q_u8(w + 16 * i));
        sums[2 * i] = vpadalq_s16(sums[2 * i], vmull_s8(vget_low_s8(wv), vget_low_s8(x)));
        sums[2 * i + 1] = vpadalq_s16(sums[2 * i + 1], vmull_high_s8(wv, x));
    }
}

/* Quad j's 4 bytes of x, broadcast (j a constant). */
#define QUAD(x, j) vreinterpretq_s8_s32(vdupq_laneq_s32(vreinterpretq_s32_s8(x), j))

static inline __attribute__((always_inline)) void dot_4quads(int32x4_t sums[8], const uint8_t *w, int8x16_t x) {
    dot_quad(sums, w, QUAD(x, 0));
    dot_quad(sums, w + 64, QUAD(x, 1));
    dot_quad(sums, w + 128, QUAD(x, 2));
    dot_quad(sums, w + 192, QUAD(x, 3));
}
#undef QUAD

static inline int32x4_t row_sums(const int32x4_t sums[8], int i) { return vpaddq_s32(sums[2 * i], sums[2 * i + 1]); }

#define NEON_TOKENS 1 /* two would spill: each quad's 8 products take registers of their own before sadalp */
#endif

/* Block b's 16 rows times T (1 or NEON_TOKENS) tokens from t0: per group, exact int32 sums 16 columns at a time
   (then a quad at a time), and one multiply-add by the rows' scales times the token's scale, as dot_q8 does per
   row. In a batch the block's cols * 16 bytes of weights are re-read from L1 for each token or pair of tokens. */
static inline __attribute__((always_inline)) void block_q8_neon(float *out, int ostride, const Matrix *m, int b,
                                                               unsigned keep, const QuantizedRows *x, int t0, int gs,
                                                               int T) {
    const int cols = m->cols, groups = cols / gs, quads = gs / 4;
    const uint8_t *w = m->packed + (size_t)b * (cols / 4) * 64;
    float32x4_t acc[NEON_TOKENS][4];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = vdupq_n_f32(0.0f);
    for (int g = 0; g < groups; g++) {
        int32x4_t sums[NEON_TOKENS][8];
        for (int t = 0; t < T; t++)
            for (int i = 0; i < 8; i++) sums[t][i] = vdupq_n_s32(0);
        const int end = (g + 1) * quads;
        int k = g * quads;
        for (; k + 4 <= end; k += 4)
            for (int t = 0; t < T; t++)
                dot_4quads(sums[t], w + (size_t)k * 64, vld1q_s8(x->q + (size_t)(t0 + t) * cols + 4 * k));
        for (; k < end; k++)
            for (int t = 0; t < T; t++)
                dot_quad(sums[t], w + (size_t)k * 64,
                         vreinterpretq_s8_s32(vdupq_n_s32(load_i32(x->q + (size_t)(t0 + t) * cols + 4 * k))));
        const float *ws = m->packed_scales + ((size_t)b * groups + g) * 16;
        for (int t = 0; t < T; t++) {
            const float xs = x->s[(size_t)(t0 + t) * groups + g];
            for (int i = 0; i < 4; i++)
                acc[t][i] = vfmaq_f32(acc[t][i], vcvtq_f32_s32(row_sums(sums[t], i)),
                                      vmulq_n_f32(vld1q_f32(ws + 4 * i), xs));
        }
    }
    for (int t = 0; t < T; t++) {
        float *row = out + (size_t)(t0 + t) * ostride + (size_t)b * 16;
        if (keep == 0xFFFFu)
            for (int i = 0; i < 4; i++) vst1q_f32(row + 4 * i, acc[t][i]);
        else {
            float lanes[16];
            for (int i = 0; i < 4; i++) vst1q_f32(lanes + 4 * i, acc[t][i]);
            for (int lane = 0; lane < 16; lane++)
                if (keep >> lane & 1) row[lane] = lanes[lane];
        }
    }
}

/* Rows [r0, r1) on packed weights, block after block (one sequential stream when generating). */
static void matmul_packed_q8(float *out, const Matrix *m, const QuantizedRows *x, int n_tok, int gs, int r0, int r1) {
    for (int b = r0 / 16; b < (r1 + 15) / 16; b++) {
        const unsigned keep = lanes_in_range(b, r0, r1);
        for (int t = 0; t < n_tok; t += NEON_TOKENS) {
            if (n_tok - t >= NEON_TOKENS) block_q8_neon(out, m->rows, m, b, keep, x, t, gs, NEON_TOKENS);
            else block_q8_neon(out, m->rows, m, b, keep, x, t, gs, 1);
        }
    }
}
#endif

static float dot_q8(const int8_t *wq, const float *ws, const int8_t *xq, const float *xs, int n, int gs) {
    float sum = 0.0f;
    for (int g = 0; g < n / gs; g++) {
        int32_t isum = 0;
        for (int j = 0; j < gs; j++) isum += wq[g * gs + j] * xq[g * gs + j];
        sum += (float)isum * (ws[g] * xs[g]);
    }
    return sum;
}

static void matmul_rows_q8(float *out, const Matrix *m, const QuantizedRows *x, int n_tok, int gs, int r0, int r1) {
#ifdef PACKED_Q8_BIAS
    if (m->packed) {
        matmul_packed_q8(out, m, x, n_tok, gs, r0, r1);
        return;
    }
#endif
    const int n = m->cols, groups = n / gs;
    for (int r = r0; r < r1; r++) {
        const int8_t *wq = m->q + (size_t)r * n;
        const float *ws = m->s + (size_t)r * groups;
        for (int t = 0; t < n_tok; t++)
            out[(size_t)t * m->rows + r] = dot_q8(wq, ws, x->q + (size_t)t * n, x->s + (size_t)t * groups, n, gs);
    }
}

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
#if defined(__AVX512F__)
    __m512 squares = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(first_lanes(n - i), x + i);
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    ss = _mm512_reduce_add_ps(squares);
#elif defined(HAVE_NEON)
    float32x4_t squares[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; j++) {
            const float32x4_t v = vld1q_f32(x + i + 4 * j);
            squares[j] = vfmaq_f32(squares[j], v, v);
        }
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        squares[0] = vfmaq_f32(squares[0], v, v);
    }
    ss = vaddvq_f32(vaddq_f32(vaddq_f32(squares[0], squares[1]), vaddq_f32(squares[2], squares[3])));
    for (; i < n; i++) ss += x[i] * x[i];
#else
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
#endif
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* RoPE on rows [r0, r1) (r0 even) of v [n_tok][width], head by head: x'[2f] = x[2f] cos - x[2f+1] sin and
   x'[2f+1] = x[2f+1] cos + x[2f] sin, as x' = x cos' + swap(x) sin' with the tables' signs folded in. */
static void rope_range(const float *rope_cos, const float *rope_sin, float *v, int n_tok, int width, int head, int pos,
                       int r0, int r1) {
    for (int t = 0; t < n_tok; t++) {
        const float *cs = rope_cos + (size_t)(pos + t) * head, *sn = rope_sin + (size_t)(pos + t) * head;
        for (int h0 = r0 - r0 % head; h0 < r1; h0 += head) {
            float *x = v + (size_t)t * width + h0;
            const int j0 = r0 > h0 ? r0 - h0 : 0, j1 = min_int(r1 - h0, head);
#if defined(__AVX512F__)
            for (int j = j0; j < j1; j += 16) { /* vpermilps swaps the pairs in place of the strided loads */
                const __mmask16 mask = first_lanes(j1 - j);
                const __m512 a = _mm512_maskz_loadu_ps(mask, x + j);
                const __m512 swapped = _mm512_permute_ps(a, 0xB1);
                _mm512_mask_storeu_ps(x + j, mask, _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(mask, cs + j),
                                                                   _mm512_mul_ps(swapped, _mm512_maskz_loadu_ps(mask, sn + j))));
            }
#else
            int j = j0;
#if defined(HAVE_NEON)
            for (; j + 4 <= j1; j += 4) { /* rev64 swaps the pairs (j0 is even) */
                const float32x4_t a = vld1q_f32(x + j);
                vst1q_f32(x + j, vfmaq_f32(vmulq_f32(vrev64q_f32(a), vld1q_f32(sn + j)), a, vld1q_f32(cs + j)));
            }
#endif
            for (; j < j1; j += 2) {
                const float a = x[j], b = x[j + 1];
                x[j] = a * cs[j] + b * sn[j];
                x[j + 1] = b * cs[j + 1] + a * sn[j + 1];
            }
#endif
        }
    }
}

#if defined(HAVE_NEON)
/* silu(a) * g on 4 lanes, as swiglu's AVX-512 path computes it. */
static inline float32x4_t swiglu_neon(float32x4_t a, float32x4_t g) {
    const float32x4_t e = exp_nonpositive_neon(vnegq_f32(vabsq_f32(a)));
    const float32x4_t numerator = vbslq_f32(vcltzq_f32(a), vmulq_f32(a, e), a);
    return vmulq_f32(vdivq_f32(numerator, vaddq_f32(vdupq_n_f32(1.0f), e)), g);
}
#endif

/* h = silu(h) * gate over n values (SwiGLU). Every value takes the same path whatever its index, so how the
   threads split the rows cannot change a result. */
static void swiglu(float *h, const float *gate, int n) {
#if defined(__AVX512F__)
    /* silu(a) = a / (1 + exp(-a)) = a e / (1 + e) with e = exp(a): take e = exp(-|a|) <= 1, which cannot
       overflow, and use the form that fits the sign. */
    for (int i = 0; i < n; i += 16) {
        const __mmask16 mask = first_lanes(n - i);
        const __m512 a = _mm512_maskz_loadu_ps(mask, h + i), one = _mm512_set1_ps(1.0f);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(a)));
        const __m512 numerator = _mm512_mask_mul_ps(a, _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ), a, e);
        _mm512_mask_storeu_ps(h + i, mask,
                              _mm512_mul_ps(_mm512_div_ps(numerator, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(mask, gate + i)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < n; i += 8) { /* as above, 8 lanes at a time */
        const __m256i mask = first_lanes8(n - i);
        const __m256 a = _mm256_maskload_ps(h + i, mask);
        const __m256 e = exp_nonpositive8(_mm256_or_ps(a, sign)); /* -|a| */
        const __m256 numerator = _mm256_blendv_ps(a, _mm256_mul_ps(a, e), _mm256_cmp_ps(a, zero, _CMP_LT_OQ));
        _mm256_maskstore_ps(h + i, mask, _mm256_mul_ps(_mm256_div_ps(numerator, _mm256_add_ps(one, e)),
                                                       _mm256_maskload_ps(gate + i, mask)));
    }
#elif defined(HAVE_NEON)
    /* As above; a last partial vector goes through the same lanes from a copy. */
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(h + i, swiglu_neon(vld1q_f32(h + i), vld1q_f32(gate + i)));
    if (i < n) {
        float hv[4] = {0}, gv[4] = {0};
        memcpy(hv, h + i, (size_t)(n - i) * 4), memcpy(gv, gate + i, (size_t)(n - i) * 4);
        vst1q_f32(hv, swiglu_neon(vld1q_f32(hv), vld1q_f32(gv)));
        memcpy(h + i, hv, (size_t)(n - i) * 4);
    }
#else
    for (int i = 0; i < n; i++) h[i] = h[i] / (1.0f + expf(-h[i])) * gate[i];
#endif
}

/* a[p] = exp(a[p] * scale - max) for p < n, where max is the largest a[p] * scale; returns their sum: the
   numerators of softmax(a * scale). */
static float softmax_numerators(float *a, int n, float scale) {
    float maxv = -INFINITY, sum = 0.0f;
#if defined(HAVE_NEON)
    int p = 0;
    float32x4_t vmax = vdupq_n_f32(-INFINITY), vsum = vdupq_n_f32(0.0f);
    for (; p + 4 <= n; p += 4) {
        const float32x4_t v = vmulq_n_f32(vld1q_f32(a + p), scale);
        vst1q_f32(a + p, v);
        vmax = vmaxq_f32(vmax, v);
    }
    for (maxv = vmaxvq_f32(vmax); p < n; p++) maxv = fmaxf(maxv, a[p] *= scale);
    const float32x4_t vm = vdupq_n_f32(maxv);
    for (p = 0; p + 4 <= n; p += 4) {
        const float32x4_t e = exp_nonpositive_neon(vsubq_f32(vld1q_f32(a + p), vm));
        vst1q_f32(a + p, e);
        vsum = vaddq_f32(vsum, e);
    }
    for (sum = vaddvq_f32(vsum); p < n; p++) sum += (a[p] = expf(a[p] - maxv));
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
    /* As NEON's, in 8 lanes; the last partial vector too, masked (vmaxps skips NaN in its first operand, as fmaxf). */
    int p = 0;
    __m256 vmax = _mm256_set1_ps(-INFINITY), vsum = _mm256_setzero_ps();
    for (; p + 8 <= n; p += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(a + p), _mm256_set1_ps(scale));
        _mm256_storeu_ps(a + p, v);
        vmax = _mm256_max_ps(v, vmax);
    }
    for (maxv = hmax8(vmax); p < n; p++) maxv = fmaxf(maxv, a[p] *= scale);
    const __m256 vm = _mm256_set1_ps(maxv);
    for (p = 0; p < n; p += 8) {
        const __m256i mask = first_lanes8(n - p);
        const __m256 e = _mm256_and_ps(exp_nonpositive8(_mm256_sub_ps(_mm256_maskload_ps(a + p, mask), vm)),
                                       _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(a + p, mask, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = _mm_cvtss_f32(hsum4(vsum, vsum, vsum, vsum));
#else
    for (int p = 0; p < n; p++) maxv = fmaxf(maxv, a[p] *= scale);
    for (int p = 0; p < n; p++) sum += (a[p] = expf(a[p] - maxv));
#endif
    return sum;
}
#endif

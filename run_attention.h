/* run_attention.h: causal attention over run.c's KV cache, and the key cache's layout.
   Part of run.c's single compile unit (run.c includes it after run_kernels.h). */
#ifndef RUN_ATTENTION_H
#define RUN_ATTENTION_H
#include "run_kernels.h"

/* Attention. Keys are cached transposed in blocks of 16 positions, so a token's scores for 16 positions are the
   16 lanes of one multiply-add chain over the head's channels (no horizontal sums), and a prompt's tokens,
   ATT_TILE at a time, share every key and value they load. Each token's sums run in the same order whatever
   tile it is in, so a prompt fed in one call gives bit for bit the logits of feeding it token by token. */

/* Key channel c at position p, from kt (a layer's cache, or a head's first channel in it): the block of 16
   positions holds kv_dim rows of 16, so a head's keys for 16 positions are one contiguous run of memory (one
   row of seq_len per channel would make each generated token's reads and writes a cache miss per channel). */
static inline const float *key_at(const float *kt, int kv_dim, int c, int p) {
    return kt + ((size_t)(p / 16) * kv_dim + c) * 16 + p % 16;
}

/* Channel 0's keys for the vector of positions p + offset... that a masked load reads, p a multiple of 16. A vector
   wholly past the last position (end) reads from p's block instead, with every lane masked off: the block it would
   name may be memory never written, and a masked access to a page not yet mapped costs a microcode assist per load
   rather than a fault (seen on AMD Zen 5), for every channel of every token. */
static inline const float *live_keys(const float *kt, int kv_dim, int p, int offset, int end) {
    return key_at(kt, kv_dim, 0, p + offset < end ? p + offset : p);
}

/* The scores of V vectors of positions from p (a multiple of VLEN, which divides 16, so no vector straddles two
   blocks), kept in registers over the channels: V chains hide the latency. */
static inline __attribute__((always_inline)) void scores_vectors(float *att, const float *q, const float *kt,
                                                                 int kv_dim, int head, int p, int V) {
    vfloat acc[4] = {{0}};
    for (int i = 0; i < head; i++)
        for (int v = 0; v < V; v++) acc[v] += q[i] * LOADV(key_at(kt, kv_dim, i, p + v * VLEN));
    for (int v = 0; v < V; v++) memcpy(att + p + v * VLEN, &acc[v], sizeof(vfloat));
}

/* out[c...] = the sum over positions p < end of att[p] v_p for V vectors of channels, kept in registers. */
static inline __attribute__((always_inline)) void values_vectors(float *out, const float *att, const float *vc,
                                                                 int kv_dim, int end, int c, int V) {
    vfloat acc[4] = {{0}};
    for (int p = 0; p < end; p++)
        for (int v = 0; v < V; v++) acc[v] += att[p] * LOADV(vc + (size_t)p * kv_dim + c + v * VLEN);
    for (int v = 0; v < V; v++) memcpy(out + c + v * VLEN, &acc[v], sizeof(vfloat));
}

/* One token over positions [0, end), any head size, for builds without AVX-512 and heads it does not fit:
   scores 4 vectors of positions at a time, then one, then one position at a time; values likewise by
   channels. */
static void attention_token(float *out, const float *q, const float *kt, const float *vc, int kv_dim, int head,
                            int end, float *att) {
    const float inv_sqrt = 1.0f / sqrtf((float)head);
    int p = 0;
    for (; p + 4 * VLEN <= end; p += 4 * VLEN) scores_vectors(att, q, kt, kv_dim, head, p, 4);
    for (; p + VLEN <= end; p += VLEN) scores_vectors(att, q, kt, kv_dim, head, p, 1);
    for (; p < end; p++) {
        float a = 0.0f;
        for (int i = 0; i < head; i++) a += q[i] * *key_at(kt, kv_dim, i, p);
        att[p] = a;
    }
    const float sum = softmax_numerators(att, end, inv_sqrt);
    int c = 0;
    for (; c + 4 * VLEN <= head; c += 4 * VLEN) values_vectors(out, att, vc, kv_dim, end, c, 4);
    for (; c + VLEN <= head; c += VLEN) values_vectors(out, att, vc, kv_dim, end, c, 1);
    for (; c < head; c++) {
        float a = 0.0f;
        for (p = 0; p < end; p++) a += att[p] * vc[(size_t)p * kv_dim + c];
        out[c] = a;
    }
    for (int i = 0; i < head; i++) out[i] *= 1.0f / sum;
}

#if defined(__AVX512F__)

/* out_j[c...] = the sum over positions p < end0 + j of att[j][p] v_p, over token j's sum: V vectors of channels
   from c, for N tokens (see attention_tile_avx512). */
static inline __attribute__((always_inline)) void values_pass(float *out, int qstride, const float *att, int seq_len,
                                                             const float *vc, int kv_dim, int head, int c, int end0,
                                                             const __m512 *inv_sum, int N, int V) {
    __mmask16 mask[4];
    __m512 acc[4][4];
    for (int v = 0; v < V; v++) mask[v] = first_lanes(head - c - 16 * v);
    for (int j = 0; j < N; j++)
        for (int v = 0; v < V; v++) acc[j][v] = _mm512_setzero_ps();
    for (int p = 0; p < end0 + N - 1; p++) {
        const float *row = vc + (size_t)p * kv_dim + c;
        __m512 vv[4];
        for (int v = 0; v < V; v++) vv[v] = _mm512_maskz_loadu_ps(mask[v], row + 16 * v);
        for (int j = 0; j < N; j++)
            if (p < end0 + j) { /* token j sees position p */
                const __m512 a = _mm512_set1_ps(att[(size_t)j * seq_len + p]);
                for (int v = 0; v < V; v++) acc[j][v] = _mm512_fmadd_ps(a, vv[v], acc[j][v]);
            }
    }
    for (int j = 0; j < N; j++)
        for (int v = 0; v < V; v++)
            _mm512_mask_storeu_ps(out + (size_t)j * qstride + c + 16 * v, mask[v], _mm512_mul_ps(acc[j][v], inv_sum[j]));
}

/* N tokens (rows qstride apart) whose positions end at end0, end0 + 1, ...; head a multiple of 16; att rows of
   seq_len. Scores take PB blocks of 16 positions per pass, so N * PB chains hide the multiply-add latency (loads
   and stores past the last position are masked); values take up to 64 channels per pass, as many vectors as the
   head needs (3 for heads of 48, rather than 4 with one masked). N and PB are constants once inlined. */
static inline __attribute__((always_inline)) void attention_tile_avx512(float *out, const float *q, int qstride,
                                                                       const float *kt, const float *vc, int kv_dim,
                                                                       int head, int end0, float *att, int seq_len,
                                                                       int N, int PB) {
    const int end = end0 + N - 1;
    const __m512 inv_sqrt = _mm512_set1_ps(1.0f / sqrtf((float)head));
    for (int p = 0; p < end; p += 16 * PB) { /* att[j][p] = q_j . k_p / sqrt(head) */
        __mmask16 mask[4];
        __m512 acc[4][4];
        const float *keys[4]; /* block b's keys of channel 0; channel i is 16 * i further */
        for (int b = 0; b < PB; b++) {
            mask[b] = first_lanes(end - p - 16 * b);
            keys[b] = live_keys(kt, kv_dim, p, 16 * b, end);
        }
        for (int j = 0; j < N; j++)
            for (int b = 0; b < PB; b++) acc[j][b] = _mm512_setzero_ps();
        for (int i = 0; i < head; i++) {
            for (int b = 0; b < PB; b++) {
                const __m512 kv = _mm512_maskz_loadu_ps(mask[b], keys[b] + 16 * i);
                for (int j = 0; j < N; j++) acc[j][b] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)j * qstride + i]), kv, acc[j][b]);
            }
        }
        for (int j = 0; j < N; j++)
            for (int b = 0; b < PB; b++)
                if (mask[b]) _mm512_mask_storeu_ps(att + (size_t)j * seq_len + p + 16 * b, mask[b], _mm512_mul_ps(acc[j][b], inv_sqrt));
    }
    __m512 inv_sum[4];
    for (int j = 0; j < N; j++) { /* att[j][p] = exp(score - max) */
        float *a = att + (size_t)j * seq_len;
        __m512 vmax = _mm512_set1_ps(-INFINITY), vsum = _mm512_setzero_ps();
        for (int p = 0; p < end0 + j; p += 16)
            vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, first_lanes(end0 + j - p), a + p));
        const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        for (int p = 0; p < end0 + j; p += 16) {
            const __mmask16 mask = first_lanes(end0 + j - p);
            const __m512 ex = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, a + p), vm));
            _mm512_mask_storeu_ps(a + p, mask, ex);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mask, ex));
        }
        inv_sum[j] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    }
    for (int c = 0; c < head; c += 64) /* out_j = sum over p < end0 + j of att[j][p] v_p / sum_j */
        switch ((min_int(head - c, 64) + 15) / 16) {
        case 1: values_pass(out, qstride, att, seq_len, vc, kv_dim, head, c, end0, inv_sum, N, 1); break;
        case 2: values_pass(out, qstride, att, seq_len, vc, kv_dim, head, c, end0, inv_sum, N, 2); break;
        case 3: values_pass(out, qstride, att, seq_len, vc, kv_dim, head, c, end0, inv_sum, N, 3); break;
        default: values_pass(out, qstride, att, seq_len, vc, kv_dim, head, c, end0, inv_sum, N, 4);
        }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* attention_tile_avx512's passes in 8 lanes, for heads a multiple of 8 and N tokens: scores PB blocks of 16
   positions at a time (N * 2 PB chains), each token's softmax as attention_token's, then values V vectors of 8
   channels at a time. A token's sums run in the same order whatever N, PB and V. */
static inline __attribute__((always_inline)) void values_pass8(float *out, int qstride, const float *att, int seq_len,
                                                              const float *vc, int kv_dim, int c, int end0,
                                                              const float *inv_sum, int N, int V) {
    __m256 acc[4][4];
    for (int j = 0; j < N; j++)
        for (int v = 0; v < V; v++) acc[j][v] = _mm256_setzero_ps();
    for (int p = 0; p < end0 + N - 1; p++) {
        const float *row = vc + (size_t)p * kv_dim + c;
        __m256 vv[4];
        for (int v = 0; v < V; v++) vv[v] = _mm256_loadu_ps(row + 8 * v);
        for (int j = 0; j < N; j++)
            if (p < end0 + j) { /* token j sees position p */
                const __m256 a = _mm256_broadcast_ss(att + (size_t)j * seq_len + p);
                for (int v = 0; v < V; v++) acc[j][v] = _mm256_fmadd_ps(a, vv[v], acc[j][v]);
            }
    }
    for (int j = 0; j < N; j++)
        for (int v = 0; v < V; v++)
            _mm256_storeu_ps(out + (size_t)j * qstride + c + 8 * v, _mm256_mul_ps(acc[j][v], _mm256_set1_ps(inv_sum[j])));
}

static inline __attribute__((always_inline)) void attention_tile_avx2(float *out, const float *q, int qstride,
                                                                     const float *kt, const float *vc, int kv_dim,
                                                                     int head, int end0, float *att, int seq_len,
                                                                     int N, int PB, int V) {
    const int end = end0 + N - 1;
    for (int p = 0; p < end; p += 16 * PB) { /* att[j][p] = q_j . k_p; past the last position nothing is read */
        __m256i mask[4];
        __m256 acc[4][4];
        const float *keys[4]; /* vector b's keys of channel 0; channel i is 16 * i further */
        for (int b = 0; b < 2 * PB; b++) {
            mask[b] = first_lanes8(end - p - 8 * b);
            keys[b] = live_keys(kt, kv_dim, p, 8 * b, end);
        }
        for (int j = 0; j < N; j++)
            for (int b = 0; b < 2 * PB; b++) acc[j][b] = _mm256_setzero_ps();
        for (int i = 0; i < head; i++) {
            __m256 kv[4];
            for (int b = 0; b < 2 * PB; b++) kv[b] = _mm256_maskload_ps(keys[b] + 16 * i, mask[b]);
            for (int j = 0; j < N; j++) {
                const __m256 qj = _mm256_broadcast_ss(q + (size_t)j * qstride + i);
                for (int b = 0; b < 2 * PB; b++) acc[j][b] = _mm256_fmadd_ps(qj, kv[b], acc[j][b]);
            }
        }
        for (int j = 0; j < N; j++)
            for (int b = 0; b < 2 * PB; b++)
                if (p + 8 * b < end) _mm256_maskstore_ps(att + (size_t)j * seq_len + p + 8 * b, mask[b], acc[j][b]);
    }
    float inv_sum[4];
    for (int j = 0; j < N; j++)
        inv_sum[j] = 1.0f / softmax_numerators(att + (size_t)j * seq_len, end0 + j, 1.0f / sqrtf((float)head));
    for (int c = 0; c < head; c += 8 * V)
        if (head - c >= 8 * V) values_pass8(out, qstride, att, seq_len, vc, kv_dim, c, end0, inv_sum, N, V);
        else for (; c < head; c += 8) values_pass8(out, qstride, att, seq_len, vc, kv_dim, c, end0, inv_sum, N, 1);
}
#endif

/* Causal attention of n tokens (n <= 4, rows qstride apart in q and out) at consecutive positions, the first of
   which sees positions [0, end0), for one head: kt is its keys (see key_at), vc its values (rows kv_dim apart),
   att its scratch ([n][seq_len]). */
static void attention_tile(float *out, const float *q, int qstride, const float *kt, const float *vc, int kv_dim,
                           int head, int end0, int n, float *att, int seq_len) {
#if defined(__AVX512F__)
    if (head % 16 == 0) {
        switch (n) {
        case 1: attention_tile_avx512(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 1, 4); break;
        case 2: attention_tile_avx512(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 2, 2); break;
        case 3: attention_tile_avx512(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 3, 2); break;
        default: attention_tile_avx512(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 4, 2);
        }
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (head % 8 == 0) { /* 4 chains of scores and of values at least */
        switch (n) {
        case 1: attention_tile_avx2(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 1, 2, 4); break;
        case 2: attention_tile_avx2(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 2, 1, 2); break;
        case 3: attention_tile_avx2(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 3, 1, 2); break;
        default: attention_tile_avx2(out, q, qstride, kt, vc, kv_dim, head, end0, att, seq_len, 4, 1, 2);
        }
        return;
    }
#endif
    for (int j = 0; j < n; j++)
        attention_token(out + (size_t)j * qstride, q + (size_t)j * qstride, kt, vc, kv_dim, head, end0 + j,
                        att + (size_t)j * seq_len);
}

#if defined(__AVX512F__)
/* The 16 x 16 block rows[i][j] transposed in place, to rows[j][i]: 64 shuffles. */
static inline void transpose16(__m512 rows[16]) {
    __m512 pairs[16], quads[4][4]; /* quads[g][m] lane L: column 4L + m of rows 4g..4g+3 */
    for (int i = 0; i < 8; i++) {
        pairs[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
        pairs[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        quads[g][0] = _mm512_shuffle_ps(pairs[4 * g], pairs[4 * g + 2], 0x44);
        quads[g][1] = _mm512_shuffle_ps(pairs[4 * g], pairs[4 * g + 2], 0xEE);
        quads[g][2] = _mm512_shuffle_ps(pairs[4 * g + 1], pairs[4 * g + 3], 0x44);
        quads[g][3] = _mm512_shuffle_ps(pairs[4 * g + 1], pairs[4 * g + 3], 0xEE);
    }
    for (int m = 0; m < 4; m++) {
        const __m512 lanes01 = _mm512_shuffle_f32x4(quads[0][m], quads[1][m], 0x44);
        const __m512 lanes23 = _mm512_shuffle_f32x4(quads[0][m], quads[1][m], 0xEE);
        const __m512 lanes01_high = _mm512_shuffle_f32x4(quads[2][m], quads[3][m], 0x44);
        const __m512 lanes23_high = _mm512_shuffle_f32x4(quads[2][m], quads[3][m], 0xEE);
        rows[m] = _mm512_shuffle_f32x4(lanes01, lanes01_high, 0x88);
        rows[4 + m] = _mm512_shuffle_f32x4(lanes01, lanes01_high, 0xDD);
        rows[8 + m] = _mm512_shuffle_f32x4(lanes23, lanes23_high, 0x88);
        rows[12 + m] = _mm512_shuffle_f32x4(lanes23, lanes23_high, 0xDD);
    }
}
#endif

/* Channels [c0, c1) of new keys k [n_tok][kv_dim] into a layer's key cache at positions pos... (see key_at).
   Whole blocks of 16 positions go 16 channels at a time, transposed in registers (one key at a time would be a
   store per key, each to another cache line). */
static void cache_keys(float *cache, int kv_dim, const float *k, int n_tok, int pos, int c0, int c1) {
    for (int t = 0; t < n_tok;) {
#if defined(__AVX512F__)
        if ((pos + t) % 16 == 0 && t + 16 <= n_tok) {
            for (int ch = c0; ch < c1; ch += 16) {
                __m512 rows[16];
                for (int i = 0; i < 16; i++) rows[i] = _mm512_maskz_loadu_ps(first_lanes(c1 - ch), k + (size_t)(t + i) * kv_dim + ch);
                transpose16(rows);
                for (int i = 0; i < min_int(16, c1 - ch); i++) _mm512_storeu_ps((float *)key_at(cache, kv_dim, ch + i, pos + t), rows[i]);
            }
            t += 16;
            continue;
        }
#endif
        for (int ch = c0; ch < c1; ch++) *(float *)key_at(cache, kv_dim, ch, pos + t) = k[(size_t)t * kv_dim + ch];
        t++;
    }
}
#endif

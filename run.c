/* run.c: inference for InnerArianna / llama2.c model files, in one compile unit (libc + libm, OpenMP optional).

   ./run model.bin -z tokenizer.bin [-i prompt] [-t temperature] [-p top_p] [-k top_k] [-s seed] [-n steps]
                                    [-m generate|chat] [-y system_prompt] [-T threads] [--min-p p]
                                    [--repeat-penalty r] [--repeat-last-n n] [--presence-penalty a]
                                    [--frequency-penalty b]

   Model files: llama2.c's legacy version 0 (7-int header, fp32), version 1 ("ak42" header, fp32) and
   version 2 ("ak42" header, Q8_0: int8 weights with one fp32 scale per group); versions 1 and 2 keep a RoPE base
   and an RMSNorm epsilon other than Llama 2's in their header's padding. The tokenizer file is
   llama2.c's tokenizer .bin (tokenizer.py writes it). Both are memory-mapped and checked against the
   file length before anything is read.

   Built with -DARIANNA_LIBRARY this file is a shared library without main(), the API chat.py uses:
   arianna_open/close, arianna_encode, arianna_chat_turn (the chat template), arianna_feed (tokens at a
   position into the KV cache), arianna_logits, arianna_sample_with (the sampler, with per-call settings and the
   token history its penalties look at), arianna_distribution (what it would draw from), arianna_sample
   (llama2.c's temperature and top-p), arianna_decode. The ./run binary's chat mode goes through the very same
   functions.

   This file reads top to bottom: model file, tokenizer, the forward pass, sampler, text API, generate, chat,
   command line. The SIMD kernels behind the forward pass (run_kernels.h), attention over the KV cache
   (run_attention.h) and the sharing of work among threads (run_threads.h) are headers it includes. */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "run_kernels.h"   /* Matrix, the fp32 and int8 products, RMSNorm, RoPE, SwiGLU: SIMD with portable twins */
#include "run_attention.h" /* attention over the KV cache and the key cache's layout */
#include "run_threads.h"   /* the thread count, and how a batch's work is shared out */
#include "run_isa.h"       /* the kernels as a table per instruction set, for the dispatching build */

#define MODEL_MAGIC 0x616b3432u /* "ak42" */
#define V1_HEADER_BYTES 256
#define ROPE_THETA_AT 44 /* float32 in the padding of versions 1 and 2, 0 for the default */
#define NORM_EPS_AT 48
#define DEFAULT_ROPE_THETA 10000.0f
#define DEFAULT_NORM_EPS 1e-5f
#define MAX_BATCH 128 /* prompt tokens per matrix-matrix pass (each a pass over the weights); bounds the buffers */
#define ATT_TILE 4   /* prompt tokens that share each pass over a head's keys and values */

/* ------------------------------------------------------------------------------------------------ */
/* Errors: every loader reports one line into a caller-owned buffer and returns failure.           */

static int fail(char *err, int err_size, const char *fmt, ...) {
    if (err && err_size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, (size_t)err_size, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Kernels: which instruction set runs the forward pass                                            */

/* `make run` on x86-64 (-DARIANNA_DISPATCH, with run_avx512.c, run_avxvnni.c and run_avx2.c): run.c itself is
   built for baseline x86-64 and its own kernels are the scalar path; the others come from those files. Otherwise
   one path, whatever the compiler's flags made of the kernels. Best first, each with the CPU features it needs (as /proc/cpuinfo
   names them) and whether this CPU has them; __builtin_cpu_supports also checks that the OS saves the registers. */
typedef struct {
    const Kernels *kernels;
    int cpu_has;
    const char *needs;
} KernelPath;

#ifdef ARIANNA_DISPATCH
#if defined(__AVX2__)
#error "-DARIANNA_DISPATCH builds run.c for baseline x86-64 (its own kernels are the scalar path): drop -march"
#endif
extern const Kernels kernels_avx512, kernels_avxvnni, kernels_avx2;
static const Kernels kernels_scalar = THESE_KERNELS;
#define KERNEL_PATHS                                                                                                   \
    {{&kernels_avx512, __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512vnni"),                    \
      "AVX-512 VNNI (avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni)"},                                       \
     {&kernels_avxvnni, __builtin_cpu_supports("x86-64-v3") && __builtin_cpu_supports("avxvnni"),                      \
      "AVX-VNNI (x86-64-v3 and avx_vnni)"},                                                                            \
     {&kernels_avx2, __builtin_cpu_supports("x86-64-v3"),                                                              \
      "AVX2 (x86-64-v3: avx avx2 bmi1 bmi2 f16c fma abm movbe xsave)"},                                                \
     {&kernels_scalar, 1, ""}}
#else
static const Kernels kernels_built = THESE_KERNELS;
#define KERNEL_PATHS {{&kernels_built, 1, ""}}
#endif

static int path_named(const KernelPath *paths, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (!strcmp(name, paths[i].kernels->name)) return i;
    return -1;
}

/* name appended to the comma-separated list (a buffer of size bytes). */
static void list_add(char *list, size_t size, const char *name) {
    const size_t len = strlen(list);
    snprintf(list + len, size - len, "%s%s", len ? ", " : "", name);
}

/* The kernels a model is loaded for: ARIANNA_ISA's (or ./run's --isa), else the best this CPU runs. ARIANNA_MAX_ISA
   caps what the CPU is taken to have (to try a smaller CPU's path as the default). NULL with a one-line error. */
static const Kernels *kernels_select(char *err, int err_size) {
#ifdef ARIANNA_DISPATCH
    __builtin_cpu_init();
#endif
    const KernelPath paths[] = KERNEL_PATHS;
    const int n = (int)(sizeof(paths) / sizeof(paths[0]));
    const char *forced = getenv("ARIANNA_ISA"), *max = getenv("ARIANNA_MAX_ISA");
    const int automatic = !forced || !*forced || !strcmp(forced, "auto");
    const int want = automatic ? -1 : path_named(paths, n, forced), cap = max && *max ? path_named(paths, n, max) : 0;
    char names[64] = "", runs[64] = ""; /* the paths of this build; those this CPU runs */
    int best = -1;
    for (int i = 0; i < n; i++) {
        list_add(names, sizeof(names), paths[i].kernels->name);
        if (paths[i].cpu_has && i >= cap) {
            list_add(runs, sizeof(runs), paths[i].kernels->name);
            if (best < 0) best = i;
        }
    }
    if (cap < 0)
        return fail(err, err_size, "ARIANNA_MAX_ISA=%s: not an instruction set of this build (%s)", max, names), NULL;
    if (automatic) return paths[best].kernels; /* the last path runs anywhere */
    if (want < 0)
        return fail(err, err_size, "ARIANNA_ISA=%s (or --isa): not an instruction set of this build (%s, or auto)",
                    forced, names), NULL;
    if (!paths[want].cpu_has || want < cap)
        return fail(err, err_size, "ARIANNA_ISA=%s (or --isa): this CPU lacks %s%s%s; it runs %s", forced,
                    paths[want].needs, paths[want].cpu_has ? ", says ARIANNA_MAX_ISA=" : "",
                    paths[want].cpu_has ? max : "", runs), NULL;
    return paths[want].kernels;
}

/* ------------------------------------------------------------------------------------------------ */
/* Model file                                                                                      */

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int shared_classifier, version, group_size; /* group_size: version 2 only */
    float rope_theta, norm_eps;                 /* RoPE's base, RMSNorm's epsilon */
} Config;

/* Values per attention head, and per token in each of the key and value caches (n_kv_heads heads). Valid once
   config_check has passed: dim divides by n_heads, and n_heads by n_kv_heads. */
static int config_head_size(const Config *c) { return c->dim / c->n_heads; }
static int config_kv_dim(const Config *c) { return config_head_size(c) * c->n_kv_heads; }

typedef struct {
    const float *rms_att, *rms_ffn;
    Matrix wq, wk, wv, wo, w1, w2, w3;
} Layer;

typedef struct {
    Config cfg;
    const Kernels *kernels; /* the instruction set's kernels the matrices are laid out for (see pack_q8) */
    Layer *layers;
    Matrix tok_embeddings; /* [vocab, dim], also the classifier when shared */
    Matrix classifier;
    const float *rms_final;
    void **owned; /* allocations of the loader: aligned copies of misaligned scale arrays, packed matrices */
    int n_owned;
} Weights;

/* Reads the file at a byte offset with bounds kept by the caller (the size check comes first). */
typedef struct {
    const unsigned char *base;
    size_t size, offset;
} Cursor;

static const void *take(Cursor *c, size_t bytes) {
    const void *p = c->base + c->offset;
    c->offset += bytes;
    return p;
}

static int read_i32(const unsigned char *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* 64-byte aligned memory that weights_free releases. */
static void *owned_alloc(Weights *w, size_t bytes) {
    void **owned = realloc(w->owned, (size_t)(w->n_owned + 1) * sizeof(void *));
    if (!owned) return NULL;
    w->owned = owned;
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p) w->owned[w->n_owned++] = p;
    return p;
}

/* Scale arrays follow int8 arrays whose length need not be a multiple of 4; copy those to aligned memory. */
static const float *aligned_floats(Weights *w, const void *p, size_t count) {
    if (((uintptr_t)p & 3u) == 0) return (const float *)p;
    float *copy = owned_alloc(w, count * sizeof(float));
    if (copy) memcpy(copy, p, count * sizeof(float));
    return copy;
}

/* The int8 kernels multiply 4 weights of a row by 4 input bytes and add the products into one int32 lane. So
   rows go in blocks of 16, a row per 32-bit lane: for every 4 columns, 64 bytes hold the block's 16 rows' 4
   weights, which the kernel multiplies by the same 4 input bytes, broadcast. For vpdpbusd (AVX-512 VNNI) the
   weights are stored plus 128 (bias), as its first operand is unsigned; the +128 comes back out by starting each
   group's sum at -128 times the sum of the group's input bytes. Rows past the end are zero weights. */
static int pack_q8(Weights *w, Matrix *m, int gs, int bias) {
    const size_t rows = (size_t)m->rows, cols = (size_t)m->cols, blocks = (rows + 15) / 16, groups = cols / (size_t)gs;
    uint8_t *packed = owned_alloc(w, blocks * 16 * cols);
    float *scales = owned_alloc(w, blocks * 16 * groups * sizeof(float));
    if (!packed || !scales) return -1;
#pragma omp parallel for
    for (size_t b = 0; b < blocks; b++)
        for (size_t lane = 0; lane < 16; lane++) {
            const size_t r = 16 * b + lane;
            for (size_t k = 0; k < cols; k++)
                packed[(b * (cols / 4) + k / 4) * 64 + lane * 4 + k % 4] =
                    (uint8_t)((r < rows ? m->q[r * cols + k] : 0) + bias);
            for (size_t g = 0; g < groups; g++) scales[(b * groups + g) * 16 + lane] = r < rows ? m->s[r * groups + g] : 0.0f;
        }
    m->packed = packed, m->packed_scales = scales;
    return 0;
}

static void weights_free(Weights *w) {
    for (int i = 0; i < w->n_owned; i++) free(w->owned[i]);
    free(w->owned);
    free(w->layers);
    memset(w, 0, sizeof(*w));
}

static int config_check(const Config *c, char *err, int err_size, const char *path) {
    /* Limits far above any model this engine can run, low enough that size arithmetic cannot overflow. */
    if (c->dim <= 0 || c->dim > 65536 || c->hidden_dim <= 0 || c->hidden_dim > 262144 || c->n_layers <= 0 ||
        c->n_layers > 1024 || c->n_heads <= 0 || c->n_heads > 1024 || c->n_kv_heads <= 0 || c->vocab_size <= 0 ||
        c->vocab_size > (1 << 22) || c->seq_len <= 0 || c->seq_len > (1 << 20))
        return fail(err, err_size,
                    "%s: implausible model header (dim=%d hidden_dim=%d n_layers=%d n_heads=%d n_kv_heads=%d "
                    "vocab_size=%d seq_len=%d): not a model .bin, or corrupt; re-export it with export.py",
                    path, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size, c->seq_len);
    if (c->dim % c->n_heads || c->n_heads % c->n_kv_heads || (c->dim / c->n_heads) % 2)
        return fail(err, err_size,
                    "%s: inconsistent heads (dim=%d n_heads=%d n_kv_heads=%d: dim must divide by n_heads into an even "
                    "head size, n_heads by n_kv_heads); the file is corrupt, re-export it",
                    path, c->dim, c->n_heads, c->n_kv_heads);
    if (c->version == 2 && (c->group_size <= 0 || c->dim % c->group_size || c->hidden_dim % c->group_size))
        return fail(err, err_size,
                    "%s: Q8_0 group size %d does not divide dim=%d and hidden_dim=%d; the file is corrupt, re-export it",
                    path, c->group_size, c->dim, c->hidden_dim);
    return 0;
}

/* Parses a model image (the mapped file). Pointers in w point into data, which must outlive w. */
static int weights_parse(Weights *w, const unsigned char *data, size_t size, const char *path, char *err,
                         int err_size) {
    memset(w, 0, sizeof(*w));
    if (!(w->kernels = kernels_select(err, err_size))) return -1;
    Config *c = &w->cfg;
    if (size < 28) return fail(err, err_size, "%s: file of %zu bytes is too short for a model header", path, size);
    Cursor cur = {data, size, 0};
    if ((uint32_t)read_i32(data) == MODEL_MAGIC) {
        if (size < V1_HEADER_BYTES)
            return fail(err, err_size, "%s: truncated header (%zu of %d bytes)", path, size, V1_HEADER_BYTES);
        c->version = read_i32(data + 4);
        if (c->version != 1 && c->version != 2)
            return fail(err, err_size, "%s: model file version %d is not supported (this engine reads 0, 1 and 2)",
                        path, c->version);
        int *fields[] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads, &c->n_kv_heads, &c->vocab_size,
                         &c->seq_len};
        for (int i = 0; i < 7; i++) *fields[i] = read_i32(data + 8 + 4 * i);
        c->shared_classifier = data[36];
        if (c->shared_classifier > 1)
            return fail(err, err_size, "%s: corrupt header (shared_classifier byte is %d)", path, c->shared_classifier);
        c->group_size = c->version == 2 ? read_i32(data + 37) : 0;
        /* In the padding, float32 where they differ from Llama 2's (zero there: the default), so llama2.c, which
           skips the padding, still loads the files of default models. */
        memcpy(&c->rope_theta, data + ROPE_THETA_AT, 4), memcpy(&c->norm_eps, data + NORM_EPS_AT, 4);
        if (c->rope_theta == 0.0f) c->rope_theta = DEFAULT_ROPE_THETA;
        if (c->norm_eps == 0.0f) c->norm_eps = DEFAULT_NORM_EPS;
        if (!(c->rope_theta > 0.0f && c->rope_theta < INFINITY && c->norm_eps > 0.0f && c->norm_eps < 1.0f))
            return fail(err, err_size, "%s: corrupt header (rope_theta=%g, norm_eps=%g); re-export it", path,
                        (double)c->rope_theta, (double)c->norm_eps);
        cur.offset = V1_HEADER_BYTES;
    } else {
        c->version = 0;
        c->rope_theta = DEFAULT_ROPE_THETA, c->norm_eps = DEFAULT_NORM_EPS;
        int *fields[] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads, &c->n_kv_heads, &c->vocab_size,
                         &c->seq_len};
        for (int i = 0; i < 7; i++) *fields[i] = read_i32(data + 4 * i);
        /* Legacy files say "classifier not shared" with a negative vocab size. */
        c->shared_classifier = c->vocab_size > 0;
        if (c->vocab_size < 0 && c->vocab_size != INT32_MIN) c->vocab_size = -c->vocab_size;
        cur.offset = 28;
    }
    if (config_check(c, err, err_size, path)) return -1;

    const uint64_t dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim, layers = (uint64_t)c->n_layers;
    const uint64_t vocab = (uint64_t)c->vocab_size, head = dim / (uint64_t)c->n_heads;
    const uint64_t kv_dim = head * (uint64_t)c->n_kv_heads;
    const uint64_t per_layer = dim * dim * 2 + dim * kv_dim * 2 + dim * hidden * 3; /* wq wo, wk wv, w1 w2 w3 */
    const uint64_t norms = layers * dim * 2 + dim;
    const uint64_t classifier = c->shared_classifier ? 0 : vocab * dim;
    uint64_t expected;
    if (c->version == 2) {
        const uint64_t gs = (uint64_t)c->group_size, values = vocab * dim + layers * per_layer + classifier;
        expected = V1_HEADER_BYTES + norms * 4 + values + values / gs * 4;
    } else {
        const uint64_t rope = c->version == 0 ? (uint64_t)c->seq_len * head : 0; /* legacy freq_cis tables */
        expected = cur.offset + 4 * (norms + vocab * dim + layers * per_layer + rope + classifier);
    }
    if (expected != size)
        return fail(err, err_size,
                    "%s: file is %zu bytes but its version %d header (dim=%d, %d layers, vocab %d) implies %llu: "
                    "truncated or corrupt, re-export it",
                    path, size, c->version, c->dim, c->n_layers, c->vocab_size, (unsigned long long)expected);

    w->layers = calloc((size_t)c->n_layers, sizeof(Layer));
    if (!w->layers) return fail(err, err_size, "%s: out of memory", path);
    const int n_layers = c->n_layers;
    const int q_dim = c->dim, kvd = (int)kv_dim;

    /* Norm weights: per-layer interleaved in version 0, grouped first in versions 1 and 2. */
    const float *rms_att = NULL, *rms_ffn = NULL;
    if (c->version == 0) {
        const float *emb = take(&cur, vocab * dim * 4);
        w->tok_embeddings = (Matrix){.f = emb, .rows = c->vocab_size, .cols = c->dim};
        rms_att = take(&cur, layers * dim * 4);
    } else {
        rms_att = take(&cur, layers * dim * 4);
        rms_ffn = take(&cur, layers * dim * 4);
        w->rms_final = take(&cur, dim * 4);
    }
    struct {
        size_t offset;
        int rows, cols;
    } shapes[7] = {{offsetof(Layer, wq), q_dim, c->dim},      {offsetof(Layer, wk), kvd, c->dim},
                   {offsetof(Layer, wv), kvd, c->dim},        {offsetof(Layer, wo), c->dim, q_dim},
                   {offsetof(Layer, w1), c->hidden_dim, c->dim}, {offsetof(Layer, w2), c->dim, c->hidden_dim},
                   {offsetof(Layer, w3), c->hidden_dim, c->dim}};
    if (c->version == 2) {
        const size_t gs = (size_t)c->group_size;
        Matrix *m = &w->tok_embeddings;
        /* Order of the file: embeddings, then each kind of matrix for all layers, then the classifier. */
        for (int i = 0; i < 1 + 7 * n_layers + !c->shared_classifier; i++) {
            if (i == 0) *m = (Matrix){.rows = c->vocab_size, .cols = c->dim};
            else if (i <= 7 * n_layers) {
                const int k = (i - 1) / n_layers, l = (i - 1) % n_layers;
                m = (Matrix *)((char *)&w->layers[l] + shapes[k].offset);
                *m = (Matrix){.rows = shapes[k].rows, .cols = shapes[k].cols};
            } else {
                m = &w->classifier;
                *m = (Matrix){.rows = c->vocab_size, .cols = c->dim};
            }
            const size_t n = (size_t)m->rows * (size_t)m->cols;
            m->q = take(&cur, n);
            m->s = aligned_floats(w, take(&cur, n / gs * 4), n / gs);
            if (!m->s) return weights_free(w), fail(err, err_size, "%s: out of memory", path);
            const int multiplied = i > 0 || c->shared_classifier; /* unshared embeddings are only looked up */
            const int bias = w->kernels->packed_q8_bias;
            if (bias >= 0 && gs % 4 == 0 && multiplied && pack_q8(w, m, (int)gs, bias))
                return weights_free(w), fail(err, err_size, "%s: out of memory", path);
        }
    } else {
        if (c->version == 1) {
            const float *emb = take(&cur, vocab * dim * 4);
            w->tok_embeddings = (Matrix){.f = emb, .rows = c->vocab_size, .cols = c->dim};
        }
        for (int k = 0; k < 7; k++) {
            if (c->version == 0 && k == 4) rms_ffn = take(&cur, layers * dim * 4); /* legacy: between wo and w1 */
            for (int l = 0; l < n_layers; l++) {
                Matrix *m = (Matrix *)((char *)&w->layers[l] + shapes[k].offset);
                *m = (Matrix){.f = take(&cur, (size_t)shapes[k].rows * shapes[k].cols * 4),
                              .rows = shapes[k].rows, .cols = shapes[k].cols};
            }
        }
        if (c->version == 0) {
            w->rms_final = take(&cur, dim * 4);
            take(&cur, (size_t)c->seq_len * head * 4); /* freq_cis_real, freq_cis_imag: recomputed instead */
        }
        if (!c->shared_classifier)
            w->classifier = (Matrix){.f = take(&cur, vocab * dim * 4), .rows = c->vocab_size, .cols = c->dim};
    }
    if (c->shared_classifier) w->classifier = w->tok_embeddings;
    for (int l = 0; l < n_layers; l++) {
        w->layers[l].rms_att = rms_att + (size_t)l * c->dim;
        w->layers[l].rms_ffn = rms_ffn + (size_t)l * c->dim;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Tokenizer                                                                                       */

typedef struct {
    int n_tokens, max_token_length;
    const unsigned char **piece;
    int *piece_len;
    float *score;
    int *table; /* open-addressing hash of the pieces BPE may merge into: token id or -1 */
    unsigned table_mask;
    int byte_token[256]; /* id of the <0xNN> piece, -1 if the vocabulary has none */
    int bos, eos, unk;
    char *decode_buf;
} Tokenizer;

static uint32_t hash_bytes(const unsigned char *s, int len) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (int i = 0; i < len; i++) h = (h ^ s[i]) * 16777619u;
    return h;
}

static int lookup_piece(const Tokenizer *t, const unsigned char *s, int len) {
    for (uint32_t i = hash_bytes(s, len) & t->table_mask;; i = (i + 1) & t->table_mask) {
        int id = t->table[i];
        if (id < 0) return -1;
        if (t->piece_len[id] == len && memcmp(t->piece[id], s, (size_t)len) == 0) return id;
    }
}

static int piece_is(const Tokenizer *t, int id, const char *s) {
    return t->piece_len[id] == (int)strlen(s) && memcmp(t->piece[id], s, strlen(s)) == 0;
}

/* Byte value of a "<0xNN>" piece, or -1. */
static int byte_piece_value(const unsigned char *p, int len) {
    if (len != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>' || !isxdigit(p[3]) || !isxdigit(p[4])) return -1;
    char hex[3] = {(char)p[3], (char)p[4], 0};
    return (int)strtol(hex, NULL, 16);
}

static void tokenizer_free(Tokenizer *t) {
    free(t->piece);
    free(t->piece_len);
    free(t->score);
    free(t->table);
    free(t->decode_buf);
    memset(t, 0, sizeof(*t));
}

/* Parses a tokenizer image; expected_vocab > 0 demands exactly that many tokens. */
static int tokenizer_parse(Tokenizer *t, const unsigned char *data, size_t size, int expected_vocab,
                           const char *path, const char *model_path, char *err, int err_size) {
    memset(t, 0, sizeof(*t));
    if (size < 4) return fail(err, err_size, "%s: too short for a tokenizer .bin; export one with tokenizer.py", path);
    t->max_token_length = read_i32(data);
    if (t->max_token_length <= 0 || t->max_token_length > (1 << 16))
        return fail(err, err_size, "%s: max token length %d is implausible: not a tokenizer .bin (tokenizer.py writes one)",
                    path, t->max_token_length);
    /* Count the entries first: the file does not store how many there are. */
    size_t off = 4;
    int n = 0;
    while (off < size) {
        if (size - off < 8) return fail(err, err_size, "%s: truncated after %d tokens; re-export it", path, n);
        int len = read_i32(data + off + 4);
        if (len < 0 || len > t->max_token_length || (size_t)len > size - off - 8)
            return fail(err, err_size, "%s: token %d has a corrupt length %d; re-export the tokenizer", path, n, len);
        off += 8 + (size_t)len;
        if (++n > (1 << 22)) return fail(err, err_size, "%s: more than 4M tokens; not a tokenizer .bin", path);
    }
    if (n == 0) return fail(err, err_size, "%s: holds no tokens; re-export it", path);
    if (expected_vocab > 0 && n != expected_vocab)
        return fail(err, err_size, "tokenizer %s has %d tokens but model %s expects %d: use the tokenizer the model was "
                    "trained with", path, n, model_path ? model_path : "", expected_vocab);
    t->n_tokens = n;
    t->piece = malloc((size_t)n * sizeof(*t->piece));
    t->piece_len = malloc((size_t)n * sizeof(int));
    t->score = malloc((size_t)n * sizeof(float));
    unsigned table_size = 16;
    while (table_size < 2u * (unsigned)n) table_size *= 2;
    t->table = malloc(table_size * sizeof(int));
    t->decode_buf = malloc((size_t)t->max_token_length + 2);
    if (!t->piece || !t->piece_len || !t->score || !t->table || !t->decode_buf)
        return tokenizer_free(t), fail(err, err_size, "%s: out of memory", path);
    t->table_mask = table_size - 1;
    memset(t->table, -1, table_size * sizeof(int));
    off = 4;
    for (int i = 0; i < n; i++) {
        memcpy(&t->score[i], data + off, 4);
        t->piece_len[i] = read_i32(data + off + 4);
        t->piece[i] = data + off + 8;
        off += 8 + (size_t)t->piece_len[i];
    }
    t->bos = t->eos = t->unk = -1;
    for (int i = 0; i < n; i++) {
        if (t->bos < 0 && piece_is(t, i, "\n<s>\n")) t->bos = i;
        if (t->eos < 0 && piece_is(t, i, "\n</s>\n")) t->eos = i;
        if (t->unk < 0 && piece_is(t, i, "<unk>")) t->unk = i;
    }
    if (t->bos < 0) t->bos = n > 1 ? 1 : 0; /* llama2.c's fixed ids */
    if (t->eos < 0) t->eos = n > 2 ? 2 : 0;
    if (t->unk < 0) t->unk = 0;
    for (int b = 0; b < 256; b++) t->byte_token[b] = -1;
    /* Control and byte pieces are never the result of a merge (SentencePiece keeps them out of its piece map). */
    for (int i = 0; i < n; i++) {
        int byte = byte_piece_value(t->piece[i], t->piece_len[i]);
        if (byte >= 0) {
            if (t->byte_token[byte] < 0) t->byte_token[byte] = i;
            continue;
        }
        if (i == t->bos || i == t->eos || i == t->unk || t->piece_len[i] == 0) continue;
        uint32_t h = hash_bytes(t->piece[i], t->piece_len[i]) & t->table_mask;
        while (t->table[h] >= 0) {
            int other = t->table[h];
            if (t->piece_len[other] == t->piece_len[i] && !memcmp(t->piece[other], t->piece[i], (size_t)t->piece_len[i]))
                break; /* duplicate piece: the first id wins, as in SentencePiece */
            h = (h + 1) & t->table_mask;
        }
        if (t->table[h] < 0) t->table[h] = i;
    }
    return 0;
}

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 if the bytes there are not one. */
static int utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    int len;
    unsigned cp, min;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return 0;
    if ((size_t)len > n) return 0;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

typedef struct {
    int start, len, prev, next;
} Symbol;

typedef struct {
    float score;
    int left, right, len;
} MergeCandidate;

/* Max-heap order: higher score first, then the leftmost pair (SentencePiece's tie rule). */
static int candidate_before(const MergeCandidate *a, const MergeCandidate *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

typedef struct {
    MergeCandidate *items;
    size_t n, cap;
} MergeHeap;

static int heap_push(MergeHeap *h, MergeCandidate c) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        MergeCandidate *items = realloc(h->items, cap * sizeof(*items));
        if (!items) return -1;
        h->items = items, h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0 && candidate_before(&c, &h->items[(i - 1) / 2])) {
        h->items[i] = h->items[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->items[i] = c;
    return 0;
}

static MergeCandidate heap_pop(MergeHeap *h) {
    MergeCandidate top = h->items[0], last = h->items[--h->n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->n) break;
        if (child + 1 < h->n && candidate_before(&h->items[child + 1], &h->items[child])) child++;
        if (!candidate_before(&h->items[child], &last)) break;
        h->items[i] = h->items[child];
        i = child;
    }
    if (h->n) h->items[i] = last;
    return top;
}

static int push_pair(MergeHeap *h, const Tokenizer *t, const unsigned char *text, const Symbol *sym, int left) {
    if (left < 0 || sym[left].next < 0) return 0;
    int right = sym[left].next, len = sym[left].len + sym[right].len;
    int id = lookup_piece(t, text + sym[left].start, len);
    if (id < 0) return 0;
    return heap_push(h, (MergeCandidate){t->score[id], left, right, len});
}

/* SentencePiece BPE encoding of text into a malloc'd array; returns the count or -1 (out of memory).
   As SentencePiece with the identity normalizer and add_dummy_prefix: a space is prepended to non-empty
   text, each byte of invalid UTF-8 becomes U+FFFD, '\u2581' is a space; then the pair whose merge has the
   best score (leftmost on ties) merges until none is in the vocabulary; pieces still unknown fall back
   to their <0xNN> byte tokens. */
static int tokenizer_encode(const Tokenizer *t, const char *text, int bos, int eos, int **out_tokens) {
    const unsigned char *in = (const unsigned char *)text;
    size_t in_len = strlen(text), norm_len = 0;
    unsigned char *norm = malloc(in_len * 3 + 2);
    Symbol *sym = malloc((in_len * 3 + 2) * sizeof(Symbol));
    int *tokens = NULL;
    MergeHeap heap = {0};
    int n_sym = 0, n_tokens = 0;
    if (!norm || !sym) goto oom;
    if (in_len > 0) norm[norm_len++] = ' ';
    for (size_t i = 0; i < in_len;) {
        int len = utf8_valid_len(in + i, in_len - i);
        if (len == 0) {
            memcpy(norm + norm_len, "\xEF\xBF\xBD", 3), norm_len += 3, i += 1;
        } else if (len == 3 && !memcmp(in + i, "\xE2\x96\x81", 3)) {
            norm[norm_len++] = ' ', i += 3;
        } else {
            memcpy(norm + norm_len, in + i, (size_t)len), norm_len += (size_t)len, i += (size_t)len;
        }
    }
    if (norm_len > (size_t)INT32_MAX / 2) goto oom;
    for (size_t i = 0; i < norm_len;) {
        int len = utf8_valid_len(norm + i, norm_len - i);
        sym[n_sym] = (Symbol){(int)i, len, n_sym - 1, -1};
        if (n_sym > 0) sym[n_sym - 1].next = n_sym;
        n_sym++, i += (size_t)len;
    }
    for (int i = 0; i < n_sym; i++)
        if (push_pair(&heap, t, norm, sym, i)) goto oom;
    while (heap.n) {
        MergeCandidate c = heap_pop(&heap);
        /* Skip candidates made stale by an earlier merge of either side. */
        if (sym[c.left].len == 0 || sym[c.left].next != c.right || sym[c.left].len + sym[c.right].len != c.len) continue;
        sym[c.left].len = c.len;
        sym[c.right].len = 0;
        sym[c.left].next = sym[c.right].next;
        if (sym[c.right].next >= 0) sym[sym[c.right].next].prev = c.left;
        if (push_pair(&heap, t, norm, sym, sym[c.left].prev) || push_pair(&heap, t, norm, sym, c.left)) goto oom;
    }
    tokens = malloc((norm_len + 2) * sizeof(int));
    if (!tokens) goto oom;
    if (bos) tokens[n_tokens++] = t->bos;
    for (int i = n_sym ? 0 : -1; i >= 0; i = sym[i].next) {
        int id = lookup_piece(t, norm + sym[i].start, sym[i].len);
        if (id >= 0) {
            tokens[n_tokens++] = id;
            continue;
        }
        for (int b = 0; b < sym[i].len; b++) {
            int byte_id = t->byte_token[norm[sym[i].start + b]];
            tokens[n_tokens++] = byte_id >= 0 ? byte_id : t->unk;
            if (byte_id < 0) break; /* no byte fallback: the whole piece is one <unk>, as SentencePiece does */
        }
    }
    if (eos) tokens[n_tokens++] = t->eos;
    free(norm), free(sym), free(heap.items);
    *out_tokens = tokens;
    return n_tokens;
oom:
    free(norm), free(sym), free(heap.items), free(tokens);
    return -1;
}

static const char *tokenizer_decode(Tokenizer *t, int prev_token, int token) {
    if (token < 0 || token >= t->n_tokens) return "";
    const unsigned char *p = t->piece[token];
    int len = t->piece_len[token];
    int byte = byte_piece_value(p, len);
    if (byte >= 0) {
        t->decode_buf[0] = (char)byte, t->decode_buf[1] = 0;
        return t->decode_buf;
    }
    if (prev_token == t->bos && len > 0 && p[0] == ' ') p++, len--; /* SentencePiece drops the dummy prefix */
    memcpy(t->decode_buf, p, (size_t)len);
    t->decode_buf[len] = 0;
    return t->decode_buf;
}

/* ------------------------------------------------------------------------------------------------ */
/* Engine: the mapped files and the buffers of the forward pass                                    */

/* The phases of a layer whose work a batch shares out (see share_take). */
enum { PHASE_QKV, PHASE_ATTENTION, PHASE_WO, PHASE_W13, PHASE_W2, PHASES };

typedef struct {
    float *x, *xb, *xb2, *hb, *hb2, *q; /* [MAX_BATCH][dim or hidden_dim] */
    float *k;                           /* [MAX_BATCH][kv_dim]: new keys, before they go into the cache */
    float *att;                         /* [n_threads][ATT_TILE][seq_len]: scores, then softmax numerators */
    float *key_cache;                   /* [n_layers][seq_len / 16 rounded up][kv_dim][16]: see key_at */
    float *value_cache;                 /* [n_layers][seq_len][kv_dim] */
    float *logits;                      /* [vocab] of the last token fed */
    float *rope_cos, *rope_sin;         /* [seq_len][head_dim]: per pair (cos, cos) and (-sin, sin) */
    float *xn;                          /* [MAX_BATCH + n_threads][dim]: normed inputs, a batch's then each thread's
                                           own for one token */
    QuantizedRows *xq;                  /* [n_threads + 1]: quantized inputs (version 2) of up to hidden_dim, each
                                           thread's own for one token ([1][...]), the last a batch's
                                           ([MAX_BATCH][...]) */
    Share *shares;                      /* [n_layers][PHASES][n_threads]: a batch's work */
    float *probs;                       /* [vocab]: the softmax the sampler draws from */
    int *prob_index;                    /* [vocab]: the tokens it keeps, most probable first */
    float *penalized;                   /* [vocab]: the logits with the sampler's penalties */
    int *token_count;                   /* [vocab]: times each token was seen in the penalties' window (else 0) */
} RunState;

typedef struct Engine {
    Weights w;
    Tokenizer tok;
    RunState s;
    void *model_map, *tok_map;
    size_t model_size, tok_size;
    int n_threads;
} Engine;

static void *map_file(const char *path, size_t *size, const char *what, char *err, int err_size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK); /* a FIFO would block here until a writer came: refused below */
    if (fd < 0) {
        fail(err, err_size, "%s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        fail(err, err_size, "%s %s: not a regular file", what, path);
        return NULL;
    }
    *size = (size_t)st.st_size;
    if (*size == 0) {
        close(fd);
        fail(err, err_size, "%s %s: empty file", what, path);
        return NULL;
    }
    void *p = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        fail(err, err_size, "%s %s: mmap failed: %s", what, path, strerror(errno));
        return NULL;
    }
    return p;
}

static void *zalloc(size_t count, size_t size, int *failed) {
    void *p = calloc(count ? count : 1, size);
    if (!p) *failed = 1;
    return p;
}

/* Floats per layer of the key cache: blocks of 16 positions, each kv_dim rows of 16 (see key_at). */
static size_t key_cache_layer(const Config *c) {
    return (size_t)((c->seq_len + 15) / 16) * (size_t)config_kv_dim(c) * 16;
}

static int runstate_alloc(Engine *e) {
    const Config *c = &e->w.cfg;
    RunState *s = &e->s;
    const size_t head = (size_t)config_head_size(c), kv_dim = (size_t)config_kv_dim(c);
    const size_t width = (size_t)(c->hidden_dim > c->dim ? c->hidden_dim : c->dim);
    int failed = 0;
    s->x = zalloc(MAX_BATCH * (size_t)c->dim, 4, &failed);
    s->xb = zalloc(MAX_BATCH * (size_t)c->dim, 4, &failed);
    s->xb2 = zalloc(MAX_BATCH * (size_t)c->dim, 4, &failed);
    s->q = zalloc(MAX_BATCH * (size_t)c->dim, 4, &failed);
    s->k = zalloc(MAX_BATCH * kv_dim, 4, &failed);
    s->hb = zalloc(MAX_BATCH * (size_t)c->hidden_dim, 4, &failed);
    s->hb2 = zalloc(MAX_BATCH * (size_t)c->hidden_dim, 4, &failed);
    s->att = zalloc((size_t)e->n_threads * ATT_TILE * (size_t)c->seq_len, 4, &failed);
    s->key_cache = zalloc((size_t)c->n_layers * key_cache_layer(c), 4, &failed);
    s->value_cache = zalloc((size_t)c->n_layers * (size_t)c->seq_len * kv_dim, 4, &failed);
    s->logits = zalloc((size_t)c->vocab_size, 4, &failed);
    s->probs = zalloc((size_t)c->vocab_size, 4, &failed);
    s->prob_index = zalloc((size_t)c->vocab_size, sizeof(int), &failed);
    s->penalized = zalloc((size_t)c->vocab_size, 4, &failed);
    s->token_count = zalloc((size_t)c->vocab_size, sizeof(int), &failed);
    s->rope_cos = zalloc((size_t)c->seq_len * head, 4, &failed);
    s->rope_sin = zalloc((size_t)c->seq_len * head, 4, &failed);
    s->xn = zalloc((MAX_BATCH + (size_t)e->n_threads) * (size_t)c->dim, 4, &failed);
    s->xq = zalloc((size_t)e->n_threads + 1, sizeof(QuantizedRows), &failed);
    s->shares = aligned_alloc(64, (size_t)c->n_layers * PHASES * (size_t)e->n_threads * sizeof(Share));
    failed |= !s->shares;
    if (c->version == 2 && s->xq)
        for (int i = 0; i <= e->n_threads; i++) {
            QuantizedRows *xq = &s->xq[i];
            const size_t rows = i < e->n_threads ? 1 : MAX_BATCH;
            xq->q = zalloc(rows * width, 1, &failed);
            xq->s = zalloc(rows * (width / (size_t)c->group_size), 4, &failed);
            xq->start = zalloc(rows * (width / (size_t)c->group_size), 4, &failed);
        }
    if (failed) return -1;
    /* Same angles as model.py: float32 frequency times float32 position. */
    for (int pos = 0; pos < c->seq_len; pos++)
        for (size_t i = 0; i < head / 2; i++) {
            float freq = (float)(1.0 / pow((double)c->rope_theta, (double)(2 * i) / (double)head));
            float angle = (float)pos * freq;
            float *cs = s->rope_cos + pos * head + 2 * i, *sn = s->rope_sin + pos * head + 2 * i;
            cs[0] = cs[1] = cosf(angle);
            sn[0] = -sinf(angle), sn[1] = sinf(angle);
        }
    return 0;
}

static void runstate_free(RunState *s, int n_threads) {
    for (int i = 0; s->xq && i <= n_threads; i++) {
        QuantizedRows *xq = &s->xq[i];
        free(xq->q), free(xq->s), free(xq->start);
    }
    void *all[] = {s->x, s->xb, s->xb2, s->q, s->k, s->hb, s->hb2, s->att, s->key_cache, s->value_cache, s->logits,
                   s->probs, s->prob_index, s->penalized, s->token_count, s->rope_cos, s->rope_sin, s->xn, s->xq,
                   s->shares};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]);
    memset(s, 0, sizeof(*s));
}

void arianna_close(Engine *e) {
    if (!e) return;
    runstate_free(&e->s, e->n_threads);
    weights_free(&e->w);
    tokenizer_free(&e->tok);
    if (e->model_map) munmap(e->model_map, e->model_size);
    if (e->tok_map) munmap(e->tok_map, e->tok_size);
    free(e);
}

Engine *arianna_open(const char *model_path, const char *tokenizer_path, int n_threads, char *err, int err_size) {
#ifdef _OPENMP
    if (getenv("OMP_NUM_THREADS") && omp_get_max_threads() > MAX_THREADS) /* the loader's own parallel loops use it */
        return fail(err, err_size, "OMP_NUM_THREADS=%s asks for more than %d threads, this engine's limit; set it "
                    "lower or unset it", getenv("OMP_NUM_THREADS"), MAX_THREADS), NULL;
#endif
    if (n_threads > MAX_THREADS)
        return fail(err, err_size, "%d threads asked for: this engine runs at most %d", n_threads, MAX_THREADS), NULL;
    Engine *e = calloc(1, sizeof(Engine));
    if (!e) return fail(err, err_size, "out of memory"), NULL;
    e->n_threads = n_threads > 0 ? n_threads : default_thread_count();
    if (!(e->model_map = map_file(model_path, &e->model_size, "model", err, err_size))) goto error;
    if (weights_parse(&e->w, e->model_map, e->model_size, model_path, err, err_size)) goto error;
    if (!(e->tok_map = map_file(tokenizer_path, &e->tok_size, "tokenizer", err, err_size))) goto error;
    if (tokenizer_parse(&e->tok, e->tok_map, e->tok_size, e->w.cfg.vocab_size, tokenizer_path, model_path, err, err_size))
        goto error;
    if (runstate_alloc(e)) {
        fail(err, err_size, "%s: not enough memory for the KV cache and activations (seq_len=%d)", model_path,
             e->w.cfg.seq_len);
        goto error;
    }
    return e;
error:
    arianna_close(e);
    return NULL;
}

int arianna_seq_len(const Engine *e) { return e->w.cfg.seq_len; }
int arianna_vocab_size(const Engine *e) { return e->w.cfg.vocab_size; }
int arianna_bos(const Engine *e) { return e->tok.bos; }
int arianna_eos(const Engine *e) { return e->tok.eos; }
/* The instruction set whose kernels run this engine: avx512, avxvnni, avx2 or scalar (see kernels_select). */
const char *arianna_isa(const Engine *e) { return e->w.kernels->name; }

/* ------------------------------------------------------------------------------------------------ */
/* Forward pass                                                                                    */

/* The forward pass runs as one OpenMP parallel region per batch of tokens, with a barrier wherever a step needs
   what other threads wrote.

   One token (four barriers per layer, five when the attention cannot follow q, k and v without one): each
   thread owns a fixed, contiguous share of every matrix's rows (a single stream through the weights per core)
   and does the element-wise work of those rows itself (RoPE, residual add, SwiGLU); the small per-token work
   every row needs (RMSNorm, quantizing the token) each thread does into its own buffers rather than one thread
   behind a barrier. Where the threads can split the kv heads evenly, each owns whole heads from q, k and v
   through attention, with no barrier in between.

   A batch (nine barriers per layer): each thread norms or quantizes its share of the tokens into shared buffers,
   then a barrier, before each of the four products; its products and attention are split into work items that the threads share out as they go (see
   share_take). */

/* The shares of phase in layer l for a batch; NULL for one token (fixed shares). */
static Share *phase_shares(const Engine *e, int n_tok, int l, int phase) {
    return n_tok > 1 ? e->s.shares + ((size_t)l * PHASES + phase) * e->n_threads : NULL;
}

static int row_items(int rows) { return (rows + ITEM_ROWS - 1) / ITEM_ROWS; }

/* Whether layer l of a pass stops once its keys and values are cached (see forward_batch's kv_only_at_end). */
static int layer_kv_only(const Config *c, int l, int kv_only_at_end) { return kv_only_at_end && l == c->n_layers - 1; }

/* The rows of a layer's q, k and v products taken as one range: q's (none where kv_only), then k's and v's. */
static int qkv_rows(const Config *c, int kv_only) { return (kv_only ? 0 : c->dim) + 2 * config_kv_dim(c); }

/* Every phase of a batch of n_tok tokens split afresh, before the threads start taking items. */
static void split_batch(const Engine *e, int n_tok, int kv_only_at_end) {
    const Config *c = &e->w.cfg;
    const int tiles = (n_tok + ATT_TILE - 1) / ATT_TILE;
    for (int l = 0; l < c->n_layers; l++) {
        const int items[PHASES] = {row_items(qkv_rows(c, layer_kv_only(c, l, kv_only_at_end))), c->n_heads * tiles,
                                   row_items(c->dim), row_items(c->hidden_dim), row_items(c->dim)};
        for (int phase = 0; phase < PHASES; phase++)
            share_split(phase_shares(e, n_tok, l, phase), items[phase], e->n_threads);
    }
}

/* A product's input, n_tok rows of cols, as the kernels take it: fp32, and quantized for Q8_0 weights. With
   norm, RMSNorm by it first. One token: every thread into its own buffers; a batch: each thread its share of
   the tokens into the shared ones, then a barrier. */
typedef struct {
    const float *x;
    const QuantizedRows *q;
} Input;

static Input prepare_input(const Engine *e, const float *x, const float *norm, int n_tok, int cols, int tid, int nth) {
    const RunState *s = &e->s;
    const Kernels *kern = e->w.kernels;
    const int gs = e->w.cfg.group_size, batch = n_tok > 1;
    float *normed = s->xn + (size_t)(batch ? 0 : MAX_BATCH + tid) * cols;
    QuantizedRows *xq = e->w.cfg.version == 2 ? &s->xq[batch ? e->n_threads : tid] : NULL;
    for (int t = batch ? n_tok * tid / nth : 0; t < (batch ? n_tok * (tid + 1) / nth : n_tok); t++) {
        const float *row = x + (size_t)t * cols;
        if (norm) {
            kern->rmsnorm(normed + (size_t)t * cols, row, norm, cols, e->w.cfg.norm_eps);
            row = normed + (size_t)t * cols;
        }
        if (xq)
            kern->quantize_row(xq->q + (size_t)t * cols, xq->s + (size_t)t * (cols / gs),
                               xq->start + (size_t)t * (cols / gs), row, cols, gs);
    }
    if (batch && nth > 1 && (norm || xq)) {
#pragma omp barrier
    }
    return (Input){norm ? normed : x, xq};
}

/* Rows [r0, r1) of out[t][r] = W[r] . x[t]. */
static void matmul_range(const Engine *e, float *out, const Matrix *m, Input in, int n_tok, int r0, int r1) {
    const Kernels *kern = e->w.kernels;
    if (r0 >= r1) return;
    if (m->q) kern->matmul_rows_q8(out, m, in.q, n_tok, e->w.cfg.group_size, r0, r1);
    else kern->matmul_rows_f32(out, m, in.x, n_tok, r0, r1);
}

/* Causal attention of tokens t0..t0+n-1 (n <= ATT_TILE, positions pos + t) for head h of layer l; writes s->xb. */
static void attend(Engine *e, int l, int t0, int n, int h, int pos, float *att) {
    const Config *c = &e->w.cfg;
    RunState *s = &e->s;
    const int head = config_head_size(c), kv_dim = config_kv_dim(c), kvh = h / (c->n_heads / c->n_kv_heads);
    const float *kt = s->key_cache + (size_t)l * key_cache_layer(c) + (size_t)kvh * head * 16;
    const float *vc = s->value_cache + (size_t)l * c->seq_len * kv_dim + kvh * head;
    e->w.kernels->attention_tile(s->xb + (size_t)t0 * c->dim + h * head, s->q + (size_t)t0 * c->dim + h * head, c->dim,
                                 kt, vc, kv_dim, head, pos + t0 + 1, n, att, c->seq_len);
}

static void embed(const Weights *w, float *x, int token) {
    const Matrix *m = &w->tok_embeddings;
    const int dim = m->cols;
    if (m->f) {
        memcpy(x, m->f + (size_t)token * dim, (size_t)dim * 4);
        return;
    }
    const int gs = w->cfg.group_size;
    const int8_t *q = m->q + (size_t)token * dim;
    const float *sc = m->s + (size_t)token * (dim / gs);
    for (int i = 0; i < dim; i++) x[i] = q[i] * sc[i / gs];
}

/* x[t] += m @ in[t] for the n_tok tokens (in: [n_tok, cols]), each thread on the rows it takes. */
static void add_projection(Engine *e, Share *shares, const Matrix *m, const float *x, int cols, int n_tok, int tid,
                           int nth) {
    RunState *s = &e->s;
    const int dim = e->w.cfg.dim;
    const Input in = prepare_input(e, x, NULL, n_tok, cols, tid, nth);
    Work work = rows_work(e->n_threads, shares, dim, tid, nth);
    int r0, r1;
    while (work_next(&work, &r0, &r1)) {
        matmul_range(e, s->xb2, m, in, n_tok, r0, r1);
        for (int t = 0; t < n_tok; t++)
            for (int r = r0; r < r1; r++) s->x[(size_t)t * dim + r] += s->xb2[(size_t)t * dim + r];
    }
}

/* Tokens at positions pos..pos+n_tok-1 (n_tok <= MAX_BATCH) through the model into the KV cache. With
   kv_only_at_end, the last layer stops once their keys and values are in the cache: the rest of it only
   feeds the classifier, and nobody reads these tokens' logits. Otherwise the logits of the last token. From
   layer from_layer; tokens NULL when s->x already holds the inputs of that layer. */
static void forward_batch(Engine *e, const int *tokens, int n_tok, int pos, int kv_only_at_end, int from_layer) {
    const Config *c = &e->w.cfg;
    const Kernels *kern = e->w.kernels;
    RunState *s = &e->s;
    const int dim = c->dim, hidden = c->hidden_dim, head = config_head_size(c), kv_dim = config_kv_dim(c);
    const int tiles = (n_tok + ATT_TILE - 1) / ATT_TILE;
    for (int t = 0; t < n_tok && tokens; t++) embed(&e->w, s->x + (size_t)t * dim, tokens[t]);
    if (n_tok > 1) split_batch(e, n_tok, kv_only_at_end);
#pragma omp parallel num_threads(e->n_threads) if (e->n_threads > 1)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num(), nth = omp_get_num_threads();
#endif
        float *att = s->att + (size_t)tid * ATT_TILE * c->seq_len;
        int r0, r1;
        for (int l = from_layer; l < c->n_layers; l++) {
            const Layer *L = &e->w.layers[l];
            const int kv_only = layer_kv_only(c, l, kv_only_at_end);
            float *keys = s->key_cache + (size_t)l * key_cache_layer(c);
            float *v = s->value_cache + ((size_t)l * c->seq_len + pos) * kv_dim;
            /* Attention: q, k, v (only k and v where kv_only) with RoPE, then attention over the cache. */
            Input in = prepare_input(e, s->x, L->rms_att, n_tok, dim, tid, nth);
            if (n_tok == 1 && c->n_kv_heads % nth == 0) {
                /* Each thread owns whole kv heads with their query heads: it computes their q, k, v rows and
                   then their attention, with no barrier in between. */
                const int group = c->n_heads / c->n_kv_heads;
                const int kv0 = c->n_kv_heads / nth * tid, kv1 = kv0 + c->n_kv_heads / nth;
                if (!kv_only) {
                    matmul_range(e, s->q, &L->wq, in, n_tok, kv0 * group * head, kv1 * group * head);
                    kern->rope_range(s->rope_cos, s->rope_sin, s->q, n_tok, dim, head, pos, kv0 * group * head,
                                     kv1 * group * head);
                }
                matmul_range(e, s->k, &L->wk, in, n_tok, kv0 * head, kv1 * head);
                kern->rope_range(s->rope_cos, s->rope_sin, s->k, n_tok, kv_dim, head, pos, kv0 * head, kv1 * head);
                kern->cache_keys(keys, kv_dim, s->k, n_tok, pos, kv0 * head, kv1 * head);
                matmul_range(e, v, &L->wv, in, n_tok, kv0 * head, kv1 * head);
                if (kv_only) break;
                for (int h = kv0 * group; h < kv1 * group; h++) attend(e, l, 0, 1, h, pos, att);
            } else { /* the q, k, v rows as one range, RoPE and key caching on each part; attention after a barrier */
                const int rows = qkv_rows(c, kv_only), q_rows = rows - 2 * kv_dim;
                Work work = rows_work(e->n_threads, phase_shares(e, n_tok, l, PHASE_QKV), rows, tid, nth);
                while (work_next(&work, &r0, &r1)) {
                    const int a0 = clamp(r0, 0, q_rows), a1 = clamp(r1, 0, q_rows);
                    matmul_range(e, s->q, &L->wq, in, n_tok, a0, a1);
                    kern->rope_range(s->rope_cos, s->rope_sin, s->q, n_tok, dim, head, pos, a0, a1);
                    const int k0 = clamp(r0 - q_rows, 0, kv_dim), k1 = clamp(r1 - q_rows, 0, kv_dim);
                    matmul_range(e, s->k, &L->wk, in, n_tok, k0, k1);
                    kern->rope_range(s->rope_cos, s->rope_sin, s->k, n_tok, kv_dim, head, pos, k0, k1);
                    kern->cache_keys(keys, kv_dim, s->k, n_tok, pos, k0, k1);
                    matmul_range(e, v, &L->wv, in, n_tok, clamp(r0 - q_rows - kv_dim, 0, kv_dim),
                                 clamp(r1 - q_rows - kv_dim, 0, kv_dim));
                }
                if (kv_only) break;
#pragma omp barrier
                /* Items head by head, each head's tiles in order: a share's last item is its most expensive. */
                work = items_work(e->n_threads, phase_shares(e, n_tok, l, PHASE_ATTENTION), c->n_heads * tiles, tid, nth);
                while (work_next(&work, &r0, &r1))
                    for (int item = r0; item < r1; item++) {
                        const int t = item % tiles * ATT_TILE;
                        attend(e, l, t, min_int(ATT_TILE, n_tok - t), item / tiles, pos, att);
                    }
            }
#pragma omp barrier
            /* wo, then the residual on the same rows. */
            add_projection(e, phase_shares(e, n_tok, l, PHASE_WO), &L->wo, s->xb, dim, n_tok, tid, nth);
#pragma omp barrier
            /* w1 and w3 on the same rows, SwiGLU on them. */
            in = prepare_input(e, s->x, L->rms_ffn, n_tok, dim, tid, nth);
            Work work = rows_work(e->n_threads, phase_shares(e, n_tok, l, PHASE_W13), hidden, tid, nth);
            while (work_next(&work, &r0, &r1)) {
                matmul_range(e, s->hb, &L->w1, in, n_tok, r0, r1);
                matmul_range(e, s->hb2, &L->w3, in, n_tok, r0, r1);
                for (int t = 0; t < n_tok; t++)
                    kern->swiglu(s->hb + (size_t)t * hidden + r0, s->hb2 + (size_t)t * hidden + r0, r1 - r0);
            }
#pragma omp barrier
            /* w2, then the residual. */
            add_projection(e, phase_shares(e, n_tok, l, PHASE_W2), &L->w2, s->hb, hidden, n_tok, tid, nth);
#pragma omp barrier
        }
        if (!kv_only_at_end) { /* the classifier (the largest matrix of small models), split like the others */
            const Input in = prepare_input(e, s->x + (size_t)(n_tok - 1) * dim, e->w.rms_final, 1, dim, tid, nth);
            thread_share(c->vocab_size, 16, tid, nth, &r0, &r1);
            matmul_range(e, s->logits, &e->w.classifier, in, 1, r0, r1);
        }
    }
}

int arianna_feed(Engine *e, const int *tokens, int n, int pos) {
    if (n <= 0 || pos < 0 || pos > e->w.cfg.seq_len - n) return -1;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= e->w.cfg.vocab_size) return -1;
    if (n == 1) {
        forward_batch(e, tokens, 1, pos, 0, 0);
        return 0;
    }
    /* Every token reaches the KV cache in batches of even sizes. Only the last token's logits are wanted: it goes on
       alone through the last layer (whose keys and values it recomputes), from its input there. */
    const int batches = (n + MAX_BATCH - 1) / MAX_BATCH, dim = e->w.cfg.dim;
    int last = 0;
    for (int i = 0; i < batches; i++) {
        const int t0 = (int)((int64_t)n * i / batches), t1 = (int)((int64_t)n * (i + 1) / batches);
        forward_batch(e, tokens + t0, t1 - t0, pos + t0, 1, 0);
        last = t1 - t0 - 1;
    }
    memmove(e->s.x, e->s.x + (size_t)last * dim, (size_t)dim * sizeof(float));
    forward_batch(e, NULL, 1, pos + n - 1, 0, e->w.cfg.n_layers - 1);
    return 0;
}

/* The logits of the last token fed, [vocab_size]; valid until the next arianna_feed. */
const float *arianna_logits(const Engine *e) { return e->s.logits; }

/* ------------------------------------------------------------------------------------------------ */
/* Sampler                                                                                         */

/* How the next token is drawn from the logits, with the meanings llama.cpp gives these settings. In this order:
   the penalties change the logits of the tokens among the last repeat_last_n of the history given; then the
   most probable token is the greedy choice, or, with a temperature, the softmax of logits / temperature is cut
   to the top_k most probable tokens, then to the most probable of those whose mass (within them) reaches top_p,
   then to those at least min_p times as probable as the most probable one, and a token is drawn from what is
   left. (llama.cpp applies the temperature after its filters, Hugging Face and ollama before: this is the
   latter, so top_p and min_p see the distribution that is sampled.) A zeroed struct is plain greedy decoding. */
typedef struct {
    float temperature;       /* 0: greedy */
    float top_p;             /* in (0, 1); 0 or 1: off */
    int top_k;               /* > 0; 0: off */
    float min_p;             /* in (0, 1]; 0: off */
    float repeat_penalty;    /* > 0: a seen token's logit divided by it when positive, multiplied when not; 1 or 0: off */
    int repeat_last_n;       /* how many of the history's last tokens the three penalties look at; -1: all of it */
    float presence_penalty;  /* subtracted from the logit of each seen token */
    float frequency_penalty; /* subtracted from a seen token's logit once per time it was seen */
} AriannaSampling;

static uint32_t rng_u32(unsigned long long *state) { /* xorshift64* */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float rng_f32(unsigned long long *state) { return (float)(rng_u32(state) >> 8) / 16777216.0f; }

/* Heap of token indices, the least probable on top (its root), for the heapsort and the top-k selection. */
static void sift_down(int *idx, int root, int n, const float *probs) {
    for (;;) {
        int child = 2 * root + 1;
        if (child >= n) return;
        if (child + 1 < n && probs[idx[child + 1]] < probs[idx[child]]) child++;
        if (probs[idx[root]] <= probs[idx[child]]) return;
        int tmp = idx[root];
        idx[root] = idx[child], idx[child] = tmp, root = child;
    }
}

/* Heapsort of token indices by descending probability (qsort cannot see probs without a global). */
static void sort_indices_by_prob(int *idx, int n, const float *probs) {
    for (int root = n / 2 - 1; root >= 0; root--) sift_down(idx, root, n, probs);
    for (int end = n - 1; end > 0; end--) { /* the smallest goes last: descending order */
        int tmp = idx[0];
        idx[0] = idx[end], idx[end] = tmp;
        sift_down(idx, 0, end, probs);
    }
}

/* The k most probable of n tokens into idx[0..k), in O(n log k): a heap of the best so far, whose least probable
   member a better token replaces. */
static void select_top_k(int *idx, int n, int k, const float *probs) {
    for (int i = 0; i < k; i++) idx[i] = i;
    for (int root = k / 2 - 1; root >= 0; root--) sift_down(idx, root, k, probs);
    for (int i = k; i < n; i++)
        if (probs[i] > probs[idx[0]]) {
            idx[0] = i;
            sift_down(idx, 0, k, probs);
        }
}

static int penalties_on(const AriannaSampling *p) {
    return p->repeat_last_n != 0 && ((p->repeat_penalty > 0.0f && p->repeat_penalty != 1.0f) ||
                                     p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f);
}

/* The logits with the penalties applied: the engine's own, or a copy in s->penalized. */
static const float *penalized_logits(Engine *e, const AriannaSampling *p, const int *history, int n_history) {
    RunState *s = &e->s;
    const int n = e->w.cfg.vocab_size;
    if (!history || n_history <= 0 || !penalties_on(p)) return s->logits;
    const int window = p->repeat_last_n < 0 || p->repeat_last_n > n_history ? n_history : p->repeat_last_n;
    const int *seen = history + n_history - window;
    memcpy(s->penalized, s->logits, (size_t)n * sizeof(float));
    for (int i = 0; i < window; i++)
        if (seen[i] >= 0 && seen[i] < n) s->token_count[seen[i]]++;
    for (int i = 0; i < window; i++) { /* each token seen once; its count goes back to 0 for the next call */
        const int token = seen[i];
        if (token < 0 || token >= n || !s->token_count[token]) continue;
        float l = s->penalized[token];
        if (p->repeat_penalty > 0.0f) l = l > 0.0f ? l / p->repeat_penalty : l * p->repeat_penalty;
        s->penalized[token] = l - ((float)s->token_count[token] * p->frequency_penalty + p->presence_penalty);
        s->token_count[token] = 0;
    }
    return s->penalized;
}

/* The distribution the next token is drawn from: s->probs (softmax of logits / temperature over every token)
   and the kept tokens, most probable first, in s->prob_index[0..kept); *mass is their total probability.
   Greedy (temperature 0), or logits holding NaN: the one most probable token. */
static int sampler_candidates(Engine *e, const AriannaSampling *p, const int *history, int n_history, float *mass) {
    const int n = e->w.cfg.vocab_size;
    const float *logits = penalized_logits(e, p, history, n_history);
    float *probs = e->s.probs;
    int *idx = e->s.prob_index, best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    const int top_k = p->top_k > 0 && p->top_k < n ? p->top_k : 0;
    const int top_p = p->top_p > 0.0f && p->top_p < 1.0f, min_p = p->min_p > 0.0f;
    float sum = 0.0f;
    if (p->temperature > 0.0f && n > 1) {
        for (int i = 0; i < n; i++) sum += (probs[i] = expf((logits[i] - logits[best]) / p->temperature));
        for (int i = 0; i < n; i++) probs[i] /= sum;
    }
    if (!(p->temperature > 0.0f) || n == 1 || !(sum > 0.0f) || isinf(sum)) {
        idx[0] = best, probs[best] = 1.0f, *mass = 1.0f;
        return 1;
    }
    if (!top_k && !top_p && !min_p) { /* every token, in index order */
        for (int i = 0; i < n; i++) idx[i] = i;
        *mass = 1.0f;
        return n;
    }
    int m = 0;
    float total = 1.0f; /* of the tokens top_p's mass is relative to */
    if (top_k) {
        select_top_k(idx, n, top_k, probs);
        m = top_k;
        total = 0.0f;
        for (int i = 0; i < m; i++) total += probs[idx[i]];
    } else {
        /* Only a prefix of the sorted tokens can be kept: none below min_p times the best, and (as the mass of all
           tokens below (1 - top_p) / (n - 1) is less than 1 - top_p) none below that either. */
        const float floor_p = fmaxf(min_p ? p->min_p * probs[best] : 0.0f, top_p ? (1.0f - p->top_p) / (float)(n - 1) : 0.0f);
        for (int i = 0; i < n; i++)
            if (probs[i] >= floor_p) idx[m++] = i;
    }
    sort_indices_by_prob(idx, m, probs);
    int keep = m;
    if (top_p) {
        float cum = 0.0f;
        for (int i = 0; i < m; i++)
            if ((cum += probs[idx[i]]) >= p->top_p * total) {
                keep = i + 1;
                break;
            }
    }
    if (min_p)
        for (int i = 1; i < keep; i++)
            if (probs[idx[i]] < p->min_p * probs[idx[0]]) {
                keep = i;
                break;
            }
    *mass = 0.0f;
    for (int i = 0; i < keep; i++) *mass += probs[idx[i]];
    return keep;
}

/* The next token: greedy, or drawn with the settings p, the penalties looking at history[0..n_history) (the
   context's tokens, or whichever the caller wants penalized). */
int arianna_sample_with(Engine *e, const AriannaSampling *p, const int *history, int n_history,
                        unsigned long long *rng_state) {
    float mass;
    const int kept = sampler_candidates(e, p, history, n_history, &mass);
    const int *idx = e->s.prob_index;
    if (kept == 1) return idx[0];
    const float r = rng_f32(rng_state) * mass;
    float cdf = 0.0f;
    for (int i = 0; i < kept; i++)
        if (r < (cdf += e->s.probs[idx[i]])) return idx[i];
    return idx[kept - 1]; /* rounding left the cdf just below r */
}

/* The probabilities the next token would be drawn with, into out[vocab_size] (zero for the tokens cut); returns
   how many tokens are kept. For log-probabilities in an API, and for the tests. */
int arianna_distribution(Engine *e, const AriannaSampling *p, const int *history, int n_history, float *out) {
    float mass;
    const int kept = sampler_candidates(e, p, history, n_history, &mass);
    memset(out, 0, (size_t)e->w.cfg.vocab_size * sizeof(float));
    for (int i = 0; i < kept; i++) out[e->s.prob_index[i]] = e->s.probs[e->s.prob_index[i]] / mass;
    return kept;
}

/* llama2.c's sampler: temperature and top-p only, no penalties. */
int arianna_sample(Engine *e, float temperature, float topp, unsigned long long *rng_state) {
    const AriannaSampling p = {.temperature = temperature, .top_p = topp};
    return arianna_sample_with(e, &p, NULL, 0, rng_state);
}

/* ------------------------------------------------------------------------------------------------ */
/* Text API                                                                                        */

static int copy_tokens(const int *tokens, int n, int *out, int max_out) {
    if (n > max_out) return -n;
    memcpy(out, tokens, (size_t)n * sizeof(int));
    return n;
}

int arianna_encode(Engine *e, const char *text, int bos, int eos, int *out, int max_out) {
    int *tokens;
    int n = tokenizer_encode(&e->tok, text, bos, eos, &tokens);
    if (n < 0) return 0;
    n = copy_tokens(tokens, n, out, max_out);
    free(tokens);
    return n;
}

/* text = a + b + c in a malloc'd string. */
static char *concat3(const char *a, const char *b, const char *c) {
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    char *s = malloc(la + lb + lc + 1);
    if (!s) return NULL;
    memcpy(s, a, la), memcpy(s + la, b, lb), memcpy(s + la + lb, c, lc + 1);
    return s;
}

/* The chat template of tokenizer.py: [BOS] + system segment + user segment, into a malloc'd array. */
static int chat_turn_tokens(Engine *e, const char *system, const char *user, int first_turn, int **out) {
    char *sys_text = system && *system ? concat3("<|system|>\n", system, "\n") : NULL;
    char *user_text = concat3("<|user|>\n", user ? user : "", "\n<|assistant|>\n");
    int *sys_tokens = NULL, *user_tokens = NULL, n_sys = 0, n_user = -1, n = -1;
    if ((system && *system && !sys_text) || !user_text) goto done;
    if (sys_text && (n_sys = tokenizer_encode(&e->tok, sys_text, 0, 0, &sys_tokens)) < 0) goto done;
    if ((n_user = tokenizer_encode(&e->tok, user_text, 0, 0, &user_tokens)) < 0) goto done;
    int *tokens = malloc(((size_t)n_sys + (size_t)n_user + 1) * sizeof(int));
    if (!tokens) goto done;
    n = 0;
    if (first_turn) tokens[n++] = e->tok.bos;
    if (n_sys) memcpy(tokens + n, sys_tokens, (size_t)n_sys * sizeof(int)), n += n_sys;
    memcpy(tokens + n, user_tokens, (size_t)n_user * sizeof(int)), n += n_user;
    *out = tokens;
done:
    free(sys_text), free(user_text), free(sys_tokens), free(user_tokens);
    return n;
}

int arianna_chat_turn(Engine *e, const char *system, const char *user, int first_turn, int *out, int max_out) {
    int *tokens;
    int n = chat_turn_tokens(e, system, user, first_turn, &tokens);
    if (n < 0) return 0;
    n = copy_tokens(tokens, n, out, max_out);
    free(tokens);
    return n;
}

const char *arianna_decode(Engine *e, int prev_token, int token) { return tokenizer_decode(&e->tok, prev_token, token); }

/* ------------------------------------------------------------------------------------------------ */
/* Command line                                                                                    */

static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#ifndef ARIANNA_LIBRARY

/* Decoded pieces on their way to stdout, written as chat.py writes them: whole UTF-8 characters (one split over
   byte-fallback tokens waits for its last byte), each maximal invalid sequence as one U+FFFD, and control
   characters other than newline and tab dropped, so neither a model nor a hostile tokenizer can send the
   terminal escape sequences. */
typedef struct {
    unsigned char pending[4]; /* the start of a character whose last bytes have not come yet */
    int n_pending;
} TextOut;

/* How many bytes a UTF-8 sequence starting with lead has, and the range its second byte must fall in (no overlong
   forms, surrogates or code points past U+10FFFF); 0 if lead starts none. */
static int utf8_lead(unsigned lead, unsigned *lo, unsigned *hi) {
    *lo = 0x80, *hi = 0xBF;
    if (lead < 0x80) return 1;
    if (lead >= 0xC2 && lead <= 0xDF) return 2;
    if (lead >= 0xE0 && lead <= 0xEF) return *lo = lead == 0xE0 ? 0xA0 : 0x80, *hi = lead == 0xED ? 0x9F : 0xBF, 3;
    if (lead >= 0xF0 && lead <= 0xF4) return *lo = lead == 0xF0 ? 0x90 : 0x80, *hi = lead == 0xF4 ? 0x8F : 0xBF, 4;
    return 0;
}

/* One whole character, unless it is a C0 or C1 control other than newline and tab. */
static void text_char(const unsigned char *c, int len) {
    const unsigned cp = len == 1 ? c[0] : len == 2 ? (c[0] & 0x1Fu) << 6 | (c[1] & 0x3Fu) : 0x100;
    if ((cp < 0x20 && cp != '\n' && cp != '\t') || (cp >= 0x7F && cp <= 0x9F)) return;
    fwrite(c, 1, (size_t)len, stdout);
}

static void text_byte(TextOut *o, unsigned b) {
    unsigned lo, hi;
    if (o->n_pending == 0) {
        const int len = utf8_lead(b, &lo, &hi);
        if (len == 1) text_char((const unsigned char[]){(unsigned char)b}, 1);
        else if (len == 0) fputs("\xEF\xBF\xBD", stdout);
        else o->pending[o->n_pending++] = (unsigned char)b;
        return;
    }
    const int len = utf8_lead(o->pending[0], &lo, &hi);
    if (o->n_pending > 1) lo = 0x80, hi = 0xBF; /* the lead's own range is for its second byte only */
    if (b >= lo && b <= hi) {
        o->pending[o->n_pending++] = (unsigned char)b;
        if (o->n_pending == len) text_char(o->pending, len), o->n_pending = 0;
        return;
    }
    fputs("\xEF\xBF\xBD", stdout); /* the cut-off character; b starts afresh */
    o->n_pending = 0;
    text_byte(o, b);
}

static void text_put(TextOut *o, const char *piece) {
    for (const unsigned char *p = (const unsigned char *)piece; *p; p++) text_byte(o, *p);
    fflush(stdout);
}

/* The end of a text: a character still waiting for bytes becomes U+FFFD. */
static void text_finish(TextOut *o) {
    if (o->n_pending) fputs("\xEF\xBF\xBD", stdout);
    o->n_pending = 0;
}

static int generate(Engine *e, const char *prompt, const AriannaSampling *sampling, unsigned long long seed, int steps) {
    const int seq_len = arianna_seq_len(e);
    int *tokens;
    int n_prompt = tokenizer_encode(&e->tok, prompt ? prompt : "", 1, 0, &tokens);
    if (n_prompt < 0) return fprintf(stderr, "error: out of memory encoding the prompt\n"), 1;
    if (n_prompt >= steps) {
        fprintf(stderr, "error: the prompt is %d tokens but -n %d (context %d) leaves no room to generate; "
                        "shorten the prompt or raise -n\n", n_prompt, steps, seq_len);
        free(tokens);
        return 1;
    }
    int *context = realloc(tokens, (size_t)steps * sizeof(int)); /* the prompt, then what follows: the penalties' */
    if (!context) return free(tokens), fprintf(stderr, "error: out of memory\n"), 1;
    TextOut out = {0};
    for (int i = 1; i < n_prompt; i++) text_put(&out, arianna_decode(e, context[i - 1], context[i]));
    double start = now_seconds();
    arianna_feed(e, context, n_prompt, 0);
    double prompt_done = now_seconds();
    int prev = context[n_prompt - 1], pos = n_prompt, generated = 0;
    while (pos < steps) {
        int next = arianna_sample_with(e, sampling, context, pos, &seed);
        if (next == e->tok.eos || next == e->tok.bos) break;
        text_put(&out, arianna_decode(e, prev, next));
        generated++;
        if (pos + 1 >= steps) break;
        context[pos] = next;
        arianna_feed(e, &next, 1, pos++);
        prev = next;
    }
    free(context);
    text_finish(&out);
    printf("\n");
    double end = now_seconds();
    fprintf(stderr, "prompt: %d tokens at %.1f tok/s; generated %d tokens at %.1f tok/s; %s kernels; %d thread%s\n",
            n_prompt, n_prompt / fmax(prompt_done - start, 1e-9), generated, generated / fmax(end - prompt_done, 1e-9),
            arianna_isa(e), e->n_threads, e->n_threads == 1 ? "" : "s");
    return 0;
}

/* One line of stdin of any length without its newline, malloc'd; NULL at end of input. */
static char *read_line(FILE *f) {
    size_t len = 0, cap = 256;
    char *line = malloc(cap);
    if (!line) return NULL;
    int ch;
    while ((ch = fgetc(f)) != EOF && ch != '\n') {
        if (len + 1 == cap) {
            char *bigger = realloc(line, cap *= 2);
            if (!bigger) return free(line), NULL;
            line = bigger;
        }
        line[len++] = (char)ch;
    }
    if (ch == EOF && len == 0) return free(line), NULL;
    line[len] = 0;
    return line;
}

/* Chat: each user line is a turn; the KV cache holds the whole conversation, so a turn only feeds its
   own tokens. The conversation starts over (with the system prompt) when the context cannot hold the turn and
   a whole reply after it: the reply cap (-n), at most 3/4 of the context, as chat.py keeps free (its
   reply_room says why). */
static int chat(Engine *e, const char *first_user, const char *system, const AriannaSampling *sampling,
                unsigned long long seed, int max_reply) {
    const int seq_len = arianna_seq_len(e), eos = arianna_eos(e), interactive = isatty(0);
    const int reply_room = (max_reply > 0 && max_reply < seq_len * 3 / 4 ? max_reply : seq_len * 3 / 4) + 1;
    int pos = 0, pending[2], n_pending = 0; /* tokens of the last reply not fed yet: its last token, EOS */
    int *context = malloc((size_t)seq_len * sizeof(int)); /* the tokens at positions 0..pos-1: the penalties' */
    if (!context) return fprintf(stderr, "error: out of memory\n"), 1;
    char *user = first_user && *first_user ? strdup(first_user) : NULL;
    for (;;) {
        if (!user) {
            if (interactive) fputs("User: ", stdout), fflush(stdout);
            if (!(user = read_line(stdin))) break;
        }
        int *turn, n_turn;
        for (int attempt = 0;; attempt++) {
            n_turn = chat_turn_tokens(e, pos == 0 ? system : NULL, user, pos == 0, &turn);
            if (n_turn < 0) return free(user), free(context), fprintf(stderr, "error: out of memory\n"), 1;
            if (pos == 0 ? n_turn < seq_len : pos + n_pending + n_turn + reply_room <= seq_len) break;
            free(turn);
            if (pos == 0 || attempt) {
                n_turn = -1;
                break;
            }
            fprintf(stderr, "[no room left for a reply in the context of %d tokens: starting a new conversation]\n",
                    seq_len);
            pos = 0, n_pending = 0;
        }
        free(user);
        user = NULL;
        if (n_turn < 0) {
            fprintf(stderr, "[this turn does not fit in the context of %d tokens: skipped]\n", seq_len);
            continue;
        }
        memcpy(context + pos, pending, (size_t)n_pending * sizeof(int));
        memcpy(context + pos + n_pending, turn, (size_t)n_turn * sizeof(int));
        free(turn);
        arianna_feed(e, context + pos, n_pending + n_turn, pos);
        pos += n_pending + n_turn;
        int prev = context[pos - 1];
        n_pending = 0;
        if (interactive) fputs("Assistant: ", stdout);
        TextOut out = {0};
        for (int produced = 0;; produced++) {
            int next = arianna_sample_with(e, sampling, context, pos, &seed);
            if (next == eos) {
                pending[n_pending++] = eos;
                break;
            }
            text_put(&out, arianna_decode(e, prev, next));
            if (pos + 1 >= seq_len) {
                fprintf(stderr, "\n[context of %d tokens is full: the next turn starts a new conversation]", seq_len);
                pos = seq_len; /* forces the reset */
                break;
            }
            if (max_reply > 0 && produced + 1 >= max_reply) {
                pending[n_pending++] = next, pending[n_pending++] = eos; /* close the cut-off reply */
                break;
            }
            context[pos] = next;
            arianna_feed(e, &next, 1, pos++);
            prev = next;
        }
        text_finish(&out);
        printf("\n");
        fflush(stdout);
    }
    free(context);
    return 0;
}

static void usage(void) {
    const Kernels *best = kernels_select(NULL, 0);
    fprintf(stderr,
            "Usage:   run <model.bin> [options]\n"
            "Example: run out/model.bin -z data/tok4096.bin -i \"Once upon a time\"\n"
            "Options:\n"
            "  -t <float>   temperature in [0, inf), default 1.0 (0 = greedy)\n"
            "  -p <float>   top-p (nucleus) in [0, 1], default 0.9 (1 = off)\n"
            "  -k <int>     top-k: only the k most probable tokens, default 0 (off); also --top-k\n"
            "  -s <int>     random seed, default time(NULL)\n"
            "  -n <int>     generate: positions in total, prompt included (default: the context length);\n"
            "               chat: most tokens per reply (default 0 = until EOS or the context is full)\n"
            "  -i <string>  prompt (chat: the first user message)\n"
            "  -z <string>  tokenizer .bin, default tokenizer.bin\n"
            "  -m <string>  mode: generate|chat, default generate\n"
            "  -y <string>  system prompt (chat mode)\n"
            "  -T <int>     threads, default: OMP_NUM_THREADS, else the CPUs not busy with other processes\n"
            "  --min-p <float>              only tokens at least this times as probable as the most probable one,\n"
            "                               in [0, 1], default 0 (off)\n"
            "  --repeat-penalty <float>     > 0: the logit of a token among the last --repeat-last-n is divided by\n"
            "                               it (multiplied when negative), default 1 (off)\n"
            "  --repeat-last-n <int>        how many of the last tokens the penalties look at, default 64 (-1: all)\n"
            "  --presence-penalty <float>   subtracted from the logit of each token among them, default 0\n"
            "  --frequency-penalty <float>  subtracted once per time a token is among them, default 0\n"
            "  --isa <string>               the kernels: avx512, avxvnni, avx2 or scalar (where this build has them);\n"
            "                               also the environment's ARIANNA_ISA; default: the best this CPU runs, here %s\n",
            best ? best->name : "none (ARIANNA_ISA or ARIANNA_MAX_ISA is wrong)");
}

static int parse_int(const char *s, const char *flag, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < INT32_MIN || v > INT32_MAX)
        return fprintf(stderr, "error: %s expects an integer, got \"%s\"\n", flag, s), -1;
    *out = (int)v;
    return 0;
}

static int parse_float(const char *s, const char *flag, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || *end || end == s || !isfinite(v))
        return fprintf(stderr, "error: %s expects a number, got \"%s\"\n", flag, s), -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *tokenizer_path = "tokenizer.bin", *prompt = NULL, *mode = "generate",
               *system = NULL, *isa = NULL;
    AriannaSampling sampling = {.temperature = 1.0f, .top_p = 0.9f, .repeat_penalty = 1.0f, .repeat_last_n = 64};
    int steps = 0, threads = 0, seed_int = 0, seed_given = 0;
    unsigned long long seed = 0;
    const struct {
        const char *name;
        float *f; /* a number, */
        int *i;   /* an integer, */
        const char **s; /* or a string */
    } options[] = {{"-t", &sampling.temperature, NULL, NULL}, {"-p", &sampling.top_p, NULL, NULL},
                   {"-k", NULL, &sampling.top_k, NULL}, {"--top-k", NULL, &sampling.top_k, NULL},
                   {"--min-p", &sampling.min_p, NULL, NULL}, {"--repeat-penalty", &sampling.repeat_penalty, NULL, NULL},
                   {"--repeat-last-n", NULL, &sampling.repeat_last_n, NULL},
                   {"--presence-penalty", &sampling.presence_penalty, NULL, NULL},
                   {"--frequency-penalty", &sampling.frequency_penalty, NULL, NULL}, {"-s", NULL, &seed_int, NULL},
                   {"-n", NULL, &steps, NULL}, {"-T", NULL, &threads, NULL}, {"-i", NULL, NULL, &prompt},
                   {"-z", NULL, NULL, &tokenizer_path}, {"-m", NULL, NULL, &mode}, {"-y", NULL, NULL, &system},
                   {"--isa", NULL, NULL, &isa}};
    if (argc < 2 || argv[1][0] == '-') return usage(), 1;
    model_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        size_t o = 0;
        while (o < sizeof(options) / sizeof(options[0]) && strcmp(argv[i], options[o].name)) o++;
        if (o == sizeof(options) / sizeof(options[0]) || i + 1 >= argc) {
            fprintf(stderr, "error: %s option \"%s\" (./run alone lists the options)\n",
                    o < sizeof(options) / sizeof(options[0]) ? "no value for" : "unknown", argv[i]);
            return 1;
        }
        if (options[o].f && parse_float(argv[i + 1], argv[i], options[o].f)) return 1;
        if (options[o].i && parse_int(argv[i + 1], argv[i], options[o].i)) return 1;
        if (options[o].s) *options[o].s = argv[i + 1];
        if (options[o].i == &seed_int) seed = (unsigned long long)(unsigned)seed_int, seed_given = 1;
    }
    const AriannaSampling *p = &sampling;
    if (p->temperature < 0.0f) return fprintf(stderr, "error: -t must be >= 0\n"), 1;
    if (p->top_p < 0.0f || p->top_p > 1.0f) return fprintf(stderr, "error: -p must be in [0, 1]\n"), 1;
    if (p->top_k < 0) return fprintf(stderr, "error: -k must be >= 0\n"), 1;
    if (p->min_p < 0.0f || p->min_p > 1.0f) return fprintf(stderr, "error: --min-p must be in [0, 1]\n"), 1;
    if (p->repeat_penalty <= 0.0f) return fprintf(stderr, "error: --repeat-penalty must be > 0 (1 = off)\n"), 1;
    if (p->repeat_last_n < -1) return fprintf(stderr, "error: --repeat-last-n must be >= -1 (-1 = all)\n"), 1;
    if (steps < 0) return fprintf(stderr, "error: -n must be >= 0\n"), 1;
    if (threads < 0) return fprintf(stderr, "error: -T must be >= 0\n"), 1;
    if (strcmp(mode, "generate") && strcmp(mode, "chat"))
        return fprintf(stderr, "error: unknown mode \"%s\": use -m generate or -m chat\n", mode), 1;
    if (!seed_given) seed = (unsigned long long)time(NULL);
    if (seed == 0) seed = 0x9E3779B97F4A7C15ull; /* xorshift state must not be zero */
    if (isa && setenv("ARIANNA_ISA", isa, 1)) return fprintf(stderr, "error: --isa: %s\n", strerror(errno)), 1;
    char err[1024];
    Engine *e = arianna_open(model_path, tokenizer_path, threads, err, sizeof(err));
    if (!e) return fprintf(stderr, "error: %s\n", err), 1;
    const int seq_len = arianna_seq_len(e);
    int rc;
    if (!strcmp(mode, "generate")) {
        if (steps > seq_len) {
            fprintf(stderr, "error: -n %d is beyond the model's context of %d tokens; use -n %d or less\n", steps,
                    seq_len, seq_len);
            arianna_close(e);
            return 1;
        }
        rc = generate(e, prompt, &sampling, seed, steps ? steps : seq_len);
    } else {
        rc = chat(e, prompt, system, &sampling, seed, steps);
    }
    arianna_close(e);
    return rc;
}
#endif

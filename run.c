/* run.c: inference for InnerArianna / llama2.c model files, in one C file (libc + libm, OpenMP optional).

   ./run model.bin -z tokenizer.bin [-i prompt] [-t temperature] [-p top_p] [-s seed] [-n steps]
                                    [-m generate|chat] [-y system_prompt] [-T threads]

   Model files: llama2.c's legacy version 0 (7-int header, fp32), version 1 ("ak42" header, fp32) and
   version 2 ("ak42" header, Q8_0: int8 weights with one fp32 scale per group). The tokenizer file is
   llama2.c's tokenizer .bin (tokenizer.py writes it). Both are memory-mapped and checked against the
   file length before anything is read.

   Built with -DARIANNA_LIBRARY this file is a shared library without main(), the API chat.py uses:
   arianna_open/close, arianna_encode, arianna_chat_turn (the chat template), arianna_feed (tokens at a
   position into the KV cache), arianna_logits, arianna_sample, arianna_decode. The ./run binary's chat mode
   goes through the very same functions. */
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
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
/* The int8 kernels on repacked weights (pack_q8): AVX-512 VNNI, else AVX2; without either, a plain loop. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_AVX512_VNNI 1
#define PACKED_Q8_BIAS 128 /* vpdpbusd's first operand is unsigned */
#elif defined(__AVX2__)
#define HAVE_AVX2_INT8 1
#define PACKED_Q8_BIAS 0
#endif

#define MODEL_MAGIC 0x616b3432u /* "ak42" */
#define V1_HEADER_BYTES 256
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
/* Model file                                                                                      */

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int shared_classifier, version, group_size; /* group_size: version 2 only */
} Config;

/* Values per attention head, and per token in each of the key and value caches (n_kv_heads heads). Valid once
   config_check has passed: dim divides by n_heads, and n_heads by n_kv_heads. */
static int config_head_size(const Config *c) { return c->dim / c->n_heads; }
static int config_kv_dim(const Config *c) { return config_head_size(c) * c->n_kv_heads; }

/* One weight matrix [rows, cols]: fp32 (f) or Q8_0 (q with scales s, one per group_size values). With AVX-512
   VNNI or AVX2, Q8_0 matrices the kernels read are also repacked at load (see pack_q8): packed
   [rows/16][cols/4][16][4] bytes, packed_scales [rows/16][cols/group_size][16]. */
typedef struct {
    const float *f;
    const int8_t *q;
    const float *s;
    const uint8_t *packed;
    const float *packed_scales;
    int rows, cols;
} Matrix;

typedef struct {
    const float *rms_att, *rms_ffn;
    Matrix wq, wk, wv, wo, w1, w2, w3;
} Layer;

typedef struct {
    Config cfg;
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

#ifdef PACKED_Q8_BIAS
/* The int8 kernels multiply 4 weights of a row by 4 input bytes and add the products into one int32 lane. So
   rows go in blocks of 16, a row per 32-bit lane: for every 4 columns, 64 bytes hold the block's 16 rows' 4
   weights, which the kernel multiplies by the same 4 input bytes, broadcast. For vpdpbusd (AVX-512 VNNI) the
   weights are stored plus 128, as its first operand is unsigned; the +128 comes back out by starting each
   group's sum at -128 times the sum of the group's input bytes. Rows past the end are zero weights. */
static int pack_q8(Weights *w, Matrix *m, int gs) {
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
                    (uint8_t)((r < rows ? m->q[r * cols + k] : 0) + PACKED_Q8_BIAS);
            for (size_t g = 0; g < groups; g++) scales[(b * groups + g) * 16 + lane] = r < rows ? m->s[r * groups + g] : 0.0f;
        }
    m->packed = packed, m->packed_scales = scales;
    return 0;
}
#endif

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
        cur.offset = V1_HEADER_BYTES;
    } else {
        c->version = 0;
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
#ifdef PACKED_Q8_BIAS
            const int multiplied = i > 0 || c->shared_classifier; /* unshared embeddings are only looked up */
            if (gs % 4 == 0 && multiplied && pack_q8(w, m, (int)gs))
                return weights_free(w), fail(err, err_size, "%s: out of memory", path);
#endif
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
/* Kernels                                                                                         */

static inline int clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }
static inline int min_int(int a, int b) { return a < b ? a : b; }

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

/* exp(x) for x <= 0 to about 1 ulp (Cephes' expf polynomial, 2^n applied by scalef). */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
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
#endif

/* dot(w, x) over n floats, for the mat-vec of a single token. Measured here: walking the rows one after the
   other streams a 37 MB matrix from memory at ~31 GB/s on one core, interleaving even 2 rows at ~14 GB/s
   (the hardware prefetchers follow one stream per core far better than several); from cache both are
   ~95 GB/s. x stays in L1. */
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
            for (; t + 4 <= n_tok; t += 4) tile_f32(out + (size_t)t * m->rows + r, m->rows, w, x + (size_t)t * n, n, n, 4, 4);
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
   copies every accumulator of _mm512_dpbusd_epi32 to a new register and spills the inputs (measured: the
   batched kernel 150 -> 175 GMAC/s with this). */
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
   the range too: a batch's next work item) a slice per 4 tokens hides that first read (measured: all of a
   layer's products 130 -> 150 GMAC/s). */
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
/* Block b's 16 rows (two halves of 8 lanes) times T tokens from t0, for CPUs with AVX2 but not VNNI. vpmaddubsw
   multiplies unsigned by signed bytes into 16-bit sums of pairs: |x| times the weights given x's sign keeps
   those within 2 * 127 * 128, so they cannot saturate, and vpmaddwd by ones adds the pairs into the 4-product
   int32 lanes that vpdpbusd makes. Then per group, as blocks_q8 does: exact integer sums, one multiply-add. */
static inline __attribute__((always_inline)) void block_q8_avx2(float *out, int ostride, const Matrix *m, int b,
                                                               unsigned keep, const QuantizedRows *x, int t0, int gs,
                                                               int T) {
    const int cols = m->cols, groups = cols / gs, quads = gs / 4;
    const uint8_t *w = m->packed + (size_t)b * (cols / 4) * 64;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][2];
    for (int t = 0; t < T; t++) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m256i dot[2][2];
        for (int t = 0; t < T; t++) dot[0][t] = dot[1][t] = _mm256_setzero_si256();
        for (int k = g * quads; k < (g + 1) * quads; k++) {
            const __m256i w0 = _mm256_load_si256((const __m256i *)(w + (size_t)k * 64));
            const __m256i w1 = _mm256_load_si256((const __m256i *)(w + (size_t)k * 64 + 32));
            for (int t = 0; t < T; t++) {
                const __m256i xv = _mm256_set1_epi32(load_i32(x->q + (size_t)(t0 + t) * cols + 4 * k));
                const __m256i xabs = _mm256_abs_epi8(xv);
                dot[0][t] = _mm256_add_epi32(dot[0][t], _mm256_madd_epi16(_mm256_maddubs_epi16(xabs, _mm256_sign_epi8(w0, xv)), ones));
                dot[1][t] = _mm256_add_epi32(dot[1][t], _mm256_madd_epi16(_mm256_maddubs_epi16(xabs, _mm256_sign_epi8(w1, xv)), ones));
            }
        }
        for (int half = 0; half < 2; half++) {
            const __m256 ws = _mm256_load_ps(m->packed_scales + ((size_t)b * groups + g) * 16 + 8 * half);
            for (int t = 0; t < T; t++) {
                const __m256 scale = _mm256_mul_ps(ws, _mm256_set1_ps(x->s[(size_t)(t0 + t) * groups + g]));
                acc[half][t] = _mm256_add_ps(acc[half][t], _mm256_mul_ps(_mm256_cvtepi32_ps(dot[half][t]), scale));
            }
        }
    }
    for (int t = 0; t < T; t++) {
        float rows[16];
        _mm256_storeu_ps(rows, acc[0][t]), _mm256_storeu_ps(rows + 8, acc[1][t]);
        for (int lane = 0; lane < 16; lane++)
            if (keep >> lane & 1) out[(size_t)(t0 + t) * ostride + (size_t)b * 16 + lane] = rows[lane];
    }
}

/* Rows [r0, r1) on packed weights: the blocks that overlap the range, storing only the range's rows. */
static void matmul_packed_q8(float *out, const Matrix *m, const QuantizedRows *x, int n_tok, int gs, int r0, int r1) {
    for (int b = r0 / 16; b < (r1 + 15) / 16; b++) {
        const unsigned keep = lanes_in_range(b, r0, r1);
        int t = 0;
        for (; t + 2 <= n_tok; t += 2) block_q8_avx2(out, m->rows, m, b, keep, x, t, gs, 2);
        for (; t < n_tok; t++) block_q8_avx2(out, m->rows, m, b, keep, x, t, gs, 1);
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
#else
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
#endif
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* ------------------------------------------------------------------------------------------------ */
/* Engine                                                                                          */

/* The phases of a layer whose work a batch shares out, and one thread's share of a phase (see share_take). */
enum { PHASE_QKV, PHASE_ATTENTION, PHASE_WO, PHASE_W13, PHASE_W2, PHASES };
typedef struct {
    _Alignas(64) _Atomic uint64_t span; /* the items not yet taken: front << 32 | back; a cache line per thread */
} Share;

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
    int *prob_index;
    float *probs;
} RunState;

typedef struct Engine {
    Weights w;
    Tokenizer tok;
    RunState s;
    void *model_map, *tok_map;
    size_t model_size, tok_size;
    int n_threads;
} Engine;

/* OMP_NUM_THREADS when set; else the CPUs this process may run on, less those other processes are running on
   right now. On a shared machine a thread that waits for a CPU stalls the others at every barrier: two
   threads on two cores busy with other work measured ~10 tokens/s where one thread kept ~350. Runnable
   tasks come from /proc/loadavg (an instant count, unlike the load averages, which remember a training run
   that just ended), the least of a few looks so one short-lived process does not count. The count is the
   whole machine's, so a process allowed fewer CPUs than the machine has (a container) counts its share. */
static int default_thread_count(void) {
#ifdef _OPENMP
    if (getenv("OMP_NUM_THREADS")) return omp_get_max_threads();
    const int procs = omp_get_num_procs();
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    int others = INT32_MAX;
    for (int look = 0; look < 5 && others > 0; look++) {
        FILE *f = fopen("/proc/loadavg", "r");
        int runnable = 0;
        const int ok = f && fscanf(f, "%*f %*f %*f %d/", &runnable) == 1;
        if (f) fclose(f);
        if (!ok) return procs;
        others = runnable - 1 < others ? runnable - 1 : others; /* less this process */
        if (look < 4) nanosleep(&(struct timespec){0, 2000000}, NULL);
    }
    const int busy = online > procs ? (int)((long long)others * procs / online) : others;
    return procs - busy > 0 ? procs - busy : 1;
#else
    return 1;
#endif
}

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
            float freq = (float)(1.0 / pow(10000.0, (double)(2 * i) / (double)head));
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
                   s->probs, s->prob_index, s->rope_cos, s->rope_sin, s->xn, s->xq, s->shares};
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

/* The forward pass runs as one OpenMP parallel region per batch of tokens, with a barrier wherever a step needs
   what other threads wrote.

   One token (four barriers per layer, five when the attention cannot follow q, k and v without one): each
   thread owns a fixed, contiguous share of every matrix's rows (a single stream through the weights per core)
   and does the element-wise work of those rows itself (RoPE, residual add, SwiGLU); the small per-token work
   every row needs (RMSNorm, quantizing the token) each thread does into its own buffers rather than one thread
   behind a barrier. Where the threads can split the kv heads evenly, each owns whole heads from q, k and v
   through attention, with no barrier in between.

   A batch (nine barriers per layer): each thread norms or quantizes its share of the tokens into shared buffers,
   then a barrier (2-thread int8 prompt 3.5% faster than every thread doing all of them), before each of the four
   products; its products and attention are split into work items that the threads share out as they go (see
   share_take). */

#define ITEM_ROWS 32 /* a batch's work item in a product: the pair of 16-row blocks its kernel takes at once */

/* A batch's items [0, count) of one phase start split into equal, contiguous shares, one per thread. Each
   thread takes its own front to back (a product prefetches its next item's weights), and a thread whose share
   is done takes the last item of the share with the most left. With fixed shares the faster of two cores here
   waited 5-19% of a prompt's time at the barriers: on a shared (or hybrid) machine one core is often slower. */
static void share_split(Share *shares, int count, int nth) {
    for (int t = 0; t < nth; t++)
        atomic_init(&shares[t].span, (uint64_t)(count * t / nth) << 32 | (uint64_t)(count * (t + 1) / nth));
}

/* The next item for thread tid, or -1 once every share is done. There is a share per thread asked for (slots);
   OpenMP may have started fewer, and the shares of those it did not start are taken like any others. Item order
   within a phase never changes a result: each item writes its own outputs, with the same arithmetic whichever
   thread runs it. */
static int share_take(Share *shares, int tid, int slots) {
    uint64_t span = atomic_load_explicit(&shares[tid].span, memory_order_relaxed);
    while ((uint32_t)(span >> 32) < (uint32_t)span)
        if (atomic_compare_exchange_weak_explicit(&shares[tid].span, &span, span + ((uint64_t)1 << 32),
                                                  memory_order_relaxed, memory_order_relaxed))
            return (int)(span >> 32);
    for (;;) {
        int victim = -1;
        uint32_t most = 0;
        for (int t = 0; t < slots; t++) {
            const uint64_t other = atomic_load_explicit(&shares[t].span, memory_order_relaxed);
            if ((uint32_t)other - (uint32_t)(other >> 32) > most) /* back - front: front <= back always */
                most = (uint32_t)other - (uint32_t)(other >> 32), victim = t, span = other;
        }
        if (victim < 0) return -1;
        if (atomic_compare_exchange_weak_explicit(&shares[victim].span, &span, span - 1, memory_order_relaxed,
                                                  memory_order_relaxed))
            return (int)(uint32_t)span - 1;
    }
}

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

/* The part of [0, count) that thread tid of nth owns: whole units (blocks of 16 rows keep RoPE pairs together). */
static void thread_share(int count, int unit, int tid, int nth, int *i0, int *i1) {
    const int units = (count + unit - 1) / unit;
    *i0 = clamp((int)((long long)units * tid / nth) * unit, 0, count);
    *i1 = clamp((int)((long long)units * (tid + 1) / nth) * unit, 0, count);
}

/* A thread's walk through a phase's rows or items: without shares its fixed share (in units of `unit`) at once,
   with them one item (`item` of them) at a time. */
typedef struct {
    Share *shares;
    int slots, count, item, unit, tid, nth, started;
} Work;

static Work rows_work(const Engine *e, Share *shares, int rows, int tid, int nth) {
    return (Work){shares, e->n_threads, rows, ITEM_ROWS, 16, tid, nth, 0};
}
static Work items_work(const Engine *e, Share *shares, int count, int tid, int nth) {
    return (Work){shares, e->n_threads, count, 1, 1, tid, nth, 0};
}

/* The next part [*i0, *i1) this thread does; 0 once it has none left. */
static int work_next(Work *w, int *i0, int *i1) {
    if (!w->shares) {
        if (w->started) return 0;
        w->started = 1;
        thread_share(w->count, w->unit, w->tid, w->nth, i0, i1);
        return *i0 < *i1;
    }
    const int item = share_take(w->shares, w->tid, w->slots);
    if (item < 0) return 0;
    *i0 = item * w->item;
    *i1 = min_int(*i0 + w->item, w->count);
    return 1;
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
    const int gs = e->w.cfg.group_size, batch = n_tok > 1;
    float *normed = s->xn + (size_t)(batch ? 0 : MAX_BATCH + tid) * cols;
    QuantizedRows *xq = e->w.cfg.version == 2 ? &s->xq[batch ? e->n_threads : tid] : NULL;
    for (int t = batch ? n_tok * tid / nth : 0; t < (batch ? n_tok * (tid + 1) / nth : n_tok); t++) {
        const float *row = x + (size_t)t * cols;
        if (norm) {
            rmsnorm(normed + (size_t)t * cols, row, norm, cols, 1e-5f);
            row = normed + (size_t)t * cols;
        }
        if (xq)
            quantize_row(xq->q + (size_t)t * cols, xq->s + (size_t)t * (cols / gs), xq->start + (size_t)t * (cols / gs),
                         row, cols, gs);
    }
    if (batch && nth > 1 && (norm || xq)) {
#pragma omp barrier
    }
    return (Input){norm ? normed : x, xq};
}

/* Rows [r0, r1) of out[t][r] = W[r] . x[t]. */
static void matmul_range(const Engine *e, float *out, const Matrix *m, Input in, int n_tok, int r0, int r1) {
    if (r0 >= r1) return;
    if (m->q) matmul_rows_q8(out, m, in.q, n_tok, e->w.cfg.group_size, r0, r1);
    else matmul_rows_f32(out, m, in.x, n_tok, r0, r1);
}

/* RoPE on rows [r0, r1) (r0 even) of v [n_tok][width], head by head: x'[2f] = x[2f] cos - x[2f+1] sin and
   x'[2f+1] = x[2f+1] cos + x[2f] sin, as x' = x cos' + swap(x) sin' with the tables' signs folded in. */
static void rope_range(const RunState *s, float *v, int n_tok, int width, int head, int pos, int r0, int r1) {
    for (int t = 0; t < n_tok; t++) {
        const float *cs = s->rope_cos + (size_t)(pos + t) * head, *sn = s->rope_sin + (size_t)(pos + t) * head;
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
            for (int j = j0; j < j1; j += 2) {
                const float a = x[j], b = x[j + 1];
                x[j] = a * cs[j] + b * sn[j];
                x[j + 1] = b * cs[j + 1] + a * sn[j + 1];
            }
#endif
        }
    }
}

/* Attention. Keys are cached transposed in blocks of 16 positions, so a token's scores for 16 positions are the
   16 lanes of one multiply-add chain over the head's channels (no horizontal sums), and a prompt's tokens,
   ATT_TILE at a time, share every key and value they load. Each token's sums run in the same order whatever
   tile it is in, so a prompt fed in one call gives bit for bit the logits of feeding it token by token. */

/* Key channel c at position p, from kt (a layer's cache, or a head's first channel in it): the block of 16
   positions holds kv_dim rows of 16, so a head's keys for 16 positions are one contiguous run of memory (rows
   seq_len apart, one row per channel, made generation 7% slower: each step's reads and writes were a cache
   miss per channel). */
static inline const float *key_at(const float *kt, int kv_dim, int c, int p) {
    return kt + ((size_t)(p / 16) * kv_dim + c) * 16 + p % 16;
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
    float maxv = -INFINITY, sum = 0.0f;
    for (p = 0; p < end; p++) maxv = fmaxf(maxv, att[p] *= inv_sqrt);
    for (p = 0; p < end; p++) sum += (att[p] = expf(att[p] - maxv));
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
   head needs (3 for heads of 48: 5% faster attention than 4 with one masked). N and PB are constants once
   inlined. */
static inline __attribute__((always_inline)) void attention_tile_avx512(float *out, const float *q, int qstride,
                                                                       const float *kt, const float *vc, int kv_dim,
                                                                       int head, int end0, float *att, int seq_len,
                                                                       int N, int PB) {
    const int end = end0 + N - 1;
    const __m512 inv_sqrt = _mm512_set1_ps(1.0f / sqrtf((float)head));
    for (int p = 0; p < end; p += 16 * PB) { /* att[j][p] = q_j . k_p / sqrt(head) */
        __mmask16 mask[4];
        __m512 acc[4][4];
        for (int b = 0; b < PB; b++) mask[b] = first_lanes(end - p - 16 * b);
        for (int j = 0; j < N; j++)
            for (int b = 0; b < PB; b++) acc[j][b] = _mm512_setzero_ps();
        for (int i = 0; i < head; i++) {
            for (int b = 0; b < PB; b++) {
                const __m512 kv = _mm512_maskz_loadu_ps(mask[b], key_at(kt, kv_dim, i, p + 16 * b));
                for (int j = 0; j < N; j++) acc[j][b] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)j * qstride + i]), kv, acc[j][b]);
            }
        }
        for (int j = 0; j < N; j++)
            for (int b = 0; b < PB; b++)
                _mm512_mask_storeu_ps(att + (size_t)j * seq_len + p + 16 * b, mask[b], _mm512_mul_ps(acc[j][b], inv_sqrt));
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

/* Causal attention of tokens t0..t0+n-1 (n <= ATT_TILE, positions pos + t) for head h of layer l; writes s->xb. */
static void attention_tile(Engine *e, int l, int t0, int n, int h, int pos, float *att) {
    const Config *c = &e->w.cfg;
    RunState *s = &e->s;
    const int head = config_head_size(c), kv_dim = config_kv_dim(c), kvh = h / (c->n_heads / c->n_kv_heads);
    const float *kt = s->key_cache + (size_t)l * key_cache_layer(c) + (size_t)kvh * head * 16;
    const float *vc = s->value_cache + (size_t)l * c->seq_len * kv_dim + kvh * head;
    const float *q = s->q + (size_t)t0 * c->dim + h * head;
    float *out = s->xb + (size_t)t0 * c->dim + h * head;
    const int end0 = pos + t0 + 1;
#if defined(__AVX512F__)
    if (head % 16 == 0) {
        const int len = c->seq_len;
        switch (n) {
        case 1: attention_tile_avx512(out, q, c->dim, kt, vc, kv_dim, head, end0, att, len, 1, 4); break;
        case 2: attention_tile_avx512(out, q, c->dim, kt, vc, kv_dim, head, end0, att, len, 2, 2); break;
        case 3: attention_tile_avx512(out, q, c->dim, kt, vc, kv_dim, head, end0, att, len, 3, 2); break;
        default: attention_tile_avx512(out, q, c->dim, kt, vc, kv_dim, head, end0, att, len, 4, 2);
        }
        return;
    }
#endif
    for (int j = 0; j < n; j++)
        attention_token(out + (size_t)j * c->dim, q + (size_t)j * c->dim, kt, vc, kv_dim, head, end0 + j, att);
}

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
#else
    for (int i = 0; i < n; i++) h[i] = h[i] / (1.0f + expf(-h[i])) * gate[i];
#endif
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

/* Channels [c0, c1) of the new keys s->k [n_tok][kv_dim] into layer l's cache at positions pos... (see key_at).
   Whole blocks of 16 positions go 16 channels at a time, transposed in registers (one key at a time was 3% of
   a prompt: a store per key, each to another cache line). */
static void cache_keys(Engine *e, int l, int n_tok, int pos, int c0, int c1) {
    const Config *c = &e->w.cfg;
    const int kv_dim = config_kv_dim(c);
    float *cache = e->s.key_cache + (size_t)l * key_cache_layer(c);
    const float *k = e->s.k;
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

/* x[t] += m @ in[t] for the n_tok tokens (in: [n_tok, cols]), each thread on the rows it takes. */
static void add_projection(Engine *e, Share *shares, const Matrix *m, const float *x, int cols, int n_tok, int tid,
                           int nth) {
    RunState *s = &e->s;
    const int dim = e->w.cfg.dim;
    const Input in = prepare_input(e, x, NULL, n_tok, cols, tid, nth);
    Work work = rows_work(e, shares, dim, tid, nth);
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
                    rope_range(s, s->q, n_tok, dim, head, pos, kv0 * group * head, kv1 * group * head);
                }
                matmul_range(e, s->k, &L->wk, in, n_tok, kv0 * head, kv1 * head);
                rope_range(s, s->k, n_tok, kv_dim, head, pos, kv0 * head, kv1 * head);
                cache_keys(e, l, n_tok, pos, kv0 * head, kv1 * head);
                matmul_range(e, v, &L->wv, in, n_tok, kv0 * head, kv1 * head);
                if (kv_only) break;
                for (int h = kv0 * group; h < kv1 * group; h++) attention_tile(e, l, 0, 1, h, pos, att);
            } else { /* the q, k, v rows as one range, RoPE and key caching on each part; attention after a barrier */
                const int rows = qkv_rows(c, kv_only), q_rows = rows - 2 * kv_dim;
                Work work = rows_work(e, phase_shares(e, n_tok, l, PHASE_QKV), rows, tid, nth);
                while (work_next(&work, &r0, &r1)) {
                    const int a0 = clamp(r0, 0, q_rows), a1 = clamp(r1, 0, q_rows);
                    matmul_range(e, s->q, &L->wq, in, n_tok, a0, a1);
                    rope_range(s, s->q, n_tok, dim, head, pos, a0, a1);
                    const int k0 = clamp(r0 - q_rows, 0, kv_dim), k1 = clamp(r1 - q_rows, 0, kv_dim);
                    matmul_range(e, s->k, &L->wk, in, n_tok, k0, k1);
                    rope_range(s, s->k, n_tok, kv_dim, head, pos, k0, k1);
                    cache_keys(e, l, n_tok, pos, k0, k1);
                    matmul_range(e, v, &L->wv, in, n_tok, clamp(r0 - q_rows - kv_dim, 0, kv_dim),
                                 clamp(r1 - q_rows - kv_dim, 0, kv_dim));
                }
                if (kv_only) break;
#pragma omp barrier
                /* Items head by head, each head's tiles in order: a share's last item is its most expensive. */
                work = items_work(e, phase_shares(e, n_tok, l, PHASE_ATTENTION), c->n_heads * tiles, tid, nth);
                while (work_next(&work, &r0, &r1))
                    for (int item = r0; item < r1; item++) {
                        const int t = item % tiles * ATT_TILE;
                        attention_tile(e, l, t, min_int(ATT_TILE, n_tok - t), item / tiles, pos, att);
                    }
            }
#pragma omp barrier
            /* wo, then the residual on the same rows. */
            add_projection(e, phase_shares(e, n_tok, l, PHASE_WO), &L->wo, s->xb, dim, n_tok, tid, nth);
#pragma omp barrier
            /* w1 and w3 on the same rows, SwiGLU on them. */
            in = prepare_input(e, s->x, L->rms_ffn, n_tok, dim, tid, nth);
            Work work = rows_work(e, phase_shares(e, n_tok, l, PHASE_W13), hidden, tid, nth);
            while (work_next(&work, &r0, &r1)) {
                matmul_range(e, s->hb, &L->w1, in, n_tok, r0, r1);
                matmul_range(e, s->hb2, &L->w3, in, n_tok, r0, r1);
                for (int t = 0; t < n_tok; t++) swiglu(s->hb + (size_t)t * hidden + r0, s->hb2 + (size_t)t * hidden + r0, r1 - r0);
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
        const int t0 = n * i / batches, t1 = n * (i + 1) / batches;
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
/* Sampling                                                                                        */

static uint32_t rng_u32(unsigned long long *state) { /* xorshift64* */
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float rng_f32(unsigned long long *state) { return (float)(rng_u32(state) >> 8) / 16777216.0f; }

/* Heapsort of token indices by descending probability (qsort cannot see probs without a global). */
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

static void sort_indices_by_prob(int *idx, int n, const float *probs) {
    for (int root = n / 2 - 1; root >= 0; root--) sift_down(idx, root, n, probs); /* min-heap */
    for (int end = n - 1; end > 0; end--) { /* the smallest goes last: descending order */
        int tmp = idx[0];
        idx[0] = idx[end], idx[end] = tmp;
        sift_down(idx, 0, end, probs);
    }
}

int arianna_sample(Engine *e, float temperature, float topp, unsigned long long *rng_state) {
    const int n = e->w.cfg.vocab_size;
    const float *logits = e->s.logits;
    int best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    if (!(temperature > 0.0f) || n == 1) return best;
    float *probs = e->s.probs, sum = 0.0f;
    for (int i = 0; i < n; i++) sum += (probs[i] = expf((logits[i] - logits[best]) / temperature));
    for (int i = 0; i < n; i++) probs[i] /= sum;
    const float coin = rng_f32(rng_state);
    if (topp <= 0.0f || topp >= 1.0f) {
        float cdf = 0.0f;
        for (int i = 0; i < n; i++)
            if (coin < (cdf += probs[i])) return i;
        return n - 1; /* rounding left the cdf just below 1 */
    }
    /* Nucleus: tokens below (1 - topp) / (n - 1) can never be in the smallest set reaching topp, skip them. */
    const float cutoff = (1.0f - topp) / (float)(n - 1);
    int *idx = e->s.prob_index, m = 0;
    for (int i = 0; i < n; i++)
        if (probs[i] >= cutoff) idx[m++] = i;
    if (m == 0) return best; /* only when the logits hold NaN: a corrupt model */
    sort_indices_by_prob(idx, m, probs);
    float mass = 0.0f;
    int keep = m;
    for (int i = 0; i < m; i++) {
        mass += probs[idx[i]];
        if (mass >= topp) {
            keep = i + 1;
            break;
        }
    }
    const float r = coin * mass;
    float cdf = 0.0f;
    for (int i = 0; i < keep; i++)
        if (r < (cdf += probs[idx[i]])) return idx[i];
    return idx[keep - 1];
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

/* Prints a piece unless it is a lone unprintable byte (control bytes from byte fallback garble terminals). */
static void print_piece(const char *piece) {
    if (!piece[0]) return;
    if (!piece[1]) {
        unsigned char b = (unsigned char)piece[0];
        if (!(isprint(b) || isspace(b) || b >= 0x80)) return;
    }
    fputs(piece, stdout);
    fflush(stdout);
}

static int generate(Engine *e, const char *prompt, float temperature, float topp, unsigned long long seed, int steps) {
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
    for (int i = 1; i < n_prompt; i++) print_piece(arianna_decode(e, tokens[i - 1], tokens[i]));
    double start = now_seconds();
    arianna_feed(e, tokens, n_prompt, 0);
    double prompt_done = now_seconds();
    int prev = tokens[n_prompt - 1], pos = n_prompt, generated = 0;
    free(tokens);
    while (pos < steps) {
        int next = arianna_sample(e, temperature, topp, &seed);
        if (next == e->tok.eos || next == e->tok.bos) break;
        print_piece(arianna_decode(e, prev, next));
        generated++;
        if (pos + 1 >= steps) break;
        arianna_feed(e, &next, 1, pos++);
        prev = next;
    }
    printf("\n");
    double end = now_seconds();
    fprintf(stderr, "prompt: %d tokens at %.1f tok/s; generated %d tokens at %.1f tok/s; %d thread%s\n", n_prompt,
            n_prompt / fmax(prompt_done - start, 1e-9), generated, generated / fmax(end - prompt_done, 1e-9),
            e->n_threads, e->n_threads == 1 ? "" : "s");
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
   own tokens. When the context fills, the conversation starts over (with the system prompt). */
static int chat(Engine *e, const char *first_user, const char *system, float temperature, float topp,
                unsigned long long seed, int max_reply) {
    const int seq_len = arianna_seq_len(e), eos = arianna_eos(e), interactive = isatty(0);
    int pos = 0, pending[2], n_pending = 0; /* tokens of the last reply not fed yet: its last token, EOS */
    char *user = first_user && *first_user ? strdup(first_user) : NULL;
    for (;;) {
        if (!user) {
            if (interactive) fputs("User: ", stdout), fflush(stdout);
            if (!(user = read_line(stdin))) break;
        }
        int *turn, n_turn;
        for (int attempt = 0;; attempt++) {
            n_turn = chat_turn_tokens(e, pos == 0 ? system : NULL, user, pos == 0, &turn);
            if (n_turn < 0) return free(user), fprintf(stderr, "error: out of memory\n"), 1;
            if (pos + n_pending + n_turn < seq_len) break;
            free(turn);
            if (pos == 0 || attempt) {
                n_turn = -1;
                break;
            }
            fprintf(stderr, "[context of %d tokens is full: starting a new conversation]\n", seq_len);
            pos = 0, n_pending = 0;
        }
        free(user);
        user = NULL;
        if (n_turn < 0) {
            fprintf(stderr, "[this turn does not fit in the context of %d tokens: skipped]\n", seq_len);
            continue;
        }
        int *feed = malloc(((size_t)n_turn + 2) * sizeof(int));
        if (!feed) return free(turn), fprintf(stderr, "error: out of memory\n"), 1;
        memcpy(feed, pending, (size_t)n_pending * sizeof(int));
        memcpy(feed + n_pending, turn, (size_t)n_turn * sizeof(int));
        arianna_feed(e, feed, n_pending + n_turn, pos);
        pos += n_pending + n_turn;
        int prev = feed[n_pending + n_turn - 1];
        free(feed), free(turn);
        n_pending = 0;
        if (interactive) fputs("Assistant: ", stdout);
        for (int produced = 0;; produced++) {
            int next = arianna_sample(e, temperature, topp, &seed);
            if (next == eos) {
                pending[n_pending++] = eos;
                break;
            }
            print_piece(arianna_decode(e, prev, next));
            if (pos + 1 >= seq_len) {
                fprintf(stderr, "\n[context of %d tokens is full: the next turn starts a new conversation]", seq_len);
                pos = seq_len; /* forces the reset */
                break;
            }
            if (max_reply > 0 && produced + 1 >= max_reply) {
                pending[n_pending++] = next, pending[n_pending++] = eos; /* close the cut-off reply */
                break;
            }
            arianna_feed(e, &next, 1, pos++);
            prev = next;
        }
        printf("\n");
        fflush(stdout);
    }
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "Usage:   run <model.bin> [options]\n"
            "Example: run out/model.bin -z data/tok4096.bin -i \"Once upon a time\"\n"
            "Options:\n"
            "  -t <float>  temperature in [0, inf), default 1.0 (0 = greedy)\n"
            "  -p <float>  top-p (nucleus) in [0, 1], default 0.9 (1 = off)\n"
            "  -s <int>    random seed, default time(NULL)\n"
            "  -n <int>    generate: positions in total, prompt included (default: the context length);\n"
            "              chat: most tokens per reply (default 0 = until EOS or the context is full)\n"
            "  -i <string> prompt (chat: the first user message)\n"
            "  -z <string> tokenizer .bin, default tokenizer.bin\n"
            "  -m <string> mode: generate|chat, default generate\n"
            "  -y <string> system prompt (chat mode)\n"
            "  -T <int>    threads, default: OMP_NUM_THREADS, else the CPUs not busy with other processes\n");
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
               *system = NULL;
    float temperature = 1.0f, topp = 0.9f;
    int steps = 0, threads = 0, seed_given = 0;
    unsigned long long seed = 0;
    if (argc < 2 || argv[1][0] == '-') return usage(), 1;
    model_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        if (argv[i][0] != '-' || strlen(argv[i]) != 2 || i + 1 >= argc) {
            fprintf(stderr, "error: bad option \"%s\"%s\n", argv[i], i + 1 >= argc ? " (missing value)" : "");
            return usage(), 1;
        }
        const char *v = argv[i + 1];
        int s_int;
        switch (argv[i][1]) {
        case 't': if (parse_float(v, "-t", &temperature)) return 1; break;
        case 'p': if (parse_float(v, "-p", &topp)) return 1; break;
        case 's': if (parse_int(v, "-s", &s_int)) return 1; seed = (unsigned long long)(unsigned)s_int, seed_given = 1; break;
        case 'n': if (parse_int(v, "-n", &steps)) return 1; break;
        case 'T': if (parse_int(v, "-T", &threads)) return 1; break;
        case 'i': prompt = v; break;
        case 'z': tokenizer_path = v; break;
        case 'm': mode = v; break;
        case 'y': system = v; break;
        default: fprintf(stderr, "error: unknown option %s\n", argv[i]); return usage(), 1;
        }
    }
    if (temperature < 0.0f) return fprintf(stderr, "error: -t must be >= 0\n"), 1;
    if (topp < 0.0f || topp > 1.0f) return fprintf(stderr, "error: -p must be in [0, 1]\n"), 1;
    if (steps < 0) return fprintf(stderr, "error: -n must be >= 0\n"), 1;
    if (threads < 0) return fprintf(stderr, "error: -T must be >= 0\n"), 1;
    if (strcmp(mode, "generate") && strcmp(mode, "chat"))
        return fprintf(stderr, "error: unknown mode \"%s\": use -m generate or -m chat\n", mode), 1;
    if (!seed_given) seed = (unsigned long long)time(NULL);
    if (seed == 0) seed = 0x9E3779B97F4A7C15ull; /* xorshift state must not be zero */
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
        rc = generate(e, prompt, temperature, topp, seed, steps ? steps : seq_len);
    } else {
        rc = chat(e, prompt, system, temperature, topp, seed, steps);
    }
    arianna_close(e);
    return rc;
}
#endif

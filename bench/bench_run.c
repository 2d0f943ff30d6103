/* bench_run.c: generation and prompt speed of run.c's engine on random weights (`make bench`).

   Builds each model image in memory (random weights, version 1 fp32 or version 2 Q8_0), loads it through
   the same parser as a file, and times arianna_feed/arianna_sample. Shapes: B (dim 288, 6 layers, vocab
   4096, seq 256), A (same, vocab 32000: stories15M), C (dim 768, 12 layers, vocab 32000, seq 1024:
   stories110M). Usage: ./bench/bench_run [gen_tokens=128] [prompt_tokens=128] [shapes=BAC] [threads=12] [weights=12]
   (weights: 1 fp32, 2 int8)

   It prints the CPU and the instruction set the engine was built for, and beside each row the memory roof: a
   streaming read of a buffer of the weights a generated token reads, on the same threads, and the share of it
   that generation reaches. A token reads every weight once, so generation cannot beat that read; where the
   weights fit the last-level cache the roof is that cache's bandwidth. */
#define ARIANNA_LIBRARY
#include "../run.c"
#ifdef __APPLE__
#include <sys/sysctl.h>
#endif

typedef struct {
    const char *name;
    int dim, hidden_dim, n_layers, n_heads, vocab_size, seq_len;
} Shape;

#define MIN_REPEATS 3
#define MIN_SECONDS 1.0 /* per table row: the small shapes get dozens of runs, C its 3 */

static unsigned long long bench_rng = 0x853c49e6748fea9bull;

static float random_weight(void) { return (rng_f32(&bench_rng) - 0.5f) * 0.1f; }

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void put_i32(unsigned char *p, int v) { memcpy(p, &v, 4); }

/* The CPU's model and the flags that decide the engine's speed (from /proc/cpuinfo, or sysctl on macOS), and the
   kernels the engine runs here (the dispatching build's choice, or ARIANNA_ISA's). */
static void print_cpu(void) {
    char model[256] = "unknown CPU", flags[256] = "";
    FILE *f = fopen("/proc/cpuinfo", "r");
    static char line[16384];
    while (f && fgets(line, sizeof(line), f)) {
        char *value = strchr(line, ':');
        if (!value) continue;
        value += 1 + (value[1] == ' ');
        value[strcspn(value, "\n")] = 0;
        if (!strncmp(line, "model name", 10) || (!strncmp(line, "Model", 5) && !strcmp(model, "unknown CPU")))
            snprintf(model, sizeof(model), "%s", value);
        if (!strncmp(line, "flags", 5) || !strncmp(line, "Features", 8)) {
            static const char *wanted[] = {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                           "asimd", "asimddp", "bf16"};
            char padded[16400];
            snprintf(padded, sizeof(padded), " %s ", value);
            for (size_t i = 0; i < sizeof(wanted) / sizeof(*wanted); i++) {
                char word[32];
                snprintf(word, sizeof(word), " %s ", wanted[i]);
                if (strstr(padded, word)) snprintf(flags + strlen(flags), sizeof(flags) - strlen(flags), " %s", wanted[i]);
            }
            break; /* the first CPU's */
        }
    }
    if (f) fclose(f);
#ifdef __APPLE__
    size_t size = sizeof(model);
    sysctlbyname("machdep.cpu.brand_string", model, &size, NULL, 0);
#endif
    char err[256];
    const Kernels *kernels = kernels_select(err, sizeof(err)); /* what the models below run: ARIANNA_ISA's or the best */
    if (!kernels) {
        fprintf(stderr, "error: %s\n", err);
        exit(1);
    }
    printf("CPU: %s; %ld CPUs online; flags:%s\nbuild: %s kernels, %s\n\n", model, sysconf(_SC_NPROCESSORS_ONLN),
           flags[0] ? flags : " (none of avx2 fma avx512f avx512_vnni avx512_bf16 asimd asimddp)", kernels->name,
#ifdef _OPENMP
           "OpenMP"
#else
           "no OpenMP (one thread)"
#endif
    );
}

/* Seconds of a streaming read of buf's n vectors on threads threads, each summing a contiguous share, as a
   generated token reads each thread's rows of the weights. */
static double stream_read_seconds(const vfloat *buf, size_t n, int threads) {
    volatile float sink = 0.0f;
    const double t0 = now_seconds();
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num(), nth = omp_get_num_threads();
#endif
        vfloat a[4] = {{0}};
        for (size_t i = n * tid / nth / 4 * 4; i < n * (tid + 1) / nth / 4 * 4; i += 4)
            for (int j = 0; j < 4; j++) a[j] += buf[i + j];
        const float sum = hsum((a[0] + a[1]) + (a[2] + a[3]));
#pragma omp atomic
        sink += sum;
    }
    return now_seconds() - t0;
}

/* Bytes of weights a generated token reads: every matrix once (int8: values and scales), the embedding a row. */
static size_t token_bytes(const Weights *w) {
    const Matrix *mats[8];
    size_t bytes = 0;
    const int gs = w->cfg.version == 2 ? w->cfg.group_size : 0;
    for (int l = 0; l < w->cfg.n_layers; l++) {
        const Layer *L = &w->layers[l];
        const Matrix *layer[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w1, &L->w2, &L->w3};
        memcpy(mats, layer, sizeof(layer));
        for (int k = 0; k < 7; k++) {
            const size_t values = (size_t)mats[k]->rows * mats[k]->cols;
            bytes += gs ? values + values / gs * 4 : values * 4;
        }
    }
    const size_t classifier = (size_t)w->classifier.rows * w->classifier.cols;
    return bytes + (gs ? classifier + classifier / gs * 4 : classifier * 4);
}

/* A version 1 (fp32) or 2 (Q8_0, group 32 or 64) image with random weights and unit norms. */
static unsigned char *random_image(const Shape *s, int version, size_t *size) {
    const int gs = s->dim % 64 == 0 && s->hidden_dim % 64 == 0 ? 64 : 32;
    const size_t dim = (size_t)s->dim, norms = (size_t)s->n_layers * dim * 2 + dim;
    const size_t values = (size_t)s->vocab_size * dim + (size_t)s->n_layers * (4 * dim * dim + 3 * dim * s->hidden_dim);
    *size = 256 + norms * 4 + (version == 1 ? values * 4 : values + values / gs * 4);
    unsigned char *img = aligned_alloc(4096, (*size + 4095) / 4096 * 4096); /* page-aligned, as a mapped file is */
    if (!img) return NULL;
    memset(img, 0, *size);
    put_i32(img, (int)MODEL_MAGIC);
    put_i32(img + 4, version);
    const int header[7] = {s->dim, s->hidden_dim, s->n_layers, s->n_heads, s->n_heads, s->vocab_size, s->seq_len};
    for (int i = 0; i < 7; i++) put_i32(img + 8 + 4 * i, header[i]);
    img[36] = 1; /* shared classifier */
    if (version == 2) put_i32(img + 37, gs);
    float *norm = (float *)(img + 256);
    for (size_t i = 0; i < norms; i++) norm[i] = 1.0f;
    unsigned char *p = img + 256 + norms * 4;
    if (version == 1) {
        float *w = (float *)p;
        for (size_t i = 0; i < values; i++) w[i] = random_weight();
        return img;
    }
    /* Per matrix: all int8 values, then the scales. Matrices are laid out back to back, so fill them the
       same way the parser reads them: values then scales, matrix by matrix. */
    const size_t mats[] = {(size_t)s->vocab_size * dim, dim * dim, dim * dim, dim * dim, dim * dim,
                           dim * s->hidden_dim, dim * s->hidden_dim, dim * s->hidden_dim};
    for (int k = 0; k < 8; k++)
        for (int l = 0; l < (k == 0 ? 1 : s->n_layers); l++) {
            const size_t n = mats[k];
            for (size_t i = 0; i < n; i++) ((int8_t *)p)[i] = (int8_t)((int)(rng_u32(&bench_rng) % 255) - 127);
            p += n;
            for (size_t g = 0; g < n / gs; g++) {
                float scale = 0.05f / 127.0f;
                memcpy(p + 4 * g, &scale, 4);
            }
            p += n / gs * 4;
        }
    return img;
}

/* An engine on a random image of shape s (freed with arianna_close, then free(*img)). */
static Engine *random_engine(const Shape *s, int version, int threads, unsigned char **img) {
    size_t size;
    *img = random_image(s, version, &size);
    Engine *e = calloc(1, sizeof(Engine));
    char err[512];
    if (!*img || !e || weights_parse(&e->w, *img, size, s->name, err, sizeof(err))) {
        fprintf(stderr, "%s: %s\n", s->name, *img && e ? err : "out of memory");
        exit(1);
    }
    e->n_threads = threads;
    if (runstate_alloc(e)) exit(1);
    return e;
}

static void bench(const Shape *s, int version, int threads, int gen_tokens, int prompt_tokens) {
    unsigned char *img;
    Engine *e = random_engine(s, version, threads, &img);
    if (gen_tokens > s->seq_len) gen_tokens = s->seq_len;
    if (prompt_tokens > s->seq_len) prompt_tokens = s->seq_len;
    int *prompt = malloc((size_t)prompt_tokens * sizeof(int));
    for (int i = 0; i < prompt_tokens; i++) prompt[i] = (int)(rng_u32(&bench_rng) % (unsigned)s->vocab_size);
    arianna_feed(e, prompt, prompt_tokens < 8 ? prompt_tokens : 8, 0); /* warm-up: page in, spin up threads */
    /* The best of at least MIN_REPEATS runs of each, and of as many as fit in MIN_SECONDS: on a shared machine
       the slow runs measure the neighbours. */
    double gen_wall = INFINITY, gen_cpu = INFINITY, prompt_wall = INFINITY, prompt_cpu = INFINITY;
    double first_gen_wall = 0.0; /* the first run alone: a fresh KV cache, as every ./run and chat starts */
    /* The memory roof, measured between the runs: a buffer of the weights' size read twice, the second pass timed
       (the first brings what the cache can hold back into it, as the previous token left the weights). */
    const size_t bytes = token_bytes(&e->w), vectors = bytes / sizeof(vfloat);
    vfloat *buf = aligned_alloc(64, (vectors + 4) * sizeof(vfloat));
    if (!buf) exit(1);
    for (size_t i = 0; i < vectors + 4; i++) buf[i] = (vfloat){0} + 1.0f; /* touched: no page faults are timed */
    double read_wall = INFINITY, read_cpu = INFINITY;
    const double start = now_seconds();
    for (int repeat = 0; repeat < MIN_REPEATS || now_seconds() - start < MIN_SECONDS; repeat++) {
        stream_read_seconds(buf, vectors, threads);
        const double c = cpu_seconds();
        read_wall = fmin(read_wall, stream_read_seconds(buf, vectors, threads));
        read_cpu = fmin(read_cpu, cpu_seconds() - c);
        unsigned long long rng = 1;
        double c0 = cpu_seconds(), t0 = now_seconds();
        int token = 1;
        for (int pos = 0; pos < gen_tokens; pos++) {
            arianna_feed(e, &token, 1, pos);
            token = arianna_sample(e, 0.0f, 0.9f, &rng);
        }
        double t1 = now_seconds(), c1 = cpu_seconds();
        arianna_feed(e, prompt, prompt_tokens, 0);
        double t2 = now_seconds(), c2 = cpu_seconds();
        if (repeat == 0) first_gen_wall = t1 - t0;
        gen_wall = fmin(gen_wall, t1 - t0), gen_cpu = fmin(gen_cpu, c1 - c0);
        prompt_wall = fmin(prompt_wall, t2 - t1), prompt_cpu = fmin(prompt_cpu, c2 - c1);
    }
    free(buf);
    const double roof_gbs = (double)bytes / read_wall * 1e-9, roof_tok = 1.0 / read_wall;
    /* Per CPU-second figures stay meaningful when other processes share the cores (wall time does not). */
    printf("| %s | %-4s | %d | %8.1f | %8.1f | %8.1f | %5.1fx | %8.1f | %8.1f | %5.1f | %6.1f | %7.1f | %3.0f%% | %3.0f%% |\n",
           s->name, version == 1 ? "fp32" : "int8", threads, gen_tokens / gen_wall, gen_tokens / first_gen_wall,
           prompt_tokens / prompt_wall,
           gen_wall / gen_tokens / (prompt_wall / prompt_tokens), gen_tokens / gen_cpu * threads,
           prompt_tokens / prompt_cpu * threads, (double)bytes / 1e6, roof_gbs, roof_tok,
           100.0 * gen_tokens / gen_wall / roof_tok, 100.0 * gen_tokens / gen_cpu * read_cpu);
    fflush(stdout);
    free(prompt);
    arianna_close(e);
    free(img);
}

/* The product alone, on one thread with everything in cache (shape s's w1 times MAX_BATCH tokens): a bound on
   prompt speed, which the table's other steps (attention, norms, quantizing) can only add to. */
static void product_speed(const Shape *s, int version) {
    unsigned char *img;
    Engine *e = random_engine(s, version, 1, &img);
    const Matrix *m = &e->w.layers[0].w1;
    float *in = aligned_alloc(64, (size_t)MAX_BATCH * m->cols * sizeof(float)); /* as the engine's buffers */
    if (!in) exit(1);
    for (size_t i = 0; i < (size_t)MAX_BATCH * m->cols; i++) in[i] = rng_f32(&bench_rng) - 0.5f;
    const Input input = prepare_input(e, in, NULL, MAX_BATCH, m->cols, 0, 1);
    double best = INFINITY;
    for (int repeat = 0; repeat < 200; repeat++) {
        const double t0 = cpu_seconds();
        matmul_range(e, e->s.hb, m, input, MAX_BATCH, 0, m->rows);
        best = fmin(best, cpu_seconds() - t0);
    }
    const Config *c = &e->w.cfg;
    const int kv_dim = config_kv_dim(c);
    /* A prompt token but the last: every layer's products, but only k and v in the last layer. */
    const double macs = (double)(c->n_layers - 1) * (2.0 * c->dim * c->dim + 2.0 * c->dim * kv_dim + 3.0 * c->dim * c->hidden_dim) +
                        2.0 * c->dim * kv_dim;
    const double gmacs = (double)m->rows * m->cols * MAX_BATCH / best * 1e-9;
    printf("%s products alone, 1 thread, in cache: %.1f GMAC/s; a %s prompt token's %.2f M multiply-adds take %.1f us "
           "at that speed (%.0f tok/s)\n", version == 1 ? "fp32" : "int8", gmacs, s->name, macs * 1e-6,
           macs / gmacs * 1e-3, gmacs * 1e9 / macs);
    free(in);
    arianna_close(e);
    free(img);
}

int main(int argc, char **argv) {
    print_cpu();
    const int gen_tokens = argc > 1 ? atoi(argv[1]) : 128, prompt_tokens = argc > 2 ? atoi(argv[2]) : 128;
    const char *which = argc > 3 ? argv[3] : "BAC", *thread_counts = argc > 4 ? argv[4] : "12";
    const char *versions = argc > 5 ? argv[5] : "12";
    const Shape shapes[] = {{"B", 288, 768, 6, 6, 4096, 256}, {"A", 288, 768, 6, 6, 32000, 256},
                            {"C", 768, 2048, 12, 12, 32000, 1024}};
    for (const char *v = versions; *v && strchr(which, 'B'); v++)
        if (*v == '1' || *v == '2') product_speed(&shapes[0], *v - '0');
    printf("\n");
    printf("| shape | weights | threads | gen tok/s | gen tok/s, first run | prompt tok/s | prompt/gen | "
           "gen tok/s x threads per CPU s | prompt, same | MB read per token | roof GB/s | roof tok/s | gen of roof | "
           "same, per CPU s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const char *w = which; *w; w++)
        for (int i = 0; i < 3; i++)
            if (shapes[i].name[0] == *w)
                for (const char *v = versions; *v; v++)
                    for (const char *t = thread_counts; *t; t++)
                        if ((*v == '1' || *v == '2') && *t >= '1' && *t <= '9')
                            bench(&shapes[i], *v - '0', *t - '0', gen_tokens, prompt_tokens);
    return 0;
}

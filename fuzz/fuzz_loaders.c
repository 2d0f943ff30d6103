/* libFuzzer target for run.c's two file loaders (`make fuzz`).

   The first input byte picks the loader: even -> model .bin parser, odd -> tokenizer .bin parser; the
   rest is the file. A model that parses and is small enough also runs one batched and one single-token
   forward pass, so size checks that let a bad file through would show as out-of-bounds reads here.
   A tokenizer that parses encodes and decodes a string taken from the same input. */
#define ARIANNA_LIBRARY
#include "../run.c"

static void fuzz_model(const uint8_t *data, size_t size) {
    Engine *e = calloc(1, sizeof(Engine));
    char err[256];
    if (!e) return;
    e->n_threads = 1;
    if (weights_parse(&e->w, data, size, "fuzz", err, sizeof(err)) == 0) {
        const Config *c = &e->w.cfg;
        if (c->dim <= 64 && c->hidden_dim <= 256 && c->n_layers <= 4 && c->seq_len <= 64 && c->vocab_size <= 4096 &&
            runstate_alloc(e) == 0) {
            int tokens[3] = {0, c->vocab_size - 1, c->vocab_size / 2};
            int n = c->seq_len < 3 ? c->seq_len : 3;
            arianna_feed(e, tokens, n, 0);
            if (n < c->seq_len) arianna_feed(e, tokens, 1, n);
            unsigned long long rng = 7;
            arianna_sample(e, 0.8f, 0.9f, &rng);
        }
    }
    arianna_close(e);
}

static void fuzz_tokenizer(const uint8_t *data, size_t size) {
    Tokenizer t;
    char err[256];
    if (tokenizer_parse(&t, data, size, -1, "fuzz", "model", err, sizeof(err)) != 0) return;
    /* Text: the input's last bytes (any bytes, invalid UTF-8 included), NUL-terminated. */
    size_t len = size < 48 ? size : 48;
    char *text = malloc(len + 1);
    if (text) {
        memcpy(text, data + size - len, len);
        text[len] = 0;
        int *tokens;
        int n = tokenizer_encode(&t, text, 1, 1, &tokens);
        for (int i = 1; i < n; i++) tokenizer_decode(&t, tokens[i - 1], tokens[i]);
        if (n >= 0) free(tokens);
        free(text);
    }
    tokenizer_free(&t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    /* A copy in malloc'd memory: aligned like the mmap of a real file, and ASan sees its exact end. */
    uint8_t *file = malloc(size - 1 ? size - 1 : 1);
    if (!file) return 0;
    memcpy(file, data + 1, size - 1);
    if (data[0] % 2 == 0) fuzz_model(file, size - 1);
    else fuzz_tokenizer(file, size - 1);
    free(file);
    return 0;
}

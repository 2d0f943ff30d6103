/* logits.c: the engine's logits for a prompt, on stdout as float32, for builds Python cannot load (test_neon.py
   runs the aarch64 ones under qemu). Usage: logits model.bin tokenizer.bin threads batch|single token...
   batch feeds the tokens in one call, single one call per token; both from position 0. */
#define ARIANNA_LIBRARY
#include "../run.c"

int main(int argc, char **argv) {
    if (argc < 6) return fprintf(stderr, "usage: logits model.bin tokenizer.bin threads batch|single token...\n"), 2;
    char err[512];
    Engine *e = arianna_open(argv[1], argv[2], atoi(argv[3]), err, sizeof(err));
    if (!e) return fprintf(stderr, "%s\n", err), 1;
    const int n = argc - 5, batch = !strcmp(argv[4], "batch");
    int *tokens = malloc((size_t)n * sizeof(int));
    if (!tokens) return fprintf(stderr, "out of memory\n"), 1;
    for (int i = 0; i < n; i++) tokens[i] = atoi(argv[5 + i]);
    for (int i = 0; i < (batch ? 1 : n); i++)
        if (arianna_feed(e, batch ? tokens : tokens + i, batch ? n : 1, i))
            return fprintf(stderr, "cannot feed %d tokens at position %d\n", batch ? n : 1, i), 1;
    fwrite(arianna_logits(e), sizeof(float), (size_t)arianna_vocab_size(e), stdout);
    free(tokens);
    arianna_close(e);
    return 0;
}

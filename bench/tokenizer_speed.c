/* Single-thread encode throughput of the GPT-2 tokenizer, timing qs_tokenizer_encode
 * alone. Each repeat loads a fresh tokenizer so that the pre-token cache starts cold,
 * as it does for one `quasar tokenize` run.
 *   usage: tokenizer_speed VOCAB_DIR TEXT [REPEATS]
 * Prints {"bytes", "tokens", "best_s", "mb_per_s"} (MB = 10^6 bytes) as JSON. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/tokenizer.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    int repeats = argc == 4 ? atoi(argv[3]) : 5;
    if (argc < 3 || argc > 4 || repeats < 1) {
        fputs("usage: tokenizer_speed VOCAB_DIR TEXT [REPEATS]\n", stderr);
        return 2;
    }
    char *text;
    size_t n, n_ids = 0;
    if (qs_file_read(argv[2], &text, &n)) {
        fprintf(stderr, "error: %s\n", qs_error_last());
        return 1;
    }
    int *ids = malloc((n + 1) * sizeof *ids);
    int rc = ids ? 0 : qs_error("out of memory");
    double best = 1e30;
    for (int r = 0; r < repeats && !rc; r++) {
        qs_tokenizer *t;
        if ((rc = qs_tokenizer_load(&t, argv[1]))) break;
        double t0 = now();
        rc = qs_tokenizer_encode(t, text, n, ids, &n_ids);
        double dt = now() - t0;
        qs_tokenizer_free(t);
        if (dt < best) best = dt;
    }
    free(text);
    free(ids);
    if (rc) {
        fprintf(stderr, "error: %s\n", qs_error_last());
        return 1;
    }
    printf("{\"bytes\": %zu, \"tokens\": %zu, \"best_s\": %.6f, \"mb_per_s\": %.3f}\n", n, n_ids, best, n / best / 1e6);
    return 0;
}

/* Sampling text from a model: temperature, top-k, top-p (nucleus), seeded. */
#ifndef QUASAR_SAMPLE_H
#define QUASAR_SAMPLE_H

#include <stdint.h>

#include "quasar/model.h"

typedef struct qs_sample_params {
    float temperature; /* 0 = greedy */
    int top_k;         /* 0 = no limit */
    float top_p;       /* 1 = no limit */
    uint64_t seed;
} qs_sample_params;

/* Picks a token from logits[V] with the random draw u in [0, 1). scratch holds V
 * floats and V ints. */
int qs_sample_token(const float *logits, int V, const qs_sample_params *sp, float u,
                    float *prob_scratch, int *idx_scratch);

/* Extends ctx[0..n) by max_new tokens (ctx has room for n + max_new; n >= 1), feeding the
 * model at most model.seq_len tokens of context, and calls emit for each new token. */
int qs_generate(qs_gpt *m, int *ctx, int n, int max_new, const qs_sample_params *sp,
                void (*emit)(int token, void *user), void *user);

#endif

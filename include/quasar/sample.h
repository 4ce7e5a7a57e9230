/* Sampling text from a model: temperature, top-k, top-p (nucleus), seeded. */
#ifndef QUASAR_SAMPLE_H
#define QUASAR_SAMPLE_H

#include <stdbool.h>
#include <stdint.h>

#include "quasar/model.h"

typedef struct qs_sample_params {
    float temperature; /* 0 = greedy */
    int top_k;         /* 0 = no limit */
    float top_p;       /* 1 = no limit */
    uint64_t seed;
    bool stop_at_token;   /* end generation after sampling stop_token (e.g. <|endoftext|>) */
    int stop_token;
} qs_sample_params;

/* Picks a token from logits[V] with the random draw u in [0, 1). Scratch: V floats
 * and 4 V ints. Top-k and top-p keep the first ids by probability (ties: lower id
 * first), then the shortest of those whose probability reaches top_p. */
int qs_sample_token(const float *logits, int V, const qs_sample_params *sp, float u,
                    float *prob_scratch, int *idx_scratch);

/* Extends ctx[0..n) by up to max_new tokens (ctx has room for n + max_new; n >= 1) and
 * calls emit for each new token; returns how many it made, or -1. The context is the
 * last model.seq_len tokens. With the KV cache the prompt is run once and each new
 * token costs one position; once the window is full and must slide, the learned
 * positions shift, so the window is run again (what recomputing would do). */
int qs_generate(qs_gpt *m, int *ctx, int n, int max_new, const qs_sample_params *sp,
                void (*emit)(int token, void *user), void *user);

/* The same for B prompts at once (B <= the model's micro-batch size), each in its own
 * KV-cache slot so their lengths may differ: ctx[b] holds n[b] >= 1 tokens and room for
 * max_new more, and lens[b] (if not NULL) gets its final length. Each step decodes
 * every running prompt in one pass; a prompt whose window must slide is refilled on its
 * own. emit gets the prompt's index. Prompt b's draws are keyed by (seed, b, step), so
 * prompt 0 comes out as qs_generate would make it and every prompt is reproducible
 * for the same batch and seed. Returns the tokens made over all prompts, or -1. */
int qs_generate_batch(qs_gpt *m, int *const *ctx, const int *n, int B, int max_new, const qs_sample_params *sp,
                      int *lens, void (*emit)(int prompt, int token, void *user), void *user);

#endif

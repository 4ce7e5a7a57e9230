#include "quasar/sample.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "quasar/error.h"
#include "quasar/rng.h"

/* qsort passes no context, hence a file-scope key; sampling runs on one thread. */
static const float *sort_key;

/* Descending probability, lower id first on ties (a total order: deterministic). */
static int by_prob_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (sort_key[i] != sort_key[j]) return sort_key[i] > sort_key[j] ? -1 : 1;
    return i - j;
}

int qs_sample_token(const float *logits, int V, const qs_sample_params *sp, float u,
                    float *prob, int *idx) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (sp->temperature <= 0.0f) return best;
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        prob[i] = expf((logits[i] - logits[best]) / sp->temperature);
        sum += prob[i];
        idx[i] = i;
    }
    for (int i = 0; i < V; i++) prob[i] = (float)(prob[i] / sum);
    int n = V;
    if ((sp->top_k > 0 && sp->top_k < V) || sp->top_p < 1.0f) {
        sort_key = prob;
        qsort(idx, (size_t)V, sizeof *idx, by_prob_desc);
        if (sp->top_k > 0 && sp->top_k < n) n = sp->top_k;
        if (sp->top_p < 1.0f) {
            double cum = 0.0;
            for (int i = 0; i < n; i++) {
                cum += prob[idx[i]];
                if (cum >= sp->top_p) {
                    n = i + 1;
                    break;
                }
            }
        }
    }
    double kept = 0.0;
    for (int i = 0; i < n; i++) kept += prob[idx[i]];
    double target = u * kept, cum = 0.0;
    for (int i = 0; i < n; i++) {
        cum += prob[idx[i]];
        if (target < cum) return idx[i];
    }
    return idx[n - 1];
}

int qs_generate(qs_gpt *m, int *ctx, int n, int max_new, const qs_sample_params *sp,
                void (*emit)(int token, void *user), void *user) {
    const qs_model_config *c = qs_gpt_config(m);
    int V = c->vocab_size;
    float *logits = malloc((size_t)V * sizeof(float)), *prob = malloc((size_t)V * sizeof(float));
    int *idx = malloc((size_t)V * sizeof(int));
    if (!logits || !prob || !idx) {
        free(logits);
        free(prob);
        free(idx);
        return qs_error("out of memory sampling");
    }
    /* Pick the thread count once (changing it between steps costs more than a step).
     * Within the window every step is a decode of one token, too little work to wake a
     * team for: one thread ran 6.6k tok/s against 0.6k on two (2 cores). Past it every
     * step re-runs the window, which does use the team. */
    int threads = omp_get_max_threads(), cached = 0, made = 0;
    if (n + max_new <= c->seq_len) omp_set_num_threads(1);
    for (int s = 0; s < max_new; s++, n++) {
        int row = 0;
        if (cached == 0 || cached == c->seq_len) {
            int T = n < c->seq_len ? n : c->seq_len;
            if (qs_gpt_prefill(m, ctx + n - T, 1, T)) {
                made = -1;
                break;
            }
            cached = T;
            row = T - 1;
        } else if (qs_gpt_decode(m, ctx + n - 1, 1, cached++)) {
            made = -1;
            break;
        }
        qs_gpt_logits_row(m, row, logits);
        ctx[n] = qs_sample_token(logits, V, sp, qs_rng_uniform(sp->seed, 0x5a3b1e, (uint64_t)s), prob, idx);
        made++;
        if (emit) emit(ctx[n], user);
        if (sp->stop_at_token && ctx[n] == sp->stop_token) break;
    }
    omp_set_num_threads(threads);
    free(logits);
    free(prob);
    free(idx);
    return made;
}

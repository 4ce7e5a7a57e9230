#include "quasar/sample.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"
#include "quasar/rng.h"

/* idx[0, n), holding 0 .. n-1 on entry, sorted by descending probability with ties in
 * ascending id (a total order, so the ranking is deterministic): a stable LSD radix
 * sort of (key, id) pairs, the key the probability's bits inverted (non-negative
 * floats order as their bit patterns), 8 bits a pass, the four passes' histograms
 * counted in one; work holds 3 n ints (the other id buffer, the keys and theirs).
 * O(n) whatever the distribution, where qsort of a GPT-2 vocabulary took ~6 ms a token. */
static void rank_by_prob(int *idx, int *work, int n, const float *prob) {
    uint32_t *key = (uint32_t *)(work + n), *key_to = key + n;
    int *id = idx, *id_to = work;
    int count[4][256] = {{0}};
    for (int i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &prob[i], sizeof bits);
        key[i] = ~bits;
        for (int b = 0; b < 4; b++) count[b][key[i] >> 8 * b & 255]++;
    }
    for (int b = 0; b < 4; b++) {
        int start[256], at = 0;
        bool one_digit = false; /* every id in one bucket: the pass would copy them in order */
        for (int d = 0; d < 256; d++) {
            one_digit |= count[b][d] == n;
            start[d] = at;
            at += count[b][d];
        }
        if (one_digit) continue;
        for (int i = 0; i < n; i++) {
            const int to = start[key[i] >> 8 * b & 255]++;
            key_to[to] = key[i];
            id_to[to] = id[i];
        }
        uint32_t *k = key;
        key = key_to, key_to = k;
        int *x = id;
        id = id_to, id_to = x;
    }
    if (id != idx) memcpy(idx, id, (size_t)n * sizeof *idx);
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
        rank_by_prob(idx, idx + V, V, prob);
        if (sp->top_k > 0 && sp->top_k < n) n = sp->top_k;
        double cum = 0.0;
        for (int i = 0; i < n && sp->top_p < 1.0f; i++)
            if ((cum += prob[idx[i]]) >= sp->top_p) {
                n = i + 1;
                break;
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

/* Below this many parameters a single prompt decodes on one thread (qs_generate_batch). */
enum { SMALL_DECODE_PARAMS = 400000 };

typedef struct single_sink {
    void (*emit)(int token, void *user);
    void *user;
} single_sink;

static void emit_single(int prompt, int token, void *user) {
    (void)prompt;
    const single_sink *s = user;
    if (s->emit) s->emit(token, s->user);
}

int qs_generate(qs_gpt *m, int *ctx, int n, int max_new, const qs_sample_params *sp,
                void (*emit)(int token, void *user), void *user) {
    single_sink sink = {emit, user};
    return qs_generate_batch(m, &ctx, &n, 1, max_new, sp, NULL, emit_single, &sink);
}

enum { SAMPLE_STREAM = 0x5a3b1e };

/* Scratch and per-prompt state of one batched generation. */
typedef struct gen_state {
    const qs_sample_params *sp;
    int V;
    float *logits, *prob;
    int *idx;
    int *n, *cached, *done;        /* per prompt: length, positions in its slot, finished */
    int *tok, *slot, *pos, *row_of; /* per decode row: token, slot, position, prompt */
    int *const *ctx;
    void (*emit)(int prompt, int token, void *user);
    void *user;
} gen_state;

/* Prompt b's token number s, drawn from g->logits. */
static void take(gen_state *g, int b, int s) {
    const float u = qs_rng_uniform(g->sp->seed, SAMPLE_STREAM + (uint64_t)b, (uint64_t)s);
    const int t = qs_sample_token(g->logits, g->V, g->sp, u, g->prob, g->idx);
    g->ctx[b][g->n[b]++] = t;
    if (g->emit) g->emit(b, t, g->user);
    g->done[b] = g->sp->stop_at_token && t == g->sp->stop_token;
}

/* One step of every running prompt: those whose slot has room decode together, the
 * others (first step, or a full window that slides) are (re)filled one by one. Returns
 * the tokens made, or -1. */
static int step(qs_gpt *m, gen_state *g, int B, int s) {
    const int S = qs_gpt_config(m)->seq_len;
    int rows = 0, made = 0;
    for (int b = 0; b < B; b++) {
        if (g->done[b]) continue;
        if (g->cached[b] > 0 && g->cached[b] < S) {
            g->tok[rows] = g->ctx[b][g->n[b] - 1];
            g->slot[rows] = b;
            g->pos[rows] = g->cached[b]++;
            g->row_of[rows++] = b;
            continue;
        }
        const int T = g->n[b] < S ? g->n[b] : S;
        if (qs_gpt_prefill_slot(m, g->ctx[b] + g->n[b] - T, T, b)) return -1;
        g->cached[b] = T;
        qs_gpt_logits_row(m, 0, g->logits);
        take(g, b, s);
        made++;
    }
    if (rows && qs_gpt_decode(m, g->tok, rows, g->slot, g->pos)) return -1;
    for (int r = 0; r < rows; r++) {
        qs_gpt_logits_row(m, r, g->logits);
        take(g, g->row_of[r], s);
        made++;
    }
    return made;
}

int qs_generate_batch(qs_gpt *m, int *const *ctx, const int *n0, int B, int max_new, const qs_sample_params *sp,
                      int *lens, void (*emit)(int prompt, int token, void *user), void *user) {
    const qs_model_config *c = qs_gpt_config(m);
    gen_state g = {.sp = sp, .V = c->vocab_size, .ctx = ctx, .emit = emit, .user = user};
    g.logits = malloc((size_t)g.V * sizeof(float));
    g.prob = malloc((size_t)g.V * sizeof(float));
    g.idx = malloc(4 * (size_t)g.V * sizeof(int));
    g.n = malloc((size_t)B * 7 * sizeof(int));
    if (!g.logits || !g.prob || !g.idx || !g.n) {
        free(g.logits);
        free(g.prob);
        free(g.idx);
        free(g.n);
        return qs_error("out of memory sampling");
    }
    g.cached = g.n + B, g.done = g.cached + B, g.tok = g.done + B, g.slot = g.tok + B, g.pos = g.slot + B;
    g.row_of = g.pos + B;
    int fits = 1;
    for (int b = 0; b < B; b++) {
        g.n[b] = n0[b];
        g.cached[b] = g.done[b] = 0;
        fits &= n0[b] + max_new <= c->seq_len;
    }
    /* Pick the thread count once (changing it between steps costs more than a step).
     * Within the window a step of one prompt decodes one token: for a small model too
     * little work to wake a team for, for a larger one worth it. Measured on 2 cores,
     * decode tokens/s on one thread / two: 11.1k / 9.5k at 0.21M parameters, 3.3k / 4.6k
     * at 0.8M, 15 / 30 at GPT-2 124M. Past the window every step re-runs it, which does
     * use the team; so do batches. */
    int threads = omp_get_max_threads(), made = 0;
    if (fits && B == 1 && qs_gpt_params(m)->n < SMALL_DECODE_PARAMS) omp_set_num_threads(1);
    for (int s = 0; s < max_new && made >= 0; s++) {
        int k = step(m, &g, B, s);
        made = k < 0 ? -1 : made + k;
    }
    omp_set_num_threads(threads);
    if (lens && made >= 0)
        for (int b = 0; b < B; b++) lens[b] = g.n[b];
    free(g.logits);
    free(g.prob);
    free(g.idx);
    free(g.n);
    return made;
}

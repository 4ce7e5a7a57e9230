/* The sampler: greedy, temperature, top-k and top-p choose what they should, and the
 * draw follows the (filtered, renormalised) softmax. Draws u sweep a fine uniform grid,
 * so frequencies are exact up to the grid, not statistical. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "quasar/rng.h"
#include "quasar/sample.h"
#include "test_seed.h"

#define V 23
#define GRID 20000

static uint64_t seed;
static float logits[V], prob[V];
static int idx[4 * V];

/* Frequencies of each id over u = (i + 0.5) / GRID. */
static void frequencies(const qs_sample_params *sp, double *freq) {
    memset(freq, 0, V * sizeof *freq);
    for (int i = 0; i < GRID; i++) freq[qs_sample_token(logits, V, sp, (i + 0.5f) / GRID, prob, idx)] += 1.0 / GRID;
}

/* softmax(logits / T) restricted to `keep`, renormalised. */
static void expected(float T, const int *keep, double *want) {
    double z = 0;
    for (int v = 0; v < V; v++) z += keep[v] ? exp(logits[v] / T) : 0;
    for (int v = 0; v < V; v++) want[v] = keep[v] ? exp(logits[v] / T) / z : 0;
}

static int setup(void **state) {
    (void)state;
    for (int v = 0; v < V; v++) logits[v] = 2.0f * qs_rng_normal(seed, 1, (uint64_t)v);
    return 0;
}

static int argmax(void) {
    int b = 0;
    for (int v = 1; v < V; v++) if (logits[v] > logits[b]) b = v;
    return b;
}

static void test_greedy_and_top1(void **state) {
    (void)state;
    qs_sample_params greedy = {.temperature = 0, .top_k = 0, .top_p = 1};
    qs_sample_params top1 = {.temperature = 1, .top_k = 1, .top_p = 1};
    for (int i = 0; i < 50; i++) {
        float u = qs_rng_uniform(seed, 2, (uint64_t)i);
        assert_int_equal(qs_sample_token(logits, V, &greedy, u, prob, idx), argmax());
        assert_int_equal(qs_sample_token(logits, V, &top1, u, prob, idx), argmax());
    }
}

static void test_distribution(void **state) {
    (void)state;
    double freq[V], want[V];
    int all[V];
    for (int v = 0; v < V; v++) all[v] = 1;
    const float temps[] = {1.0f, 0.5f, 2.0f};
    for (int t = 0; t < 3; t++) {
        qs_sample_params sp = {.temperature = temps[t], .top_k = 0, .top_p = 1};
        frequencies(&sp, freq);
        expected(temps[t], all, want);
        for (int v = 0; v < V; v++) assert_float_equal(freq[v], want[v], 2.0 / GRID + 1e-4);
    }
}

/* top-k keeps the k most likely; top-p the smallest prefix reaching p. */
static void test_top_k_and_top_p(void **state) {
    (void)state;
    int order[V];
    for (int v = 0; v < V; v++) order[v] = v;
    for (int a = 0; a < V; a++) /* ids by descending logit */
        for (int b = a + 1; b < V; b++)
            if (logits[order[b]] > logits[order[a]]) { int x = order[a]; order[a] = order[b]; order[b] = x; }
    double freq[V], want[V];
    int keep[V] = {0};
    for (int k = 0; k < 5; k++) keep[order[k]] = 1;
    qs_sample_params sp = {.temperature = 1, .top_k = 5, .top_p = 1};
    frequencies(&sp, freq);
    expected(1, keep, want);
    for (int v = 0; v < V; v++) assert_float_equal(freq[v], want[v], 2.0 / GRID + 1e-4);

    int all[V];
    for (int v = 0; v < V; v++) all[v] = 1;
    double p_all[V];
    expected(1, all, p_all);
    double cum = 0;
    memset(keep, 0, sizeof keep);
    for (int k = 0; k < V && cum < 0.8; k++) {
        keep[order[k]] = 1;
        cum += p_all[order[k]];
    }
    sp = (qs_sample_params){.temperature = 1, .top_k = 0, .top_p = 0.8f};
    frequencies(&sp, freq);
    expected(1, keep, want);
    for (int v = 0; v < V; v++) assert_float_equal(freq[v], want[v], 2.0 / GRID + 1e-4);
}

/* The sampler against the definition, written plainly: rank every id (probability
 * descending, lower id first on ties) by a full sort, cut at top-k, then at the
 * shortest prefix whose probability reaches top-p, and walk it to u times its sum. A
 * vocabulary of GPT-2's order of size, logits with many exact ties, every combination
 * of the cuts: the same id every time (the sampler ranks by a radix sort). */
enum { BIG_V = 5003 };
static const float *ref_key;
static int ref_rank(const void *a, const void *b) {
    const int i = *(const int *)a, j = *(const int *)b;
    if (ref_key[i] != ref_key[j]) return ref_key[i] > ref_key[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}
static int reference_token(const float *lg, int n_v, const qs_sample_params *sp, float u, float *p, int *ids) {
    int best = 0;
    for (int i = 1; i < n_v; i++)
        if (lg[i] > lg[best]) best = i;
    double sum = 0;
    for (int i = 0; i < n_v; i++) {
        p[i] = expf((lg[i] - lg[best]) / sp->temperature);
        sum += p[i];
        ids[i] = i;
    }
    for (int i = 0; i < n_v; i++) p[i] = (float)(p[i] / sum);
    int n = n_v;
    if ((sp->top_k > 0 && sp->top_k < n_v) || sp->top_p < 1.0f) {
        ref_key = p;
        qsort(ids, (size_t)n_v, sizeof *ids, ref_rank);
        if (sp->top_k > 0 && sp->top_k < n) n = sp->top_k;
        double cum = 0;
        for (int i = 0; i < n && sp->top_p < 1.0f; i++)
            if ((cum += p[ids[i]]) >= sp->top_p) {
                n = i + 1;
                break;
            }
    }
    double kept = 0, cum = 0;
    for (int i = 0; i < n; i++) kept += p[ids[i]];
    for (int i = 0; i < n; i++)
        if (u * kept < (cum += p[ids[i]])) return ids[i];
    return ids[n - 1];
}

static void test_large_vocabulary_matches_full_sort(void **state) {
    (void)state;
    static float lg[BIG_V], p[BIG_V], p_ref[BIG_V];
    static int ids[4 * BIG_V], ids_ref[BIG_V];
    const int ks[] = {0, 1, 7, 256, 257, 1500, BIG_V - 1, BIG_V, BIG_V + 9};
    const float ps[] = {1.0f, 0.01f, 0.5f, 0.9f, 0.999f, 0.99999f};
    const float temps[] = {0.3f, 1.0f, 4.0f};
    int draws = 0, distinct_kept = 0;
    for (int rep = 0; rep < 3; rep++) {
        /* rep 1 rounds the logits to quarters: thousands of exact ties; rep 2 keeps them
         * within 0.3 of each other, so the probabilities share their top bits (a radix
         * pass with one digit) */
        for (int v = 0; v < BIG_V; v++) {
            const float x = 3.0f * qs_rng_normal(seed, 10 + rep, (uint64_t)v);
            lg[v] = rep == 0 ? x : rep == 1 ? roundf(4 * x) / 4 : 0.3f * qs_rng_uniform(seed, 12, (uint64_t)v);
        }
        for (size_t t = 0; t < sizeof temps / sizeof *temps; t++)
            for (size_t a = 0; a < sizeof ks / sizeof *ks; a++)
                for (size_t b = 0; b < sizeof ps / sizeof *ps; b++) {
                    const qs_sample_params sp = {.temperature = temps[t], .top_k = ks[a], .top_p = ps[b]};
                    int last = -1;
                    for (int i = 0; i < 8; i++, draws++) {
                        const float u = i == 0 ? 0.0f : i == 7 ? 0.99999994f : qs_rng_uniform(seed, 20, (uint64_t)draws);
                        const int got = qs_sample_token(lg, BIG_V, &sp, u, p, ids);
                        const int want = reference_token(lg, BIG_V, &sp, u, p_ref, ids_ref);
                        if (got != want)
                            fail_msg("T %g top_k %d top_p %g u %.8f: %d, the full sort gives %d", temps[t], ks[a],
                                     ps[b], u, got, want);
                        distinct_kept += got != last;
                        last = got;
                    }
                }
    }
    assert_true(distinct_kept > draws / 4); /* the draws did land on many ids, not one */
}

int main(void) {
    seed = qs_test_seed("test_sample");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_top1),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_top_k_and_top_p),
        cmocka_unit_test(test_large_vocabulary_matches_full_sort),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}

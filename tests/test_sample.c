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
static int idx[V];

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

int main(void) {
    seed = qs_test_seed("test_sample");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_top1),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_top_k_and_top_p),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}

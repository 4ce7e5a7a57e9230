/* The residual add and LayerNorm of the CPU backend, as the GPT forward ran them before
 * (an add, then layernorm_forward) and fused (residual_layernorm_forward), at N rows of
 * C; inputs rotated over 4 sets so they come from memory. bench/NOTES.md, "Residual add
 * fused into LayerNorm".
 *   usage: residual_layernorm_speed [N C REPEATS]   (default 8192 768 30)
 * Prints the median ms of the add, the LayerNorm, the two in a row, and the fused op. */
#include <stdio.h>
#include <stdlib.h>

#include "quasar/backend.h"
#include "quasar/bench.h"
#include "quasar/clock.h"

enum { SETS = 4, BUFS = 6 };

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, by_value);
    return v[n / 2];
}

/* the add the forward made before the fusion: an elementwise loop over the threads */
static void add(float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

int main(int argc, char **argv) {
    const int N = argc > 1 ? atoi(argv[1]) : 8192, C = argc > 2 ? atoi(argv[2]) : 768,
              reps = argc > 3 ? atoi(argv[3]) : 30;
    if (N < 1 || C < 1 || reps < 1) {
        fprintf(stderr, "usage: residual_layernorm_speed [N C REPEATS]\n");
        return 2;
    }
    const qs_ops *ops = qs_backend_cpu()->ops;
    const size_t n = (size_t)N * C;
    float *buf[SETS][BUFS], *w = malloc(C * sizeof *w), *b = malloc(C * sizeof *b);
    double *t[4];
    for (int k = 0; k < 4; k++) t[k] = malloc((size_t)reps * sizeof *t[k]);
    for (int c = 0; c < C; c++) w[c] = 1.0f, b[c] = 0.0f;
    for (int s = 0; s < SETS; s++)
        for (int k = 0; k < BUFS; k++) {
            if (!(buf[s][k] = malloc(n * sizeof(float)))) return fprintf(stderr, "out of memory\n"), 1;
            for (size_t i = 0; i < n; i++) buf[s][k][i] = (float)((i * 7 + (size_t)k) % 13) * 0.1f;
        }
    for (int r = 0; r < reps; r++) {
        float **x = buf[r % SETS]; /* inp, branch, sum, out, mean, rstd */
        const double t0 = qs_clock_now();
        add(x[2], x[0], x[1], n);
        const double t1 = qs_clock_now();
        ops->layernorm_forward(x[3], x[4], x[5], x[2], w, b, N, C);
        const double t2 = qs_clock_now();
        x = buf[(r + SETS / 2) % SETS];
        ops->residual_layernorm_forward(x[2], x[3], x[4], x[5], x[0], x[1], w, b, N, C);
        const double t3 = qs_clock_now();
        t[0][r] = (t1 - t0) * 1e3, t[1][r] = (t2 - t1) * 1e3, t[2][r] = (t2 - t0) * 1e3, t[3][r] = (t3 - t2) * 1e3;
    }
    const double pair = median(t[2], reps), fused = median(t[3], reps);
    printf("N=%d C=%d median ms: add %.2f, layernorm %.2f, add then layernorm %.2f, fused %.2f (fused / pair %.2f)\n",
           N, C, median(t[0], reps), median(t[1], reps), pair, fused, fused / pair);
    return 0;
}

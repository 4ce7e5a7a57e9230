/* Forward + backward time of the CPU quadratic depthwise conv (csrc/cpu/quadconv.c) at
 * one 2D "same" shape, with the FLOP and byte counts of bench/NOTES.md.
 *   usage: quadconv_speed B H W C K [REPEATS]
 * Prints {"B", "H", "W", "C", "k", "fwd_ms", "bwd_ms", "gflop_per_s", "gb_per_s"} (medians). */
#include <stdio.h>
#include <stdlib.h>

#include "quasar/backend.h"
#include "quasar/bench.h"
#include "quasar/clock.h"
#include "quasar/rng.h"

static float *rnd(size_t n, uint64_t stream) {
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; p && i < n; i++) p[i] = qs_rng_uniform(1, stream, i) - 0.5f;
    return p;
}

int main(int argc, char **argv) {
    int v[5], reps = argc == 7 ? atoi(argv[6]) : 10;
    for (int i = 0; i < 5 && i + 1 < argc; i++) v[i] = atoi(argv[i + 1]);
    if (argc < 6 || argc > 7 || reps < 1 || v[0] < 1 || v[1] < 1 || v[2] < 1 || v[3] < 1 || v[4] < 1 || v[4] % 2 == 0) {
        fputs("usage: quadconv_speed B H W C K(odd) [REPEATS]\n", stderr);
        return 2;
    }
    const qs_conv_shape s = {v[0], v[1], v[2], v[3], v[4], v[4], v[4] / 2, v[4] / 2};
    const size_t n = (size_t)s.B * s.H * s.W * s.C, nw = 3 * (size_t)s.KH * s.KW * s.C;
    float *x = rnd(n, 1), *w = rnd(nw, 2), *bias = rnd(3 * (size_t)s.C, 3), *dy = rnd(n, 4);
    float *y = malloc(n * sizeof *y), *fa = malloc(n * sizeof *fa), *fb = malloc(n * sizeof *fb);
    float *dx = calloc(n, sizeof *dx), *dw = calloc(nw, sizeof *dw), *db = calloc(3 * (size_t)s.C, sizeof *db);
    double *tf = malloc(reps * sizeof *tf), *tb = malloc(reps * sizeof *tb);
    if (!x || !w || !bias || !dy || !y || !fa || !fb || !dx || !dw || !db || !tf || !tb) {
        fputs("error: out of memory\n", stderr);
        return 1;
    }
    const qs_ops *ops = qs_backend_cpu()->ops;
    ops->quadconv_forward(y, fa, fb, x, w, bias, &s); /* warm-up: page in every buffer */
    ops->quadconv_backward(dx, dw, db, dy, x, w, fa, fb, &s);
    for (int r = 0; r < reps; r++) {
        double t0 = qs_clock_now();
        ops->quadconv_forward(y, fa, fb, x, w, bias, &s);
        double t1 = qs_clock_now();
        ops->quadconv_backward(dx, dw, db, dy, x, w, fa, fb, &s);
        tf[r] = t1 - t0;
        tb[r] = qs_clock_now() - t1;
    }
    const double f = qs_bench_stats_of(tf, reps).median, b = qs_bench_stats_of(tb, reps).median;
    const double k2nc = (double)s.KH * s.KW * n;
    /* forward 6 k^2 NC (three filters' multiply-adds), backward 11 k^2 NC (dW: 6, dx: 5);
     * bytes: forward reads x, writes y, fa, fb; backward reads dy, x, fa, fb, writes dx */
    const double flops = 17.0 * k2nc, bytes = 9.0 * n * sizeof(float);
    printf("{\"B\": %d, \"H\": %d, \"W\": %d, \"C\": %d, \"k\": %d, \"fwd_ms\": %.3f, \"bwd_ms\": %.3f, "
           "\"gflop_per_s\": %.2f, \"gb_per_s\": %.2f}\n",
           s.B, s.H, s.W, s.C, s.KH, 1e3 * f, 1e3 * b, flops / (f + b) / 1e9, bytes / (f + b) / 1e9);
    return 0;
}

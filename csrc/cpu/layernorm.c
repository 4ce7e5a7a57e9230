/* LayerNorm over the last dimension. */
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

#define LN_EPS 1e-5f

/* One row: o = LayerNorm(x); its mean and rstd. */
static inline void ln_row(float *o, float *mean, float *rstd, const float *x, const float *w, const float *b, int C) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < C; c++) sum += x[c];
    const float m = sum / (float)C;
    /* Two passes: the variance of centred values does not cancel catastrophically. */
    float var = 0.0f;
#pragma omp simd reduction(+ : var)
    for (int c = 0; c < C; c++) var += (x[c] - m) * (x[c] - m);
    const float s = 1.0f / sqrtf(var / (float)C + LN_EPS);
    for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * w[c] + b[c];
    *mean = m;
    *rstd = s;
}

void qs_cpu_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        ln_row(out + (size_t)n * C, mean + n, rstd + n, inp + (size_t)n * C, w, b, C);
}

void qs_cpu_residual_layernorm_forward(float *res, float *out, float *mean, float *rstd, const float *inp,
                                       const float *branch, const float *w, const float *b, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const size_t at = (size_t)n * C;
        for (int c = 0; c < C; c++) res[at + c] = inp[at + c] + branch[at + c];
        ln_row(out + at, mean + n, rstd + n, res + at, w, b, C);
    }
}

void qs_cpu_layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *mean,
                               const float *rstd, int N, int C) {
    /* dw/db sum over rows: each thread sums its rows into its own partial buffer,
     * and the partials are added in thread order afterwards (deterministic). */
    const int maxt = omp_get_max_threads();
    const int want_wb = dw || db;
    float *part = NULL;
    if (want_wb) {
        part = qs_cpu_scratch((size_t)maxt * 2 * C * sizeof *part);
        memset(part, 0, (size_t)maxt * 2 * C * sizeof *part);
    }
#pragma omp parallel
    {
        float *pw = want_wb ? part + (size_t)omp_get_thread_num() * 2 * C : NULL;
        float *pb = want_wb ? pw + C : NULL;
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
            const float m = mean[n], s = rstd[n];
            /* dinp = s * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w. */
            float g_mean = 0.0f, gx_mean = 0.0f;
#pragma omp simd reduction(+ : g_mean, gx_mean)
            for (int c = 0; c < C; c++) {
                const float xhat = (x[c] - m) * s, g = d[c] * w[c];
                g_mean += g;
                gx_mean += g * xhat;
            }
            g_mean /= (float)C;
            gx_mean /= (float)C;
            if (dinp) {
                float *di = dinp + (size_t)n * C;
                for (int c = 0; c < C; c++) {
                    const float xhat = (x[c] - m) * s;
                    di[c] += s * (d[c] * w[c] - g_mean - xhat * gx_mean);
                }
            }
            if (want_wb) {
                for (int c = 0; c < C; c++) {
                    pw[c] += d[c] * (x[c] - m) * s;
                    pb[c] += d[c];
                }
            }
        }
    }
    if (!want_wb) return;
    for (int c = 0; c < C; c++) {
        float sw = 0.0f, sb = 0.0f;
        for (int t = 0; t < maxt; t++) {
            sw += part[(size_t)t * 2 * C + c];
            sb += part[(size_t)t * 2 * C + C + c];
        }
        if (dw) dw[c] += sw;
        if (db) db[c] += sb;
    }
    free(part);
}

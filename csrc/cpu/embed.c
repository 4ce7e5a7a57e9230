/* Token + position embedding. */
#include "cpu_ops.h"

void qs_cpu_embed_forward(float *out, const int *tok, const float *wte, const float *wpe, int B,
                          int T, int C) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < B * T; r++) {
        float *o = out + (size_t)r * C;
        const float *e = wte + (size_t)tok[r] * C;
        const float *p = wpe + (size_t)(r % T) * C;
        for (int c = 0; c < C; c++) o[c] = e[c] + p[c];
    }
}

void qs_cpu_embed_backward(float *dwte, float *dwpe, const float *dout, const int *tok, int B,
                           int T, int C) {
    const int N = B * T;
#pragma omp parallel
    {
        /* Repeated tokens scatter into the same dwte row. Each thread owns the
         * tokens congruent to its number and adds their rows in row order, so
         * there are no races and the sum order never depends on timing. */
        if (dwte) {
            const int nt = omp_get_num_threads(), me = omp_get_thread_num();
            for (int r = 0; r < N; r++) {
                if (tok[r] % nt != me) continue;
                float *g = dwte + (size_t)tok[r] * C;
                const float *d = dout + (size_t)r * C;
                for (int c = 0; c < C; c++) g[c] += d[c];
            }
        }
        if (dwpe) {
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) {
                float *g = dwpe + (size_t)t * C;
                for (int b = 0; b < B; b++) {
                    const float *d = dout + ((size_t)b * T + t) * C;
                    for (int c = 0; c < C; c++) g[c] += d[c];
                }
            }
        }
    }
}

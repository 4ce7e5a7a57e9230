/* Token + position embedding. */
#include "cpu_ops.h"

void qs_cpu_embed_forward(float *out, const int *tok, const int *pos, const float *wte,
                          const float *wpe, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        float *o = out + (size_t)r * C;
        const float *e = wte + (size_t)tok[r] * C;
        const float *p = wpe + (size_t)pos[r] * C;
        for (int c = 0; c < C; c++) o[c] = e[c] + p[c];
    }
}

/* Rows with the same index (a repeated token, one position over many sequences) add into
 * one table row. Each thread owns the indices congruent to its number and adds their
 * rows in row order, so there are no races and the sum order never depends on timing. */
static void scatter_rows(float *table, const float *dout, const int *index, int N, int C) {
    const int nt = omp_get_num_threads(), me = omp_get_thread_num();
    for (int r = 0; r < N; r++) {
        if (index[r] % nt != me) continue;
        float *g = table + (size_t)index[r] * C;
        const float *d = dout + (size_t)r * C;
        for (int c = 0; c < C; c++) g[c] += d[c];
    }
}

void qs_cpu_embed_backward(float *dwte, float *dwpe, const float *dout, const int *tok,
                           const int *pos, int N, int C) {
#pragma omp parallel
    {
        if (dwte) scatter_rows(dwte, dout, tok, N, C);
        if (dwpe) scatter_rows(dwpe, dout, pos, N, C);
    }
}

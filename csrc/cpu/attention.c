/* Causal multi-head self-attention. Work is split over (batch, head) pairs: each
 * pair owns its columns of out/dqkv and its att block, so threads never share an
 * output element and every sum runs in a fixed order.
 *
 * The products are single-threaded sgemm calls (BLAS runs on one thread in this
 * engine; matmul.c) that read q, k and v where they lie in qkv (row stride 3C). They
 * compute the whole T x T score square, twice the causal work, but at BLAS speed,
 * which beats the triangular row-by-row loops at every T tried; the masked half is
 * then discarded (forward) or zeroed (backward). */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

/* Row t of a [T,T] score block: softmax over its first t+1 entries, zeros after. */
static void causal_softmax_row(float *a, int t, int T) {
    float mx = -INFINITY;
    for (int u = 0; u <= t; u++) mx = a[u] > mx ? a[u] : mx;
    float sum = 0.0f;
    for (int u = 0; u <= t; u++) sum += (a[u] = expf(a[u] - mx));
    const float inv = 1.0f / sum;
    for (int u = 0; u <= t; u++) a[u] *= inv;
    memset(a + t + 1, 0, (size_t)(T - t - 1) * sizeof *a);
}

void qs_cpu_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C,
                              int NH) {
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
        const int b = bh / NH, h = bh % NH;
        /* q of (b, t) is base + t*C3, k is C further along, v 2C. */
        const float *base = qkv + (size_t)b * T * C3 + (size_t)h * hs;
        float *a = att + (size_t)bh * T * T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, base, C3, base + C, C3, 0.0f, a, T);
        for (int t = 0; t < T; t++) causal_softmax_row(a + (size_t)t * T, t, T);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, a, T, base + 2 * C, C3, 0.0f,
                    out + (size_t)b * T * C + (size_t)h * hs, C);
    }
}

void qs_cpu_attention_backward(float *dqkv, const float *dout, const float *qkv,
                               const float *att, int B, int T, int C, int NH) {
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        float *ds = qs_cpu_scratch((size_t)T * T * sizeof *ds); /* dL/dscores [T,T] */
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * NH; bh++) {
            const int b = bh / NH, h = bh % NH;
            const float *base = qkv + (size_t)b * T * C3 + (size_t)h * hs;
            const float *dbo = dout + (size_t)b * T * C + (size_t)h * hs;
            float *dbase = dqkv + (size_t)b * T * C3 + (size_t)h * hs;
            const float *ab = att + (size_t)bh * T * T;
            /* datt = dout V^T; the softmax Jacobian turns it into the score gradient
             * (times the 1/sqrt(hs) scale), zero above the diagonal */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, dbo, C, base + 2 * C, C3, 0.0f, ds, T);
            for (int t = 0; t < T; t++) {
                const float *a = ab + (size_t)t * T;
                float *d = ds + (size_t)t * T;
                const float datt_dot_att = qs_cpu_dot(d, a, t + 1);
                for (int u = 0; u <= t; u++) d[u] = scale * a[u] * (d[u] - datt_dot_att);
                memset(d + t + 1, 0, (size_t)(T - t - 1) * sizeof *d);
            }
            /* dq += ds K, dk += ds^T Q, dv += att^T dout */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, ds, T, base + C, C3, 1.0f, dbase, C3);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, ds, T, base, C3, 1.0f, dbase + C, C3);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, ab, T, dbo, C, 1.0f, dbase + 2 * C, C3);
        }
        free(ds);
    }
}

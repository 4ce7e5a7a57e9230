/* Causal multi-head self-attention. Work is split over (batch, head) pairs: each
 * pair owns its columns of out/dqkv and its att block, so threads never share an
 * output element and every sum runs in a fixed order.
 *
 * Every product is phrased as vec_mat (a row vector times a matrix whose rows
 * are contiguous), with K and V transposed into per-thread scratch where needed;
 * that keeps partial sums in registers instead of re-reading and re-writing
 * rows for each term. */
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

/* out[j] += sum_{i<len} x[i] * m[i*stride + j] for j < w (w <= 32). The w sums
 * stay in registers over all i when w is a compile-time constant. */
static inline void vec_mat_block(float *out, const float *x, int len, const float *m,
                                 size_t stride, int w) {
    float acc[32] = {0};
    for (int i = 0; i < len; i++)
        for (int j = 0; j < w; j++) acc[j] += x[i] * m[i * stride + j];
    for (int j = 0; j < w; j++) out[j] += acc[j];
}

/* out[j] += sum_{i<len} x[i] * m[i*stride + j] for j < n, in constant-width
 * blocks so each is unrolled into vector registers. */
static void vec_mat(float *out, const float *x, int len, const float *m, size_t stride, int n) {
    int j = 0;
    for (; n - j >= 32; j += 32) vec_mat_block(out + j, x, len, m + j, stride, 32);
    if (n - j >= 16) {
        vec_mat_block(out + j, x, len, m + j, stride, 16);
        j += 16;
    }
    if (n - j >= 8) {
        vec_mat_block(out + j, x, len, m + j, stride, 8);
        j += 8;
    }
    if (n > j) vec_mat_block(out + j, x, len, m + j, stride, n - j);
}

/* dst[i*T + u] = src[u*stride + i]: the [T, hs] head slice at src, transposed. */
static void transpose_head(float *dst, const float *src, size_t stride, int T, int hs) {
    for (int u = 0; u < T; u++)
        for (int i = 0; i < hs; i++) dst[(size_t)i * T + u] = src[u * stride + i];
}

void qs_cpu_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C,
                              int NH) {
    const int hs = C / NH;
    const size_t C3 = 3 * (size_t)C;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        float *kt = qs_cpu_scratch((size_t)hs * T * sizeof *kt);
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * NH; bh++) {
            const int b = bh / NH, h = bh % NH;
            /* q of (b, t) is base + t*C3, k is C further along, v 2C. */
            const float *base = qkv + (size_t)b * T * C3 + (size_t)h * hs;
            transpose_head(kt, base + C, C3, T, hs);
            for (int t = 0; t < T; t++) {
                float *a = att + ((size_t)bh * T + t) * T;
                memset(a, 0, (size_t)T * sizeof *a); /* also the zeros above the diagonal */
                vec_mat(a, base + t * C3, hs, kt, T, t + 1);
                float mx = -INFINITY;
                for (int u = 0; u <= t; u++) {
                    a[u] *= scale;
                    mx = a[u] > mx ? a[u] : mx;
                }
                float sum = 0.0f;
                for (int u = 0; u <= t; u++) {
                    a[u] = expf(a[u] - mx);
                    sum += a[u];
                }
                const float inv = 1.0f / sum;
                for (int u = 0; u <= t; u++) a[u] *= inv;

                float *o = out + ((size_t)b * T + t) * C + (size_t)h * hs;
                memset(o, 0, (size_t)hs * sizeof *o);
                vec_mat(o, a, t + 1, base + 2 * C, C3, hs);
            }
        }
        free(kt);
    }
}

void qs_cpu_attention_backward(float *dqkv, const float *dout, const float *qkv,
                               const float *att, int B, int T, int C, int NH) {
    const int hs = C / NH;
    const size_t C3 = 3 * (size_t)C;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        /* V transposed [hs,T], dL/dscores [T,T] (lower triangle), one column [T]. */
        float *vt = qs_cpu_scratch(((size_t)hs + T + 1) * T * sizeof *vt);
        float *ds = vt + (size_t)hs * T, *col = ds + (size_t)T * T;
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * NH; bh++) {
            const int b = bh / NH, h = bh % NH;
            const float *base = qkv + (size_t)b * T * C3 + (size_t)h * hs;
            const float *dbo = dout + (size_t)b * T * C + (size_t)h * hs;
            float *dbase = dqkv + (size_t)b * T * C3 + (size_t)h * hs;
            const float *ab = att + (size_t)bh * T * T;
            transpose_head(vt, base + 2 * C, C3, T, hs);
            /* Row t: datt = dout_t . v_u; softmax Jacobian gives the score gradient
             * (times the 1/sqrt(hs) scale); dq_t += ds_t @ K. */
            for (int t = 0; t < T; t++) {
                const float *a = ab + (size_t)t * T;
                float *d = ds + (size_t)t * T;
                memset(d, 0, (size_t)(t + 1) * sizeof *d);
                vec_mat(d, dbo + (size_t)t * C, hs, vt, T, t + 1);
                const float datt_dot_att = qs_cpu_dot(d, a, t + 1);
                for (int u = 0; u <= t; u++) d[u] = scale * a[u] * (d[u] - datt_dot_att);
                vec_mat(dbase + t * C3, d, t + 1, base + C, C3, hs);
            }
            /* Key/value u collects from the queries t >= u that see it:
             * dk_u += sum_t ds[t,u] q_t, dv_u += sum_t att[t,u] dout_t. */
            for (int u = 0; u < T; u++) {
                for (int t = u; t < T; t++) col[t - u] = ds[(size_t)t * T + u];
                vec_mat(dbase + u * C3 + C, col, T - u, base + u * C3, C3, hs);
                for (int t = u; t < T; t++) col[t - u] = ab[(size_t)t * T + u];
                vec_mat(dbase + u * C3 + 2 * C, col, T - u, dbo + (size_t)u * C, C, hs);
            }
        }
        free(vt);
    }
}

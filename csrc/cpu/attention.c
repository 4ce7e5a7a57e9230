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
            qs_cpu_transpose_head(kt, base + C, C3, T, hs);
            for (int t = 0; t < T; t++) {
                float *a = att + ((size_t)bh * T + t) * T;
                memset(a, 0, (size_t)T * sizeof *a); /* also the zeros above the diagonal */
                qs_cpu_vec_mat(a, base + t * C3, hs, kt, T, t + 1);
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
                qs_cpu_vec_mat(o, a, t + 1, base + 2 * C, C3, hs);
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
            qs_cpu_transpose_head(vt, base + 2 * C, C3, T, hs);
            /* Row t: datt = dout_t . v_u; softmax Jacobian gives the score gradient
             * (times the 1/sqrt(hs) scale); dq_t += ds_t @ K. */
            for (int t = 0; t < T; t++) {
                const float *a = ab + (size_t)t * T;
                float *d = ds + (size_t)t * T;
                memset(d, 0, (size_t)(t + 1) * sizeof *d);
                qs_cpu_vec_mat(d, dbo + (size_t)t * C, hs, vt, T, t + 1);
                const float datt_dot_att = qs_cpu_dot(d, a, t + 1);
                for (int u = 0; u <= t; u++) d[u] = scale * a[u] * (d[u] - datt_dot_att);
                qs_cpu_vec_mat(dbase + t * C3, d, t + 1, base + C, C3, hs);
            }
            /* Key/value u collects from the queries t >= u that see it:
             * dk_u += sum_t ds[t,u] q_t, dv_u += sum_t att[t,u] dout_t. */
            for (int u = 0; u < T; u++) {
                for (int t = u; t < T; t++) col[t - u] = ds[(size_t)t * T + u];
                qs_cpu_vec_mat(dbase + u * C3 + C, col, T - u, base + u * C3, C3, hs);
                for (int t = u; t < T; t++) col[t - u] = ab[(size_t)t * T + u];
                qs_cpu_vec_mat(dbase + u * C3 + 2 * C, col, T - u, dbo + (size_t)u * C, C, hs);
            }
        }
        free(vt);
    }
}

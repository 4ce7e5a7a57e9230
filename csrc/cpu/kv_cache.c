/* Attention with a KV cache, for decoding one token at a time. Plain loops: one query
 * per (sequence, head) is a matrix-vector product, so there is no GEMM to hand to BLAS. */
#include <math.h>
#include <string.h>

#include "cpu_ops.h"

/* Row t of head h of sequence b in a [B,NH,max_T,hs] cache. */
static float *cache_row(float *cache, int b, int h, int t, int NH, int max_T, int hs) {
    return cache + (((size_t)b * NH + h) * max_T + t) * hs;
}

void qs_cpu_kv_cache_fill(float *kcache, float *vcache, const float *qkv, int B, int T, int C, int NH, int max_T) {
    int hs = C / NH;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *row = qkv + ((size_t)b * T + t) * 3 * C;
                memcpy(cache_row(kcache, b, h, t, NH, max_T, hs), row + C + h * hs, (size_t)hs * sizeof(float));
                memcpy(cache_row(vcache, b, h, t, NH, max_T, hs), row + 2 * C + h * hs, (size_t)hs * sizeof(float));
            }
}

void qs_cpu_attention_decode(float *out, float *kcache, float *vcache, const float *qkv, int B, int C, int NH,
                             const int *slots, const int *pos, int max_T) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++) {
        const size_t at = ((size_t)slots[b] * NH * max_T + (size_t)pos[b]) * hs;
        qs_cpu_kv_cache_fill(kcache + at, vcache + at, qkv + (size_t)b * 3 * C, 1, 1, C, NH, max_T);
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const int s = slots[b], P = pos[b];
            const float *q = qkv + (size_t)b * 3 * C + h * hs;
            float *o = out + (size_t)b * C + h * hs;
            float w[P + 1]; /* pos < max_T = model.seq_len: small */
            float mx = -INFINITY;
            for (int t = 0; t <= P; t++) {
                const float *k = cache_row(kcache, s, h, t, NH, max_T, hs);
                float d = 0.0f;
                for (int i = 0; i < hs; i++) d += q[i] * k[i];
                w[t] = d * scale;
                if (w[t] > mx) mx = w[t];
            }
            float sum = 0.0f;
            for (int t = 0; t <= P; t++) sum += (w[t] = expf(w[t] - mx));
            for (int i = 0; i < hs; i++) o[i] = 0.0f;
            for (int t = 0; t <= P; t++) {
                const float *v = cache_row(vcache, s, h, t, NH, max_T, hs);
                float p = w[t] / sum;
                for (int i = 0; i < hs; i++) o[i] += p * v[i];
            }
        }
}

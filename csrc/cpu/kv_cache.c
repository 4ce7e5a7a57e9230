/* Attention with a KV cache, for decoding one token at a time. Plain loops: one query
 * per (sequence, head) is a matrix-vector product, so there is no GEMM to hand to BLAS.
 * The cache holds the NKV key/value heads only: grouped-query attention's saving. */
#include <math.h>
#include <string.h>

#include "cpu_ops.h"

/* Row t of kv head g of slot b in a [slots,NKV,max_T,hs] cache. */
static float *cache_row(float *cache, int b, int g, int t, int NKV, int max_T, int hs) {
    return cache + (((size_t)b * NKV + g) * max_T + t) * hs;
}

void qs_cpu_kv_cache_fill(float *kcache, float *vcache, const float *qkv, int B, int T, int C, int NH, int NKV,
                          int max_T) {
    const int hs = C / NH, Ckv = NKV * hs;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < NKV; g++)
            for (int t = 0; t < T; t++) {
                const float *row = qkv + ((size_t)b * T + t) * (C + 2 * Ckv);
                memcpy(cache_row(kcache, b, g, t, NKV, max_T, hs), row + C + g * hs, (size_t)hs * sizeof(float));
                memcpy(cache_row(vcache, b, g, t, NKV, max_T, hs), row + C + Ckv + g * hs,
                       (size_t)hs * sizeof(float));
            }
}

void qs_cpu_attention_decode(float *out, float *kcache, float *vcache, const float *qkv, int B, int C, int NH,
                             int NKV, const int *slots, const int *pos, int max_T) {
    const int hs = C / NH, row_w = C + 2 * NKV * hs, group = NH / NKV;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++) {
        const size_t at = ((size_t)slots[b] * NKV * max_T + (size_t)pos[b]) * hs;
        qs_cpu_kv_cache_fill(kcache + at, vcache + at, qkv + (size_t)b * row_w, 1, 1, C, NH, NKV, max_T);
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const int s = slots[b], P = pos[b], g = h / group;
            const float *q = qkv + (size_t)b * row_w + h * hs;
            float *o = out + (size_t)b * C + h * hs;
            float w[P + 1]; /* pos < max_T = model.seq_len: small */
            float mx = -INFINITY;
            for (int t = 0; t <= P; t++) {
                const float *k = cache_row(kcache, s, g, t, NKV, max_T, hs);
                float d = 0.0f;
                for (int i = 0; i < hs; i++) d += q[i] * k[i];
                w[t] = d * scale;
                if (w[t] > mx) mx = w[t];
            }
            float sum = 0.0f;
            for (int t = 0; t <= P; t++) sum += (w[t] = expf(w[t] - mx));
            for (int i = 0; i < hs; i++) o[i] = 0.0f;
            for (int t = 0; t <= P; t++) {
                const float *v = cache_row(vcache, s, g, t, NKV, max_T, hs);
                float p = w[t] / sum;
                for (int i = 0; i < hs; i++) o[i] += p * v[i];
            }
        }
}

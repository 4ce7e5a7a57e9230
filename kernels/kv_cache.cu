/* Attention with a KV cache, for decoding one token at a time: caches [slots,NKV,max_T,hs],
 * the K/V heads only (grouped-query attention: query head h reads kv head h / (NH / NKV)). */
#include "common.cuh"

#define DECODE_THREADS 128

/* The k and v of qkv row (b, t) [B,T,C+2Ckv] go to position pos[b] (NULL: t) of slot
 * slots[b] (NULL: b). */
__global__ static void cache_store_kernel(float *kcache, float *vcache, const float *qkv, int B, int T, int C, int NH,
                                          int NKV, int max_T, const int *slots, const int *pos) {
    const int hs = C / NH, Ckv = hs * NKV;
    QS_GRID_LOOP(e, (size_t)B * T * Ckv) {
        const int c = (int)(e % Ckv), t = (int)(e / Ckv % T), b = (int)(e / ((size_t)Ckv * T));
        const int s = slots ? slots[b] : b, at = pos ? pos[b] : t, g = c / hs, i = c % hs;
        const size_t dst = (((size_t)s * NKV + g) * max_T + at) * hs + i;
        const float *row = qkv + ((size_t)b * T + t) * (C + 2 * Ckv);
        kcache[dst] = row[C + c];
        vcache[dst] = row[C + Ckv + c];
    }
}

void qs_cuda_kv_cache_fill(float *kcache, float *vcache, const float *qkv, int B, int T, int C, int NH, int NKV,
                           int max_T) {
    QS_LAUNCH_N(cache_store_kernel, (size_t)B * T * (C / NH * NKV), kcache, vcache, qkv, B, T, C, NH, NKV, max_T,
                (const int *)NULL, (const int *)NULL);
}

/* One block per (row b, query head h), reading kv head h / (NH / NKV): scores against
 * positions 0..pos[b] of its slot into w [B,NH,max_T], softmax, then out = sum_t p_t v_t. */
__global__ static void decode_kernel(float *out, const float *kcache, const float *vcache, const float *qkv, int C,
                                     int NH, int NKV, const int *slots, const int *pos, int max_T, float *w) {
    const int b = blockIdx.x / NH, h = blockIdx.x % NH, hs = C / NH, P = pos[b];
    const size_t head = ((size_t)slots[b] * NKV + h / (NH / NKV)) * max_T * hs;
    const float *q = qkv + (size_t)b * (C + 2 * hs * NKV) + (size_t)h * hs;
    float *wb = w + (size_t)blockIdx.x * max_T;
    const float scale = 1.0f / sqrtf((float)hs);
    float mx = -INFINITY;
    for (int t = threadIdx.x; t <= P; t += blockDim.x) {
        const float *k = kcache + head + (size_t)t * hs;
        float d = 0.0f;
        for (int i = 0; i < hs; i++) d += q[i] * k[i];
        wb[t] = d * scale;
        mx = fmaxf(mx, wb[t]);
    }
    mx = qs_block_reduce(mx, qs_max_op(), -INFINITY);
    float sum = 0.0f;
    for (int t = threadIdx.x; t <= P; t += blockDim.x) sum += wb[t] = expf(wb[t] - mx);
    sum = qs_block_reduce(sum, qs_sum_op(), 0.0f); /* its barrier also publishes wb */
    float *o = out + (size_t)b * C + (size_t)h * hs;
    for (int i = threadIdx.x; i < hs; i += blockDim.x) {
        float acc = 0.0f;
        for (int t = 0; t <= P; t++) acc += wb[t] / sum * vcache[head + (size_t)t * hs + i];
        o[i] = acc;
    }
}

void qs_cuda_attention_decode(float *out, float *kcache, float *vcache, const float *qkv, int B, int C, int NH, int NKV,
                              const int *slots, const int *pos, int max_T) {
    QS_LAUNCH_N(cache_store_kernel, (size_t)B * (C / NH * NKV), kcache, vcache, qkv, B, 1, C, NH, NKV, max_T, slots,
                pos);
    float *w = (float *)qs_cuda_scratch((size_t)B * NH * max_T * sizeof(float));
    QS_LAUNCH(decode_kernel, B * NH, DECODE_THREADS, 0, out, kcache, vcache, qkv, C, NH, NKV, slots, pos, max_T, w);
}

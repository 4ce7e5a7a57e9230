/* Attention with a KV cache, for decoding one token at a time: caches [slots,NKV,max_T,hs],
 * the K/V heads only (grouped-query attention: query head h reads kv head h / (NH / NKV)). */
#include "common.cuh"

enum {
    DECODE_THREADS = 128,
    DECODE_CHUNK = 64, /* cached positions a block of the split pass takes */
    DECODE_COLS = 8,   /* head columns a lane holds: heads up to 256 (the backend's max_head_size) */
};

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

/* Decoding attention as splits over the cached positions (flash-decoding), so that even
 * one row's few heads fill the GPU: the split pass gives each (row b, query head h) one
 * block per DECODE_CHUNK positions of 0..pos[b], which writes its scores' max m, the sum
 * l of exp(score - m) and the hs sums of exp(score - m) v into
 * part[(b NH + h) splits + s] = {m, l, o[hs]}; the combine pass rescales the row's splits
 * to their common max and adds them in order (deterministic, no atomics). Within a
 * block a warp takes every fourth position: its lanes read the cached rows' columns
 * lane + 32c, coalesced, for the dot product (then a butterfly) and for p v. */
__global__ static void decode_split_kernel(float *part, const float *kcache, const float *vcache, const float *qkv,
                                           int C, int NH, int NKV, const int *slots, const int *pos, int max_T,
                                           int splits) {
    __shared__ float qs[DECODE_COLS * 32], ws[DECODE_CHUNK], os[DECODE_THREADS / 32][DECODE_COLS * 32];
    const int b = blockIdx.x / NH, h = blockIdx.x % NH, hs = C / NH, t0 = blockIdx.y * DECODE_CHUNK;
    const int n = min(DECODE_CHUNK, pos[b] + 1 - t0); /* positions of this split */
    if (n <= 0) return;                                /* past the row's last: the combine skips it */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const size_t head = ((size_t)slots[b] * NKV + h / (NH / NKV)) * max_T * hs + (size_t)t0 * hs;
    const float *q = qkv + (size_t)b * (C + 2 * hs * NKV) + (size_t)h * hs;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int i = threadIdx.x; i < hs; i += blockDim.x) qs[i] = q[i] * scale;
    __syncthreads();
    for (int j = warp; j < n; j += warps) {
        const float *k = kcache + head + (size_t)j * hs;
        float d = 0.0f;
        for (int i = lane; i < hs; i += 32) d += qs[i] * k[i];
        d = qs_warp_reduce(d, qs_sum_op());
        if (lane == 0) ws[j] = d;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, ws[j]);
    mx = qs_block_reduce(mx, qs_max_op(), -INFINITY);
    float l = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) l += ws[j] = expf(ws[j] - mx);
    l = qs_block_reduce(l, qs_sum_op(), 0.0f); /* its barrier also publishes ws */
    float acc[DECODE_COLS] = {};
    for (int j = warp; j < n; j += warps) {
        const float p = ws[j], *v = vcache + head + (size_t)j * hs;
#pragma unroll
        for (int c = 0; c < DECODE_COLS; c++)
            if (lane + 32 * c < hs) acc[c] += p * v[lane + 32 * c];
    }
#pragma unroll
    for (int c = 0; c < DECODE_COLS; c++)
        if (lane + 32 * c < hs) os[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    float *at = part + ((size_t)blockIdx.x * splits + blockIdx.y) * (hs + 2);
    for (int i = threadIdx.x; i < hs; i += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < warps; w++) o += os[w][i];
        at[2 + i] = o;
    }
    if (threadIdx.x == 0) at[0] = mx, at[1] = l;
}

/* out[b, h's columns] from the row's splits 0..pos[b] / DECODE_CHUNK: one block per (b, h).
 * Each split's weight exp(m_s - max) is taken once, into shared memory (splits floats),
 * not once per column. */
__global__ static void decode_combine_kernel(float *out, const float *part, int C, int NH, const int *pos,
                                             int splits) {
    QS_DYNAMIC_SMEM(float, weight);
    const int b = blockIdx.x / NH, hs = C / NH, used = pos[b] / DECODE_CHUNK + 1;
    const float *at = part + (size_t)blockIdx.x * splits * (hs + 2);
    float mx = -INFINITY, l = 0.0f;
    for (int s = 0; s < used; s++) mx = fmaxf(mx, at[(size_t)s * (hs + 2)]);
    for (int s = threadIdx.x; s < used; s += blockDim.x) weight[s] = expf(at[(size_t)s * (hs + 2)] - mx);
    __syncthreads();
    for (int s = 0; s < used; s++) l += weight[s] * at[(size_t)s * (hs + 2) + 1];
    for (int i = threadIdx.x; i < hs; i += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < used; s++) o += weight[s] * at[(size_t)s * (hs + 2) + 2 + i];
        out[(size_t)b * C + (size_t)(blockIdx.x % NH) * hs + i] = o / l;
    }
}

void qs_cuda_attention_decode(float *out, float *kcache, float *vcache, const float *qkv, int B, int C, int NH, int NKV,
                              const int *slots, const int *pos, int max_T) {
    QS_LAUNCH_N(cache_store_kernel, (size_t)B * (C / NH * NKV), kcache, vcache, qkv, B, 1, C, NH, NKV, max_T, slots,
                pos);
    const int splits = (max_T + DECODE_CHUNK - 1) / DECODE_CHUNK;
    float *part = (float *)qs_cuda_scratch((size_t)B * NH * splits * (C / NH + 2) * sizeof(float));
    QS_LAUNCH(decode_split_kernel, dim3(B * NH, splits), DECODE_THREADS, 0, part, kcache, vcache, qkv, C, NH, NKV,
              slots, pos, max_T, splits);
    QS_LAUNCH(decode_combine_kernel, B * NH, DECODE_THREADS, splits * sizeof(float), out, part, C, NH, pos, splits);
}

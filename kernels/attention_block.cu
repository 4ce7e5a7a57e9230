/* Blockwise attention (ops.h qs_attn_block): a query block against one key/value block,
 * its log-sum-exp, the merge of two blocks' results, and one block's share of the
 * backward. The products run through cuBLAS, one sequence at a time with its heads as
 * a strided batch (a head is a column slice of the rows, so every operand is read where
 * it lies); the softmax rows run one warp each. */
#include "common.cuh"

/* Keys query row i sees: a prefix of the block, as positions rise with the row. */
__device__ static inline int visible_keys(const qs_attn_block &k, int i) {
    if (!k.causal) return k.Tk;
    const long long n = (long long)k.q_pos0 + i - k.k_pos0 + 1;
    return n < 0 ? 0 : n > k.Tk ? k.Tk : (int)n;
}

static float scale_of(const qs_attn_block *k) { return 1.0f / sqrtf((float)(k->C / k->NH)); }

/* ---- the head-batched products of sequence b; p, ds are [NH][Tq][Tk] ---- */

static const float *q_of(const float *q, const qs_attn_block *k, int b) {
    return q + (size_t)b * k->q_len * k->q_stride;
}
static const float *kv_of(const float *kv, const qs_attn_block *k, int b) {
    return kv + (size_t)b * k->kv_len * k->kv_stride;
}
static size_t o_at(const qs_attn_block *k, int b) { return (size_t)b * k->q_len * k->C; }

static void qs_cuda_attn_scores(float *p, const float *q, const float *kv, const qs_attn_block *k, int b) {
    const int hs = k->C / k->NH;
    const long long pq = (long long)k->Tq * k->Tk;
    qs_cuda_gemm(0, 1, k->Tq, k->Tk, hs, scale_of(k), q_of(q, k, b), k->q_stride, hs, kv_of(kv, k, b), k->kv_stride,
                 hs, 0.0f, p, k->Tk, pq, k->NH);
}

static void qs_cuda_attn_apply(float *out, const float *p, const float *kv, const qs_attn_block *k, int b) {
    const int hs = k->C / k->NH;
    const long long pq = (long long)k->Tq * k->Tk;
    qs_cuda_gemm(0, 0, k->Tq, hs, k->Tk, 1.0f, p, k->Tk, pq, kv_of(kv, k, b) + k->C, k->kv_stride, hs, 0.0f,
                 out + o_at(k, b), k->C, hs, k->NH);
}

static void qs_cuda_attn_dprobs(float *dp, const float *dout, const float *kv, const qs_attn_block *k, int b) {
    const int hs = k->C / k->NH;
    const long long pq = (long long)k->Tq * k->Tk;
    qs_cuda_gemm(0, 1, k->Tq, k->Tk, hs, 1.0f, dout + o_at(k, b), k->C, hs, kv_of(kv, k, b) + k->C, k->kv_stride, hs,
                 0.0f, dp, k->Tk, pq, k->NH);
}

static void qs_cuda_attn_grads(float *dq, float *dkv, const float *ds, const float *p, const float *dout, const float *q,
                        const float *kv, const qs_attn_block *k, int b) {
    const int hs = k->C / k->NH, Tq = k->Tq, Tk = k->Tk;
    const long long pq = (long long)Tq * Tk;
    if (dq) /* dq += dS K */
        qs_cuda_gemm(0, 0, Tq, hs, Tk, 1.0f, ds, Tk, pq, kv_of(kv, k, b), k->kv_stride, hs, 1.0f,
                     dq + (size_t)b * k->q_len * k->q_stride, k->q_stride, hs, k->NH);
    if (!dkv) return;
    float *dkv_b = dkv + (size_t)b * k->kv_len * k->kv_stride;
    /* dk += dS^T Q, dv += P^T dout */
    qs_cuda_gemm(1, 0, Tk, hs, Tq, 1.0f, ds, Tk, pq, q_of(q, k, b), k->q_stride, hs, 1.0f, dkv_b, k->kv_stride, hs,
                 k->NH);
    qs_cuda_gemm(1, 0, Tk, hs, Tq, 1.0f, p, Tk, pq, dout + o_at(k, b), k->C, hs, 1.0f, dkv_b + k->C, k->kv_stride, hs,
                 k->NH);
}

/* ---- softmax rows ---- */

/* Row r of p [rows][Tk] (r = (b * NH + h) * Tq + i) holds query i's scaled scores; it
 * becomes its probabilities over the visible keys and 0 elsewhere, and lse (if not
 * NULL) gets the log-sum-exp, -inf for a query that sees no key. */
__global__ static void softmax_rows_kernel(float *p, float *lse, qs_attn_block k, int rows) {
    const int r = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (r >= rows) return;
    const int i = r % k.Tq, n = visible_keys(k, i);
    float *s = p + (size_t)r * k.Tk;
    float mx = -INFINITY;
    for (int j = lane; j < n; j += 32) mx = fmaxf(mx, s[j]);
    mx = qs_warp_reduce(mx, qs_max_op());
    double sum = 0.0;
    for (int j = lane; j < n; j += 32) sum += expf(s[j] - mx);
    sum = qs_warp_reduce(sum, qs_sum_op());
    const float inv = n ? (float)(1.0 / sum) : 0.0f;
    for (int j = lane; j < k.Tk; j += 32) s[j] = j < n ? expf(s[j] - mx) * inv : 0.0f;
    if (lse && lane == 0) lse[(size_t)(r / k.Tq) * k.q_len + i] = n ? mx + (float)log(sum) : -INFINITY;
}

static void qs_cuda_attn_softmax(float *p, float *lse, const qs_attn_block *k, int rows) {
    QS_LAUNCH_ROWS(softmax_rows_kernel, rows, p, lse, *k, rows);
}

/* ---- the ops ---- */

void qs_cuda_attention_block_forward(float *out, float *lse, const float *q, const float *kv,
                                     const qs_attn_block *k) {
    const size_t pq = (size_t)k->Tq * k->Tk;
    float *p = (float *)qs_cuda_scratch((size_t)k->B * k->NH * pq * sizeof(float));
    for (int b = 0; b < k->B; b++) qs_cuda_attn_scores(p + (size_t)b * k->NH * pq, q, kv, k, b);
    qs_cuda_attn_softmax(p, lse, k, k->B * k->NH * k->Tq);
    for (int b = 0; b < k->B; b++) qs_cuda_attn_apply(out, p + (size_t)b * k->NH * pq, kv, k, b);
}

/* One warp per (sequence, head, query row). */
__global__ static void merge_kernel(float *out, float *lse, const float *out_b, const float *lse_b, qs_attn_block k) {
    const int r = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (r >= k.B * k.NH * k.Tq) return;
    const int bh = r / k.Tq, i = r % k.Tq, b = bh / k.NH, h = bh % k.NH, hs = k.C / k.NH;
    const size_t s = (size_t)bh * k.q_len + i;
    const float la = lse[s], lb = lse_b[s];
    /* the block adds nothing; this also keeps -inf - -inf (NaN) out below */
    if (lb == -INFINITY) return;
    /* logaddexp from the larger side, so neither exp overflows */
    const float l = fmaxf(la, lb) + log1pf(expf(-fabsf(la - lb)));
    const float wa = expf(la - l), wb = expf(lb - l);
    const size_t o = ((size_t)b * k.q_len + i) * k.C + (size_t)h * hs;
    for (int c = lane; c < hs; c += 32) out[o + c] = wa * out[o + c] + wb * out_b[o + c];
    __syncwarp();
    if (lane == 0) lse[s] = l;
}

void qs_cuda_attention_merge(float *out, float *lse, const float *out_b, const float *lse_b,
                             const qs_attn_block *k) {
    const int rows = k->B * k->NH * k->Tq;
    QS_LAUNCH_ROWS(merge_kernel, rows, out, lse, out_b, lse_b, *k);
}

/* One warp per (sequence, head, row): delta = dout . out over the head's columns. */
__global__ static void delta_kernel(float *delta, const float *dout, const float *out, int B, int T, int C, int NH) {
    const int r = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (r >= B * NH * T) return;
    const int bh = r / T, t = r % T, hs = C / NH;
    const size_t o = ((size_t)(bh / NH) * T + t) * C + (size_t)(bh % NH) * hs;
    float s = 0.0f;
    for (int c = lane; c < hs; c += 32) s += dout[o + c] * out[o + c];
    s = qs_warp_reduce(s, qs_sum_op());
    if (lane == 0) delta[r] = s;
}

void qs_cuda_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int C, int NH) {
    const int rows = B * NH * T;
    QS_LAUNCH_ROWS(delta_kernel, rows, delta, dout, out, B, T, C, NH);
}

/* Sequence b's rows [NH][Tq][Tk]: p holds the scaled scores and becomes P = exp(S - lse)
 * over the visible keys; ds holds dP = dout V^T and becomes dS = scale P (dP - delta);
 * both 0 where a key is not visible. */
__global__ static void block_dscores_kernel(float *p, float *ds, const float *lse, const float *delta,
                                            qs_attn_block k, int b, float scale) {
    const size_t n_all = (size_t)k.NH * k.Tq * k.Tk;
    QS_GRID_LOOP(e, n_all) {
        const int j = (int)(e % k.Tk), row = (int)(e / k.Tk), i = row % k.Tq, h = row / k.Tq;
        if (j >= visible_keys(k, i)) {
            p[e] = ds[e] = 0.0f;
            continue;
        }
        const size_t s = ((size_t)b * k.NH + h) * k.q_len + i;
        const float pe = expf(p[e] - lse[s]);
        p[e] = pe;
        ds[e] = scale * pe * (ds[e] - delta[s]);
    }
}

void qs_cuda_attention_block_backward(float *dq, float *dkv, const float *dout, const float *q, const float *kv,
                                      const float *lse, const float *delta, const qs_attn_block *k) {
    if (!dq && !dkv) return;
    const size_t pq = (size_t)k->NH * k->Tq * k->Tk;
    char *at = (char *)qs_cuda_scratch(2 * qs_cuda_room(pq * sizeof(float)));
    float *p = (float *)qs_cuda_carve(&at, pq * sizeof(float)), *ds = (float *)qs_cuda_carve(&at, pq * sizeof(float));
    for (int b = 0; b < k->B; b++) {
        qs_cuda_attn_scores(p, q, kv, k, b);
        qs_cuda_attn_dprobs(ds, dout, kv, k, b);
        QS_LAUNCH_N(block_dscores_kernel, pq, p, ds, lse, delta, *k, b, scale_of(k));
        qs_cuda_attn_grads(dq, dkv, ds, p, dout, q, kv, k, b);
    }
}

__global__ static void kv_pack_kernel(float *kv, const float *qkv, size_t rows, int C) {
    QS_GRID_LOOP(i, rows * 2 * C) {
        const size_t r = i / (2 * C), c = i % (2 * C);
        kv[i] = qkv[r * 3 * C + C + c];
    }
}

__global__ static void kv_unpack_add_kernel(float *dqkv, const float *dkv, size_t rows, int C) {
    QS_GRID_LOOP(i, rows * 2 * C) {
        const size_t r = i / (2 * C), c = i % (2 * C);
        dqkv[r * 3 * C + C + c] += dkv[i];
    }
}

void qs_cuda_kv_pack_forward(float *kv, const float *qkv, int B, int T, int C) {
    QS_LAUNCH_N(kv_pack_kernel, (size_t)B * T * 2 * C, kv, qkv, (size_t)B * T, C);
}

void qs_cuda_kv_pack_backward(float *dqkv, const float *dkv, int B, int T, int C) {
    QS_LAUNCH_N(kv_unpack_add_kernel, (size_t)B * T * 2 * C, dqkv, dkv, (size_t)B * T, C);
}

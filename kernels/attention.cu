/* Causal multi-head attention with the probabilities kept in att [B,NH,T,T], as the CPU
 * does (the fused kernel that keeps nothing T x T replaces it later). It is blockwise
 * attention (attention_block.cu) over one block: the whole sequence against itself, q,
 * k and v read in place from qkv [B,T,3C]. */
#include "common.cuh"

static qs_attn_block whole_sequence(int B, int T, int C, int NH) {
    qs_attn_block k;
    k.B = B, k.C = C, k.NH = NH;
    k.Tq = k.Tk = k.q_len = k.kv_len = T;
    k.q_stride = k.kv_stride = 3 * C;
    k.q_pos0 = k.k_pos0 = 0;
    k.causal = 1;
    return k;
}

void qs_cuda_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
    const qs_attn_block k = whole_sequence(B, T, C, NH);
    const size_t per_seq = (size_t)NH * T * T;
    for (int b = 0; b < B; b++) qs_cuda_attn_scores(att + b * per_seq, qkv, qkv + C, &k, b);
    qs_cuda_attn_softmax(att, NULL, &k, B * NH * T);
    for (int b = 0; b < B; b++) qs_cuda_attn_apply(out, att + b * per_seq, qkv + C, &k, b);
}

/* Rows r = h * T + t of one sequence: d holds dA = dout V^T and becomes the score
 * gradient scale * a * (dA - dA . a) over the keys t sees, 0 above the diagonal. */
__global__ static void softmax_backward_kernel(float *d, const float *att, int rows, int T, float scale) {
    const int r = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (r >= rows) return;
    const int n = r % T + 1;
    const float *a = att + (size_t)r * T;
    float *dr = d + (size_t)r * T;
    float dot = 0.0f;
    for (int u = lane; u < n; u += 32) dot += dr[u] * a[u];
    dot = qs_warp_reduce(dot, qs_sum_op());
    for (int u = lane; u < T; u += 32) dr[u] = u < n ? scale * a[u] * (dr[u] - dot) : 0.0f;
}

void qs_cuda_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att, int B, int T,
                                int C, int NH) {
    const qs_attn_block k = whole_sequence(B, T, C, NH);
    const size_t per_seq = (size_t)NH * T * T;
    const float scale = 1.0f / sqrtf((float)(C / NH));
    float *ds = (float *)qs_cuda_scratch(per_seq * sizeof(float));
    for (int b = 0; b < B; b++) {
        qs_cuda_attn_dprobs(ds, dout, qkv + C, &k, b);
        QS_LAUNCH_ROWS(softmax_backward_kernel, NH * T, ds, att + b * per_seq, NH * T, T, scale);
        qs_cuda_attn_grads(dqkv, dqkv + C, ds, att + b * per_seq, dout, qkv, qkv + C, &k, b);
    }
}

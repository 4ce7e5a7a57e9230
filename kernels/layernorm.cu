/* LayerNorm over the last dimension: one warp per row. */
#include "common.cuh"

#define LN_EPS 1e-5f

/* RESIDUAL: x = inp + branch, stored to res (each lane re-reads only what it wrote); else
 * x = inp. */
template <bool RESIDUAL>
__global__ static void layernorm_forward_kernel(float *res, float *out, float *mean, float *rstd, const float *inp,
                                                const float *branch, const float *w, const float *b, int N, int C) {
    const int row = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N) return; /* whole warps leave together */
    const size_t at = (size_t)row * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = inp[at + c];
        if (RESIDUAL) {
            v += branch[at + c];
            res[at + c] = v;
        }
        s += v;
    }
    const float *x = (RESIDUAL ? res : inp) + at;
    const float m = qs_warp_reduce(s, qs_sum_op()) / (float)C;
    /* two passes: the variance of centred values does not cancel catastrophically */
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) v += (x[c] - m) * (x[c] - m);
    const float r = 1.0f / sqrtf(qs_warp_reduce(v, qs_sum_op()) / (float)C + LN_EPS);
    float *o = out + at;
    for (int c = lane; c < C; c += 32) o[c] = (x[c] - m) * r * w[c] + b[c];
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

void qs_cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                               const float *b, int N, int C) {
    QS_LAUNCH_ROWS(layernorm_forward_kernel<false>, N, (float *)NULL, out, mean, rstd, inp, (const float *)NULL, w, b,
                   N, C);
}

void qs_cuda_residual_layernorm_forward(float *res, float *out, float *mean, float *rstd, const float *inp,
                                        const float *branch, const float *w, const float *b, int N, int C) {
    QS_LAUNCH_ROWS(layernorm_forward_kernel<true>, N, res, out, mean, rstd, inp, branch, w, b, N, C);
}

/* dinp += rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * w. */
__global__ static void layernorm_dinp_kernel(float *dinp, const float *dout, const float *inp, const float *w,
                                             const float *mean, const float *rstd, int N, int C) {
    const int row = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (row >= N) return;
    const float *x = inp + (size_t)row * C, *d = dout + (size_t)row * C;
    const float m = mean[row], s = rstd[row];
    float g_mean = 0.0f, gx_mean = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float xhat = (x[c] - m) * s, g = d[c] * w[c];
        g_mean += g;
        gx_mean += g * xhat;
    }
    g_mean = qs_warp_reduce(g_mean, qs_sum_op()) / (float)C;
    gx_mean = qs_warp_reduce(gx_mean, qs_sum_op()) / (float)C;
    float *di = dinp + (size_t)row * C;
    for (int c = lane; c < C; c += 32) {
        const float xhat = (x[c] - m) * s;
        di[c] += s * (d[c] * w[c] - g_mean - xhat * gx_mean);
    }
}

/* Columns [0, C): dw's terms dout * xhat; [C, 2C): db's, dout. */
struct ln_param_term {
    const float *dout, *inp, *mean, *rstd;
    int C;
    __device__ float operator()(int r, int j) const {
        const size_t at = (size_t)r * C + (j < C ? j : j - C);
        return j < C ? dout[at] * (inp[at] - mean[r]) * rstd[r] : dout[at];
    }
};

void qs_cuda_layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                const float *w, const float *mean, const float *rstd, int N, int C) {
    if (dinp)
        QS_LAUNCH_ROWS(layernorm_dinp_kernel, N, dinp, dout, inp, w, mean, rstd, N, C);
    qs_colsum(ln_param_term{dout, inp, mean, rstd, C}, N, 2 * C, dw, C, db);
}

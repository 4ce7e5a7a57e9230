/* Optimizer kernels: gradient sum of squares (for clipping) and AdamW. */
#include "common.cuh"

#define SUMSQ_BLOCKS 1024

/* Each block's share of the squares in double; the grid depends only on n, so the sum
 * is the same on every run. */
__global__ static void sumsq_partial_kernel(double *part, const float *g, size_t n) {
    double s = 0.0;
    QS_GRID_LOOP(i, n) s += (double)g[i] * g[i];
    s = qs_block_reduce(s, qs_sum_op(), 0.0);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ static void sumsq_final_kernel(double *out, const double *part, int n) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
    s = qs_block_reduce(s, qs_sum_op(), 0.0);
    if (threadIdx.x == 0) *out = s;
}

size_t qs_cuda_sumsq_scratch(void) { return (SUMSQ_BLOCKS + 1) * sizeof(double); }

double qs_cuda_sumsq(const float *g, size_t n) {
    if (n == 0) return 0.0;
    unsigned blocks = qs_cuda_blocks(n, QS_THREADS);
    if (blocks > SUMSQ_BLOCKS) blocks = SUMSQ_BLOCKS;
    double *part = (double *)qs_cuda_scratch((blocks + 1) * sizeof(double)), total;
    QS_LAUNCH(sumsq_partial_kernel, blocks, QS_THREADS, 0, part, g, n);
    QS_LAUNCH(sumsq_final_kernel, 1, 1024, 0, part + blocks, part, (int)blocks);
    qs_cuda_download(&total, part + blocks, sizeof total);
    return total;
}

__global__ static void adamw_kernel(float *p, const float *grad, float *m, float *v, size_t n, float step,
                                    float bc2_sqrt, float decay, float beta1, float beta2, float eps,
                                    float grad_scale) {
    QS_GRID_LOOP(i, n) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g, vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

void qs_cuda_adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                          float beta2, float eps, float wd, int t, float grad_scale) {
    /* As the CPU (torch.optim.AdamW): beta^t in double, since 1 - beta2^t loses most float
     * digits when beta2 is near 1. */
    const float step = (float)(lr / (1.0 - pow(beta1, t)));
    const float bc2_sqrt = (float)sqrt(1.0 - pow(beta2, t));
    const float decay = 1.0f - lr * wd;
    QS_LAUNCH_N(adamw_kernel, n, p, grad, m, v, n, step, bc2_sqrt, decay, beta1, beta2, eps, grad_scale);
}

/* Fused softmax + cross-entropy: one block per row of logits, the softmax's sum in
 * double as on the CPU. */
#include "common.cuh"

#define XENT_THREADS 512

/* Max of the row and, in *sum, the sum of exp(x - max), for the whole block. */
__device__ static float row_stats(const float *x, int V, double *sum) {
    float mx = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, x[v]);
    mx = qs_block_reduce(mx, qs_max_op(), -INFINITY);
    double s = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(x[v] - mx);
    *sum = qs_block_reduce(s, qs_sum_op(), 0.0);
    return mx;
}

__global__ static void xent_forward_kernel(float *losses, const float *logits, const int *targets, int V) {
    const int n = blockIdx.x, t = targets[n];
    if (t < 0) { /* the whole block leaves: targets[n] is the same for every thread */
        if (threadIdx.x == 0) losses[n] = 0.0f;
        return;
    }
    const float *x = logits + (size_t)n * V;
    double sum;
    const float mx = row_stats(x, V, &sum);
    if (threadIdx.x == 0) losses[n] = (float)(log(sum) - (double)(x[t] - mx));
}

/* In place: row_stats's last block reduction is a barrier after every read of the row,
 * and each element is then read and rewritten by the one thread that owns it. */
__global__ static void xent_backward_kernel(float *logits, const int *targets, float dloss, int V) {
    const int n = blockIdx.x, t = targets[n];
    float *x = logits + (size_t)n * V;
    if (t < 0) {
        for (int v = threadIdx.x; v < V; v += blockDim.x) x[v] = 0.0f;
        return;
    }
    double sum;
    const float mx = row_stats(x, V, &sum);
    const float inv = (float)(1.0 / sum);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const float p = expf(x[v] - mx) * inv;
        x[v] = dloss * (v == t ? p - 1.0f : p);
    }
}

void qs_cuda_xent_forward(float *losses, const float *logits, const int *targets, int N, int V) {
    QS_LAUNCH(xent_forward_kernel, N, XENT_THREADS, 0, losses, logits, targets, V);
}

void qs_cuda_xent_backward(float *logits, const int *targets, float dloss, int N, int V) {
    QS_LAUNCH(xent_backward_kernel, N, XENT_THREADS, 0, logits, targets, dloss, V);
}

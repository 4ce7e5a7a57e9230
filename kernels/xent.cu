/* Fused softmax + cross-entropy: one block per row of logits, each read once by the
 * forward (an online softmax: a thread's running max and rescaled sum, then the
 * block's) and once by the backward, which takes the row's log-sum-exp from the
 * forward's loss; the softmax's sum in double as on the CPU. */
#include "common.cuh"

#define XENT_THREADS 512

/* Max of the row and, in *sum, the sum of exp(x - max), for the whole block, in one
 * read of the row. */
__device__ static float row_stats(const float *x, int V, double *sum) {
    float mx = -INFINITY;
    double s = 0.0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        if (x[v] > mx) { /* a new max: the sum so far in its terms */
            s = s * (double)expf(mx - x[v]);
            mx = x[v];
        }
        s += expf(x[v] - mx);
    }
    const float block_mx = qs_block_reduce(mx, qs_max_op(), -INFINITY);
    *sum = qs_block_reduce(mx == -INFINITY ? 0.0 : s * (double)expf(mx - block_mx), qs_sum_op(), 0.0);
    return block_mx;
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

/* In place: softmax(x)[v] = exp((x[v] - x[t]) - loss) (ops.h), every thread reading
 * x[t] before the barrier and each element then read and rewritten by the one thread
 * that owns it. */
__global__ static void xent_backward_kernel(float *logits, const float *losses, const int *targets, float dloss,
                                            int V) {
    const int n = blockIdx.x, t = targets[n];
    float *x = logits + (size_t)n * V;
    if (t < 0) {
        for (int v = threadIdx.x; v < V; v += blockDim.x) x[v] = 0.0f;
        return;
    }
    const float xt = x[t], loss = losses[n];
    __syncthreads();
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const float p = expf((x[v] - xt) - loss);
        x[v] = dloss * (v == t ? p - 1.0f : p);
    }
}

void qs_cuda_xent_forward(float *losses, const float *logits, const int *targets, int N, int V) {
    QS_LAUNCH(xent_forward_kernel, N, XENT_THREADS, 0, losses, logits, targets, V);
}

void qs_cuda_xent_backward(float *logits, const float *losses, const int *targets, float dloss, int N, int V) {
    QS_LAUNCH(xent_backward_kernel, N, XENT_THREADS, 0, logits, losses, targets, dloss, V);
}

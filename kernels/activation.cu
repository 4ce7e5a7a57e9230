/* Element-wise ops: GELU, ReLU, residual add, dropout (the CPU's counter RNG, so the
 * same masks). */
#include "common.cuh"
#include "quasar/rng.h"

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_A 0.044715f

/* 0.5 (1 + tanh(u)) = sigmoid(2u), as the CPU writes GELU's tanh form. */
__device__ static inline float gelu_sigmoid(float x) {
    return 1.0f / (1.0f + expf(-2.0f * GELU_K * (x + GELU_A * x * x * x)));
}

__global__ static void gelu_forward_kernel(float *out, const float *inp, size_t n) {
    QS_GRID_LOOP(i, n) out[i] = inp[i] * gelu_sigmoid(inp[i]);
}

__device__ static inline float gelu_grad(float x) {
    const float s = gelu_sigmoid(x), du = GELU_K * (1.0f + 3.0f * GELU_A * x * x);
    return s + 2.0f * x * s * (1.0f - s) * du;
}

__global__ static void gelu_backward_kernel(float *dinp, const float *inp, const float *dout, size_t n) {
    QS_GRID_LOOP(i, n) dinp[i] += dout[i] * gelu_grad(inp[i]);
}

__global__ static void gelu_grad_scale_kernel(float *d, const float *pre, size_t n) {
    QS_GRID_LOOP(i, n) d[i] = d[i] * gelu_grad(pre[i]);
}

__global__ static void relu_forward_kernel(float *out, const float *inp, size_t n) {
    QS_GRID_LOOP(i, n) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

__global__ static void relu_backward_kernel(float *dinp, const float *inp, const float *dout, size_t n) {
    QS_GRID_LOOP(i, n) dinp[i] += inp[i] > 0.0f ? dout[i] : 0.0f;
}

/* out = a + b: dropout's backward at p = 0 */
__global__ static void add_kernel(float *out, const float *a, const float *b, size_t n) {
    QS_GRID_LOOP(i, n) out[i] = a[i] + b[i];
}

void qs_cuda_gelu_forward(float *out, const float *inp, size_t n) {
    QS_LAUNCH_N(gelu_forward_kernel, n, out, inp, n);
}
void qs_cuda_gelu_backward(float *dinp, const float *inp, const float *dout, size_t n) {
    QS_LAUNCH_N(gelu_backward_kernel, n, dinp, inp, dout, n);
}
void qs_cuda_gelu_grad_scale(float *d, const float *pre, size_t n) {
    QS_LAUNCH_N(gelu_grad_scale_kernel, n, d, pre, n);
}
void qs_cuda_relu_forward(float *out, const float *inp, size_t n) {
    QS_LAUNCH_N(relu_forward_kernel, n, out, inp, n);
}
void qs_cuda_relu_backward(float *dinp, const float *inp, const float *dout, size_t n) {
    QS_LAUNCH_N(relu_backward_kernel, n, dinp, inp, dout, n);
}

/* out = (acc ? out : 0) + x * (1/(1-p) if element i = r*W + c is kept, else 0): forward
 * overwrites, backward accumulates. */
__global__ static void dropout_kernel(float *out, const float *x, float p, float scale, uint64_t seed,
                                      uint64_t stream, const int64_t *row_ids, size_t N, size_t W, int acc) {
    QS_GRID_LOOP(i, N * W) {
        const float keep = qs_rng_uniform(seed, stream, qs_rng_counter(row_ids, i / W, W, i % W)) >= p ? scale : 0.0f;
        const float v = x[i] * keep;
        out[i] = acc ? out[i] + v : v;
    }
}

void qs_cuda_dropout_forward(float *out, const float *inp, float p, uint64_t seed, uint64_t stream,
                             const int64_t *row_ids, size_t N, size_t W) {
    if (p == 0.0f) {
        if (out != inp) QS_CUDA(cudaMemcpyAsync(out, inp, N * W * sizeof(float), cudaMemcpyDeviceToDevice, 0));
        return;
    }
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    QS_LAUNCH_N(dropout_kernel, N * W, out, inp, p, scale, seed, stream, row_ids, N, W, 0);
}

void qs_cuda_dropout_backward(float *dinp, const float *dout, float p, uint64_t seed, uint64_t stream,
                              const int64_t *row_ids, size_t N, size_t W) {
    if (p == 0.0f) { /* every factor is 1 */
        QS_LAUNCH_N(add_kernel, N * W, dinp, dinp, dout, N * W);
        return;
    }
    const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    QS_LAUNCH_N(dropout_kernel, N * W, dinp, dout, p, scale, seed, stream, row_ids, N, W, 1);
}

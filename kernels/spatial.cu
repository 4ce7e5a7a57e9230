/* Layout ops of the image models: patches to channels, global average pooling. */
#include "common.cuh"

/* The input element that element e of space_to_depth's output [B,H/p,W/p,p*p*C] copies:
 * out[b,i,j,(di*p+dj)*C+c] = inp[b,i*p+di,j*p+dj,c]. A bijection (H, W divisible by p),
 * so the backward's additions never meet. */
__device__ static inline size_t patch_source(size_t e, int H, int W, int C, int p) {
    const int Ho = H / p, Wo = W / p, c = (int)(e % C);
    const size_t q = e / C, pos = q / ((size_t)p * p);
    const int d = (int)(q % ((size_t)p * p)), di = d / p, dj = d % p;
    const int j = (int)(pos % Wo), i = (int)(pos / Wo % Ho);
    const size_t b = pos / ((size_t)Wo * Ho);
    return ((b * H + (size_t)i * p + di) * W + (size_t)j * p + dj) * C + c;
}

__global__ static void space_to_depth_forward_kernel(float *out, const float *inp, size_t n, int H, int W, int C,
                                                     int p) {
    QS_GRID_LOOP(e, n) out[e] = inp[patch_source(e, H, W, C, p)];
}

__global__ static void space_to_depth_backward_kernel(float *dinp, const float *dout, size_t n, int H, int W, int C,
                                                      int p) {
    QS_GRID_LOOP(e, n) dinp[patch_source(e, H, W, C, p)] += dout[e];
}

void qs_cuda_space_to_depth_forward(float *out, const float *inp, int B, int H, int W, int C, int p) {
    const size_t n = (size_t)B * (H / p) * (W / p) * p * p * C;
    QS_LAUNCH_N(space_to_depth_forward_kernel, n, out, inp, n, H, W, C, p);
}

void qs_cuda_space_to_depth_backward(float *dinp, const float *dout, int B, int H, int W, int C, int p) {
    const size_t n = (size_t)B * (H / p) * (W / p) * p * p * C;
    QS_LAUNCH_N(space_to_depth_backward_kernel, n, dinp, dout, n, H, W, C, p);
}

/* One thread per (b, c), summing the positions in order as the CPU does. */
__global__ static void avgpool_forward_kernel(float *out, const float *inp, int B, int N, int C) {
    QS_GRID_LOOP(e, (size_t)B * C) {
        const size_t b = e / C, c = e % C;
        float s = 0.0f;
        for (int n = 0; n < N; n++) s += inp[(b * N + n) * C + c];
        out[e] = s / (float)N;
    }
}

__global__ static void avgpool_backward_kernel(float *dinp, const float *dout, int B, int N, int C) {
    QS_GRID_LOOP(e, (size_t)B * N * C) {
        const size_t b = e / ((size_t)N * C), c = e % C;
        dinp[e] += dout[b * C + c] / (float)N;
    }
}

void qs_cuda_avgpool_forward(float *out, const float *inp, int B, int N, int C) {
    QS_LAUNCH_N(avgpool_forward_kernel, (size_t)B * C, out, inp, B, N, C);
}

void qs_cuda_avgpool_backward(float *dinp, const float *dout, int B, int N, int C) {
    QS_LAUNCH_N(avgpool_backward_kernel, (size_t)B * N * C, dinp, dout, B, N, C);
}

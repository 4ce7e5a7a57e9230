/* Residual branches with layer scale and stochastic depth (QuadraBlock). */
#include "common.cuh"
#include "quasar/rng.h"

/* Sample b's whole branch is kept (and scaled up) or dropped, by the CPU's draw. */
__device__ static inline float keep_scale(float p, uint64_t seed, uint64_t stream, uint64_t sample) {
    if (p <= 0.0f) return 1.0f;
    return qs_rng_uniform(seed, stream, sample) >= p ? 1.0f / (1.0f - p) : 0.0f;
}

__global__ static void layer_scale_forward_kernel(float *out, const float *resid, const float *inp,
                                                  const float *gamma, float p, uint64_t seed, uint64_t stream,
                                                  uint64_t sample0, int B, int N, int C) {
    QS_GRID_LOOP(e, (size_t)B * N * C) {
        const float k = keep_scale(p, seed, stream, sample0 + e / ((size_t)N * C));
        out[e] = resid[e] + gamma[e % C] * k * inp[e];
    }
}

__global__ static void layer_scale_dinp_kernel(float *dinp, const float *dout, const float *gamma, float p,
                                               uint64_t seed, uint64_t stream, uint64_t sample0, int B, int N, int C) {
    QS_GRID_LOOP(e, (size_t)B * N * C) {
        const float k = keep_scale(p, seed, stream, sample0 + e / ((size_t)N * C));
        if (k != 0.0f) dinp[e] += gamma[e % C] * k * dout[e];
    }
}

/* dgamma's term at row r = b * N + n: k_b inp dout (a dropped sample adds nothing). */
struct gamma_term {
    const float *dout, *inp;
    float p;
    uint64_t seed, stream, sample0;
    int N, C;
    __device__ float operator()(int r, int c) const {
        const float k = keep_scale(p, seed, stream, sample0 + (uint64_t)(r / N));
        const size_t e = (size_t)r * C + c;
        return k == 0.0f ? 0.0f : k * inp[e] * dout[e];
    }
};

void qs_cuda_layer_scale_forward(float *out, const float *resid, const float *inp, const float *gamma, float p,
                                 uint64_t seed, uint64_t stream, uint64_t sample0, int B, int N, int C) {
    QS_LAUNCH_N(layer_scale_forward_kernel, (size_t)B * N * C, out, resid, inp, gamma, p, seed, stream, sample0, B,
                N, C);
}

void qs_cuda_layer_scale_backward(float *dinp, float *dgamma, const float *dout, const float *inp,
                                  const float *gamma, float p, uint64_t seed, uint64_t stream, uint64_t sample0,
                                  int B, int N, int C) {
    if (dinp)
        QS_LAUNCH_N(layer_scale_dinp_kernel, (size_t)B * N * C, dinp, dout, gamma, p, seed, stream, sample0, B, N,
                    C);
    qs_colsum(gamma_term{dout, inp, p, seed, stream, sample0, N, C}, B * N, C, dgamma, C, NULL);
}

/* Residual branches with layer scale and stochastic depth (QuadraBlock). */
#include "cpu_ops.h"
#include "quasar/rng.h"

/* The whole branch of sample b is kept (and scaled up) or dropped. */
static float keep_scale(float p, uint64_t seed, uint64_t stream, uint64_t sample) {
    if (p <= 0.0f) return 1.0f;
    return qs_rng_uniform(seed, stream, sample) >= p ? 1.0f / (1.0f - p) : 0.0f;
}

void qs_cpu_layer_scale_forward(float *out, const float *resid, const float *inp, const float *gamma,
                                float p, uint64_t seed, uint64_t stream, uint64_t sample0, int B, int N,
                                int C) {
    for (int b = 0; b < B; b++) {
        const float k = keep_scale(p, seed, stream, sample0 + (uint64_t)b);
        const size_t base = (size_t)b * N * C;
#pragma omp parallel for schedule(static) if ((size_t)N * C >= QS_CPU_PAR_MIN)
        for (int n = 0; n < N; n++) {
            const size_t o = base + (size_t)n * C;
            for (int c = 0; c < C; c++) out[o + c] = resid[o + c] + gamma[c] * k * inp[o + c];
        }
    }
}

void qs_cpu_layer_scale_backward(float *dinp, float *dgamma, const float *dout, const float *inp,
                                 const float *gamma, float p, uint64_t seed, uint64_t stream,
                                 uint64_t sample0, int B, int N, int C) {
    for (int b = 0; b < B; b++) {
        const float k = keep_scale(p, seed, stream, sample0 + (uint64_t)b);
        if (k == 0.0f) continue;
        const size_t base = (size_t)b * N * C;
        for (int n = 0; n < N; n++) {
            const size_t o = base + (size_t)n * C;
            for (int c = 0; c < C; c++) {
                if (dinp) dinp[o + c] += gamma[c] * k * dout[o + c];
                if (dgamma) dgamma[c] += k * inp[o + c] * dout[o + c];
            }
        }
    }
}

/* Optimizer kernels: gradient sum of squares (for clipping) and AdamW. */
#include "cpu_ops.h"

#define SUMSQ_LANES 8

double qs_cpu_sumsq(const float *g, size_t n) {
    const size_t blocks = n / SUMSQ_LANES;
    double total = 0.0;
#pragma omp parallel if (n >= QS_CPU_PAR_MIN)
    {
        /* Independent lanes break the add dependency chain (and vectorize) while
         * keeping a fixed summation order. */
        double lane[SUMSQ_LANES] = {0};
#pragma omp for schedule(static) nowait
        for (size_t b = 0; b < blocks; b++)
            for (int l = 0; l < SUMSQ_LANES; l++) {
                const double x = g[b * SUMSQ_LANES + l];
                lane[l] += x * x;
            }
        double mine = 0.0;
        for (int l = 0; l < SUMSQ_LANES; l++) mine += lane[l];
        qs_cpu_ordered_add(&total, mine);
    }
    for (size_t i = blocks * SUMSQ_LANES; i < n; i++) total += (double)g[i] * g[i];
    return total;
}

void qs_cpu_adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                         float beta1, float beta2, float eps, float wd, int t, float grad_scale) {
    /* As torch.optim.AdamW: decay p by (1 - lr*wd), then step by
     * (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps). beta^t is formed in double
     * because 1 - beta2^t loses most float digits when beta2 is near 1. */
    const float step = (float)(lr / (1.0 - pow(beta1, t)));
    const float bc2_sqrt = (float)sqrt(1.0 - pow(beta2, t));
    const float decay = 1.0f - lr * wd;
#pragma omp parallel for schedule(static) if (n >= QS_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        const float g = grad[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        p[i] = p[i] * decay - step * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
    }
}

/* Fused softmax + cross-entropy. */
#include "cpu_ops.h"

void qs_cpu_xent_forward(float *losses, const float *logits, const int *targets, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        if (targets[n] < 0) {
            losses[n] = 0.0f;
            continue;
        }
        double sum;
        const float mx = qs_cpu_softmax_stats(x, V, &sum);
        /* -log softmax = logsumexp - x[target], with the max taken out of both. */
        losses[n] = (float)(log(sum) - (double)(x[targets[n]] - mx));
    }
}

void qs_cpu_xent_backward(float *dlogits, const float *logits, const int *targets, float dloss,
                          int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        if (targets[n] < 0) continue;
        const float *x = logits + (size_t)n * V;
        float *d = dlogits + (size_t)n * V;
        double sum;
        const float mx = qs_cpu_softmax_stats(x, V, &sum);
        const float inv = (float)(1.0 / sum);
        for (int v = 0; v < V; v++) {
            const float p = expf(x[v] - mx) * inv;
            d[v] += dloss * (v == targets[n] ? p - 1.0f : p);
        }
    }
}

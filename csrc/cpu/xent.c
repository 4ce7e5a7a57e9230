/* Fused softmax + cross-entropy. */
#include <string.h>

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

/* In place: the row's statistics are taken before any of it is overwritten. */
void qs_cpu_xent_backward(float *logits, const int *targets, float dloss, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *x = logits + (size_t)n * V;
        if (targets[n] < 0) {
            memset(x, 0, (size_t)V * sizeof *x);
            continue;
        }
        double sum;
        const float mx = qs_cpu_softmax_stats(x, V, &sum);
        const float inv = (float)(1.0 / sum);
        for (int v = 0; v < V; v++) x[v] = dloss * qs_cpu_expf(x[v] - mx) * inv;
        x[targets[n]] -= dloss;
    }
}

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

/* In place, one pass a row: softmax(x)[v] = exp((x[v] - x[t]) - loss), the target's
 * logit read before the row is overwritten. x[v] - x[t] first: for logits far from 0
 * the difference is exact where x[t] + loss would round (at 100, by ~4e-6 of p). */
void qs_cpu_xent_backward(float *logits, const float *losses, const int *targets, float dloss, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *x = logits + (size_t)n * V;
        const int t = targets[n];
        if (t < 0) {
            memset(x, 0, (size_t)V * sizeof *x);
            continue;
        }
        const float xt = x[t], loss = losses[n];
#pragma omp simd
        for (int v = 0; v < V; v++) x[v] = dloss * qs_cpu_expf((x[v] - xt) - loss);
        x[t] -= dloss;
    }
}

/* Mixture-of-experts routing (noisy gating, top-k selection, capacity assignment, router
 * regularizers) and dispatch to / combine from the expert-packed buffers. The router is
 * the plain composition of its steps, one pass each: the reference the fused CUDA
 * kernels are checked against. */
#include <string.h>

#include "cpu_ops.h"
#include "quasar/rng.h"
#include "quasar/topk.h"

/* softplus(x) = log(1 + e^x), written so that neither branch overflows. */
static inline float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static float gate_noise(uint64_t seed, uint64_t stream, const int64_t *row_ids, size_t i, int E) {
    return qs_rng_normal(seed, stream, qs_rng_counter(row_ids, i / (size_t)E, (size_t)E, i % (size_t)E));
}

static void noisy_gate(float *h, const float *clean, const float *noise_logits, uint64_t seed,
                       uint64_t stream, const int64_t *row_ids, int N, int E) {
    const size_t n = (size_t)N * E;
#pragma omp parallel for schedule(static) if (n >= QS_CPU_PAR_MIN)
    for (size_t i = 0; i < n; i++)
        h[i] = clean[i] + gate_noise(seed, stream, row_ids, i, E) * softplus(noise_logits[i]);
}

static void topk_gates(int *idx, float *gate, const float *logits, int N, int E, int K) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * E;
        int *id = idx + (size_t)n * K;
        float *g = gate + (size_t)n * K;
        qs_topk_select(id, x, E, K);
        for (int k = 0; k < K; k++) g[k] = x[id[k]];
        double sum;
        const float mx = qs_cpu_softmax_stats(g, K, &sum);
        const float inv = (float)(1.0 / sum);
        for (int k = 0; k < K; k++) g[k] = expf(g[k] - mx) * inv;
    }
}

static int assign(int *slot, int *counts, int *offsets, int *routed, const int *idx, int N, int E,
                  int K, int capacity) {
    memset(counts, 0, (size_t)E * sizeof *counts);
    memset(routed, 0, (size_t)E * sizeof *routed);
    int dropped = 0;
    /* First pass: slot holds the rank within the expert; offsets are known after. */
    for (int a = 0; a < N * K; a++) {
        const int e = idx[a];
        routed[e]++;
        if (capacity > 0 && counts[e] >= capacity) {
            slot[a] = -1;
            dropped++;
        } else {
            slot[a] = counts[e]++;
        }
    }
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + counts[e];
    for (int a = 0; a < N * K; a++)
        if (slot[a] >= 0) slot[a] += offsets[idx[a]];
    return dropped;
}

/* Router statistics of one row: softmax p = exp(x - mx) / sum, logsumexp, and
 * s = sum_e f_e p_e with f_e = routed[e] * inv_nk. */
typedef struct {
    float mx;
    double sum, lse, s;
} router_row;

static router_row router_stats(const float *x, const int *routed, double inv_nk, int E) {
    router_row r;
    r.mx = qs_cpu_softmax_stats(x, E, &r.sum);
    r.lse = r.mx + log(r.sum);
    double fs = 0.0;
    for (int e = 0; e < E; e++) fs += routed[e] * inv_nk * expf(x[e] - r.mx);
    r.s = fs / r.sum;
    return r;
}

static void regularizers(float *balance, float *z, const float *logits, const int *routed, int N, int E,
                         int K) {
    const double inv_nk = 1.0 / ((double)N * K);
    double bal = 0.0, zsum = 0.0;
#pragma omp parallel
    {
        double my_bal = 0.0, my_z = 0.0;
#pragma omp for schedule(static) nowait
        for (int n = 0; n < N; n++) {
            const router_row r = router_stats(logits + (size_t)n * E, routed, inv_nk, E);
            my_bal += r.s;
            my_z += r.lse * r.lse;
        }
        qs_cpu_ordered_add(&bal, my_bal);
        qs_cpu_ordered_add(&zsum, my_z);
    }
    /* E * sum_i f_i * mean_n p_ni = (E / N) * sum_n s_n */
    *balance = (float)(E * bal / N);
    *z = (float)(zsum / N);
}

void qs_cpu_moe_route_forward(qs_moe_load *load, int *idx, float *gate, int *slot, float *h,
                              const float *clean, const float *noise_logits, const qs_moe_router *r) {
    const float *x = clean;
    if (noise_logits) {
        noisy_gate(h, clean, noise_logits, r->seed, r->stream, r->row_ids, r->N, r->E);
        x = h;
    }
    topk_gates(idx, gate, x, r->N, r->E, r->K);
    load->dropped = assign(slot, load->counts, load->offsets, load->routed, idx, r->N, r->E, r->K, r->capacity);
    regularizers(&load->balance, &load->z, x, load->routed, r->N, r->E, r->K);
}

void qs_cpu_moe_route_backward(float *dclean, float *dnoise, const float *dgate, const int *idx,
                               const float *gate, const float *x, const float *noise_logits,
                               const qs_moe_load *load, float balance_coef, float z_coef,
                               const qs_moe_router *r) {
    const int N = r->N, E = r->E, K = r->K;
    const double inv_nk = 1.0 / ((double)N * K);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xn = x + (size_t)n * E, *g = gate + (size_t)n * K, *dg = dgate + (size_t)n * K;
        const int *id = idx + (size_t)n * K;
        const router_row st = router_stats(xn, load->routed, inv_nk, E);
        /* d balance / dx_e = (E/N) p_e (f_e - s);  d z / dx_e = (2 lse / N) p_e */
        const double cb = (double)balance_coef * E / N, cz = (double)z_coef * 2.0 * st.lse / N;
        /* top-k's softmax Jacobian: dx_id[k] = g_k (dg_k - sum_j g_j dg_j) */
        const float gdg = qs_cpu_dot(g, dg, K);
        for (int e = 0; e < E; e++) {
            const double p = expf(xn[e] - st.mx) / st.sum;
            float d = (float)(p * (cb * (load->routed[e] * inv_nk - st.s) + cz));
            for (int k = 0; k < K; k++)
                if (id[k] == e) d += g[k] * (dg[k] - gdg);
            const size_t i = (size_t)n * E + e;
            if (dclean) dclean[i] += d;
            if (dnoise) dnoise[i] += d * gate_noise(r->seed, r->stream, r->row_ids, i, E) * sigmoid(noise_logits[i]);
        }
    }
}

/* The packed rows are distinct per assignment and each token's assignments are
 * handled by one thread, so the loops over tokens below are race-free. */

void qs_cpu_moe_dispatch_forward(float *xe, const float *x, const int *slot, int N, int K,
                                 int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            const int s = slot[(size_t)n * K + k];
            if (s >= 0) memcpy(xe + (size_t)s * C, x + (size_t)n * C, (size_t)C * sizeof *xe);
        }
}

void qs_cpu_moe_dispatch_backward(float *dx, const float *dxe, const int *slot, int N, int K,
                                  int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            const int s = slot[(size_t)n * K + k];
            if (s >= 0) qs_cpu_axpy(dx + (size_t)n * C, 1.0f, dxe + (size_t)s * C, C);
        }
}

void qs_cpu_moe_combine_forward(float *y, const float *ye, const float *gate, const int *slot,
                                int N, int K, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *yn = y + (size_t)n * C;
        memset(yn, 0, (size_t)C * sizeof *yn);
        for (int k = 0; k < K; k++) {
            const size_t a = (size_t)n * K + k;
            if (slot[a] >= 0) qs_cpu_axpy(yn, gate[a], ye + (size_t)slot[a] * C, C);
        }
    }
}

void qs_cpu_moe_combine_backward(float *dye, float *dgate, const float *dy, const float *ye,
                                 const float *gate, const int *slot, int N, int K, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *d = dy + (size_t)n * C;
        for (int k = 0; k < K; k++) {
            const size_t a = (size_t)n * K + k;
            if (slot[a] < 0) continue;
            if (dye) qs_cpu_axpy(dye + (size_t)slot[a] * C, gate[a], d, C);
            if (dgate) dgate[a] += qs_cpu_dot(d, ye + (size_t)slot[a] * C, C);
        }
    }
}

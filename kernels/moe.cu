/* Mixture-of-experts routing: noisy gating, top-k, capacity assignment (host
 * bookkeeping, as the contract has it), dispatch / combine, router regularizers. Each
 * output element is owned by one thread: packed rows are distinct per assignment, and a
 * token's assignments are visited in k order, as on the CPU. */
#include "common.cuh"
#include "quasar/rng.h"
#include "quasar/topk.h"

/* softplus(x) = log(1 + e^x), written so that neither branch overflows. */
__device__ static inline float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

__device__ static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__global__ static void noisy_gate_forward_kernel(float *h, const float *clean, const float *noise_logits,
                                                 uint64_t seed, uint64_t stream, const int64_t *row_ids, int N,
                                                 int E) {
    QS_GRID_LOOP(i, (size_t)N * E) {
        const float z = qs_rng_normal(seed, stream, qs_rng_counter(row_ids, i / E, E, i % E));
        h[i] = clean[i] + z * softplus(noise_logits[i]);
    }
}

__global__ static void noisy_gate_backward_kernel(float *dclean, float *dnoise, const float *dh,
                                                  const float *noise_logits, uint64_t seed, uint64_t stream,
                                                  const int64_t *row_ids, int N, int E) {
    QS_GRID_LOOP(i, (size_t)N * E) {
        if (dclean) dclean[i] += dh[i];
        if (dnoise) {
            const float z = qs_rng_normal(seed, stream, qs_rng_counter(row_ids, i / E, E, i % E));
            dnoise[i] += dh[i] * z * sigmoid(noise_logits[i]);
        }
    }
}

void qs_cuda_noisy_gate_forward(float *h, const float *clean, const float *noise_logits, uint64_t seed,
                                uint64_t stream, const int64_t *row_ids, int N, int E) {
    QS_LAUNCH_N(noisy_gate_forward_kernel, (size_t)N * E, h, clean, noise_logits, seed, stream, row_ids, N, E);
}

void qs_cuda_noisy_gate_backward(float *dclean, float *dnoise, const float *dh, const float *noise_logits,
                                 uint64_t seed, uint64_t stream, const int64_t *row_ids, int N, int E) {
    if (!dclean && !dnoise) return;
    QS_LAUNCH_N(noisy_gate_backward_kernel, (size_t)N * E, dclean, dnoise, dh, noise_logits, seed, stream, row_ids,
                N, E);
}

/* One thread per token: the shared selection (quasar/topk.h), then the softmax over the
 * K kept logits. */
__global__ static void topk_forward_kernel(int *idx, float *gate, const float *logits, int N, int E, int K) {
    QS_GRID_LOOP(n, (size_t)N) {
        const float *x = logits + n * E;
        int *id = idx + n * K;
        float *g = gate + n * K;
        qs_topk_select(id, x, E, K);
        float mx = -INFINITY;
        for (int k = 0; k < K; k++) mx = fmaxf(mx, x[id[k]]);
        double sum = 0.0;
        for (int k = 0; k < K; k++) sum += expf(x[id[k]] - mx);
        const float inv = (float)(1.0 / sum);
        for (int k = 0; k < K; k++) g[k] = expf(x[id[k]] - mx) * inv;
    }
}

/* Softmax Jacobian over the kept K: dx_k = g_k (dg_k - sum_j g_j dg_j). */
__global__ static void topk_backward_kernel(float *dlogits, const float *dgate, const int *idx, const float *gate,
                                            int N, int E, int K) {
    QS_GRID_LOOP(n, (size_t)N) {
        const float *g = gate + n * K, *dg = dgate + n * K;
        const int *id = idx + n * K;
        float *d = dlogits + n * E;
        float gdg = 0.0f;
        for (int k = 0; k < K; k++) gdg += g[k] * dg[k];
        for (int k = 0; k < K; k++) d[id[k]] += g[k] * (dg[k] - gdg);
    }
}

void qs_cuda_moe_topk_forward(int *idx, float *gate, const float *logits, int N, int E, int K) {
    QS_LAUNCH_N(topk_forward_kernel, (size_t)N, idx, gate, logits, N, E, K);
}

void qs_cuda_moe_topk_backward(float *dlogits, const float *dgate, const int *idx, const float *gate, int N, int E,
                               int K) {
    QS_LAUNCH_N(topk_backward_kernel, (size_t)N, dlogits, dgate, idx, gate, N, E, K);
}

/* Sequential integer bookkeeping in token order, whose counts and offsets the host needs
 * anyway (to size each expert's GEMM): the CPU reference's own moe_assign on a copy of
 * idx, then slot goes back to the device. */
int qs_cuda_moe_assign(int *slot, int *counts, int *offsets, int *routed, const int *idx, int N, int E, int K,
                       int capacity) {
    const size_t nk = (size_t)N * K;
    int *host_idx = (int *)qs_cuda_host_scratch(2 * nk * sizeof(int) + 1), *host_slot = host_idx + nk;
    qs_cuda_download(host_idx, idx, nk * sizeof(int));
    const int dropped =
        qs_backend_cpu()->ops->moe_assign(host_slot, counts, offsets, routed, host_idx, N, E, K, capacity);
    qs_cuda_upload(slot, host_slot, nk * sizeof(int));
    return dropped;
}

__global__ static void dispatch_forward_kernel(float *xe, const float *x, const int *slot, int N, int K, int C) {
    QS_GRID_LOOP(e, (size_t)N * K * C) {
        const size_t a = e / C, c = e % C;
        const int s = slot[a];
        if (s >= 0) xe[(size_t)s * C + c] = x[a / K * C + c];
    }
}

__global__ static void dispatch_backward_kernel(float *dx, const float *dxe, const int *slot, int N, int K, int C) {
    QS_GRID_LOOP(e, (size_t)N * C) {
        const size_t n = e / C, c = e % C;
        for (int k = 0; k < K; k++) {
            const int s = slot[n * K + k];
            if (s >= 0) dx[e] += dxe[(size_t)s * C + c];
        }
    }
}

__global__ static void combine_forward_kernel(float *y, const float *ye, const float *gate, const int *slot, int N,
                                              int K, int C) {
    QS_GRID_LOOP(e, (size_t)N * C) {
        const size_t n = e / C, c = e % C;
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            const size_t a = n * K + k;
            if (slot[a] >= 0) acc += gate[a] * ye[(size_t)slot[a] * C + c];
        }
        y[e] = acc;
    }
}

/* dye[slot, :] += gate * dy[n, :], one thread per element of a kept assignment's row. */
__global__ static void combine_dye_kernel(float *dye, const float *dy, const float *gate, const int *slot, int N,
                                          int K, int C) {
    QS_GRID_LOOP(e, (size_t)N * K * C) {
        const size_t a = e / C, c = e % C;
        const int s = slot[a];
        if (s >= 0) dye[(size_t)s * C + c] += gate[a] * dy[a / K * C + c];
    }
}

/* dgate[a] += dot(dy[n, :], ye[slot, :]), one warp per assignment. */
__global__ static void combine_dgate_kernel(float *dgate, const float *dy, const float *ye, const int *slot, int N,
                                            int K, int C) {
    const int lane = threadIdx.x & 31;
    QS_GRID_LOOP(t, (size_t)N * K * 32) {
        const size_t a = t / 32; /* the whole warp takes the same assignment */
        if (slot[a] < 0) continue;
        const float *d = dy + a / K * C, *y = ye + (size_t)slot[a] * C;
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) s += d[c] * y[c];
        s = qs_warp_reduce(s, qs_sum_op());
        if (lane == 0) dgate[a] += s;
    }
}

void qs_cuda_moe_dispatch_forward(float *xe, const float *x, const int *slot, int N, int K, int C) {
    QS_LAUNCH_N(dispatch_forward_kernel, (size_t)N * K * C, xe, x, slot, N, K, C);
}

void qs_cuda_moe_dispatch_backward(float *dx, const float *dxe, const int *slot, int N, int K, int C) {
    QS_LAUNCH_N(dispatch_backward_kernel, (size_t)N * C, dx, dxe, slot, N, K, C);
}

void qs_cuda_moe_combine_forward(float *y, const float *ye, const float *gate, const int *slot, int N, int K, int C) {
    QS_LAUNCH_N(combine_forward_kernel, (size_t)N * C, y, ye, gate, slot, N, K, C);
}

void qs_cuda_moe_combine_backward(float *dye, float *dgate, const float *dy, const float *ye, const float *gate,
                                  const int *slot, int N, int K, int C) {
    if (dye) QS_LAUNCH_N(combine_dye_kernel, (size_t)N * K * C, dye, dy, gate, slot, N, K, C);
    if (dgate) QS_LAUNCH_N(combine_dgate_kernel, (size_t)N * K * 32, dgate, dy, ye, slot, N, K, C);
}

/* ---- router regularizers ----
 * Per row: softmax p = exp(x - mx) / sum, its logsumexp, and s = sum_e f_e p_e with
 * f_e = routed[e] / (N K). routed is a host array (moe_assign's output), copied up. */
struct router_row {
    float mx;
    double sum, lse, s;
};

__device__ static router_row router_stats(const float *x, const int *routed, double inv_nk, int E) {
    router_row r;
    r.mx = -INFINITY;
    for (int e = 0; e < E; e++) r.mx = fmaxf(r.mx, x[e]);
    r.sum = 0.0;
    for (int e = 0; e < E; e++) r.sum += expf(x[e] - r.mx);
    r.lse = r.mx + log(r.sum);
    double fs = 0.0;
    for (int e = 0; e < E; e++) fs += routed[e] * inv_nk * expf(x[e] - r.mx);
    r.s = fs / r.sum;
    return r;
}

static int *routed_on_device(const int *routed, int E, size_t extra_bytes, char **rest) {
    char *at = (char *)qs_cuda_scratch(qs_cuda_room((size_t)E * sizeof(int)) + extra_bytes);
    int *d = (int *)qs_cuda_carve(&at, (size_t)E * sizeof(int));
    qs_cuda_upload(d, routed, (size_t)E * sizeof(int));
    *rest = at;
    return d;
}

/* Per row: terms[n] = s_n, terms[N + n] = lse_n^2; then one block adds them up. */
__global__ static void balance_rows_kernel(double *terms, const float *logits, const int *routed, int N, int E,
                                           double inv_nk) {
    QS_GRID_LOOP(n, (size_t)N) {
        const router_row r = router_stats(logits + n * E, routed, inv_nk, E);
        terms[n] = r.s;
        terms[N + n] = r.lse * r.lse;
    }
}

__global__ static void balance_sum_kernel(double *out, const double *terms, int N) {
    double bal = 0.0, z = 0.0;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        bal += terms[n];
        z += terms[N + n];
    }
    bal = qs_block_reduce(bal, qs_sum_op(), 0.0);
    z = qs_block_reduce(z, qs_sum_op(), 0.0);
    if (threadIdx.x == 0) {
        out[0] = bal;
        out[1] = z;
    }
}

/* Per-row terms and the two sums of the balance forward, in doubles. */
static size_t balance_terms(int N) { return 2 * (size_t)N + 2; }

size_t qs_cuda_moe_scratch(int N, int E) {
    return qs_cuda_room((size_t)E * sizeof(int)) + qs_cuda_room(balance_terms(N) * sizeof(double));
}

/* balance and z are host scalars, as model.c passes them (the loss is summed on the
 * host). */
void qs_cuda_moe_balance_forward(float *balance, float *z, const float *logits, const int *routed, int N, int E,
                                 int K) {
    char *at;
    const size_t n_terms = balance_terms(N);
    const int *d_routed = routed_on_device(routed, E, qs_cuda_room(n_terms * sizeof(double)), &at);
    double *terms = (double *)qs_cuda_carve(&at, n_terms * sizeof(double)), *sums = terms + 2 * (size_t)N;
    QS_LAUNCH_N(balance_rows_kernel, (size_t)N, terms, logits, d_routed, N, E, 1.0 / ((double)N * K));
    QS_LAUNCH(balance_sum_kernel, 1, 1024, 0, sums, terms, N);
    double host[2];
    qs_cuda_download(host, sums, sizeof host);
    /* E * sum_i f_i * mean_n p_ni = (E / N) * sum_n s_n */
    *balance = (float)(E * host[0] / N);
    *z = (float)(host[1] / N);
}

/* d balance / dx_e = (E/N) p_e (f_e - s);  d z / dx_e = (2 lse / N) p_e */
__global__ static void balance_backward_kernel(float *dlogits, const float *logits, const int *routed,
                                               float balance_coef, float z_coef, int N, int E, double inv_nk) {
    QS_GRID_LOOP(n, (size_t)N) {
        const float *x = logits + n * E;
        float *d = dlogits + n * E;
        const router_row r = router_stats(x, routed, inv_nk, E);
        const double cb = (double)balance_coef * E / N, cz = (double)z_coef * 2.0 * r.lse / N;
        for (int e = 0; e < E; e++) {
            const double p = expf(x[e] - r.mx) / r.sum;
            d[e] += (float)(p * (cb * (routed[e] * inv_nk - r.s) + cz));
        }
    }
}

void qs_cuda_moe_balance_backward(float *dlogits, const float *logits, const int *routed, float balance_coef,
                                  float z_coef, int N, int E, int K) {
    char *at;
    const int *d_routed = routed_on_device(routed, E, 0, &at);
    QS_LAUNCH_N(balance_backward_kernel, (size_t)N, dlogits, logits, d_routed, balance_coef, z_coef, N, E,
                1.0 / ((double)N * K));
}

/* Mixture-of-experts routing and dispatch / combine, without atomics or host loops.
 *
 * The router (moe_route_forward) is three kernels and one download:
 *   route_rows: a block per chunk of ROUTE_ROWS tokens, a thread per token: the noisy
 *     logits, top-k and the softmax over the kept (quasar/topk.h, as on the CPU), the
 *     row's logsumexp; then the chunk's column sums of the full softmax (the balance
 *     loss's P); then warp 0 walks the chunk's assignments in token order and gives each
 *     its rank among the chunk's arrivals at its expert (__match_any_sync groups a step's
 *     lanes by expert), leaving the chunk's per-expert histogram;
 *   route_scan: one block, a warp per expert: the arrivals before each chunk (a scan over
 *     the chunks), routed / counts / offsets / dropped, the balance and z losses;
 *   route_slot: rank = arrivals before the chunk + rank within it; the first `capacity`
 *     arrivals keep row offsets[e] + rank, so rows are in token order, as on the CPU.
 * The host fetches the counts and losses in one copy (it sizes each expert's GEMM from
 * them). The backward is one kernel, a warp per token.
 *
 * Dispatch and combine own each output element with one thread: packed rows are distinct
 * per assignment, and a token's assignments are visited in k order. */
#include "common.cuh"
#include "quasar/rng.h"
#include "quasar/topk.h"

#include <string.h>

/* softplus(x) = log(1 + e^x), written so that neither branch overflows. */
__device__ static inline float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

__device__ static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ static inline float gate_noise(const qs_moe_router &r, size_t n, int e) {
    return qs_rng_normal(r.seed, r.stream, qs_rng_counter(r.row_ids, n, (size_t)r.E, (size_t)e));
}

#define ROUTE_ROWS 128 /* tokens per chunk: the route_rows block */

/* The router's scratch: per chunk and expert the arrivals (then the arrivals before the
 * chunk) and the softmax's column sum; per chunk the sum of lse^2; and the result the
 * host fetches: balance, z, then ints routed [E], counts [E], offsets [E+1], dropped. */
struct route_scratch {
    int *hist;
    double *psum, *lse2, *result;
};
static int route_chunks(int N) { return (N + ROUTE_ROWS - 1) / ROUTE_ROWS; }
static size_t route_result_bytes(int E) { return 2 * sizeof(double) + (3 * (size_t)E + 2) * sizeof(int); }
__host__ __device__ static inline int *route_result_ints(double *result) { return (int *)(result + 2); }

/* Also the most the backward takes (E ints). */
size_t qs_cuda_moe_scratch(int N, int E) {
    const size_t chunks = (size_t)route_chunks(N), cells = chunks * E;
    return qs_cuda_room(cells * sizeof(int)) + qs_cuda_room(cells * sizeof(double)) +
           qs_cuda_room(chunks * sizeof(double)) + qs_cuda_room(route_result_bytes(E));
}

/* Dynamic shared memory: the chunk's arrivals per expert, E ints (16 KiB at the
 * config's limit of 4096 experts). */
__global__ static void __launch_bounds__(ROUTE_ROWS)
    route_rows_kernel(int *idx, float *gate, int *rank, float *h, route_scratch s, const float *clean,
                      const float *noise_logits, qs_moe_router r) {
    QS_DYNAMIC_SMEM(int, arrivals);
    __shared__ float row_mx[ROUTE_ROWS];
    __shared__ double row_sum[ROUTE_ROWS];
    const int E = r.E, K = r.K, t = threadIdx.x, chunk = blockIdx.x;
    const int n0 = chunk * ROUTE_ROWS, rows = min(ROUTE_ROWS, r.N - n0);
    const float *x = noise_logits ? h : clean;

    double lse2 = 0.0;
    if (t < rows) {
        const size_t n = (size_t)n0 + t;
        if (noise_logits)
            for (int e = 0; e < E; e++) {
                const size_t i = n * E + e;
                h[i] = clean[i] + gate_noise(r, n, e) * softplus(noise_logits[i]);
            }
        const float *xn = x + n * E;
        int *id = idx + n * K;
        float *g = gate + n * K;
        qs_topk_select(id, xn, E, K);
        float mx = xn[id[0]]; /* the softmax over the kept: the first is the largest */
        double sum = 0.0;
        for (int k = 0; k < K; k++) sum += expf(xn[id[k]] - mx);
        const float inv = (float)(1.0 / sum);
        for (int k = 0; k < K; k++) g[k] = expf(xn[id[k]] - mx) * inv;
        mx = -INFINITY; /* the full softmax, for the regularizers */
        for (int e = 0; e < E; e++) mx = fmaxf(mx, xn[e]);
        sum = 0.0;
        for (int e = 0; e < E; e++) sum += expf(xn[e] - mx);
        const double lse = mx + log(sum);
        lse2 = lse * lse;
        row_mx[t] = mx;
        row_sum[t] = sum;
    }
    lse2 = qs_block_reduce(lse2, qs_sum_op(), 0.0); /* its barriers publish the rows above */
    if (t == 0) s.lse2[chunk] = lse2;
    for (int e = t; e < E; e += blockDim.x) {
        double p = 0.0;
        for (int j = 0; j < rows; j++) p += expf(x[((size_t)n0 + j) * E + e] - row_mx[j]) / row_sum[j];
        s.psum[(size_t)chunk * E + e] = p;
        arrivals[e] = 0;
    }
    __syncthreads();
    if (t < 32) {
        const unsigned before_me = (1u << t) - 1u;
        const size_t a1 = ((size_t)n0 + rows) * K;
        for (size_t a = (size_t)n0 * K; a < a1; a += 32) {
            const bool live = a + t < a1;
            const int e = live ? idx[a + t] : -1;
            const unsigned peers = __match_any_sync(0xffffffffu, e);
            if (live) rank[a + t] = arrivals[e] + __popc(peers & before_me);
            __syncwarp();
            if (live && 31 - __clz(peers) == t) arrivals[e] += __popc(peers); /* the group's last lane */
            __syncwarp();
        }
    }
    __syncthreads();
    for (int e = t; e < E; e += blockDim.x) s.hist[(size_t)chunk * E + e] = arrivals[e];
}

/* One block; warp w takes experts w, w + 32, ...: its lanes take 32 chunks at a time and
 * scan them (shuffles), turning each chunk's arrivals into the arrivals before it; then
 * thread 0 adds the losses' per-expert and per-chunk terms and the offsets in order. */
__global__ static void route_scan_kernel(route_scratch s, int chunks, qs_moe_router r) {
    __shared__ double bal_of[32];
    const int E = r.E, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int *routed = route_result_ints(s.result), *counts = routed + E, *offsets = counts + E;
    int *dropped = offsets + E + 1;
    double bal = 0.0; /* this warp's sum over its experts of routed_e * psum_e */
    for (int e = warp; e < E; e += warps) {
        int before = 0;
        double p = 0.0;
        for (int c0 = 0; c0 < chunks; c0 += 32) {
            const int c = c0 + lane;
            int *cell = s.hist + (size_t)c * E + e;
            const int here = c < chunks ? *cell : 0;
            int upto = here; /* inclusive scan over the 32 lanes */
            for (int d = 1; d < 32; d <<= 1) {
                const int u = __shfl_sync(0xffffffffu, upto, lane >= d ? lane - d : lane);
                if (lane >= d) upto += u;
            }
            if (c < chunks) {
                *cell = before + upto - here;
                p += s.psum[(size_t)c * E + e];
            }
            before += __shfl_sync(0xffffffffu, upto, 31);
        }
        p = qs_warp_reduce(p, qs_sum_op());
        if (lane == 0) {
            routed[e] = before;
            counts[e] = r.capacity > 0 && before > r.capacity ? r.capacity : before;
        }
        bal += before * p;
    }
    if (lane == 0) bal_of[warp] = bal;
    __syncthreads();
    if (threadIdx.x == 0) {
        /* balance = E * sum_e (routed_e / (N K)) * (psum_e / N) */
        double b = 0.0, z = 0.0;
        for (int w = 0; w < warps; w++) b += bal_of[w];
        for (int c = 0; c < chunks; c++) z += s.lse2[c];
        s.result[0] = b * E / ((double)r.N * r.N * r.K);
        s.result[1] = z / r.N;
        int rows = 0, drops = 0;
        for (int e = 0; e < E; e++) {
            offsets[e] = rows;
            rows += counts[e];
            drops += routed[e] - counts[e];
        }
        offsets[E] = rows;
        *dropped = drops;
    }
}

/* slot holds each assignment's rank within its chunk; it becomes the packed row. */
__global__ static void route_slot_kernel(int *slot, const int *idx, route_scratch s, qs_moe_router r) {
    const int *offsets = route_result_ints(s.result) + 2 * (size_t)r.E;
    QS_GRID_LOOP(a, (size_t)r.N * r.K) {
        const int e = idx[a], rank = s.hist[a / r.K / ROUTE_ROWS * r.E + e] + slot[a];
        slot[a] = r.capacity <= 0 || rank < r.capacity ? offsets[e] + rank : -1;
    }
}

void qs_cuda_moe_route_forward(qs_moe_load *load, int *idx, float *gate, int *slot, float *h, const float *clean,
                               const float *noise_logits, const qs_moe_router *r) {
    const int E = r->E, chunks = route_chunks(r->N);
    char *at = (char *)qs_cuda_scratch(qs_cuda_moe_scratch(r->N, E));
    route_scratch s;
    s.hist = (int *)qs_cuda_carve(&at, (size_t)chunks * E * sizeof(int));
    s.psum = (double *)qs_cuda_carve(&at, (size_t)chunks * E * sizeof(double));
    s.lse2 = (double *)qs_cuda_carve(&at, (size_t)chunks * sizeof(double));
    s.result = (double *)qs_cuda_carve(&at, route_result_bytes(E));
    QS_LAUNCH(route_rows_kernel, chunks, ROUTE_ROWS, (size_t)E * sizeof(int), idx, gate, slot, h, s, clean,
              noise_logits, *r);
    QS_LAUNCH(route_scan_kernel, 1, 1024, 0, s, chunks, *r);
    QS_LAUNCH_N(route_slot_kernel, (size_t)r->N * r->K, slot, idx, s, *r);

    double *host = (double *)qs_cuda_host_scratch(route_result_bytes(E));
    qs_cuda_download(host, s.result, route_result_bytes(E));
    const int *ints = route_result_ints(host);
    load->balance = (float)host[0];
    load->z = (float)host[1];
    memcpy(load->routed, ints, (size_t)E * sizeof(int));
    memcpy(load->counts, ints + E, (size_t)E * sizeof(int));
    memcpy(load->offsets, ints + 2 * E, ((size_t)E + 1) * sizeof(int));
    load->dropped = ints[3 * E + 1];
}

/* A warp per token, lane j taking experts j, j + 32, ...: the softmax statistics by warp
 * reductions, then dx per expert (the regularizers' term plus, at the kept, top-k's
 * softmax Jacobian dx_id[k] = g_k (dg_k - sum_j g_j dg_j)), added to dclean and, through
 * the noise, to dnoise. routed: f = routed / (N K). */
__global__ static void route_backward_kernel(float *dclean, float *dnoise, const float *dgate, const int *idx,
                                             const float *gate, const float *x, const float *noise_logits,
                                             const int *routed, float balance_coef, float z_coef, qs_moe_router r) {
    const size_t n = blockIdx.x * (size_t)QS_WARPS + threadIdx.x / 32;
    if (n >= (size_t)r.N) return; /* whole warps */
    const int lane = threadIdx.x & 31, E = r.E, K = r.K;
    const float *xn = x + n * E, *g = gate + n * K, *dg = dgate + n * K;
    const int *id = idx + n * K;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, xn[e]);
    mx = qs_warp_reduce(mx, qs_max_op());
    double sum = 0.0, fsum = 0.0;
    for (int e = lane; e < E; e += 32) {
        const double p = expf(xn[e] - mx);
        sum += p;
        fsum += routed[e] * p;
    }
    sum = qs_warp_reduce(sum, qs_sum_op());
    fsum = qs_warp_reduce(fsum, qs_sum_op());
    float gdg = 0.0f;
    for (int k = lane; k < K; k += 32) gdg += g[k] * dg[k];
    gdg = qs_warp_reduce(gdg, qs_sum_op());
    /* d balance / dx_e = (E/N) p_e (f_e - s), s = sum_e f_e p_e;  d z / dx_e = (2 lse / N) p_e */
    const double inv_nk = 1.0 / ((double)r.N * K), s = fsum * inv_nk / sum, lse = mx + log(sum);
    const double cb = (double)balance_coef * E / r.N, cz = (double)z_coef * 2.0 * lse / r.N;
    for (int e = lane; e < E; e += 32) {
        const double p = expf(xn[e] - mx) / sum;
        float d = (float)(p * (cb * (routed[e] * inv_nk - s) + cz));
        for (int k = 0; k < K; k++)
            if (id[k] == e) d += g[k] * (dg[k] - gdg);
        const size_t i = n * E + e;
        if (dclean) dclean[i] += d;
        if (dnoise) dnoise[i] += d * gate_noise(r, n, e) * sigmoid(noise_logits[i]);
    }
}

void qs_cuda_moe_route_backward(float *dclean, float *dnoise, const float *dgate, const int *idx, const float *gate,
                                const float *x, const float *noise_logits, const qs_moe_load *load,
                                float balance_coef, float z_coef, const qs_moe_router *r) {
    int *routed = (int *)qs_cuda_scratch((size_t)r->E * sizeof(int));
    qs_cuda_upload(routed, load->routed, (size_t)r->E * sizeof(int));
    QS_LAUNCH_ROWS(route_backward_kernel, r->N, dclean, dnoise, dgate, idx, gate, x, noise_logits, routed,
                   balance_coef, z_coef, *r);
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

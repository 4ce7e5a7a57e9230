/* `quasar bench moe`: one sparse MoE layer (issue 6), forward + backward, on a backend.
 * The layer is the model's (csrc/model.c, moe_forward and moe_backward) without router
 * noise, capacity or adapters: router GEMM, top-k routing, dispatch into expert-packed
 * rows, the experts' grouped Linear-GELU-Linear, combine; then the same backward. It is
 * timed whole, in its four parts (routing, permutation, expert GEMMs, combine), and beside
 * a dense FFN of the same active FLOPs (hidden K F): the layer / dense ratio is what the
 * sparse layer costs over the matrix work it cannot avoid. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_impl.h"
#include "quasar/backend.h"
#include "quasar/error.h"

enum { WARMUP_CALLS = 2 };
static const float BALANCE_COEF = 0.01f; /* the configs' model.moe.aux_loss_coef */

typedef enum { PART_ROUTE, PART_PERMUTE, PART_EXPERTS, PART_COMBINE, N_PARTS } moe_part;
static const char *const PART_NAME[N_PARTS] = {"route", "permute", "experts", "combine"};

typedef struct moe_bench {
    const qs_backend *be;
    const qs_ops *o;
    qs_bench_moe_shape s;
    qs_moe_router r;
    /* weights, then their gradients: router [C,E] [E]; experts [E,C,F] [E,F] [E,F,C]
     * [E,C]; the dense FFN [C,KF] [KF] [KF,C] [C] */
    float *wr, *br, *w1, *b1, *w2, *b2, *wd1, *bd1, *wd2, *bd2;
    float *gwr, *gbr, *gw1, *gb1, *gw2, *gb2, *gwd1, *gbd1, *gwd2, *gbd2;
    float *x, *dy, *y, *dx;     /* [N,C] */
    float *logit, *dlogit;      /* [N,E] */
    float *gate, *dgate;        /* [N,K] */
    float *xe, *ye, *dxe, *dye; /* packed [NK,C] */
    float *h, *ha, *dh, *dha;   /* packed [NK,F]; the dense FFN's [N,KF], as many floats */
    int *idx, *slot;            /* [NK] */
    qs_moe_load load;           /* host arrays */
    float *pool;
} moe_bench;

static size_t rows_of(const moe_bench *b) { return (size_t)b->load.offsets[b->s.E]; }

/* ---- the layer, step by step (model.c's order) ---- */

static void route_fwd(moe_bench *b) {
    const qs_bench_moe_shape *s = &b->s;
    b->o->matmul_forward(b->logit, b->x, b->wr, b->br, s->N, s->C, s->E, QS_W_IN_OUT);
    b->o->moe_route_forward(&b->load, b->idx, b->gate, b->slot, NULL, b->logit, NULL, &b->r);
}

static void dispatch_fwd(moe_bench *b) { b->o->moe_dispatch_forward(b->xe, b->x, b->slot, b->s.N, b->s.K, b->s.C); }

static void experts_fwd(moe_bench *b) {
    const qs_bench_moe_shape *s = &b->s;
    const int *off = b->load.offsets;
    b->o->matmul_grouped_forward(b->h, b->xe, b->w1, b->b1, off, s->E, s->C, s->F);
    b->o->gelu_forward(b->ha, b->h, rows_of(b) * s->F);
    b->o->matmul_grouped_forward(b->ye, b->ha, b->w2, b->b2, off, s->E, s->F, s->C);
}

static void combine_fwd(moe_bench *b) {
    b->o->moe_combine_forward(b->y, b->ye, b->gate, b->slot, b->s.N, b->s.K, b->s.C);
}

static void combine_bwd(moe_bench *b) {
    const qs_bench_moe_shape *s = &b->s;
    b->be->zero(b->dye, rows_of(b) * s->C * sizeof(float));
    b->be->zero(b->dgate, (size_t)s->N * s->K * sizeof(float));
    b->o->moe_combine_backward(b->dye, b->dgate, b->dy, b->ye, b->gate, b->slot, s->N, s->K, s->C);
}

static void experts_bwd(moe_bench *b) {
    const qs_bench_moe_shape *s = &b->s;
    const int *off = b->load.offsets;
    const size_t rf = rows_of(b) * s->F;
    b->be->zero(b->dha, rf * sizeof(float));
    b->be->zero(b->dh, rf * sizeof(float));
    b->be->zero(b->dxe, rows_of(b) * s->C * sizeof(float));
    b->o->matmul_grouped_backward(b->dha, b->gw2, b->gb2, b->dye, b->ha, b->w2, off, s->E, s->F, s->C);
    b->o->gelu_backward(b->dh, b->h, b->dha, rf);
    b->o->matmul_grouped_backward(b->dxe, b->gw1, b->gb1, b->dh, b->xe, b->w1, off, s->E, s->C, s->F);
}

static void dispatch_bwd(moe_bench *b) {
    b->be->zero(b->dx, (size_t)b->s.N * b->s.C * sizeof(float));
    b->o->moe_dispatch_backward(b->dx, b->dxe, b->slot, b->s.N, b->s.K, b->s.C);
}

static void route_bwd(moe_bench *b) {
    const qs_bench_moe_shape *s = &b->s;
    b->be->zero(b->dlogit, (size_t)s->N * s->E * sizeof(float));
    b->o->moe_route_backward(b->dlogit, NULL, b->dgate, b->idx, b->gate, b->logit, NULL, &b->load, BALANCE_COEF, 0.0f,
                             &b->r);
    b->o->matmul_backward(b->dx, b->gwr, b->gbr, b->dlogit, b->x, b->wr, s->N, s->C, s->E, QS_W_IN_OUT);
}

static const struct {
    void (*run)(moe_bench *b);
    moe_part part;
} STEPS[] = {
    {route_fwd, PART_ROUTE},      {dispatch_fwd, PART_PERMUTE}, {experts_fwd, PART_EXPERTS},
    {combine_fwd, PART_COMBINE},  {combine_bwd, PART_COMBINE},  {experts_bwd, PART_EXPERTS},
    {dispatch_bwd, PART_PERMUTE}, {route_bwd, PART_ROUTE},
};
enum { N_STEPS = sizeof STEPS / sizeof *STEPS };

static void layer_fwd_bwd(void *arg) {
    for (int i = 0; i < N_STEPS; i++) STEPS[i].run(arg);
}

/* One step alone, for the split: the step's index in `step` of a moe_step_call. */
typedef struct moe_step_call {
    moe_bench *b;
    int step;
} moe_step_call;

static void one_step(void *arg) {
    const moe_step_call *c = arg;
    STEPS[c->step].run(c->b);
}

/* The dense FFN of the same active FLOPs over the same tokens: x [N,C] -> [N,KF] -> [N,C]. */
static void dense_fwd_bwd(void *arg) {
    moe_bench *b = arg;
    const qs_bench_moe_shape *s = &b->s;
    const int H = s->K * s->F;
    const size_t nh = (size_t)s->N * H;
    b->o->matmul_forward(b->h, b->x, b->wd1, b->bd1, s->N, s->C, H, QS_W_IN_OUT);
    b->o->gelu_forward(b->ha, b->h, nh);
    b->o->matmul_forward(b->y, b->ha, b->wd2, b->bd2, s->N, H, s->C, QS_W_IN_OUT);
    b->be->zero(b->dha, nh * sizeof(float));
    b->o->matmul_backward(b->dha, b->gwd2, b->gbd2, b->dy, b->ha, b->wd2, s->N, H, s->C, QS_W_IN_OUT);
    b->be->zero(b->dh, nh * sizeof(float));
    b->o->gelu_backward(b->dh, b->h, b->dha, nh);
    b->be->zero(b->dx, (size_t)s->N * s->C * sizeof(float));
    b->o->matmul_backward(b->dx, b->gwd1, b->gbd1, b->dh, b->x, b->wd1, s->N, s->C, H, QS_W_IN_OUT);
}

/* ---- buffers ---- */

/* Every float buffer from one allocation, all random (qs_bench_fill) but the router's
 * bias; the index and host arrays beside it. */
static int moe_bench_open(moe_bench *b, const qs_backend *be, const qs_bench_moe_shape *s) {
    memset(b, 0, sizeof *b);
    b->be = be;
    b->o = be->ops;
    b->s = *s;
    b->r = (qs_moe_router){.N = s->N, .E = s->E, .K = s->K};
    const size_t N = s->N, C = s->C, F = s->F, E = s->E, K = s->K, NK = N * K, H = K * F;
    struct {
        float **p;
        size_t n;
    } f[] = {
        {&b->wr, C * E},    {&b->br, E},      {&b->w1, E * C * F}, {&b->b1, E * F}, {&b->w2, E * F * C},
        {&b->b2, E * C},    {&b->wd1, C * H}, {&b->bd1, H},        {&b->wd2, H * C}, {&b->bd2, C},
        {&b->gwr, C * E},   {&b->gbr, E},     {&b->gw1, E * C * F}, {&b->gb1, E * F}, {&b->gw2, E * F * C},
        {&b->gb2, E * C},   {&b->gwd1, C * H}, {&b->gbd1, H},      {&b->gwd2, H * C}, {&b->gbd2, C},
        {&b->x, N * C},     {&b->dy, N * C},  {&b->y, N * C},      {&b->dx, N * C},  {&b->logit, N * E},
        {&b->dlogit, N * E}, {&b->gate, NK},  {&b->dgate, NK},     {&b->xe, NK * C}, {&b->ye, NK * C},
        {&b->dxe, NK * C},  {&b->dye, NK * C}, {&b->h, NK * F},    {&b->ha, NK * F}, {&b->dh, NK * F},
        {&b->dha, NK * F},
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof f / sizeof *f; i++) total += qs_bench_round16(f[i].n);
    if (!(b->pool = be->alloc(total * sizeof(float))))
        return qs_error("out of memory on %s: the MoE layer's buffers take %zu MiB", be->name,
                        total * sizeof(float) >> 20);
    float *p = b->pool;
    for (size_t i = 0; i < sizeof f / sizeof *f; i++) {
        *f[i].p = p;
        p += qs_bench_round16(f[i].n);
    }
    b->idx = be->alloc(NK * sizeof(int));
    b->slot = be->alloc(NK * sizeof(int));
    b->load.routed = calloc(E, sizeof(int));
    b->load.counts = calloc(E, sizeof(int));
    b->load.offsets = calloc(E + 1, sizeof(int));
    if (!b->idx || !b->slot || !b->load.routed || !b->load.counts || !b->load.offsets)
        return qs_error("out of memory on %s for the MoE layer's routing", be->name);
    if (qs_bench_fill(be, b->pool, total, 0x30e)) return -1;
    /* the router's bias at zero: random ones, as large as the weights, would skew the
     * load well past what a trained (balance-regularised) router gives */
    be->zero(b->br, E * sizeof(float));
    return 0;
}

static void moe_bench_close(moe_bench *b) {
    if (b->be) {
        b->be->free(b->pool);
        b->be->free(b->idx);
        b->be->free(b->slot);
    }
    free(b->load.routed);
    free(b->load.counts);
    free(b->load.offsets);
}

/* ---- timing and output ---- */

/* The medians and what follows from them. */
typedef struct moe_times {
    qs_bench_stats layer, dense, part[N_PARTS];
    double part_share[N_PARTS]; /* each part's median over the sum of the parts' medians */
    double over_dense;          /* layer / dense FFN */
    double tokens_per_s;        /* through the layer's forward + backward */
    double expert_flop_s, dense_flop_s;
} moe_times;

/* FLOPs of the experts' products forward + backward (three GEMMs of 2 R C F each per
 * linear layer, two layers), the same for the dense FFN with N rows of K F. */
static double expert_flops(const moe_bench *b) { return 12.0 * (double)rows_of(b) * b->s.C * b->s.F; }
static double dense_flops(const qs_bench_moe_shape *s) { return 12.0 * (double)s->N * s->K * s->F * s->C; }

/* Per repeat: the whole layer in one timed call, the dense FFN in one, then the layer
 * again step by step, each step timed alone and summed into its part. */
static int time_layer(moe_bench *b, int repeats, moe_times *t) {
    double *ms = malloc((size_t)repeats * (2 + N_PARTS) * sizeof *ms);
    if (!ms) return qs_error("out of memory");
    double *layer = ms, *dense = ms + repeats, *part = ms + 2 * repeats;
    for (int i = 0; i < WARMUP_CALLS; i++) {
        b->be->time_ms(layer_fwd_bwd, b);
        b->be->time_ms(dense_fwd_bwd, b);
    }
    for (int i = 0; i < repeats; i++) {
        layer[i] = b->be->time_ms(layer_fwd_bwd, b);
        dense[i] = b->be->time_ms(dense_fwd_bwd, b);
        for (int p = 0; p < N_PARTS; p++) part[p * repeats + i] = 0.0;
        for (int st = 0; st < N_STEPS; st++) {
            moe_step_call c = {b, st};
            part[STEPS[st].part * repeats + i] += b->be->time_ms(one_step, &c);
        }
    }
    t->layer = qs_bench_stats_of(layer, repeats);
    t->dense = qs_bench_stats_of(dense, repeats);
    double sum = 0.0;
    for (int p = 0; p < N_PARTS; p++) {
        t->part[p] = qs_bench_stats_of(part + p * repeats, repeats);
        sum += t->part[p].median;
    }
    for (int p = 0; p < N_PARTS; p++) t->part_share[p] = t->part[p].median / sum;
    t->over_dense = t->layer.median / t->dense.median;
    t->tokens_per_s = b->s.N / (t->layer.median / 1e3);
    t->expert_flop_s = expert_flops(b) / (t->part[PART_EXPERTS].median / 1e3);
    t->dense_flop_s = dense_flops(&b->s) / (t->dense.median / 1e3);
    free(ms);
    return 0;
}

static void load_range(const moe_bench *b, int *lo, int *hi) {
    *lo = *hi = b->load.counts[0];
    for (int e = 1; e < b->s.E; e++) {
        if (b->load.counts[e] < *lo) *lo = b->load.counts[e];
        if (b->load.counts[e] > *hi) *hi = b->load.counts[e];
    }
}

/* Whose kernel ran the experts' grouped products: the CPU's, or the CUDA backend's answer
 * for its precision. */
static const char *grouped_kernel(const qs_backend *be) {
    if (be == qs_backend_cpu()) return "cpu";
    return qs_backend_cuda_grouped_gemm(be == qs_backend_cuda(QS_PRECISION_BF16) ? QS_PRECISION_BF16
                                                                                 : QS_PRECISION_FP32);
}

static void print_table(const moe_bench *b, const moe_times *t, const qs_bench_ceilings *c, int repeats, bool quick) {
    const qs_bench_moe_shape *s = &b->s;
    int lo, hi;
    load_range(b, &lo, &hi);
    printf("quasar bench moe: %s, %d threads, N=%d tokens, C=%d, F=%d, E=%d experts, top-%d, dropless; median of "
           "%d%s\n",
           b->be->name, omp_get_max_threads(), s->N, s->C, s->F, s->E, s->K, repeats,
           quick ? " (--quick: tiny shapes, a smoke run, not a measurement)" : "");
    printf("  ceiling: %d^3 GEMM %.1f GFLOP/s; rows per expert %d..%d (mean %.1f); grouped GEMMs: %s\n", c->gemm_n,
           c->gemm_flop_s / 1e9, lo, hi, (double)s->N * s->K / s->E, grouped_kernel(b->be));
    printf("  %-26s %10s %7s\n", "forward + backward", "ms", "share");
    const double ge = t->expert_flop_s, gd = t->dense_flop_s;
    for (int p = 0; p < N_PARTS; p++) {
        printf("  %-26s %10.4f %7.3f", PART_NAME[p], t->part[p].median, t->part_share[p]);
        if (p == PART_EXPERTS) printf("  %.1f GFLOP/s, %.3f of the GEMM ceiling", ge / 1e9, ge / c->gemm_flop_s);
        putchar('\n');
    }
    printf("  %-26s %10.4f %7s  %.0f tokens/s\n", "MoE layer, one call", t->layer.median, "", t->tokens_per_s);
    printf("  dense FFN, hidden %-8d %10.4f %7s  %.1f GFLOP/s, %.3f of the GEMM ceiling\n", s->K * s->F,
           t->dense.median, "", gd / 1e9, gd / c->gemm_flop_s);
    printf("  MoE layer / dense FFN of the same active FLOPs: %.3f\n", t->over_dense);
    printf("  other processes took %.0f%% of the CPU time meanwhile\n", 100 * qs_bench_others_cpu());
}

static void print_json(const moe_bench *b, const moe_times *t, const qs_bench_ceilings *c, int repeats, bool quick,
                       int argc, char **argv) {
    const qs_bench_moe_shape *s = &b->s;
    char shape[160], metric[320], name[64];
    snprintf(shape, sizeof shape, "N=%d C=%d F=%d E=%d top-%d, dropless", s->N, s->C, s->F, s->E, s->K);
    qs_bench_json_head(stdout, b->be, argc, argv, c);
    printf(", \"quick\": %s, \"repeats\": %d, \"shape\": {\"N\": %d, \"C\": %d, \"F\": %d, \"E\": %d, \"K\": %d}",
           quick ? "true" : "false", repeats, s->N, s->C, s->F, s->E, s->K);
    printf(", \"grouped_gemm\": \"%s\"", grouped_kernel(b->be));
    fputs(", \"expert_rows\": [", stdout);
    for (int e = 0; e < s->E; e++) printf("%s%d", e ? ", " : "", b->load.counts[e]);
    fputs("], \"results\": [", stdout);
    snprintf(metric, sizeof metric, "MoE layer forward + backward, ms per call, median of %d (%s; p10 %.4f, p90 %.4f)",
             repeats, shape, t->layer.p10, t->layer.p90);
    qs_bench_json_result(stdout, true, "moe_layer_fwd_bwd_ms", metric, t->layer.median);
    snprintf(metric, sizeof metric, "dense FFN of the same active FLOPs (hidden %d), forward + backward, ms, median "
             "of %d (p10 %.4f, p90 %.4f)", s->K * s->F, repeats, t->dense.p10, t->dense.p90);
    qs_bench_json_result(stdout, false, "moe_ffn_dense_fwd_bwd_ms", metric, t->dense.median);
    qs_bench_json_result(stdout, false, "moe_layer_over_dense", "MoE layer ms / dense FFN ms (issue 6: <= 1.25)",
                         t->over_dense);
    snprintf(metric, sizeof metric, "tokens through the MoE layer's forward + backward per second (%s)", shape);
    qs_bench_json_result(stdout, false, "moe_layer_tokens_per_s", metric, t->tokens_per_s);
    for (int p = 0; p < N_PARTS; p++) {
        snprintf(name, sizeof name, "moe_%s_ms", PART_NAME[p]);
        snprintf(metric, sizeof metric, "the layer's %s steps forward + backward, each timed alone, ms, median of %d "
                 "(%.3f of the parts' sum)", PART_NAME[p], repeats, t->part_share[p]);
        qs_bench_json_result(stdout, false, name, metric, t->part[p].median);
    }
    const double ge = t->expert_flop_s, gd = t->dense_flop_s;
    snprintf(metric, sizeof metric, "the experts' grouped GEMMs (with GELU and zeroing), GFLOP/s; %.3f of the GEMM "
             "ceiling", ge / c->gemm_flop_s);
    qs_bench_json_result(stdout, false, "moe_experts_gflop_per_s", metric, ge / 1e9);
    snprintf(metric, sizeof metric, "the dense FFN, GFLOP/s; %.3f of the GEMM ceiling", gd / c->gemm_flop_s);
    qs_bench_json_result(stdout, false, "moe_ffn_dense_gflop_per_s", metric, gd / 1e9);
    fputs("\n  ]}\n", stdout);
}

int qs_bench_moe(const qs_backend *be, const qs_bench_moe_shape *s, bool json, bool quick, int repeats, int argc,
                 char **argv) {
    qs_bench_ceilings c;
    if (qs_bench_ceilings_measure(&c, be, quick ? QS_BENCH_QUICK_GEMM_N : qs_bench_gemm_n(be), 0)) return -1;
    moe_bench b;
    moe_times t = {.part_share = {0}};
    int rc = moe_bench_open(&b, be, s);
    if (!rc) rc = time_layer(&b, repeats, &t);
    if (!rc && json) print_json(&b, &t, &c, repeats, quick, argc, argv);
    else if (!rc) print_table(&b, &t, &c, repeats, quick);
    moe_bench_close(&b);
    return rc;
}

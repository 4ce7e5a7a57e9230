/* `quasar bench attention`: the fused attention kernels over a sweep of sequence lengths
 * and head sizes, causal and not, forward and forward + backward, as TFLOP/s (issue 5's
 * measurement; bench/peers/attention_torch.py times PyTorch's SDPA the same way and
 * bench/compare.sh sets the two side by side). The number of tokens and the model width
 * stay fixed across the sweep, so batch x heads fills the device at every length:
 * B = tokens / T sequences (at least 1) of NH = width / hs heads, q, k and v read in place
 * from one qkv buffer as the model reads them.
 *
 * FLOPs are FlashAttention's count, so that the figures compare with its papers and
 * with any peer: the forward 4 B NH T^2 hs (two products of T x T x hs per head), half
 * of it when causal; forward + backward 3.5 times the forward (the backward recomputes
 * S and adds dP, dq, dk, dv). The inputs stay in the device's cache only as far as the
 * kernels' own reuse allows: attention reads each operand many times from on-chip
 * tiles and is compute-bound at these lengths, so no rotation. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_impl.h"
#include "quasar/error.h"

enum { WARMUP_CALLS = 2, MAX_SWEEP = 16 };

/* One point of the sweep and its buffers. */
typedef struct att_bench {
    const qs_backend *be;
    qs_attn_block blk;
    float *qkv, *dqkv, *out, *dout, *lse, *delta;
    size_t n_qkv;
} att_bench;

static void forward(void *arg) {
    const att_bench *b = arg;
    b->be->ops->attention_block_forward(b->out, b->lse, b->qkv, b->qkv + b->blk.C, &b->blk);
}

/* Forward, then the backward as the model runs it: delta, dqkv zeroed (it accumulates). */
static void forward_backward(void *arg) {
    const att_bench *b = arg;
    const qs_attn_block *k = &b->blk;
    forward(arg);
    b->be->ops->attention_delta(b->delta, b->dout, b->out, k->B, k->Tq, k->C, k->NH);
    b->be->zero(b->dqkv, b->n_qkv * sizeof(float));
    b->be->ops->attention_block_backward(b->dqkv, b->dqkv + k->C, b->dout, b->qkv, b->qkv + k->C, b->lse, b->delta,
                                         k);
}

/* A comma-separated list of positive ints into v (at most MAX_SWEEP); its length, or -1. */
static int parse_list(const char *s, int *v, const char *flag) {
    int n = 0;
    for (const char *p = s; *p;) {
        char *end;
        const long x = strtol(p, &end, 10);
        if (end == p || x < 1 || x > (1 << 20) || (*end && *end != ',') || n == MAX_SWEEP)
            return qs_error("%s: expected up to %d comma-separated sizes in [1, 2^20], got '%s'", flag, MAX_SWEEP, s);
        v[n++] = (int)x;
        p = *end ? end + 1 : end;
    }
    return n ? n : qs_error("%s: empty list", flag);
}

typedef struct att_point {
    int T, hs, B, NH, causal;
    qs_bench_stats fwd, fwd_bwd; /* ms */
    double fwd_flops;
    size_t bytes;   /* the point's buffers */
    size_t scratch; /* what attention adds to the backend's op workspace (the bf16 kernels' staged heads) */
} att_point;

static double tflop_s(double flops, double ms) { return flops / (ms / 1e3) / 1e12; }

/* Times one point; its buffers come and go with it. */
static int time_point(const qs_backend *be, att_point *p, int repeats) {
    const int C = p->NH * p->hs;
    att_bench b = {.be = be, .blk = qs_attn_block_self(p->B, p->T, C, p->NH, p->NH, p->causal)};
    const size_t rows = (size_t)p->B * p->T, n_out = rows * C, n_st = (size_t)p->B * p->NH * p->T;
    b.n_qkv = rows * 3 * C;
    const size_t total = 2 * qs_bench_round16(b.n_qkv) + 2 * qs_bench_round16(n_out) + 2 * qs_bench_round16(n_st);
    p->bytes = total * sizeof(float);
    const qs_op_sizes with = {.rows = (int)rows, .heads = p->NH, .kv_heads = p->NH, .head_size = p->hs},
                      without = {.rows = (int)rows};
    p->scratch = be->workspace_bytes(&with) - be->workspace_bytes(&without);
    float *pool = be->alloc(p->bytes);
    if (!pool)
        return qs_error("out of memory on %s: attention at T=%d hs=%d takes %zu MiB", be->name, p->T, p->hs,
                        p->bytes >> 20);
    b.qkv = pool;
    b.dqkv = b.qkv + qs_bench_round16(b.n_qkv);
    b.out = b.dqkv + qs_bench_round16(b.n_qkv);
    b.dout = b.out + qs_bench_round16(n_out);
    b.lse = b.dout + qs_bench_round16(n_out);
    b.delta = b.lse + qs_bench_round16(n_st);
    int rc = qs_bench_fill(be, pool, total, 0xa77);
    double *ms = rc ? NULL : malloc(2 * (size_t)repeats * sizeof *ms);
    if (!rc && !ms) rc = qs_error("out of memory");
    if (!rc) {
        for (int i = 0; i < WARMUP_CALLS; i++) be->time_ms(forward_backward, &b);
        for (int i = 0; i < repeats; i++) {
            ms[i] = be->time_ms(forward, &b);
            ms[repeats + i] = be->time_ms(forward_backward, &b);
        }
        p->fwd = qs_bench_stats_of(ms, repeats);
        p->fwd_bwd = qs_bench_stats_of(ms + repeats, repeats);
        p->fwd_flops = 4.0 * p->B * p->NH * (double)p->T * p->T * p->hs * (p->causal ? 0.5 : 1.0);
    }
    free(ms);
    be->free(pool);
    return rc;
}

/* The result name of a point's figure: attention_T1024_hs64_causal_fwd_tflop_per_s. */
static void point_name(char *name, size_t n, const att_point *p, const char *pass) {
    snprintf(name, n, "attention_T%d_hs%d_%s_%s_tflop_per_s", p->T, p->hs, p->causal ? "causal" : "full", pass);
}

static void print_json(const qs_backend *be, const att_point *pts, int n, const qs_bench_ceilings *c, int repeats,
                       int argc, char **argv) {
    qs_bench_json_head(stdout, be, argc, argv, c);
    printf(", \"repeats\": %d, \"flops\": ", repeats);
    qs_bench_json_str(stdout, "FlashAttention's count: forward 4 B NH T^2 hs, half when causal; "
                              "forward + backward 3.5x the forward");
    fputs(", \"points\": [", stdout);
    for (int i = 0; i < n; i++) {
        const att_point *p = &pts[i];
        printf("%s\n    {\"T\": %d, \"hs\": %d, \"B\": %d, \"NH\": %d, \"causal\": %s", i ? "," : "", p->T, p->hs, p->B,
               p->NH, p->causal ? "true" : "false");
        qs_bench_json_num(stdout, "fwd_ms", p->fwd.median);
        qs_bench_json_num(stdout, "fwd_bwd_ms", p->fwd_bwd.median);
        qs_bench_json_num(stdout, "buffers_mib", (double)p->bytes / (1 << 20));
        qs_bench_json_num(stdout, "scratch_mib", (double)p->scratch / (1 << 20));
        fputs("}", stdout);
    }
    fputs("],\n  \"results\": [", stdout);
    for (int i = 0; i < n; i++) {
        const att_point *p = &pts[i];
        const struct {
            const char *pass, *what;
            qs_bench_stats s;
            double flops;
        } pass[2] = {{"fwd", "forward", p->fwd, p->fwd_flops}, {"fwd_bwd", "forward + backward", p->fwd_bwd,
                                                               3.5 * p->fwd_flops}};
        for (int j = 0; j < 2; j++) {
            char name[96], metric[256];
            point_name(name, sizeof name, p, pass[j].pass);
            snprintf(metric, sizeof metric,
                     "attention %s, TFLOP/s (B=%d NH=%d T=%d hs=%d%s; %.4f ms, median of %d, p10 %.4f, p90 %.4f; "
                     "%.3f of the GEMM ceiling)",
                     pass[j].what, p->B, p->NH, p->T, p->hs, p->causal ? " causal" : "", pass[j].s.median, repeats,
                     pass[j].s.p10, pass[j].s.p90, pass[j].flops / (pass[j].s.median / 1e3) / c->gemm_flop_s);
            qs_bench_json_result(stdout, i == 0 && j == 0, name, metric, tflop_s(pass[j].flops, pass[j].s.median));
        }
    }
    fputs("\n  ]}\n", stdout);
}

static void print_table(const qs_backend *be, const att_point *pts, int n, const qs_bench_ceilings *c, int repeats,
                        bool quick) {
    printf("quasar bench attention: %s, %d threads, median of %d%s\n", be->name, omp_get_max_threads(), repeats,
           quick ? " (--quick: tiny shapes, a smoke run, not a measurement)" : "");
    printf("  ceiling: %d^3 GEMM %.4g TFLOP/s; FLOPs: FlashAttention's count (forward 4 B NH T^2 hs, half causal; "
           "forward + backward 3.5x)\n",
           c->gemm_n, c->gemm_flop_s / 1e12);
    printf("  %-7s %4s %4s %4s %-7s %10s %9s %7s %10s %9s %7s\n", "T", "hs", "B", "NH", "mask", "fwd ms", "TFLOP/s",
           "of GEMM", "f+b ms", "TFLOP/s", "of GEMM");
    for (int i = 0; i < n; i++) {
        const att_point *p = &pts[i];
        const double f = tflop_s(p->fwd_flops, p->fwd.median), fb = tflop_s(3.5 * p->fwd_flops, p->fwd_bwd.median);
        printf("  %-7d %4d %4d %4d %-7s %10.4f %9.3f %7.3f %10.4f %9.3f %7.3f\n", p->T, p->hs, p->B, p->NH,
               p->causal ? "causal" : "full", p->fwd.median, f, f * 1e12 / c->gemm_flop_s, p->fwd_bwd.median, fb,
               fb * 1e12 / c->gemm_flop_s);
    }
}

int qs_bench_attention(const qs_backend *be, const qs_bench_attention_sweep *s, bool json, bool quick, int repeats,
                       int argc, char **argv) {
    int seqs[MAX_SWEEP], heads[MAX_SWEEP];
    const int ns = parse_list(s->seqs, seqs, "--seq");
    const int nh = ns < 0 ? -1 : parse_list(s->head_sizes, heads, "--head-size");
    if (ns < 0 || nh < 0) return -1;
    for (int j = 0; j < nh; j++) {
        if (s->width % heads[j])
            return qs_error("--width %d is not a multiple of head size %d (heads = width / head size)", s->width,
                            heads[j]);
        if (be->max_head_size && heads[j] > be->max_head_size)
            return qs_error("head size %d: %s takes heads up to %d wide", heads[j], be->name, be->max_head_size);
    }
    att_point *pts = calloc((size_t)ns * nh * 2, sizeof *pts);
    if (!pts) return qs_error("out of memory");
    qs_bench_ceilings c;
    int n = 0, rc = qs_bench_ceilings_measure(&c, be, quick ? QS_BENCH_QUICK_GEMM_N : qs_bench_gemm_n(be), 0);
    for (int i = 0; i < ns && !rc; i++)
        for (int j = 0; j < nh && !rc; j++)
            for (int causal = 1; causal >= 0 && !rc; causal--) {
                att_point *p = &pts[n++];
                *p = (att_point){.T = seqs[i], .hs = heads[j], .NH = s->width / heads[j], .causal = causal};
                p->B = s->tokens / p->T > 1 ? s->tokens / p->T : 1;
                if ((double)p->B * p->T * 3 * s->width > (double)(1u << 31) - 1)
                    rc = qs_error("attention at T=%d: B x T x 3 width must stay under 2^31 floats", p->T);
                else rc = time_point(be, p, repeats);
            }
    if (!rc) {
        if (json) print_json(be, pts, n, &c, repeats, argc, argv);
        else print_table(be, pts, n, &c, repeats, quick);
    }
    free(pts);
    return rc;
}

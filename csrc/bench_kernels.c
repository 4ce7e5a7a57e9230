/* `quasar bench kernels`: each core op of a backend at a realistic shape for it, timed
 * call by call (median of many; events on a GPU) over input sets rotated past the
 * last-level cache, as FLOP/s and bytes/s and as fractions of the GEMM and copy ceilings
 * measured at start on the same backend. The ops are the rows of one table (CASES); a
 * row says what one call reads, writes and computes, and how to call it. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_impl.h"
#include "quasar/backend.h"
#include "quasar/error.h"
#include "quasar/rng.h"

enum { MAX_BUF = 8, WARMUP_CALLS = 2 };

/* The sizes an op is timed at; each case reads the ones it needs. */
typedef struct kdims {
    int B, T, C, NH; /* batch, sequence, width, heads */
    int NKV;         /* attention's K/V heads (0: NH) */
    int N, F;        /* rows, hidden width (GEMM: N x C -> N x F) */
    int E, K, V;     /* experts, experts per token, classes */
    int H, k;        /* quadconv: H x H maps, k x k taps */
} kdims;

/* One call's buffers and cost. The float buffers make one rotation set; the int
 * buffers (indices in and out) are shared by the sets, in the backend's memory but for
 * those the op's contract puts on the host (host_ints, a bit per buffer). Bytes count
 * each input read once and each output written once, an accumulated (+=) output both. */
typedef struct kplan {
    int nf, ni;
    size_t f[MAX_BUF], i[MAX_BUF]; /* lengths in elements */
    unsigned host_ints;
    double flops, bytes;
    char shape[96];
} kplan;

typedef struct kcase {
    const char *name;
    kdims cpu, gpu, quick; /* the shapes on the CPU, on a GPU, and for --quick */
    void (*plan)(kplan *p, const kdims *d);
    void (*prepare)(const kdims *d, int *const *ib); /* index inputs; NULL: none */
    void (*run)(const qs_ops *ops, const kdims *d, float *const *f, int *const *ib);
} kcase;

static void bufs(kplan *p, int nf, const size_t *f, int ni, const size_t *i) {
    p->nf = nf;
    p->ni = ni;
    memcpy(p->f, f, (size_t)nf * sizeof *f);
    if (ni) memcpy(p->i, i, (size_t)ni * sizeof *i);
}

/* ---- GEMM: out[N,F] = inp[N,C] W[C,F] (GPT-2 small's c_fc on 2 x 1024 tokens) ---- */

static void gemm_fwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C, F = d->F;
    bufs(p, 3, (size_t[]){N * C, C * F, N * F}, 0, NULL);
    p->flops = 2.0 * N * C * F;
    p->bytes = 4.0 * (N * C + C * F + N * F);
    snprintf(p->shape, sizeof p->shape, "N=%d in=%d out=%d", d->N, d->C, d->F);
}
static void gemm_fwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->matmul_forward(f[2], f[0], f[1], NULL, d->N, d->C, d->F, QS_W_IN_OUT);
}

static void gemm_bwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C, F = d->F;
    bufs(p, 5, (size_t[]){N * F, N * C, C * F, N * C, C * F}, 0, NULL);
    p->flops = 4.0 * N * C * F; /* dinp and dW */
    p->bytes = 4.0 * (N * F + N * C + C * F + 2 * N * C + 2 * C * F);
    snprintf(p->shape, sizeof p->shape, "N=%d in=%d out=%d", d->N, d->C, d->F);
}
static void gemm_bwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->matmul_backward(f[3], f[4], NULL, f[0], f[1], f[2], d->N, d->C, d->F, QS_W_IN_OUT);
}

/* ---- a decode step's linear layer: one row (or a batch's 8), bound by reading the
 * weights, from fp32 weights (the GEMM's case at a few rows) and from bf16 panels
 * (matmul_forward_bf16, `--weights bf16`). The panels sit in a float buffer; the
 * benchmark's fill holds values bf16 represents exactly, so read as bf16 pairs they are
 * those values and zeros, never denormals or NaN. */

static void decode_bf16_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C, F = d->F, packed = qs_bf16_packed_elems(d->C, d->F);
    bufs(p, 3, (size_t[]){N * C, packed / 2, N * F}, 0, NULL); /* packed: a multiple of 32 bf16 */
    p->flops = 2.0 * N * C * F;
    p->bytes = 4.0 * (N * C + N * F) + 2.0 * packed;
    snprintf(p->shape, sizeof p->shape, "N=%d in=%d out=%d, bf16 weights", d->N, d->C, d->F);
}
static void decode_bf16_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->matmul_forward_bf16(f[2], f[0], (const uint16_t *)f[1], NULL, d->N, d->C, d->F);
}

/* ---- a feed-forward's GELU fused into its products, and the same work unfused ----
 * Forward: pre = inp W + b and gelu(pre) [N,F] (matmul_gelu_forward; unfused the GEMM with
 * its bias, then gelu_forward). Backward of the next layer [N,F] -> [N,C] through the GELU
 * (matmul_backward_dgelu; unfused matmul_backward into a buffer, then gelu_backward,
 * without the zeroing the model does first). The pairs share a plan, so their times
 * compare directly: on a GPU the fused rows are cuBLASLt's epilogues. */

static void ffn_fwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C, F = d->F;
    bufs(p, 5, (size_t[]){N * C, C * F, F, N * F, N * F}, 0, NULL);
    p->flops = 2.0 * N * C * F;
    p->bytes = 4.0 * (N * C + C * F + F + 2 * N * F);
    snprintf(p->shape, sizeof p->shape, "N=%d in=%d out=%d", d->N, d->C, d->F);
}
static void ffn_fwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->matmul_gelu_forward(f[3], f[4], f[0], f[1], f[2], d->N, d->C, d->F, QS_W_IN_OUT);
}
static void ffn_fwd_unfused_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->matmul_forward(f[3], f[0], f[1], f[2], d->N, d->C, d->F, QS_W_IN_OUT);
    o->gelu_forward(f[4], f[3], (size_t)d->N * d->F);
}

/* dout [N,C], act and pre [N,F], W [F,C], dpre [N,F], dW, dbias, and the unfused path's
 * [N,F] buffer for dout W^T */
static void ffn_bwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C, F = d->F;
    bufs(p, 8, (size_t[]){N * C, N * F, N * F, F * C, N * F, F * C, C, N * F}, 0, NULL);
    p->flops = 4.0 * N * C * F; /* dpre and dW */
    p->bytes = 4.0 * (N * C + 2 * N * F + F * C + N * F + 2 * F * C + 2 * C);
    snprintf(p->shape, sizeof p->shape, "N=%d in=%d out=%d", d->N, d->F, d->C);
}
static void ffn_bwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->matmul_backward_dgelu(f[4], f[5], f[6], f[0], f[1], f[2], f[3], d->N, d->F, d->C, QS_W_IN_OUT);
}
static void ffn_bwd_unfused_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->matmul_backward(f[7], f[5], f[6], f[0], f[1], f[3], d->N, d->F, d->C, QS_W_IN_OUT);
    o->gelu_backward(f[4], f[2], f[7], (size_t)d->N * d->F);
}

/* ---- causal attention as the model runs it: whole sequences as one block ----
 * FLOPs over the T(T+1)/2 visible pairs of each head: forward QK^T and PV; backward
 * FlashAttention's count, 2.5x the forward (QK^T recomputed, dP, dQ, dK, dV). */

static double att_pairs(const kdims *d) { return (double)d->B * d->T * (d->T + 1) / 2.0; }

static int att_kv_heads(const kdims *d) { return d->NKV ? d->NKV : d->NH; }

/* The whole-sequence block over a qkv buffer of B T rows of W = C + 2 Ckv floats. */
static qs_attn_block att_block(const kdims *d) {
    return qs_attn_block_self(d->B, d->T, d->C, d->NH, att_kv_heads(d), 1);
}

/* qkv's and out's floats; the shape's text */
static void att_sizes(const kdims *d, kplan *p, size_t *qkv, size_t *out) {
    const qs_attn_block blk = att_block(d);
    *qkv = (size_t)d->B * d->T * blk.q_stride;
    *out = (size_t)d->B * d->T * d->C;
    const int n = snprintf(p->shape, sizeof p->shape, "B=%d T=%d C=%d NH=%d", d->B, d->T, d->C, d->NH);
    if (d->NKV) snprintf(p->shape + n, sizeof p->shape - (size_t)n, " NKV=%d", d->NKV);
}

static void att_fwd_plan(kplan *p, const kdims *d) {
    size_t qkv, BTC;
    att_sizes(d, p, &qkv, &BTC);
    const size_t st = (size_t)d->B * d->NH * d->T;
    bufs(p, 3, (size_t[]){qkv, BTC, st}, 0, NULL);
    p->flops = 4.0 * att_pairs(d) * d->C;
    p->bytes = 4.0 * (qkv + BTC + st);
}
static void att_fwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    const qs_attn_block blk = att_block(d);
    o->attention_block_forward(f[1], f[2], f[0], f[0] + d->C, &blk);
}

/* dqkv, dout, qkv, out, lse, delta */
static void att_bwd_plan(kplan *p, const kdims *d) {
    size_t qkv, BTC;
    att_sizes(d, p, &qkv, &BTC);
    const size_t st = (size_t)d->B * d->NH * d->T;
    bufs(p, 6, (size_t[]){qkv, BTC, qkv, BTC, st, st}, 0, NULL);
    p->flops = 10.0 * att_pairs(d) * d->C;
    p->bytes = 4.0 * (3 * qkv + 2 * BTC + 3 * st);
}
static void att_bwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    const qs_attn_block blk = att_block(d);
    o->attention_delta(f[5], f[1], f[3], d->B, d->T, d->C, d->NH);
    o->attention_block_backward(f[0], f[0] + d->C, f[1], f[2], f[2] + d->C, f[4], f[5], &blk);
}

/* ---- MoE: router GEMM + routing (top-k, capacity assignment, router losses) + dispatch ---- */

static void moe_route_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C, E = d->E, K = d->K;
    bufs(p, 5, (size_t[]){N * C, C * E, N * E, N * K, N * K * C}, 5, (size_t[]){N * K, N * K, E, E, E + 1});
    p->host_ints = 1u << 2 | 1u << 3 | 1u << 4; /* qs_moe_load's arrays */
    p->flops = 2.0 * N * C * E; /* the rest moves data */
    p->bytes = 4.0 * (2 * N * C + C * E + 2 * N * E + 4 * N * K + N * K * C + 3 * E);
    snprintf(p->shape, sizeof p->shape, "N=%d C=%d E=%d top-%d dropless", d->N, d->C, d->E, d->K);
}
static void moe_route_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    o->matmul_forward(f[2], f[0], f[1], NULL, d->N, d->C, d->E, QS_W_IN_OUT);
    qs_moe_load load = {.routed = ib[2], .counts = ib[3], .offsets = ib[4]};
    const qs_moe_router r = {.N = d->N, .E = d->E, .K = d->K};
    o->moe_route_forward(&load, ib[0], f[3], ib[1], NULL, f[2], NULL, &r);
    o->moe_dispatch_forward(f[4], f[0], ib[1], d->N, d->K, d->C);
}

/* ---- MoE experts: Linear-GELU-Linear per expert over its packed rows, as grouped products ---- */

static void moe_experts_plan(kplan *p, const kdims *d) {
    const size_t R = (size_t)d->N * d->K, C = d->C, F = d->F, E = d->E;
    bufs(p, 6, (size_t[]){R * C, E * C * F, R * F, R * F, E * F * C, R * C}, 1, (size_t[]){E + 1});
    p->host_ints = 1u; /* the grouped products' offsets */
    p->flops = 4.0 * R * C * F;
    p->bytes = 4.0 * (2 * R * C + 2 * E * C * F + 4 * R * F);
    snprintf(p->shape, sizeof p->shape, "%d rows (N=%d top-%d) over E=%d, C=%d F=%d", d->N * d->K, d->N, d->K, d->E,
             d->C, d->F);
}
/* Balanced routing: expert e holds rows [R e / E, R (e+1) / E). */
static void moe_experts_prepare(const kdims *d, int *const *ib) {
    const long R = (long)d->N * d->K;
    for (int e = 0; e <= d->E; e++) ib[0][e] = (int)(R * e / d->E);
}
static void moe_experts_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    const int *off = ib[0];
    o->matmul_grouped_forward(f[2], f[0], f[1], NULL, off, d->E, d->C, d->F);
    o->gelu_forward(f[3], f[2], (size_t)off[d->E] * d->F);
    o->matmul_grouped_forward(f[5], f[3], f[4], NULL, off, d->E, d->F, d->C);
}

/* ---- quadratic depthwise conv, 2D "same" (issue 7's shape; its batch cut on a CPU) ---- */

static qs_conv_shape conv_shape(const kdims *d) {
    return (qs_conv_shape){d->B, d->H, d->H, d->C, d->k, d->k, d->k / 2, d->k / 2};
}

static void qconv_fwd_plan(kplan *p, const kdims *d) {
    const size_t NC = (size_t)d->B * d->H * d->H * d->C, W = 3 * (size_t)d->k * d->k * d->C, C3 = 3 * (size_t)d->C;
    bufs(p, 6, (size_t[]){NC, W, C3, NC, NC, NC}, 0, NULL);
    p->flops = (6.0 * d->k * d->k + 2) * NC; /* bench/NOTES.md */
    p->bytes = 4.0 * (4 * NC + W + C3);
    snprintf(p->shape, sizeof p->shape, "B=%d %dx%d C=%d k=%d", d->B, d->H, d->H, d->C, d->k);
}
static void qconv_fwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    const qs_conv_shape s = conv_shape(d);
    o->quadconv_forward(f[3], f[4], f[5], f[0], f[1], f[2], &s);
}

static void qconv_bwd_plan(kplan *p, const kdims *d) {
    const size_t NC = (size_t)d->B * d->H * d->H * d->C, W = 3 * (size_t)d->k * d->k * d->C, C3 = 3 * (size_t)d->C;
    bufs(p, 8, (size_t[]){NC, W, C3, NC, NC, W, NC, NC}, 0, NULL);
    p->flops = 11.0 * d->k * d->k * NC; /* dW 6, dx 5 per tap (bench/NOTES.md) */
    p->bytes = 4.0 * (6 * NC + 3 * W + 2 * C3);
    snprintf(p->shape, sizeof p->shape, "B=%d %dx%d C=%d k=%d", d->B, d->H, d->H, d->C, d->k);
}
static void qconv_bwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    const qs_conv_shape s = conv_shape(d);
    o->quadconv_backward(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], &s);
}

/* ---- layernorm over rows of C (elementwise FLOPs: mean 1, variance 3, normalise 2,
 *      affine 2; backward about 14) ---- */

static void ln_fwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C;
    bufs(p, 6, (size_t[]){N * C, N, N, N * C, C, C}, 0, NULL);
    p->flops = 8.0 * N * C;
    p->bytes = 4.0 * (2 * N * C + 2 * C + 2 * N);
    snprintf(p->shape, sizeof p->shape, "N=%d C=%d", d->N, d->C);
}
static void ln_fwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->layernorm_forward(f[0], f[1], f[2], f[3], f[4], f[5], d->N, d->C);
}

/* fused with the residual add before it (+1 FLOP; reads the residual and the branch,
 * writes their sum and the normalised rows) */
static void res_ln_fwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C;
    bufs(p, 8, (size_t[]){N * C, N * C, N, N, N * C, N * C, C, C}, 0, NULL);
    p->flops = 9.0 * N * C;
    p->bytes = 4.0 * (4 * N * C + 2 * C + 2 * N);
    snprintf(p->shape, sizeof p->shape, "N=%d C=%d", d->N, d->C);
}
static void res_ln_fwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->residual_layernorm_forward(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], d->N, d->C);
}

static void ln_bwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, C = d->C;
    bufs(p, 8, (size_t[]){N * C, C, C, N * C, N * C, C, N, N}, 0, NULL);
    p->flops = 14.0 * N * C;
    p->bytes = 4.0 * (4 * N * C + 5 * C + 2 * N);
    snprintf(p->shape, sizeof p->shape, "N=%d C=%d", d->N, d->C);
}
static void ln_bwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    (void)ib;
    o->layernorm_backward(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], d->N, d->C);
}

/* ---- classifier: softmax cross-entropy over V classes (per logit, exp = 1 FLOP:
 *      forward max, subtract, exp, sum = 4; backward recomputes them, then scales and
 *      accumulates = 7) ---- */

static void xent_targets(const kdims *d, int *const *ib) {
    for (int n = 0; n < d->N; n++) ib[0][n] = (int)qs_rng_below(0x5eed, 0x7a, (uint64_t)n, (uint64_t)d->V);
}

static void xent_fwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, V = d->V;
    bufs(p, 2, (size_t[]){N, N * V}, 1, (size_t[]){N});
    p->flops = 4.0 * N * V;
    p->bytes = 4.0 * (N * V + 2 * N);
    snprintf(p->shape, sizeof p->shape, "N=%d V=%d", d->N, d->V);
}
static void xent_fwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    o->xent_forward(f[0], f[1], ib[0], d->N, d->V);
}

static void xent_bwd_plan(kplan *p, const kdims *d) {
    const size_t N = d->N, V = d->V;
    bufs(p, 2, (size_t[]){N * V, N}, 1, (size_t[]){N});
    p->flops = 4.0 * N * V;                 /* two subtractions, exp, the scale */
    p->bytes = 4.0 * (2 * N * V + 2 * N); /* the logits read, their gradient written in place; losses, targets */
    snprintf(p->shape, sizeof p->shape, "N=%d V=%d", d->N, d->V);
}
static void xent_bwd_run(const qs_ops *o, const kdims *d, float *const *f, int *const *ib) {
    o->xent_backward(f[0], f[1], ib[0], 1.0f / (float)d->N, d->N, d->V);
}

/* CPU, GPU (GPT-2 124M's at 8 x 1024 tokens; issue 6's shape A; issue 7's shape), quick */
#define GEMM_DIMS {.N = 2048, .C = 768, .F = 3072}, {.N = 8192, .C = 768, .F = 3072}, {.N = 64, .C = 32, .F = 48}
/* a decode step through GPT-2 124M's c_fc (both), and a quick one with a partial panel */
#define DECODE_DIMS {.N = 1, .C = 768, .F = 3072}, {.N = 1, .C = 768, .F = 3072}, {.N = 1, .C = 32, .F = 48}
/* the same for 8 sequences decoding together, and a quick one with a partial register tile */
#define DECODE_BATCH_DIMS {.N = 8, .C = 768, .F = 3072}, {.N = 8, .C = 768, .F = 3072}, {.N = 3, .C = 32, .F = 48}
#define ATT_DIMS                                                                                                      \
    {.B = 4, .T = 256, .C = 384, .NH = 6}, {.B = 8, .T = 1024, .C = 768, .NH = 12}, {.B = 1, .T = 16, .C = 16, .NH = 2}
/* multi-query: one K/V head, one sequence (long-context decoding's and fine-tuning's case) */
#define MQA_DIMS                                                                                                      \
    {.B = 1, .T = 1024, .C = 768, .NH = 12, .NKV = 1}, {.B = 1, .T = 4096, .C = 768, .NH = 12, .NKV = 1},             \
        {.B = 1, .T = 16, .C = 16, .NH = 2, .NKV = 1}
#define MOE_DIMS                                                                                                      \
    {.N = 2048, .C = 384, .E = 8, .K = 2, .F = 1536}, {.N = 16384, .C = 768, .E = 8, .K = 2, .F = 3072},             \
        {.N = 32, .C = 16, .E = 4, .K = 2, .F = 32}
#define QCONV_DIMS                                                                                                    \
    {.B = 8, .H = 56, .C = 64, .k = 7}, {.B = 64, .H = 56, .C = 256, .k = 7}, {.B = 1, .H = 8, .C = 8, .k = 3}
#define LN_DIMS {.N = 8192, .C = 768}, {.N = 16384, .C = 768}, {.N = 16, .C = 32}
#define XENT_DIMS {.N = 1024, .V = 50257}, {.N = 8192, .V = 50257}, {.N = 8, .V = 64}

static const kcase CASES[] = {
    {"gemm_fwd", GEMM_DIMS, gemm_fwd_plan, NULL, gemm_fwd_run},
    {"gemm_bwd", GEMM_DIMS, gemm_bwd_plan, NULL, gemm_bwd_run},
    {"decode_fp32", DECODE_DIMS, gemm_fwd_plan, NULL, gemm_fwd_run},
    {"decode_bf16", DECODE_DIMS, decode_bf16_plan, NULL, decode_bf16_run},
    {"decode_batch_fp32", DECODE_BATCH_DIMS, gemm_fwd_plan, NULL, gemm_fwd_run},
    {"decode_batch_bf16", DECODE_BATCH_DIMS, decode_bf16_plan, NULL, decode_bf16_run},
    {"ffn_gelu_fwd", GEMM_DIMS, ffn_fwd_plan, NULL, ffn_fwd_run},
    {"ffn_gelu_fwd_unfused", GEMM_DIMS, ffn_fwd_plan, NULL, ffn_fwd_unfused_run},
    {"ffn_gelu_bwd", GEMM_DIMS, ffn_bwd_plan, NULL, ffn_bwd_run},
    {"ffn_gelu_bwd_unfused", GEMM_DIMS, ffn_bwd_plan, NULL, ffn_bwd_unfused_run},
    {"attention_fwd", ATT_DIMS, att_fwd_plan, NULL, att_fwd_run},
    {"attention_bwd", ATT_DIMS, att_bwd_plan, NULL, att_bwd_run},
    {"attention_mqa_fwd", MQA_DIMS, att_fwd_plan, NULL, att_fwd_run},
    {"attention_mqa_bwd", MQA_DIMS, att_bwd_plan, NULL, att_bwd_run},
    {"moe_route_dispatch", MOE_DIMS, moe_route_plan, NULL, moe_route_run},
    {"moe_experts_fwd", MOE_DIMS, moe_experts_plan, moe_experts_prepare, moe_experts_run},
    {"quadconv_fwd", QCONV_DIMS, qconv_fwd_plan, NULL, qconv_fwd_run},
    {"quadconv_bwd", QCONV_DIMS, qconv_bwd_plan, NULL, qconv_bwd_run},
    {"layernorm_fwd", LN_DIMS, ln_fwd_plan, NULL, ln_fwd_run},
    {"residual_layernorm_fwd", LN_DIMS, res_ln_fwd_plan, NULL, res_ln_fwd_run},
    {"layernorm_bwd", LN_DIMS, ln_bwd_plan, NULL, ln_bwd_run},
    {"xent_fwd", XENT_DIMS, xent_fwd_plan, xent_targets, xent_fwd_run},
    {"xent_bwd", XENT_DIMS, xent_bwd_plan, xent_targets, xent_bwd_run},
};
enum { N_CASES = sizeof CASES / sizeof *CASES };

typedef struct kresult {
    kplan p;
    int sets;
    qs_bench_stats ms;
} kresult;

/* One call of a case, for the backend's timer. */
typedef struct kcall {
    const kcase *c;
    const qs_ops *ops;
    const kdims *d;
    float *f[MAX_BUF];
    int *const *ib;
} kcall;

static void run_call(void *arg) {
    const kcall *k = arg;
    k->c->run(k->ops, k->d, k->f, k->ib);
}

/* Times WARMUP_CALLS + repeats calls, call c on set c mod sets, where enough sets are
 * made for them to span `rotate` bytes, so that a call finds its inputs in memory
 * rather than in the cache the previous call warmed. */
static int time_case(const qs_backend *be, const kcase *c, const kdims *d, size_t rotate, int repeats, kresult *r) {
    kplan *p = &r->p;
    memset(p, 0, sizeof *p);
    c->plan(p, d);
    size_t set_floats = 0;
    for (int j = 0; j < p->nf; j++) set_floats += qs_bench_round16(p->f[j]);
    r->sets = (int)((rotate + set_floats * sizeof(float) - 1) / (set_floats * sizeof(float)));
    if (r->sets < 1) r->sets = 1;
    float *pool = be->alloc((size_t)r->sets * set_floats * sizeof *pool);
    double *ms = malloc((size_t)repeats * sizeof *ms);
    int *host[MAX_BUF] = {0}, *dev[MAX_BUF] = {0}, *ib[MAX_BUF] = {0}, rc = !pool || !ms ? -1 : 0;
    for (int j = 0; j < p->ni && !rc; j++) {
        const bool on_host = p->host_ints >> j & 1;
        if (!(host[j] = calloc(p->i[j], sizeof **host)) || (!on_host && !(dev[j] = be->alloc(p->i[j] * sizeof **dev))))
            rc = -1;
        ib[j] = on_host ? host[j] : dev[j];
    }
    if (!rc) rc = qs_bench_fill(be, pool, (size_t)r->sets * set_floats, 0x6b);
    if (!rc) {
        if (c->prepare) c->prepare(d, host);
        for (int j = 0; j < p->ni; j++)
            if (dev[j]) be->upload(dev[j], host[j], p->i[j] * sizeof **host);
        kcall k = {c, be->ops, d, {NULL}, ib};
        for (int call = 0; call < WARMUP_CALLS + repeats; call++) {
            float *base = pool + (size_t)(call % r->sets) * set_floats;
            for (int j = 0; j < p->nf; j++) {
                k.f[j] = base;
                base += qs_bench_round16(p->f[j]);
            }
            const double t = be->time_ms(run_call, &k);
            if (call >= WARMUP_CALLS) ms[call - WARMUP_CALLS] = t;
        }
        r->ms = qs_bench_stats_of(ms, repeats);
    }
    be->free(pool);
    free(ms);
    for (int j = 0; j < p->ni; j++) {
        free(host[j]);
        be->free(dev[j]);
    }
    return rc ? qs_error("out of memory on %s for %s (%d input sets of %zu MiB)", be->name, c->name, r->sets,
                         set_floats * sizeof(float) >> 20)
              : 0;
}

/* Twice the backend's last-level cache (32 MiB when it does not say), within [64 MiB,
 * 1 GiB]. */
static size_t rotation_bytes(const qs_device_info *dev) {
    const size_t r = 2 * (dev->cache_bytes ? dev->cache_bytes : (size_t)32 << 20);
    return r < ((size_t)64 << 20) ? (size_t)64 << 20 : r > ((size_t)1 << 30) ? (size_t)1 << 30 : r;
}

/* The cases --only selects (all without it): names starting with one of its
 * comma-separated prefixes. Returns how many, or -1 with qs_error for a prefix that
 * names none. */
static int select_cases(const char *only, int *sel) {
    int n = 0;
    for (int i = 0; i < N_CASES; i++) {
        bool take = !only;
        for (const char *t = only; t && *t && !take;) {
            const size_t len = strcspn(t, ",");
            take = len > 0 && !strncmp(CASES[i].name, t, len);
            t += len + (t[len] == ',');
        }
        if (take) sel[n++] = i;
    }
    for (const char *t = only; t && *t;) {
        const size_t len = strcspn(t, ",");
        bool known = false;
        for (int i = 0; i < N_CASES && !known; i++) known = len > 0 && !strncmp(CASES[i].name, t, len);
        if (!known) return qs_error("--only: no op's name starts with '%.*s' (gemm, decode, ffn, attention, moe, "
                                    "quadconv, layernorm, residual_layernorm, xent)", (int)len, t);
        t += len + (t[len] == ',');
    }
    return n;
}

static void print_table(const qs_backend *be, const kresult *res, const int *sel, int n, const qs_bench_ceilings *c,
                        size_t rotate, int repeats, bool quick) {
    printf("quasar bench kernels: %s, %d threads, median of %d calls%s\n", be->name, omp_get_max_threads(), repeats,
           quick ? " (--quick: tiny shapes, a smoke run, not a measurement)" : "");
    printf("  ceilings: %d^3 GEMM %.1f GFLOP/s; copy of %zu MiB %.1f GB/s (read + write); inputs rotated over "
           "%zu MiB\n",
           c->gemm_n, c->gemm_flop_s / 1e9, c->copy_bytes >> 20, c->copy_byte_s / 1e9, rotate >> 20);
    printf("%-22s %-40s %10s %9s %7s %8s %7s %5s\n", "op", "shape", "ms", "GFLOP/s", "of GEMM", "GB/s", "of copy",
           "sets");
    for (int i = 0; i < n; i++) {
        const kresult *r = &res[i];
        const double s = r->ms.median / 1e3;
        printf("%-22s %-40s %10.4f %9.2f %7.3f %8.2f %7.3f %5d\n", CASES[sel[i]].name, r->p.shape, r->ms.median,
               r->p.flops / s / 1e9, r->p.flops / s / c->gemm_flop_s, r->p.bytes / s / 1e9,
               r->p.bytes / s / c->copy_byte_s, r->sets);
    }
    printf("  other processes took %.0f%% of the CPU time meanwhile\n", 100 * qs_bench_others_cpu());
}

static void print_json(const qs_backend *be, const kresult *res, const int *sel, int n, const qs_bench_ceilings *c,
                       size_t rotate, int repeats, bool quick, int argc, char **argv) {
    qs_bench_json_head(stdout, be, argc, argv, c);
    printf(", \"quick\": %s, \"repeats\": %d, \"rotate_mib\": %zu, \"kernels\": [", quick ? "true" : "false", repeats,
           rotate >> 20);
    for (int i = 0; i < n; i++) {
        const kresult *r = &res[i];
        const double s = r->ms.median / 1e3;
        printf("%s\n    {\"name\": \"%s\", \"shape\": \"%s\", \"sets\": %d", i ? "," : "", CASES[sel[i]].name,
               r->p.shape, r->sets);
        qs_bench_json_num(stdout, "ms_median", r->ms.median);
        qs_bench_json_num(stdout, "ms_p10", r->ms.p10);
        qs_bench_json_num(stdout, "ms_p90", r->ms.p90);
        qs_bench_json_num(stdout, "flops", r->p.flops);
        qs_bench_json_num(stdout, "bytes", r->p.bytes);
        qs_bench_json_num(stdout, "gflop_per_s", r->p.flops / s / 1e9);
        qs_bench_json_num(stdout, "gb_per_s", r->p.bytes / s / 1e9);
        qs_bench_json_num(stdout, "frac_gemm", r->p.flops / s / c->gemm_flop_s);
        qs_bench_json_num(stdout, "frac_copy", r->p.bytes / s / c->copy_byte_s);
        fputc('}', stdout);
    }
    fputs("\n  ], \"results\": [", stdout);
    for (int i = 0; i < n; i++) {
        const kresult *r = &res[i];
        const char *op = CASES[sel[i]].name;
        const double s = r->ms.median / 1e3;
        char name[64], metric[256];
        snprintf(name, sizeof name, "kernel_%s_ms", op);
        snprintf(metric, sizeof metric, "ms per call, median of %d (%s; p10 %.4f, p90 %.4f)", repeats, r->p.shape,
                 r->ms.p10, r->ms.p90);
        qs_bench_json_result(stdout, i == 0, name, metric, r->ms.median);
        snprintf(name, sizeof name, "kernel_%s_gflop_per_s", op);
        snprintf(metric, sizeof metric, "GFLOP/s, median of %d calls (%s, %.4f ms); %.3f of the GEMM ceiling",
                 repeats, r->p.shape, r->ms.median, r->p.flops / s / c->gemm_flop_s);
        qs_bench_json_result(stdout, false, name, metric, r->p.flops / s / 1e9);
        snprintf(name, sizeof name, "kernel_%s_gb_per_s", op);
        snprintf(metric, sizeof metric, "GB/s moved, median of %d calls (%s); %.3f of the copy ceiling", repeats,
                 r->p.shape, r->p.bytes / s / c->copy_byte_s);
        qs_bench_json_result(stdout, false, name, metric, r->p.bytes / s / 1e9);
    }
    fputs("\n  ]}\n", stdout);
}

int qs_bench_kernels(const qs_backend *be, bool json, bool quick, int repeats, const char *only, int argc,
                     char **argv) {
    int sel[N_CASES];
    const int n = select_cases(only, sel);
    if (n < 0) return -1;
    qs_device_info dev = {.cache_bytes = 0};
    be->describe(&dev);
    const bool cpu = be == qs_backend_cpu();
    const size_t rotate = quick ? 0 : rotation_bytes(&dev);
    /* the copy ceiling: buffers of half the rotation on the CPU, 1 GiB on a GPU (its L2
     * and its bandwidth are both larger) */
    const size_t copy_bytes = quick ? (size_t)8 << 20 : cpu ? rotate / 2 : (size_t)1 << 30;
    qs_bench_ceilings c;
    kresult res[N_CASES];
    if (qs_bench_ceilings_measure(&c, be, quick ? QS_BENCH_QUICK_GEMM_N : qs_bench_gemm_n(be), copy_bytes)) return -1;
    for (int i = 0; i < n; i++) {
        const kcase *k = &CASES[sel[i]];
        if (time_case(be, k, quick ? &k->quick : cpu ? &k->cpu : &k->gpu, rotate, repeats, &res[i])) return -1;
    }
    if (json) print_json(be, res, sel, n, &c, rotate, repeats, quick, argc, argv);
    else print_table(be, res, sel, n, &c, rotate, repeats, quick);
    return 0;
}

/* CPU reference backend internals: one qs_cpu_<op> per qs_ops field (same
 * signature, same semantics as documented in quasar/ops.h), plus the few helpers
 * the op files share. */
#ifndef QUASAR_CPU_OPS_H
#define QUASAR_CPU_OPS_H

#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

#include "quasar/ops.h"

/* Element-wise ops below this many elements run on one thread: forking the team
 * costs more than the work. */
#define QS_CPU_PAR_MIN ((size_t)1 << 15)

/* e^x in plain arithmetic, so loops over it vectorise (libm's expf is a call
 * per element). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6
 * Taylor polynomial (measured worst 2.4e-7 relative over [-87, 88]) scaled by 2^n through the exponent bits.
 * x is clamped to [-87, 88]: below, the result is ~0 (1.6e-38) instead of a denormal. */
static inline float qs_cpu_expf(float x) {
    /* ternaries, not fminf/fmaxf (libm calls without -ffast-math); NaN compares false and
     * becomes -87, so the int conversion below is always defined (callers such as GELU
     * still return NaN for a NaN input through their other factor) */
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    /* round to nearest by the 1.5 * 2^23 trick: floorf/nearbyintf do not vectorise
     * without -fno-trapping-math */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* acc + a * w in one instruction where the target has FMA (ISO C mode does not contract
 * the expression itself; the few-row tiles are bound by arithmetic beyond a row or two).
 * Without FMA, fmaf would be a library call a product: the plain expression instead. */
#ifdef __FMA__
#define QS_CPU_MADD(a, w, acc) fmaf(a, w, acc)
#else
#define QS_CPU_MADD(a, w, acc) ((a) * (w) + (acc))
#endif

/* embed.c */
void qs_cpu_embed_forward(float *out, const int *tok, const int *pos, const float *wte,
                          const float *wpe, int N, int C);
void qs_cpu_embed_backward(float *dwte, float *dwpe, const float *dout, const int *tok,
                           const int *pos, int N, int C);

/* layernorm.c */
void qs_cpu_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C);
void qs_cpu_residual_layernorm_forward(float *res, float *out, float *mean, float *rstd, const float *inp,
                                       const float *branch, const float *w, const float *b, int N, int C);
void qs_cpu_layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *mean,
                               const float *rstd, int N, int C);

/* matmul_bf16.c */
void qs_cpu_matmul_pack_bf16(uint16_t *dst, const float *w, int n_in, int n_out, qs_weight_layout layout);
void qs_cpu_matmul_forward_bf16(float *out, const float *inp, const uint16_t *w, const float *bias, int N, int n_in,
                                int n_out);

/* The few-row tiles (matmul_rows.c, matmul_bf16.c) keep the sums of up to
 * QS_CPU_TILE_ROWS input rows in registers. QS_CPU_TILE_SWITCH(rows, TILE) runs TILE(r)
 * with r the constant min(rows, QS_CPU_TILE_ROWS), so each row count compiles to its
 * own unrolled tile (rows >= 1). */
#define QS_CPU_TILE_ROWS 8
#define QS_CPU_TILE_SWITCH(rows, TILE)                                                                                \
    switch ((rows) < QS_CPU_TILE_ROWS ? (rows) : QS_CPU_TILE_ROWS) {                                                 \
    case 1: TILE(1); break;                                                                                           \
    case 2: TILE(2); break;                                                                                           \
    case 3: TILE(3); break;                                                                                           \
    case 4: TILE(4); break;                                                                                           \
    case 5: TILE(5); break;                                                                                           \
    case 6: TILE(6); break;                                                                                           \
    case 7: TILE(7); break;                                                                                           \
    default: TILE(QS_CPU_TILE_ROWS); break;                                                                           \
    }

/* Products of fewer multiply-adds run on one thread: forking the team costs more. */
#define QS_CPU_GEMM_PAR_MIN ((size_t)1 << 15)

/* matmul_rows.c: qs_cpu_matmul_forward's products of up to QS_CPU_FEW_ROWS - 1 rows
 * (SGEMM catches up at 20-32 rows of GPT-2 124M's products, bench/NOTES.md) */
#define QS_CPU_FEW_ROWS 24
void qs_cpu_matmul_rows_forward(float *out, const float *inp, const float *w, const float *bias, int N, int n_in,
                                int n_out, qs_weight_layout layout);

/* matmul.c */
void qs_cpu_matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N,
                           int n_in, int n_out, qs_weight_layout layout);
void qs_cpu_matmul_acc(float *out, const float *inp, const float *w, float alpha, int N, int n_in, int n_out,
                       qs_weight_layout layout);
void qs_cpu_matmul_gelu_forward(float *pre, float *out, const float *inp, const float *w, const float *bias, int N,
                                int n_in, int n_out, qs_weight_layout layout);
void qs_cpu_matmul_backward_dgelu(float *dpre, float *dw, float *dbias, const float *dout, const float *act,
                                  const float *pre, const float *w, int N, int n_in, int n_out,
                                  qs_weight_layout layout);
void qs_cpu_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                            const float *inp, const float *w, int N, int n_in, int n_out,
                            qs_weight_layout layout);
void qs_cpu_matmul_grouped_forward(float *out, const float *inp, const float *w, const float *bias,
                                   const int *offsets, int groups, int n_in, int n_out);
void qs_cpu_matmul_grouped_backward(float *dinp, float *dw, float *dbias, const float *dout,
                                    const float *inp, const float *w, const int *offsets, int groups,
                                    int n_in, int n_out);

/* kv_cache.c */
void qs_cpu_kv_cache_fill(float *kcache, float *vcache, const float *qkv, int B, int T, int C, int NH, int NKV,
                          int max_T);
void qs_cpu_attention_decode(float *out, float *kcache, float *vcache, const float *qkv, int B, int C, int NH,
                             int NKV, const int *slots, const int *pos, int max_T);

/* attention_block.c */
void qs_cpu_attention_block_forward(float *out, float *lse, const float *q, const float *kv,
                                    const qs_attn_block *blk);
void qs_cpu_attention_merge(float *out, float *lse, const float *out_b, const float *lse_b,
                            const qs_attn_block *blk);
void qs_cpu_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int C,
                            int NH);
void qs_cpu_attention_block_backward(float *dq, float *dkv, const float *dout, const float *q,
                                     const float *kv, const float *lse, const float *delta,
                                     const qs_attn_block *blk);
void qs_cpu_kv_pack_forward(float *kv, const float *qkv, int B, int T, int C, int Ckv);
void qs_cpu_kv_pack_backward(float *dqkv, const float *dkv, int B, int T, int C, int Ckv);

/* activation.c */
void qs_cpu_gelu_forward(float *out, const float *inp, size_t n);
void qs_cpu_gelu_backward(float *dinp, const float *inp, const float *dout, size_t n);
/* d[i] = d[i] * gelu'(pre[i]): the GELU's backward in place, for matmul_backward_dgelu */
void qs_cpu_gelu_grad_scale(float *d, const float *pre, size_t n);
void qs_cpu_relu_forward(float *out, const float *inp, size_t n);
void qs_cpu_relu_backward(float *dinp, const float *inp, const float *dout, size_t n);
void qs_cpu_dropout_forward(float *out, const float *inp, float p, uint64_t seed, uint64_t stream,
                            const int64_t *row_ids, size_t N, size_t W);
void qs_cpu_dropout_backward(float *dinp, const float *dout, float p, uint64_t seed,
                             uint64_t stream, const int64_t *row_ids, size_t N, size_t W);

/* xent.c */
void qs_cpu_xent_forward(float *losses, const float *logits, const int *targets, int N, int V);
void qs_cpu_xent_backward(float *logits, const float *losses, const int *targets, float dloss, int N, int V);

/* moe.c */
void qs_cpu_moe_route_forward(qs_moe_load *load, int *idx, float *gate, int *slot, float *h,
                              const float *clean, const float *noise_logits, const qs_moe_router *r);
void qs_cpu_moe_route_backward(float *dclean, float *dnoise, const float *dgate, const int *idx,
                               const float *gate, const float *x, const float *noise_logits,
                               const qs_moe_load *load, float balance_coef, float z_coef,
                               const qs_moe_router *r);
void qs_cpu_moe_dispatch_forward(float *xe, const float *x, const int *slot, int N, int K, int C);
void qs_cpu_moe_dispatch_backward(float *dx, const float *dxe, const int *slot, int N, int K,
                                  int C);
void qs_cpu_moe_combine_forward(float *y, const float *ye, const float *gate, const int *slot,
                                int N, int K, int C);
void qs_cpu_moe_combine_backward(float *dye, float *dgate, const float *dy, const float *ye,
                                 const float *gate, const int *slot, int N, int K, int C);

/* quadconv.c */
void qs_cpu_quadconv_forward(float *y, float *fa, float *fb, const float *x, const float *w,
                             const float *bias, const qs_conv_shape *s);
void qs_cpu_quadconv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                              const float *w, const float *fa, const float *fb,
                              const qs_conv_shape *s);

/* spatial.c */
void qs_cpu_space_to_depth_forward(float *out, const float *inp, int B, int H, int W, int C, int p);
void qs_cpu_space_to_depth_backward(float *dinp, const float *dout, int B, int H, int W, int C, int p);
void qs_cpu_avgpool_forward(float *out, const float *inp, int B, int N, int C);
void qs_cpu_avgpool_backward(float *dinp, const float *dout, int B, int N, int C);

/* residual.c */
void qs_cpu_layer_scale_forward(float *out, const float *resid, const float *inp, const float *gamma,
                                float p, uint64_t seed, uint64_t stream, uint64_t sample0, int B, int N,
                                int C);
void qs_cpu_layer_scale_backward(float *dinp, float *dgamma, const float *dout, const float *inp,
                                 const float *gamma, float p, uint64_t seed, uint64_t stream,
                                 uint64_t sample0, int B, int N, int C);
/* optim.c */
double qs_cpu_sumsq(const float *g, size_t n);
void qs_cpu_adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                         float beta1, float beta2, float eps, float wd, int t, float grad_scale);

/* backend.c: malloc for an op's temporary buffer. Ops return void, so running out
 * of memory here cannot be reported; it aborts rather than train on wrong gradients. */
void *qs_cpu_scratch(size_t bytes);
/* blas.c: makes BLAS single-threaded (the ops parallelise around it, see matmul.c);
 * the name of the OpenBLAS kernels that run. */
void qs_cpu_blas_init(void);
const char *qs_cpu_blas_core(void);

/* Called by every thread of a parallel region: adds each thread's `local` to the
 * shared *total in thread-number order, so the sum does not depend on timing
 * (an OpenMP reduction clause combines in an unspecified order). */
static inline void qs_cpu_ordered_add(double *total, double local) {
    const int nt = omp_get_num_threads();
#pragma omp for ordered schedule(static, 1)
    for (int t = 0; t < nt; t++) {
#pragma omp ordered
        *total += local;
    }
}

static inline float qs_cpu_dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += a * x */
static inline void qs_cpu_axpy(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* Max of x[0..n) and, in *sum, sum of exp(x - max): softmax is exp(x - max) / sum,
 * logsumexp is max + log(sum). Subtracting the max keeps exp from overflowing. `omp simd`
 * lets the loops keep per-lane partials and combine them at the end, an order fixed at
 * compile time, so the result is the same on every run. The sum is taken in float over
 * pieces of 1024 (vector float adds; double ones ran 8x slower) and carried in double.
 * y (NULL: none) gets the exponentials, y == x allowed: one pass makes and sums them. */
static inline float qs_cpu_softmax_pass(const float *x, float *y, int n, double *sum) {
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double s = 0.0;
    for (int i0 = 0; i0 < n; i0 += 1024) {
        const int i1 = n - i0 < 1024 ? n : i0 + 1024;
        float piece = 0.0f;
        if (y) {
#pragma omp simd reduction(+ : piece)
            for (int i = i0; i < i1; i++) {
                y[i] = qs_cpu_expf(x[i] - mx);
                piece += y[i];
            }
        } else {
#pragma omp simd reduction(+ : piece)
            for (int i = i0; i < i1; i++) piece += qs_cpu_expf(x[i] - mx);
        }
        s += piece;
    }
    *sum = s;
    return mx;
}

static inline float qs_cpu_softmax_stats(const float *x, int n, double *sum) {
    return qs_cpu_softmax_pass(x, NULL, n, sum);
}

#endif

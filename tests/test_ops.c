/* CPU backend ops: forward results against naive double-precision references,
 * every backward against central finite differences, plus the accumulate and
 * NULL-gradient contracts. Inputs (and some sizes) are fresh every run; the seed
 * is printed, and QS_TEST_SEED=<seed> replays a failure. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quasar/backend.h"
#include "quasar/bf16.h"
#include "quasar/rng.h"
#include "test_seed.h"

static const qs_ops *ops;
static uint64_t test_seed, draws;

/* ---- random inputs and buffers ---- */

static uint64_t rnd_u64(void) { return qs_rng_u64(test_seed, 0x7e57, draws++); }
static float rnd_uniform(float lo, float hi) {
    return lo + (hi - lo) * qs_rng_uniform(test_seed, 0x7e57, draws++);
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd_u64() % (uint64_t)(hi - lo + 1)); }

static float *alloc_f(size_t n) {
    float *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}
static double *alloc_d(size_t n) {
    double *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}
static int *alloc_i(size_t n) {
    int *p = calloc(n ? n : 1, sizeof *p);
    assert_non_null(p);
    return p;
}
static float *rnd_tensor(size_t n, float lo, float hi) {
    float *p = alloc_f(n);
    for (size_t i = 0; i < n; i++) p[i] = rnd_uniform(lo, hi);
    return p;
}
static float *copy_tensor(const float *x, size_t n) {
    float *p = alloc_f(n);
    memcpy(p, x, n * sizeof *p);
    return p;
}
/* Outputs are filled with NaN before a forward call, so an element the op fails
 * to write shows up in every comparison and in the loss. */
static void poison(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}
/* Random logits on a grid with gaps of at least 0.2: top-k never flips under
 * finite-difference steps. */
static void separated_logits(float *x, int N, int E) {
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) x[(size_t)n * E + e] = e * 0.3f + rnd_uniform(0.0f, 0.1f);
    for (int n = 0; n < N; n++) /* shuffle each row */
        for (int e = E - 1; e > 0; e--) {
            const int j = rnd_int(0, e);
            float *r = x + (size_t)n * E, tmp = r[e];
            r[e] = r[j];
            r[j] = tmp;
        }
}
/* K distinct random experts per token. */
static void rnd_routes(int *idx, int N, int E, int K) {
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int e, dup;
            do {
                e = rnd_int(0, E - 1);
                dup = 0;
                for (int j = 0; j < k; j++) dup |= idx[n * K + j] == e;
            } while (dup);
            idx[n * K + k] = e;
        }
}

static double weighted_sum(const float *out, const float *R, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)out[i] * R[i];
    return s;
}

/* Fails unless |got - want| <= atol + rtol * |want| everywhere (NaN fails). */
static void check_close(const char *what, const float *got, const double *want, size_t n,
                        double rtol, double atol) {
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)got[i] - want[i]) <= atol + rtol * fabs(want[i])))
            fail_msg("%s[%zu]: got %.9g, want %.9g", what, i, (double)got[i], want[i]);
}

/* ---- gradient checking ---- */

typedef struct {
    const char *name;
    float *x;
    size_t n;
} param;

/* loss(ctx): poisons the op's outputs, runs the forward, returns L = sum(out * R)
 * in double (R fixed per test). backward(ctx, g): runs the backward with dout = R,
 * accumulating the gradient of params[i] into g[i] (NULL: not wanted). */
typedef double (*loss_fn)(void *ctx);
typedef void (*backward_fn)(void *ctx, float **g);

#define MAX_PARAMS 3
#define FD_COORDS 240  /* coordinates checked per parameter (all if fewer) */
#define GRAD_TOL 5e-3  /* ||fd - analytic|| / ||analytic|| */

static void zero_grads(float **g, const param *ps, int np, int skip) {
    for (int i = 0; i < np; i++) g[i] = i == skip ? NULL : alloc_f(ps[i].n);
}
static void free_grads(float **g, int np) {
    for (int i = 0; i < np; i++) free(g[i]);
}

static void check_gradients(const char *op, loss_fn loss, backward_fn backward, void *ctx,
                            const param *ps, int np, double eps) {
    assert_true(np <= MAX_PARAMS);
    float *grad[MAX_PARAMS], *acc[MAX_PARAMS], *pre[MAX_PARAMS], *g[MAX_PARAMS];
    loss(ctx); /* activations saved for backward belong to the unperturbed inputs */
    zero_grads(grad, ps, np, -1);
    backward(ctx, grad);

    /* Accumulate contract: a prefilled gradient ends up as prefill + gradient. */
    for (int i = 0; i < np; i++) {
        pre[i] = rnd_tensor(ps[i].n, -1.0f, 1.0f);
        acc[i] = copy_tensor(pre[i], ps[i].n);
    }
    backward(ctx, acc);
    for (int i = 0; i < np; i++) {
        for (size_t j = 0; j < ps[i].n; j++) {
            const double want = (double)pre[i][j] + grad[i][j];
            if (!(fabs(acc[i][j] - want) <= 1e-5 * (fabs(pre[i][j]) + fabs(grad[i][j])) + 1e-6))
                fail_msg("%s: d%s[%zu] does not accumulate: prefill %g + grad %g -> %g", op,
                         ps[i].name, j, (double)pre[i][j], (double)grad[i][j], (double)acc[i][j]);
        }
        free(pre[i]);
        free(acc[i]);
    }

    /* Rerunning gives the same bits (no races or timing-dependent sums), also with
     * any one gradient output NULL, which must be skipped. */
    for (int skip = -1; skip < (np > 1 ? np : 0); skip++) {
        zero_grads(g, ps, np, skip);
        backward(ctx, g);
        for (int i = 0; i < np; i++)
            if (g[i] && memcmp(g[i], grad[i], ps[i].n * sizeof(float)) != 0)
                fail_msg("%s: d%s differs between identical runs (NULL output %d)", op,
                         ps[i].name, skip);
        free_grads(g, np);
    }

    /* Central differences, on all coordinates or a random subset. */
    for (int i = 0; i < np; i++) {
        const size_t m = ps[i].n <= FD_COORDS ? ps[i].n : FD_COORDS;
        double num = 0.0, den = 0.0;
        for (size_t c = 0; c < m; c++) {
            const size_t j = ps[i].n <= FD_COORDS ? c : rnd_u64() % ps[i].n;
            const float x0 = ps[i].x[j], xp = x0 + (float)eps, xm = x0 - (float)eps;
            ps[i].x[j] = xp;
            const double lp = loss(ctx);
            ps[i].x[j] = xm;
            const double lm = loss(ctx);
            ps[i].x[j] = x0;
            const double fd = (lp - lm) / ((double)xp - (double)xm);
            num += (fd - grad[i][j]) * (fd - grad[i][j]);
            den += (double)grad[i][j] * grad[i][j];
        }
        const double rel = sqrt(num / den);
        print_message("  %-14s d%-5s rel err %.1e (%zu coords)\n", op, ps[i].name, rel, m);
        if (!(den > 0.0)) fail_msg("%s: gradient of %s is all zero", op, ps[i].name);
        if (!(rel < GRAD_TOL))
            fail_msg("%s: d%s disagrees with finite differences: rel err %g", op, ps[i].name, rel);
    }
    free_grads(grad, np);
}

/* ---- backend memory ---- */

static void test_backend_memory(void **state) {
    (void)state;
    const qs_backend *be = qs_backend_cpu();
    assert_string_equal(be->name, "cpu");
    const size_t n = 1001;
    float *d = be->alloc(n * sizeof *d);
    assert_non_null(d);
    assert_true(((uintptr_t)d & 63) == 0);
    for (size_t i = 0; i < n; i++) assert_true(d[i] == 0.0f);
    float *h = rnd_tensor(n, -1.0f, 1.0f), *back = alloc_f(n);
    be->upload(d, h, n * sizeof *d);
    be->download(back, d, n * sizeof *d);
    assert_memory_equal(back, h, n * sizeof *d);
    be->zero(d, n * sizeof *d);
    be->download(back, d, n * sizeof *d);
    for (size_t i = 0; i < n; i++) assert_true(back[i] == 0.0f);
    be->free(d);
    free(h);
    free(back);
}

/* ---- embedding ---- */

typedef struct {
    int N, C;
    const int *tok, *pos;
    float *wte, *wpe, *out, *R;
} embed_ctx;

static double embed_loss(void *p) {
    embed_ctx *c = p;
    const size_t n = (size_t)c->N * c->C;
    poison(c->out, n);
    ops->embed_forward(c->out, c->tok, c->pos, c->wte, c->wpe, c->N, c->C);
    return weighted_sum(c->out, c->R, n);
}
static void embed_backward(void *p, float **g) {
    embed_ctx *c = p;
    ops->embed_backward(g[0], g[1], c->R, c->tok, c->pos, c->N, c->C);
}

static void test_embed(void **state) {
    (void)state;
    /* A small vocabulary and positions in any order, repeating, some unused: tokens and
     * positions repeat, so their gradients must add up. */
    const int N = 33, C = 13, V = 5, P = 11;
    int *tok = alloc_i(N), *pos = alloc_i(N);
    for (int i = 0; i < N; i++) tok[i] = rnd_int(0, V - 1), pos[i] = rnd_int(0, P - 2);
    embed_ctx c = {N, C, tok, pos, rnd_tensor((size_t)V * C, -1, 1), rnd_tensor((size_t)P * C, -1, 1),
                   alloc_f((size_t)N * C), rnd_tensor((size_t)N * C, -1, 1)};
    embed_loss(&c);
    double *want = alloc_d((size_t)N * C);
    for (int r = 0; r < N; r++)
        for (int j = 0; j < C; j++)
            want[(size_t)r * C + j] = (double)c.wte[tok[r] * C + j] + c.wpe[pos[r] * C + j];
    check_close("embed out", c.out, want, (size_t)N * C, 1e-6, 0.0);

    const param ps[] = {{"wte", c.wte, (size_t)V * C}, {"wpe", c.wpe, (size_t)P * C}};
    check_gradients("embed", embed_loss, embed_backward, &c, ps, 2, 1e-3);
    free(want), free(tok), free(pos), free(c.wte), free(c.wpe), free(c.out), free(c.R);
}

/* ---- layernorm ---- */

typedef struct {
    int N, C;
    float *inp, *w, *b, *out, *mean, *rstd, *R;
} ln_ctx;

static double ln_loss(void *p) {
    ln_ctx *c = p;
    const size_t n = (size_t)c->N * c->C;
    poison(c->out, n), poison(c->mean, c->N), poison(c->rstd, c->N);
    ops->layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C);
    return weighted_sum(c->out, c->R, n);
}
static void ln_backward(void *p, float **g) {
    ln_ctx *c = p;
    ops->layernorm_backward(g[0], g[1], g[2], c->R, c->inp, c->w, c->mean, c->rstd, c->N, c->C);
}

static void test_layernorm(void **state) {
    (void)state;
    const int N = rnd_int(7, 37), C = 13;
    const size_t n = (size_t)N * C;
    ln_ctx c = {N, C, rnd_tensor(n, -1, 1), rnd_tensor(C, 0.5f, 1.5f), rnd_tensor(C, -1, 1),
                alloc_f(n), alloc_f(N), alloc_f(N), rnd_tensor(n, -1, 1)};
    /* Rows with a large common offset: a one-pass variance would cancel. */
    for (int r = 0; r < N; r++)
        for (int j = 0; j < C; j++) c.inp[(size_t)r * C + j] += (r % 3) * 50.0f;
    ln_loss(&c);
    double *want = alloc_d(n), *wmean = alloc_d(N), *wrstd = alloc_d(N);
    for (int r = 0; r < N; r++) {
        const float *x = c.inp + (size_t)r * C;
        double m = 0.0, v = 0.0;
        for (int j = 0; j < C; j++) m += x[j];
        m /= C;
        for (int j = 0; j < C; j++) v += (x[j] - m) * (x[j] - m);
        const double s = 1.0 / sqrt(v / C + 1e-5);
        for (int j = 0; j < C; j++) want[(size_t)r * C + j] = (x[j] - m) * s * c.w[j] + c.b[j];
        wmean[r] = m;
        wrstd[r] = s;
    }
    check_close("layernorm out", c.out, want, n, 1e-4, 1e-4);
    check_close("layernorm mean", c.mean, wmean, N, 1e-5, 1e-5);
    check_close("layernorm rstd", c.rstd, wrstd, N, 1e-4, 0.0);

    /* Finite differences want inputs of order one. */
    for (size_t i = 0; i < n; i++) c.inp[i] = rnd_uniform(-1, 1);
    const param ps[] = {{"inp", c.inp, n}, {"w", c.w, C}, {"b", c.b, C}};
    check_gradients("layernorm", ln_loss, ln_backward, &c, ps, 3, 1e-3);
    free(want), free(wmean), free(wrstd);
    free(c.inp), free(c.w), free(c.b), free(c.out), free(c.mean), free(c.rstd), free(c.R);
}

/* ---- matmul ---- */

typedef struct {
    int N, I, O;
    qs_weight_layout layout;
    float *inp, *w, *bias, *out, *R;
} mm_ctx;

static double mm_loss(void *p) {
    mm_ctx *c = p;
    const size_t n = (size_t)c->N * c->O;
    poison(c->out, n);
    ops->matmul_forward(c->out, c->inp, c->w, c->bias, c->N, c->I, c->O, c->layout);
    return weighted_sum(c->out, c->R, n);
}
static void mm_backward(void *p, float **g) {
    mm_ctx *c = p;
    ops->matmul_backward(g[0], g[1], c->bias ? g[2] : NULL, c->R, c->inp, c->w, c->N, c->I, c->O,
                         c->layout);
}

static void test_matmul(void **state) {
    (void)state;
    for (int layout = QS_W_IN_OUT; layout <= QS_W_OUT_IN; layout++)
        for (int with_bias = 0; with_bias <= 1; with_bias++) {
            const int N = rnd_int(7, 37), I = 13, O = rnd_int(5, 19);
            mm_ctx c = {N, I, O, (qs_weight_layout)layout, rnd_tensor((size_t)N * I, -1, 1),
                        rnd_tensor((size_t)I * O, -1, 1), with_bias ? rnd_tensor(O, -1, 1) : NULL,
                        alloc_f((size_t)N * O), rnd_tensor((size_t)N * O, -1, 1)};
            mm_loss(&c);
            double *want = alloc_d((size_t)N * O);
            for (int r = 0; r < N; r++)
                for (int o = 0; o < O; o++) {
                    double s = with_bias ? c.bias[o] : 0.0;
                    for (int i = 0; i < I; i++)
                        s += (double)c.inp[r * I + i] *
                             (layout == QS_W_IN_OUT ? c.w[i * O + o] : c.w[o * I + i]);
                    want[(size_t)r * O + o] = s;
                }
            check_close(layout == QS_W_IN_OUT ? "matmul [in,out]" : "matmul [out,in]", c.out, want,
                        (size_t)N * O, 1e-5, 1e-5);
            /* matmul_acc adds alpha * inp @ W on top of what out holds (here the product
             * with bias just checked): out = (1 + alpha) inp @ W + bias. */
            const float alpha = (float)rnd_uniform(-2, 2);
            ops->matmul_acc(c.out, c.inp, c.w, alpha, N, I, O, (qs_weight_layout)layout);
            for (int r = 0; r < N; r++)
                for (int o = 0; o < O; o++) {
                    double b = with_bias ? c.bias[o] : 0.0;
                    want[(size_t)r * O + o] = b + (1.0 + alpha) * (want[(size_t)r * O + o] - b);
                }
            check_close("matmul_acc", c.out, want, (size_t)N * O, 1e-5, 1e-5);
            const param ps[] = {
                {"inp", c.inp, (size_t)N * I}, {"w", c.w, (size_t)I * O}, {"bias", c.bias, O}};
            check_gradients(layout == QS_W_IN_OUT ? "matmul in,out" : "matmul out,in", mm_loss,
                            mm_backward, &c, ps, with_bias ? 3 : 2, 1e-3);
            free(want), free(c.inp), free(c.w), free(c.bias), free(c.out), free(c.R);
        }
    /* An expert can receive no tokens: N = 0 must leave everything untouched. */
    float w = 1.0f, dw = 0.5f, db = 0.25f;
    ops->matmul_forward(NULL, NULL, &w, &w, 0, 1, 1, QS_W_IN_OUT);
    ops->matmul_backward(NULL, &dw, &db, NULL, NULL, &w, 0, 1, 1, QS_W_IN_OUT);
    ops->matmul_acc(NULL, NULL, &w, 1.0f, 0, 1, 1, QS_W_IN_OUT);
    assert_true(dw == 0.5f && db == 0.25f);
}

/* One row (each of a decode step's products is one): forward into a NaN-poisoned output,
 * matmul_acc on top, and the input gradient, against double sums, wide enough
 * (K N >= 32768) that the columns are split over the threads. */
static void test_matmul_one_row(void **state) {
    (void)state;
    const int I = 13, O = rnd_int(2600, 2700);
    for (int layout = QS_W_IN_OUT; layout <= QS_W_OUT_IN; layout++) {
        float *x = rnd_tensor(I, -1, 1), *w = rnd_tensor((size_t)I * O, -1, 1), *b = rnd_tensor(O, -1, 1);
        float *out = alloc_f(O), *dout = rnd_tensor(O, -1, 1), *dx = rnd_tensor(I, -1, 1);
        double *want = alloc_d(O), *want_dx = alloc_d(I);
        const float alpha = rnd_uniform(-2, 2);
        for (int o = 0; o < O; o++) {
            double sum = 0;
            for (int i = 0; i < I; i++) sum += (double)x[i] * (layout == QS_W_IN_OUT ? w[(size_t)i * O + o] : w[(size_t)o * I + i]);
            want[o] = sum;
        }
        for (int i = 0; i < I; i++) {
            want_dx[i] = dx[i];
            for (int o = 0; o < O; o++)
                want_dx[i] += (double)dout[o] * (layout == QS_W_IN_OUT ? w[(size_t)i * O + o] : w[(size_t)o * I + i]);
        }
        poison(out, O);
        ops->matmul_forward(out, x, w, NULL, 1, I, O, (qs_weight_layout)layout);
        check_close("matmul, one row", out, want, O, 1e-5, 1e-5);
        for (int o = 0; o < O; o++) want[o] = (1.0 + alpha) * want[o] + b[o];
        for (int o = 0; o < O; o++) out[o] += b[o];
        ops->matmul_acc(out, x, w, alpha, 1, I, O, (qs_weight_layout)layout);
        check_close("matmul_acc, one row", out, want, O, 1e-5, 1e-5);
        ops->matmul_backward(dx, NULL, NULL, dout, x, w, 1, I, O, (qs_weight_layout)layout);
        check_close("matmul_backward dinp, one row", dx, want_dx, I, 1e-5, 1e-4);
        free(x), free(w), free(b), free(out), free(dout), free(dx), free(want), free(want_dx);
    }
}

/* Products of 2 to 23 rows (a batch's decode step; from [out, in] weights one row too)
 * take their own register tiles (matmul_rows.c), checked against double sums into NaN-poisoned outputs: row counts
 * with partial and whole tiles (8, 16), input widths with and without a partial vector
 * of 16, output widths that leave a partial strip of 32 and an odd weight row to a
 * thread, with and without bias; then the same bits from one thread as from three. */
static void test_matmul_few_rows(void **state) {
    (void)state;
    const int rows[] = {1, 2, rnd_int(3, 7), 8, rnd_int(9, 15), 16, rnd_int(17, 23)};
    for (int layout = QS_W_IN_OUT; layout <= QS_W_OUT_IN; layout++)
        for (size_t k = layout == QS_W_IN_OUT; k < sizeof rows / sizeof *rows; k++) { /* [in, out]: GEMV for 1 */
            const int N = rows[k], I = k % 3 ? rnd_int(17, 100) : rnd_int(1, 16), O = 2 * rnd_int(150, 350) + 1;
            const int with_bias = (int)(k % 2);
            float *x = rnd_tensor((size_t)N * I, -1, 1), *w = rnd_tensor((size_t)I * O, -1, 1);
            float *b = with_bias ? rnd_tensor(O, -1, 1) : NULL, *out = alloc_f((size_t)N * O);
            float *alone = alloc_f((size_t)N * O);
            double *want = alloc_d((size_t)N * O);
            for (int r = 0; r < N; r++)
                for (int o = 0; o < O; o++) {
                    double s = b ? b[o] : 0.0;
                    for (int i = 0; i < I; i++)
                        s += (double)x[(size_t)r * I + i] *
                             (layout == QS_W_IN_OUT ? w[(size_t)i * O + o] : w[(size_t)o * I + i]);
                    want[(size_t)r * O + o] = s;
                }
            poison(out, (size_t)N * O);
            ops->matmul_forward(out, x, w, b, N, I, O, (qs_weight_layout)layout);
            char name[64];
            snprintf(name, sizeof name, "matmul %s, N %d, I %d", layout == QS_W_IN_OUT ? "[in,out]" : "[out,in]",
                     N, I);
            check_close(name, out, want, (size_t)N * O, 1e-5, 1e-5);
            const int threads = omp_get_max_threads();
            omp_set_num_threads(1);
            poison(alone, (size_t)N * O);
            ops->matmul_forward(alone, x, w, b, N, I, O, (qs_weight_layout)layout);
            omp_set_num_threads(threads);
            if (memcmp(alone, out, (size_t)N * O * sizeof *out)) fail_msg("%s: one thread's bits differ", name);
            free(x), free(w), free(b), free(out), free(alone), free(want);
        }
}

/* bf16 rounding: nearest, ties to even, by hand on values around 1 (bf16 keeps 7
 * fraction bits: steps of 2^-7), at the top of the range, and the specials. */
static void test_bf16_rounding(void **state) {
    (void)state;
    const float step = 1.0f / 128.0f, largest = qs_bf16_to_float(0x7f7f);
    const struct { float x, want; } cases[] = {
        {1.0f, 1.0f},
        {1.0f + step / 2, 1.0f},                   /* a tie: to the even 1 */
        {1.0f + step + step / 2, 1.0f + 2 * step}, /* a tie: to the even 1 + 2 step */
        {1.0f + step / 2 + step / 64, 1.0f + step},
        {1.0f + step / 2 - step / 64, 1.0f},
        {-(1.0f + step / 2 + step / 64), -(1.0f + step)},
        {largest, largest},
        {3.4028235e38f, INFINITY}, /* FLT_MAX is past the largest bf16's half step */
        {INFINITY, INFINITY},
        {-INFINITY, -INFINITY},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        const float got = qs_bf16_to_float(qs_bf16_from_float(cases[k].x));
        if (got != cases[k].want) fail_msg("bf16(%.9g) = %.9g, want %.9g", cases[k].x, got, cases[k].want);
    }
    assert_true(isnan(qs_bf16_to_float(qs_bf16_from_float(NAN))));
    /* random values: within half a step of bf16's 8 significant bits */
    for (int k = 0; k < 1000; k++) {
        const float x = rnd_uniform(-4, 4), got = qs_bf16_to_float(qs_bf16_from_float(x));
        assert_true(fabsf(got - x) <= fabsf(x) * (1.0f / 256.0f));
    }
}

/* matmul_forward_bf16 from matmul_pack_bf16's panels against double sums over the
 * bf16-rounded weights: both layouts, widths that leave the last panel part empty, row
 * counts with partial register tiles (1, 3, 9, one drawn from 10-255) and full ones (8),
 * and through the widened SGEMM path (256-300), with and without bias, into
 * NaN-poisoned outputs. */
static void test_matmul_bf16(void **state) {
    (void)state;
    const int rows[] = {1, 3, 8, 9, rnd_int(10, 255), rnd_int(256, 300)};
    for (int layout = QS_W_IN_OUT; layout <= QS_W_OUT_IN; layout++)
        for (size_t k = 0; k < sizeof rows / sizeof *rows; k++) {
            const int N = rows[k], I = rnd_int(1, 70), O = rnd_int(1, 300), with_bias = (int)(k % 2);
            float *x = rnd_tensor((size_t)N * I, -1, 1), *w = rnd_tensor((size_t)I * O, -1, 1);
            float *b = with_bias ? rnd_tensor(O, -1, 1) : NULL, *out = alloc_f((size_t)N * O);
            const size_t packed = qs_bf16_packed_elems(I, O);
            uint16_t *wp = malloc(packed * sizeof *wp);
            assert_non_null(wp);
            memset(wp, 0xff, packed * sizeof *wp); /* NaN: padding must be written too */
            ops->matmul_pack_bf16(wp, w, I, O, (qs_weight_layout)layout);
            for (size_t e = 0; e < packed; e++) {
                const int p = (int)(e / ((size_t)I * QS_BF16_PANEL)), i = (int)(e / QS_BF16_PANEL % I);
                const int j = p * QS_BF16_PANEL + (int)(e % QS_BF16_PANEL);
                const float v = j >= O ? 0.0f : layout == QS_W_IN_OUT ? w[(size_t)i * O + j] : w[(size_t)j * I + i];
                if (wp[e] != qs_bf16_from_float(v)) fail_msg("packed element %zu (%d, %d) wrong", e, i, j);
            }
            double *want = alloc_d((size_t)N * O);
            for (int r = 0; r < N; r++)
                for (int o = 0; o < O; o++) {
                    double s = b ? b[o] : 0.0;
                    for (int i = 0; i < I; i++) {
                        const float wi = layout == QS_W_IN_OUT ? w[(size_t)i * O + o] : w[(size_t)o * I + i];
                        s += (double)x[(size_t)r * I + i] * qs_bf16_to_float(qs_bf16_from_float(wi));
                    }
                    want[(size_t)r * O + o] = s;
                }
            poison(out, (size_t)N * O);
            ops->matmul_forward_bf16(out, x, wp, b, N, I, O);
            char name[64];
            snprintf(name, sizeof name, "matmul_bf16 %s, N %d", layout == QS_W_IN_OUT ? "[in,out]" : "[out,in]", N);
            check_close(name, out, want, (size_t)N * O, 1e-5, 1e-5);
            free(x), free(w), free(b), free(out), free(wp), free(want);
        }
}

/* The GELU-fused pair is the separate ops' composition on the CPU, bit for bit: the
 * CUDA backend fuses them, its parity harness compares it with these. dpre is written
 * over whatever it held (NaN here); dw and dbias accumulate. */
static void test_matmul_gelu(void **state) {
    (void)state;
    for (int layout = QS_W_IN_OUT; layout <= QS_W_OUT_IN; layout++) {
        const int N = rnd_int(1, 29), C = rnd_int(1, 17), H = rnd_int(1, 40);
        const qs_weight_layout l = (qs_weight_layout)layout;
        float *x = rnd_tensor((size_t)N * C, -2, 2), *w1 = rnd_tensor((size_t)C * H, -1, 1);
        float *b1 = rnd_tensor((size_t)H, -1, 1), *w2 = rnd_tensor((size_t)H * C, -1, 1);
        float *dout = rnd_tensor((size_t)N * C, -1, 1), *dw = rnd_tensor((size_t)H * C, -1, 1);
        float *db = rnd_tensor((size_t)C, -1, 1);
        float *pre = alloc_f((size_t)N * H), *out = alloc_f((size_t)N * H), *dpre = alloc_f((size_t)N * H);
        float *want_pre = alloc_f((size_t)N * H), *want_out = alloc_f((size_t)N * H);
        float *want_d = alloc_f((size_t)N * H), *mid = alloc_f((size_t)N * H);
        float *want_dw = alloc_f((size_t)H * C), *want_db = alloc_f((size_t)C);
        memcpy(want_dw, dw, (size_t)H * C * sizeof(float));
        memcpy(want_db, db, (size_t)C * sizeof(float));
        ops->matmul_forward(want_pre, x, w1, b1, N, C, H, l);
        ops->gelu_forward(want_out, want_pre, (size_t)N * H);
        ops->matmul_gelu_forward(pre, out, x, w1, b1, N, C, H, l);
        assert_memory_equal(pre, want_pre, (size_t)N * H * sizeof(float));
        assert_memory_equal(out, want_out, (size_t)N * H * sizeof(float));
        memset(mid, 0, (size_t)N * H * sizeof(float));
        memset(want_d, 0, (size_t)N * H * sizeof(float));
        ops->matmul_backward(mid, want_dw, want_db, dout, out, w2, N, H, C, l);
        ops->gelu_backward(want_d, pre, mid, (size_t)N * H);
        for (size_t i = 0; i < (size_t)N * H; i++) dpre[i] = NAN;
        ops->matmul_backward_dgelu(dpre, dw, db, dout, out, pre, w2, N, H, C, l);
        assert_memory_equal(dpre, want_d, (size_t)N * H * sizeof(float));
        assert_memory_equal(dw, want_dw, (size_t)H * C * sizeof(float));
        assert_memory_equal(db, want_db, (size_t)C * sizeof(float));
        free(x), free(w1), free(b1), free(w2), free(dout), free(dw), free(db), free(pre), free(out), free(dpre);
        free(want_pre), free(want_out), free(want_d), free(mid), free(want_dw), free(want_db);
    }
    float w = 1.0f, dw = 0.5f; /* N = 0: nothing */
    ops->matmul_gelu_forward(NULL, NULL, NULL, &w, &w, 0, 1, 1, QS_W_IN_OUT);
    ops->matmul_backward_dgelu(NULL, &dw, NULL, NULL, NULL, NULL, &w, 0, 1, 1, QS_W_IN_OUT);
    assert_true(dw == 0.5f);
}

/* ---- grouped matmul (MoE experts) ---- */

typedef struct {
    int G, I, O;
    const int *off;
    float *inp, *w, *bias, *out, *R;
} gmm_ctx;

static double gmm_loss(void *p) {
    gmm_ctx *c = p;
    const size_t n = (size_t)c->off[c->G] * c->O;
    poison(c->out, n);
    ops->matmul_grouped_forward(c->out, c->inp, c->w, c->bias, c->off, c->G, c->I, c->O);
    return weighted_sum(c->out, c->R, n);
}
static void gmm_backward(void *p, float **g) {
    gmm_ctx *c = p;
    ops->matmul_grouped_backward(g[0], g[1], g[2], c->R, c->inp, c->w, c->off, c->G, c->I, c->O);
}

static void test_matmul_grouped(void **state) {
    (void)state;
    /* groups of random sizes, the first and last always empty, the second never (some
     * rows to take gradients of) */
    const int G = rnd_int(3, 7), I = rnd_int(3, 17), O = rnd_int(2, 11);
    int *off = alloc_i((size_t)G + 1);
    off[0] = 0;
    for (int g = 0; g < G; g++) off[g + 1] = off[g] + (g == 0 || g == G - 1 ? 0 : rnd_int(g == 1, 9));
    const int rows = off[G];
    gmm_ctx c = {G, I, O, off, rnd_tensor((size_t)rows * I, -1, 1), rnd_tensor((size_t)G * I * O, -1, 1),
                 rnd_tensor((size_t)G * O, -1, 1), alloc_f((size_t)rows * O), rnd_tensor((size_t)rows * O, -1, 1)};
    gmm_loss(&c);
    double *want = alloc_d((size_t)rows * O);
    for (int g = 0; g < G; g++)
        for (int r = off[g]; r < off[g + 1]; r++)
            for (int o = 0; o < O; o++) {
                double s = c.bias[g * O + o];
                for (int i = 0; i < I; i++) s += (double)c.inp[r * I + i] * c.w[((size_t)g * I + i) * O + o];
                want[(size_t)r * O + o] = s;
            }
    check_close("matmul_grouped", c.out, want, (size_t)rows * O, 1e-5, 1e-5);
    const param ps[] = {{"inp", c.inp, (size_t)rows * I}, {"w", c.w, (size_t)G * I * O}, {"bias", c.bias, (size_t)G * O}};
    check_gradients("matmul_grouped", gmm_loss, gmm_backward, &c, ps, 3, 1e-3);
    free(want), free(off), free(c.inp), free(c.w), free(c.bias), free(c.out), free(c.R);
}

/* ---- attention: causal self-attention of whole sequences as one block ---- */

typedef struct {
    int B, T, C, NH;
    float *qkv, *out, *lse, *R;
} attn_ctx;

static qs_attn_block attn_whole(const attn_ctx *c) { return qs_attn_block_self(c->B, c->T, c->C, c->NH, c->NH, 1); }

static double attn_loss(void *p) {
    attn_ctx *c = p;
    const size_t n = (size_t)c->B * c->T * c->C;
    const qs_attn_block blk = attn_whole(c);
    poison(c->out, n), poison(c->lse, (size_t)c->B * c->NH * c->T);
    ops->attention_block_forward(c->out, c->lse, c->qkv, c->qkv + c->C, &blk);
    return weighted_sum(c->out, c->R, n);
}
static void attn_backward(void *p, float **g) {
    attn_ctx *c = p;
    const qs_attn_block blk = attn_whole(c);
    float *delta = alloc_f((size_t)c->B * c->NH * c->T);
    ops->attention_delta(delta, c->R, c->out, c->B, c->T, c->C, c->NH);
    ops->attention_block_backward(g[0], g[0] + c->C, c->R, c->qkv, c->qkv + c->C, c->lse, delta, &blk);
    free(delta);
}

static void check_attention(int B, int T, int NH, int hs, double eps) {
    const int C = NH * hs;
    const size_t nqkv = (size_t)B * T * 3 * C, nout = (size_t)B * T * C, nst = (size_t)B * NH * T;
    attn_ctx c = {B, T, C, NH, rnd_tensor(nqkv, -2, 2), alloc_f(nout), alloc_f(nst), rnd_tensor(nout, -1, 1)};
    attn_loss(&c);
    double *want = alloc_d(nout), *wlse = alloc_d(nst), *a = alloc_d((size_t)T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = c.qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                double mx = -INFINITY, sum = 0.0;
                for (int u = 0; u <= t; u++) {
                    const float *k = c.qkv + ((size_t)b * T + u) * 3 * C + C + h * hs;
                    double s = 0.0;
                    for (int i = 0; i < hs; i++) s += (double)q[i] * k[i];
                    a[u] = s / sqrt(hs);
                    mx = fmax(mx, a[u]);
                }
                for (int u = 0; u <= t; u++) sum += a[u] = exp(a[u] - mx);
                wlse[((size_t)b * NH + h) * T + t] = mx + log(sum);
                for (int i = 0; i < hs; i++) {
                    double o = 0.0;
                    for (int u = 0; u <= t; u++)
                        o += a[u] / sum * c.qkv[((size_t)b * T + u) * 3 * C + 2 * C + h * hs + i];
                    want[((size_t)b * T + t) * C + h * hs + i] = o;
                }
            }
    check_close("attention out", c.out, want, nout, 1e-5, 1e-5);
    check_close("attention lse", c.lse, wlse, nst, 1e-5, 1e-6);

    const param ps[] = {{"qkv", c.qkv, nqkv}};
    check_gradients("attention", attn_loss, attn_backward, &c, ps, 1, eps);
    free(want), free(wlse), free(a), free(c.qkv), free(c.out), free(c.lse), free(c.R);
}

static void test_attention(void **state) {
    (void)state;
    check_attention(2, 11, 3, 5, 1e-3);
    /* Heads wide enough for BLAS's register blocks, and sequences longer than one
     * 64-row query tile (not a multiple of it); longer sums carry more rounding noise,
     * so a larger step. */
    check_attention(1, 41, 2, 37, 1e-2);
    check_attention(1, 150, 1, 6, 1e-2);
}

/* ---- element-wise: gelu, relu, dropout ---- */

typedef enum { EW_GELU, EW_RELU, EW_DROPOUT } ew_kind;

typedef struct {
    ew_kind kind;
    size_t n;
    float p;
    uint64_t seed, stream;
    float *inp, *out, *R;
} ew_ctx;

static double ew_loss(void *p) {
    ew_ctx *c = p;
    poison(c->out, c->n);
    if (c->kind == EW_GELU) ops->gelu_forward(c->out, c->inp, c->n);
    else if (c->kind == EW_RELU) ops->relu_forward(c->out, c->inp, c->n);
    else ops->dropout_forward(c->out, c->inp, c->p, c->seed, c->stream, NULL, c->n, 1);
    return weighted_sum(c->out, c->R, c->n);
}
static void ew_backward(void *p, float **g) {
    ew_ctx *c = p;
    if (c->kind == EW_GELU) ops->gelu_backward(g[0], c->inp, c->R, c->n);
    else if (c->kind == EW_RELU) ops->relu_backward(g[0], c->inp, c->R, c->n);
    else ops->dropout_backward(g[0], c->R, c->p, c->seed, c->stream, NULL, c->n, 1);
}

/* Inputs in [-3, 3] but at least 0.05 from zero (ReLU's kink). */
static float *ew_inputs(size_t n) {
    float *x = rnd_tensor(n, 0.05f, 3.0f);
    for (size_t i = 0; i < n; i++)
        if (rnd_u64() & 1) x[i] = -x[i];
    return x;
}

static void test_gelu_relu(void **state) {
    (void)state;
    const size_t n = (size_t)rnd_int(50, 200);
    ew_ctx c = {EW_GELU, n, 0.0f, 0, 0, ew_inputs(n), alloc_f(n), rnd_tensor(n, -1, 1)};
    double *want = alloc_d(n);
    ew_loss(&c);
    for (size_t i = 0; i < n; i++) {
        const double x = c.inp[i];
        want[i] = 0.5 * x * (1.0 + tanh(sqrt(2.0 / acos(-1.0)) * (x + 0.044715 * x * x * x)));
    }
    check_close("gelu", c.out, want, n, 1e-5, 1e-6);
    /* a diverging run's NaN passes through (and under UBSan, without undefined casts) */
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    float bad_out[3], bad_grad[3] = {0, 0, 0}, ones[3] = {1, 1, 1};
    ops->gelu_forward(bad_out, bad, 3);
    ops->gelu_backward(bad_grad, bad, ones, 3);
    assert_true(isnan(bad_out[0]) && isnan(bad_grad[0]));
    assert_true(bad_out[1] == INFINITY);
    const param ps[] = {{"inp", c.inp, n}};
    check_gradients("gelu", ew_loss, ew_backward, &c, ps, 1, 1e-3);

    c.kind = EW_RELU;
    ew_loss(&c);
    for (size_t i = 0; i < n; i++) want[i] = c.inp[i] > 0.0f ? c.inp[i] : 0.0;
    check_close("relu", c.out, want, n, 0.0, 0.0);
    check_gradients("relu", ew_loss, ew_backward, &c, ps, 1, 1e-3);
    free(want), free(c.inp), free(c.out), free(c.R);
}

/* The fused residual add: the sum exactly, and the same bits as layernorm_forward of it,
 * into a fresh buffer and in place over the residual. */
static void test_residual_layernorm(void **state) {
    (void)state;
    const int N = rnd_int(1, 70), C = rnd_int(1, 300);
    const size_t n = (size_t)N * C;
    float *inp = rnd_tensor(n, -3, 3), *branch = rnd_tensor(n, -1, 1), *w = rnd_tensor(C, 0.5f, 1.5f),
          *b = rnd_tensor(C, -1, 1);
    float *sum = alloc_f(n), *want = alloc_f(n), *wmean = alloc_f(N), *wrstd = alloc_f(N);
    for (size_t i = 0; i < n; i++) sum[i] = inp[i] + branch[i];
    ops->layernorm_forward(want, wmean, wrstd, sum, w, b, N, C);
    float *res = alloc_f(n), *out = alloc_f(n), *mean = alloc_f(N), *rstd = alloc_f(N), *in_place = copy_tensor(inp, n);
    for (int pass = 0; pass < 2; pass++) {
        float *r = pass ? in_place : res;
        poison(out, n), poison(mean, N), poison(rstd, N);
        if (!pass) poison(res, n);
        ops->residual_layernorm_forward(r, out, mean, rstd, pass ? in_place : inp, branch, w, b, N, C);
        assert_memory_equal(r, sum, n * sizeof(float));
        assert_memory_equal(out, want, n * sizeof(float));
        assert_memory_equal(mean, wmean, N * sizeof(float));
        assert_memory_equal(rstd, wrstd, N * sizeof(float));
    }
    free(inp), free(branch), free(w), free(b), free(sum), free(want), free(wmean), free(wrstd);
    free(res), free(out), free(mean), free(rstd), free(in_place);
}

static void test_dropout(void **state) {
    (void)state;
    const size_t W = (size_t)rnd_int(3, 40), N = 200003 / W, n = N * W;
    const float p = 0.3f;
    const uint64_t seed = rnd_u64(), stream = 7;
    float *inp = ew_inputs(n), *out = alloc_f(n), *same = copy_tensor(inp, n);

    /* p = 0 copies, also in place. */
    poison(out, n);
    ops->dropout_forward(out, inp, 0.0f, seed, stream, NULL, N, W);
    assert_memory_equal(out, inp, n * sizeof *out);
    ops->dropout_forward(same, same, 0.0f, seed, stream, NULL, N, W);
    assert_memory_equal(same, inp, n * sizeof *out);

    /* The documented mask rule, the 1/(1-p) scale, and the drop rate. */
    poison(out, n);
    ops->dropout_forward(out, inp, p, seed, stream, NULL, N, W);
    size_t dropped = 0;
    const float scale = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++) {
        const int keep = qs_rng_uniform(seed, stream, i) >= p;
        dropped += !keep;
        if (!(out[i] == (keep ? inp[i] * scale : 0.0f)))
            fail_msg("dropout out[%zu] = %g, keep %d, inp %g", i, (double)out[i], keep,
                     (double)inp[i]);
    }
    const double rate = (double)dropped / n;
    if (fabs(rate - p) > 0.01) fail_msg("dropout rate %g, want %g", rate, (double)p);

    /* In place gives the same result. */
    ops->dropout_forward(same, same, p, seed, stream, NULL, N, W);
    assert_memory_equal(same, out, n * sizeof *out);

    /* Rows named by global ids draw those rows' masks wherever they sit: a few rows
     * picked out of the tensor, in another order, come out as they did in it. */
    enum { PICK = 5 };
    int64_t ids[PICK];
    float *rows = alloc_f(PICK * W);
    for (int r = 0; r < PICK; r++) {
        ids[r] = (int64_t)rnd_int(0, (int)N - 1);
        memcpy(rows + r * W, inp + (size_t)ids[r] * W, W * sizeof(float));
    }
    ops->dropout_forward(rows, rows, p, seed, stream, ids, PICK, W);
    for (int r = 0; r < PICK; r++)
        assert_memory_equal(rows + r * W, out + (size_t)ids[r] * W, W * sizeof(float));
    free(rows);

    /* Another stream draws another mask. */
    float *other = alloc_f(n);
    ops->dropout_forward(other, inp, p, seed, stream + 1, NULL, N, W);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += (other[i] == 0.0f) != (out[i] == 0.0f);
    if (differ < n / 10) fail_msg("dropout masks of two streams barely differ (%zu)", differ);

    /* Backward applies the forward's mask: dropped elements get no gradient. */
    float *dout = rnd_tensor(n, 0.5f, 1.5f), *dinp = rnd_tensor(n, -1, 1);
    float *pre = copy_tensor(dinp, n);
    ops->dropout_backward(dinp, dout, p, seed, stream, NULL, N, W);
    for (size_t i = 0; i < n; i++) {
        const float want = pre[i] + (out[i] != 0.0f ? dout[i] * scale : 0.0f);
        if (!(fabs(dinp[i] - want) <= 1e-6f * (1.0f + fabsf(want))))
            fail_msg("dropout dinp[%zu] = %g, want %g", i, (double)dinp[i], (double)want);
    }

    const size_t m = (size_t)rnd_int(50, 200);
    ew_ctx c = {EW_DROPOUT, m, p, seed, stream, ew_inputs(m), alloc_f(m), rnd_tensor(m, -1, 1)};
    const param ps[] = {{"inp", c.inp, m}};
    check_gradients("dropout", ew_loss, ew_backward, &c, ps, 1, 1e-3);
    free(c.inp), free(c.out), free(c.R);
    free(inp), free(out), free(same), free(other), free(dout), free(dinp), free(pre);
}

/* ---- cross-entropy ---- */

typedef struct {
    int N, V;
    float r;
    const int *tgt;
    float *logits, *losses;
} xent_ctx;

static double xent_loss(void *p) {
    xent_ctx *c = p;
    poison(c->losses, c->N);
    ops->xent_forward(c->losses, c->logits, c->tgt, c->N, c->V);
    double s = 0.0;
    for (int n = 0; n < c->N; n++) s += c->losses[n];
    return c->r * s;
}
/* The op replaces the logits by their gradient; the checker wants it added to g[0]. It
 * takes the forward's losses at these logits. */
static void xent_backward(void *p, float **g) {
    xent_ctx *c = p;
    const size_t n = (size_t)c->N * c->V;
    float *d = copy_tensor(c->logits, n);
    xent_loss(c);
    ops->xent_backward(d, c->losses, c->tgt, c->r, c->N, c->V);
    for (size_t i = 0; i < n; i++) g[0][i] += d[i];
    free(d);
}

/* Loss and dlogits against a double-precision reference at V classes, and the gradient
 * against finite differences when `fd`. */
static void check_xent(int V, bool fd) {
    const int N = rnd_int(7, 37);
    const size_t n = (size_t)N * V;
    int *tgt = alloc_i(N);
    for (int i = 0; i < N; i++) tgt[i] = i % 4 == 1 ? -1 : rnd_int(0, V - 1);
    xent_ctx c = {N, V, rnd_uniform(0.5f, 2.0f), tgt, rnd_tensor(n, -3, 3), alloc_f(N)};
    /* Some rows far beyond float exp's range: only a max-subtracting softmax survives. */
    for (int r = 0; r < N; r += 3)
        for (int v = 0; v < V; v++) c.logits[(size_t)r * V + v] += 100.0f;

    xent_loss(&c);
    double *want = alloc_d(N), *wgrad = alloc_d(n);
    for (int r = 0; r < N; r++) {
        const float *x = c.logits + (size_t)r * V;
        double mx = -INFINITY, sum = 0.0;
        for (int v = 0; v < V; v++) mx = fmax(mx, x[v]);
        for (int v = 0; v < V; v++) sum += exp(x[v] - mx);
        want[r] = tgt[r] < 0 ? 0.0 : mx + log(sum) - x[tgt[r]];
        for (int v = 0; v < V; v++)
            wgrad[(size_t)r * V + v] = tgt[r] < 0 ? 0.0 : c.r * (exp(x[v] - mx) / sum - (v == tgt[r]));
    }
    check_close("xent loss", c.losses, want, N, 1e-5, 1e-5);
    /* in place: the gradient replaces the logits, and an ignored row becomes exact zeros */
    float *grad = copy_tensor(c.logits, n);
    ops->xent_backward(grad, c.losses, tgt, c.r, N, V);
    check_close("xent dlogits", grad, wgrad, n, 1e-5, 1e-6);
    for (int r = 1; r < N; r += 4)
        for (int v = 0; v < V; v++) assert_true(grad[(size_t)r * V + v] == 0.0f);

    const param ps[] = {{"logits", c.logits, n}};
    if (fd) check_gradients("xent", xent_loss, xent_backward, &c, ps, 1, 1e-2);
    free(tgt), free(c.logits), free(c.losses), free(want), free(wgrad), free(grad);
}

static void test_xent(void **state) {
    (void)state;
    check_xent(29, true);
    /* rows longer than the CPU's 1024-element summation pieces, with a remainder */
    check_xent(rnd_int(2049, 3071), false);
}

/* ---- MoE: the router ---- */

/* Host arrays of an E-expert load. */
static qs_moe_load load_alloc(int E) {
    return (qs_moe_load){.routed = alloc_i((size_t)E), .counts = alloc_i((size_t)E),
                         .offsets = alloc_i((size_t)E + 1), .dropped = -1, .balance = NAN, .z = NAN};
}
static void load_free(qs_moe_load *l) { free(l->routed), free(l->counts), free(l->offsets); }

/* Routes without noise; returns the number dropped. */
static int route(qs_moe_load *load, int *idx, float *gate, int *slot, const float *logits, int N, int E,
                 int K, int capacity) {
    const qs_moe_router r = {.N = N, .E = E, .K = K, .capacity = capacity};
    ops->moe_route_forward(load, idx, gate, slot, NULL, logits, NULL, &r);
    return load->dropped;
}

/* Logits whose top-K are want[n*K..] in that order (K - k at choice k, 0 elsewhere). */
static float *logits_choosing(const int *want, int N, int E, int K) {
    float *x = calloc((size_t)N * E, sizeof *x);
    assert_non_null(x);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) x[(size_t)n * E + want[n * K + k]] = (float)(K - k);
    return x;
}

/* The slots of routing to the experts in want (capacity as for moe_route_forward). */
static int route_to(qs_moe_load *load, int *slot, const int *want, int N, int E, int K, int capacity) {
    float *x = logits_choosing(want, N, E, K), *gate = alloc_f((size_t)N * K);
    int *idx = alloc_i((size_t)N * K);
    const int dropped = route(load, idx, gate, slot, x, N, E, K, capacity);
    assert_memory_equal(idx, want, (size_t)N * K * sizeof *idx);
    free(x), free(gate), free(idx);
    return dropped;
}

/* Reference selection: repeatedly the largest unchosen logit, lowest index on ties. */
static void topk_reference(int *idx, double *gate, const float *x, int E, int K) {
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= idx[j] == e;
            if (!taken && (best < 0 || x[e] > x[best])) best = e;
        }
        idx[k] = best;
    }
    double sum = 0.0;
    for (int k = 0; k < K; k++) sum += gate[k] = exp((double)x[idx[k]] - x[idx[0]]);
    for (int k = 0; k < K; k++) gate[k] /= sum;
}

static void check_topk(const float *logits, int N, int E, int K) {
    int *idx = alloc_i((size_t)N * K), *widx = alloc_i((size_t)N * K), *slot = alloc_i((size_t)N * K);
    float *gate = alloc_f((size_t)N * K);
    double *wgate = alloc_d((size_t)N * K);
    qs_moe_load load = load_alloc(E);
    for (int i = 0; i < N * K; i++) idx[i] = -1;
    poison(gate, (size_t)N * K);
    route(&load, idx, gate, slot, logits, N, E, K, 0);
    for (int n = 0; n < N; n++) topk_reference(widx + n * K, wgate + n * K, logits + n * E, E, K);
    for (int i = 0; i < N * K; i++)
        if (idx[i] != widx[i])
            fail_msg("topk idx[%d] = %d, want %d (E=%d K=%d)", i, idx[i], widx[i], E, K);
    check_close("topk gate", gate, wgate, (size_t)N * K, 1e-5, 1e-6);
    free(idx), free(widx), free(slot), free(gate), free(wgate), load_free(&load);
}

static void test_topk(void **state) {
    (void)state;
    /* Exact ties: the lower index comes first. */
    const float ties[] = {1, 3, 3, 2, 3, 0, /**/ 5, 5, 5, 5, 5, 5, /**/ -1, 4, 0, 4, 9, 4};
    const int want3[] = {1, 2, 4, /**/ 0, 1, 2, /**/ 4, 1, 3};
    int idx[9], slot[9];
    float gate[9];
    qs_moe_load load = load_alloc(6);
    route(&load, idx, gate, slot, ties, 3, 6, 3, 0);
    assert_memory_equal(idx, want3, sizeof idx);
    load_free(&load);
    for (int K = 1; K <= 6; K++) check_topk(ties, 3, 6, K);

    /* Random rows, integer logits so ties are frequent. */
    const int N = rnd_int(7, 37), E = rnd_int(5, 11);
    float *x = alloc_f((size_t)N * E);
    for (int i = 0; i < N * E; i++) x[i] = (float)rnd_int(-3, 3);
    for (int K = 1; K <= 3; K++) check_topk(x, N, E, K);
    for (int i = 0; i < N * E; i++) x[i] = rnd_uniform(-5, 5);
    check_topk(x, N, E, 2);
    check_topk(x, N, E, E); /* every expert */
    free(x);
}

/* Capacity assignment */

static void test_assign_by_hand(void **state) {
    (void)state;
    /* 4 tokens, 3 experts, top-2. In token order expert 0 gets tokens 0, 1, 2,
     * expert 1 gets 0, 2, 3, expert 2 gets 1, 3. */
    const int idx[] = {0, 1, 0, 2, 0, 1, 1, 2};
    int slot[8];
    qs_moe_load load = load_alloc(3);

    /* Capacity 2: the third arrival at experts 0 and 1 is dropped. */
    assert_int_equal(route_to(&load, slot, idx, 4, 3, 2, 2), 2);
    const int routed_w[] = {3, 3, 2}, counts2[] = {2, 2, 2}, offsets2[] = {0, 2, 4, 6};
    const int slot2[] = {0, 2, 1, 4, -1, 3, -1, 5};
    assert_memory_equal(load.routed, routed_w, sizeof routed_w);
    assert_memory_equal(load.counts, counts2, sizeof counts2);
    assert_memory_equal(load.offsets, offsets2, sizeof offsets2);
    assert_memory_equal(slot, slot2, sizeof slot);

    /* Capacity 1: tokens 2 and 3 lose both experts. */
    assert_int_equal(route_to(&load, slot, idx, 4, 3, 2, 1), 5);
    const int counts1[] = {1, 1, 1}, offsets1[] = {0, 1, 2, 3};
    const int slot1[] = {0, 1, -1, 2, -1, -1, -1, -1};
    assert_memory_equal(load.counts, counts1, sizeof counts1);
    assert_memory_equal(load.offsets, offsets1, sizeof offsets1);
    assert_memory_equal(slot, slot1, sizeof slot);

    /* Dropless (capacity <= 0). */
    for (int cap = 0; cap >= -1; cap--) {
        assert_int_equal(route_to(&load, slot, idx, 4, 3, 2, cap), 0);
        const int offsets0[] = {0, 3, 6, 8}, slot0[] = {0, 3, 1, 6, 2, 4, 5, 7};
        assert_memory_equal(load.routed, routed_w, sizeof routed_w);
        assert_memory_equal(load.counts, routed_w, sizeof routed_w);
        assert_memory_equal(load.offsets, offsets0, sizeof offsets0);
        assert_memory_equal(slot, slot0, sizeof slot);
    }
    load_free(&load);
}

static void test_assign_random(void **state) {
    (void)state;
    for (int rep = 0; rep < 20; rep++) {
        const int N = rnd_int(7, 37), E = rnd_int(2, 7), K = rnd_int(1, E < 3 ? E : 3);
        const int cap = rep % 4 == 0 ? 0 : rnd_int(1, N * K / E + 1);
        int *idx = alloc_i((size_t)N * K), *slot = alloc_i((size_t)N * K), *rank = alloc_i(E);
        qs_moe_load load = load_alloc(E);
        rnd_routes(idx, N, E, K);
        for (int i = 0; i < N * K; i++) slot[i] = 1 << 30;
        const int dropped = route_to(&load, slot, idx, N, E, K, cap);
        int want_dropped = 0;
        assert_int_equal(load.offsets[0], 0);
        for (int e = 0; e < E; e++) {
            int r = 0;
            for (int i = 0; i < N * K; i++) r += idx[i] == e;
            assert_int_equal(load.routed[e], r);
            assert_int_equal(load.counts[e], cap > 0 && r > cap ? cap : r);
            assert_int_equal(load.offsets[e + 1], load.offsets[e] + load.counts[e]);
            want_dropped += r - load.counts[e];
        }
        assert_int_equal(dropped, want_dropped);
        /* The first `cap` arrivals at an expert, in token order, fill its rows in order. */
        for (int i = 0; i < N * K; i++) {
            const int e = idx[i], r = rank[e]++;
            assert_int_equal(slot[i], cap <= 0 || r < cap ? load.offsets[e] + r : -1);
        }
        free(idx), free(slot), free(rank), load_free(&load);
    }
}

/* The regularizers, against their definition. */
static void test_route_losses(void **state) {
    (void)state;
    const int N = rnd_int(7, 37), E = 7, K = 2;
    float *x = rnd_tensor((size_t)N * E, -3, 3), *gate = alloc_f((size_t)N * K);
    int *idx = alloc_i((size_t)N * K), *slot = alloc_i((size_t)N * K);
    qs_moe_load load = load_alloc(E);
    route(&load, idx, gate, slot, x, N, E, K, 0);
    double P[7] = {0}, wz = 0.0, wb = 0.0;
    for (int n = 0; n < N; n++) {
        const float *xn = x + (size_t)n * E;
        double sum = 0.0;
        for (int e = 0; e < E; e++) sum += exp(xn[e]);
        for (int e = 0; e < E; e++) P[e] += exp(xn[e]) / sum / N;
        wz += log(sum) * log(sum) / N;
    }
    for (int e = 0; e < E; e++) wb += E * (load.routed[e] / (double)(N * K)) * P[e];
    check_close("balance", &load.balance, &wb, 1, 1e-5, 0.0);
    check_close("z", &load.z, &wz, 1, 1e-5, 0.0);
    free(x), free(gate), free(idx), free(slot), load_free(&load);
}

/* Gradients of L = sum(R * gate) + bc * balance + zc * z at the clean and noise logits. */
typedef struct {
    qs_moe_router r;
    float bc, zc;
    float *clean, *noise, *h, *gate, *R;
    int *idx, *slot;
    qs_moe_load load;
} route_grad_ctx;

static double route_loss(void *p) {
    route_grad_ctx *c = p;
    const size_t NK = (size_t)c->r.N * c->r.K;
    poison(c->gate, NK);
    if (c->noise) poison(c->h, (size_t)c->r.N * c->r.E);
    ops->moe_route_forward(&c->load, c->idx, c->gate, c->slot, c->h, c->clean, c->noise, &c->r);
    return weighted_sum(c->gate, c->R, NK) + (double)c->bc * c->load.balance + (double)c->zc * c->load.z;
}
static void route_backward(void *p, float **g) {
    route_grad_ctx *c = p;
    ops->moe_route_backward(g[0], c->noise ? g[1] : NULL, c->R, c->idx, c->gate, c->noise ? c->h : c->clean, c->noise, &c->load,
                            c->bc, c->zc, &c->r);
}

static void check_route_gradients(bool noisy) {
    const int N = rnd_int(7, 37), E = rnd_int(4, 9), K = rnd_int(1, 3);
    const size_t NE = (size_t)N * E, NK = (size_t)N * K;
    /* rows carry global ids (a token's noise follows it to any rank or batch position) */
    int64_t *ids = malloc((size_t)N * sizeof(int64_t));
    for (int n = 0; n < N; n++) ids[n] = (int64_t)(rnd_u64() >> 20);
    route_grad_ctx c = {.r = {.N = N, .E = E, .K = K, .capacity = 0, .seed = rnd_u64(), .stream = 3, .row_ids = ids},
                        .bc = rnd_uniform(0.5f, 2.0f), .zc = rnd_uniform(0.5f, 2.0f), .clean = alloc_f(NE),
                        .noise = noisy ? rnd_tensor(NE, -2, 2) : NULL, .h = alloc_f(NE), .gate = alloc_f(NK),
                        .R = rnd_tensor(NK, -1, 1), .idx = alloc_i(NK), .slot = alloc_i(NK), .load = load_alloc(E)};
    /* Routing logits apart by >= 0.2, so no finite-difference step flips a choice: the
     * clean logits are those minus the noise. */
    separated_logits(c.clean, N, E);
    double *want_h = alloc_d(NE);
    for (size_t i = 0; i < NE; i++) {
        const double z = noisy ? qs_rng_normal(c.r.seed, c.r.stream, (uint64_t)ids[i / E] * E + i % E) : 0.0;
        const double noise = noisy ? z * log1p(exp((double)c.noise[i])) : 0.0;
        c.clean[i] -= (float)noise;
        want_h[i] = c.clean[i] + noise;
    }
    route_loss(&c);
    if (noisy) check_close("noisy gate", c.h, want_h, NE, 1e-5, 1e-6);
    const param ps[] = {{"clean", c.clean, NE}, {"noise", c.noise, NE}};
    /* a step of 1e-2: the losses are floats, and no choice is within 0.1 of flipping */
    check_gradients(noisy ? "route noisy" : "route", route_loss, route_backward, &c, ps, noisy ? 2 : 1, 1e-2);
    free(ids), free(want_h), free(c.clean), free(c.noise), free(c.h), free(c.gate), free(c.R), free(c.idx);
    free(c.slot), load_free(&c.load);
}

static void test_route_gradients(void **state) {
    (void)state;
    check_route_gradients(false);
    check_route_gradients(true);
}

/* ---- MoE: dispatch / combine ---- */

typedef struct {
    int N, K, C, rows;
    const int *slot;
    float *x, *xe, *ye, *gate, *y, *R;
} route_ctx;

static double dispatch_loss(void *p) {
    route_ctx *c = p;
    poison(c->xe, (size_t)c->rows * c->C);
    ops->moe_dispatch_forward(c->xe, c->x, c->slot, c->N, c->K, c->C);
    return weighted_sum(c->xe, c->R, (size_t)c->rows * c->C);
}
static void dispatch_backward(void *p, float **g) {
    route_ctx *c = p;
    ops->moe_dispatch_backward(g[0], c->R, c->slot, c->N, c->K, c->C);
}
static double combine_loss(void *p) {
    route_ctx *c = p;
    poison(c->y, (size_t)c->N * c->C);
    ops->moe_combine_forward(c->y, c->ye, c->gate, c->slot, c->N, c->K, c->C);
    return weighted_sum(c->y, c->R, (size_t)c->N * c->C);
}
static void combine_backward(void *p, float **g) {
    route_ctx *c = p;
    ops->moe_combine_backward(g[0], g[1], c->R, c->ye, c->gate, c->slot, c->N, c->K, c->C);
}

/* dispatch then combine: y[n] = x[n] * (sum of n's kept gates); all-dropped -> 0. */
static void check_round_trip(const int *slot, int rows, int N, int K, int C) {
    float *x = rnd_tensor((size_t)N * C, -1, 1), *gate = rnd_tensor((size_t)N * K, 0, 1);
    float *xe = alloc_f((size_t)rows * C), *y = alloc_f((size_t)N * C);
    double *want = alloc_d((size_t)N * C);
    poison(xe, (size_t)rows * C);
    poison(y, (size_t)N * C);
    ops->moe_dispatch_forward(xe, x, slot, N, K, C);
    ops->moe_combine_forward(y, xe, gate, slot, N, K, C);
    for (int n = 0; n < N; n++) {
        double g = 0.0;
        for (int k = 0; k < K; k++) {
            const int s = slot[n * K + k];
            if (s < 0) continue;
            g += gate[n * K + k];
            assert_memory_equal(xe + (size_t)s * C, x + (size_t)n * C, C * sizeof *x);
        }
        for (int j = 0; j < C; j++) want[(size_t)n * C + j] = g * x[(size_t)n * C + j];
    }
    check_close("dispatch/combine", y, want, (size_t)N * C, 1e-5, 0.0);
    free(x), free(gate), free(xe), free(y), free(want);
}

static void test_dispatch_combine(void **state) {
    (void)state;
    /* The hand-made capacity-1 case above: tokens 2 and 3 are fully dropped. */
    const int slot1[] = {0, 1, -1, 2, -1, -1, -1, -1};
    check_round_trip(slot1, 3, 4, 2, 13);

    const int N = rnd_int(7, 37), E = 5, K = 2, C = 13;
    int *idx = alloc_i((size_t)N * K), *slot = alloc_i((size_t)N * K);
    qs_moe_load load = load_alloc(E);
    rnd_routes(idx, N, E, K);
    const int capacity = N * K / E * 2 / 3; /* below the mean load: some are dropped */
    assert_true(route_to(&load, slot, idx, N, E, K, capacity) > 0);
    const int rows = load.offsets[E];
    check_round_trip(slot, rows, N, K, C);

    route_ctx c = {N, K, C, rows, slot, rnd_tensor((size_t)N * C, -1, 1),
                   alloc_f((size_t)rows * C), rnd_tensor((size_t)rows * C, -1, 1),
                   rnd_tensor((size_t)N * K, 0, 1), alloc_f((size_t)N * C), NULL};
    c.R = rnd_tensor((size_t)rows * C, -1, 1);
    const param pd[] = {{"x", c.x, (size_t)N * C}};
    check_gradients("dispatch", dispatch_loss, dispatch_backward, &c, pd, 1, 1e-3);
    free(c.R);
    c.R = rnd_tensor((size_t)N * C, -1, 1);
    const param pc[] = {{"ye", c.ye, (size_t)rows * C}, {"gate", c.gate, (size_t)N * K}};
    check_gradients("combine", combine_loss, combine_backward, &c, pc, 2, 1e-3);
    free(c.R), free(c.x), free(c.xe), free(c.ye), free(c.gate), free(c.y), free(idx), free(slot);
    load_free(&load);
}

/* ---- optimizer ---- */

static void test_sumsq(void **state) {
    (void)state;
    const size_t sizes[] = {0, 5, 1003, 100003};
    for (int s = 0; s < 4; s++) {
        const size_t n = sizes[s];
        float *g = rnd_tensor(n, -2, 2);
        double want = 0.0;
        for (size_t i = 0; i < n; i++) want += (double)g[i] * g[i];
        const double got = ops->sumsq(g, n);
        if (!(fabs(got - want) <= 1e-12 * want))
            fail_msg("sumsq(%zu) = %.17g, want %.17g", n, got, want);
        free(g);
    }
}

static void test_adamw(void **state) {
    (void)state;
    const size_t n = 1003;
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, scale = 0.5f;
    float *p = rnd_tensor(n, -1, 1), *m = alloc_f(n), *v = alloc_f(n);
    double *wp = alloc_d(n), *wm = alloc_d(n), *wv = alloc_d(n);
    for (size_t i = 0; i < n; i++) wp[i] = p[i];
    for (int t = 1; t <= 6; t++) {
        float *g = rnd_tensor(n, -3, 3);
        for (size_t i = 0; i < n; i += 7) g[i] = 0.0f;
        ops->adamw_update(p, g, m, v, n, lr, b1, b2, eps, wd, t, scale);
        for (size_t i = 0; i < n; i++) {
            const double gs = (double)g[i] * scale;
            wm[i] = b1 * wm[i] + (1.0 - b1) * gs;
            wv[i] = b2 * wv[i] + (1.0 - b2) * gs * gs;
            const double mh = wm[i] / (1.0 - pow(b1, t)), vh = wv[i] / (1.0 - pow(b2, t));
            wp[i] -= lr * (mh / (sqrt(vh) + eps) + wd * wp[i]);
        }
        check_close("adamw m", m, wm, n, 1e-5, 1e-7);
        check_close("adamw v", v, wv, n, 1e-5, 1e-8);
        check_close("adamw p", p, wp, n, 1e-5, 1e-6);
        free(g);
    }
    free(p), free(m), free(v), free(wp), free(wm), free(wv);
}

/* ---- quadratic depthwise convolution ---- */

typedef struct {
    qs_conv_shape s;
    float *x, *w, *bias, *y, *fa, *fb, *R;
} qc_ctx;

static size_t qc_n(const qs_conv_shape *s) { return (size_t)s->B * s->H * s->W * s->C; }
static size_t qc_filt(const qs_conv_shape *s) { return (size_t)s->KH * s->KW * s->C; }

static double qc_loss(void *p) {
    qc_ctx *c = p;
    const size_t n = qc_n(&c->s);
    poison(c->y, n), poison(c->fa, n), poison(c->fb, n);
    ops->quadconv_forward(c->y, c->fa, c->fb, c->x, c->w, c->bias, &c->s);
    return weighted_sum(c->y, c->R, n);
}
static void qc_backward(void *p, float **g) {
    qc_ctx *c = p;
    ops->quadconv_backward(g[0], g[1], g[2], c->R, c->x, c->w, c->fa, c->fb, &c->s);
}

/* Each filter applied by the definition, in double. */
static void qc_reference(const qc_ctx *c, double *y, double *fa, double *fb) {
    const qs_conv_shape *s = &c->s;
    for (int b = 0; b < s->B; b++)
        for (int h = 0; h < s->H; h++)
            for (int w = 0; w < s->W; w++)
                for (int ch = 0; ch < s->C; ch++) {
                    double f[3];
                    for (int k = 0; k < 3; k++) {
                        f[k] = c->bias[k * s->C + ch];
                        for (int i = 0; i < s->KH; i++)
                            for (int j = 0; j < s->KW; j++) {
                                const int ih = h + i - s->pad_top, iw = w + j - s->pad_left;
                                if (ih < 0 || ih >= s->H || iw < 0 || iw >= s->W) continue;
                                f[k] += (double)c->w[k * qc_filt(s) + ((size_t)i * s->KW + j) * s->C + ch] *
                                        c->x[(((size_t)b * s->H + ih) * s->W + iw) * s->C + ch];
                            }
                    }
                    const size_t o = (((size_t)b * s->H + h) * s->W + w) * s->C + ch;
                    y[o] = f[0] * f[1] + f[2];
                    fa[o] = f[0];
                    fb[o] = f[1];
                }
}

static void check_quadconv(const char *what, qs_conv_shape s) {
    const size_t n = qc_n(&s), nw = 3 * qc_filt(&s);
    qc_ctx c = {s, rnd_tensor(n, -1, 1), rnd_tensor(nw, -0.5f, 0.5f), rnd_tensor(3 * (size_t)s.C, -0.5f, 0.5f),
                alloc_f(n), alloc_f(n), alloc_f(n), rnd_tensor(n, -1, 1)};
    double *y = alloc_d(n), *fa = alloc_d(n), *fb = alloc_d(n);
    qc_loss(&c);
    qc_reference(&c, y, fa, fb);
    check_close("quadconv y", c.y, y, n, 1e-5, 1e-5);
    check_close("quadconv fa", c.fa, fa, n, 1e-5, 1e-5);
    check_close("quadconv fb", c.fb, fb, n, 1e-5, 1e-5);
    print_message("  %s: B=%d H=%d W=%d C=%d k=%dx%d pad=(%d,%d)\n", what, s.B, s.H, s.W, s.C, s.KH, s.KW,
                  s.pad_top, s.pad_left);
    const param ps[] = {{"x", c.x, n}, {"w", c.w, nw}, {"bias", c.bias, 3 * (size_t)s.C}};
    check_gradients(what, qc_loss, qc_backward, &c, ps, 3, 1e-3);
    free(y), free(fa), free(fb);
    free(c.x), free(c.w), free(c.bias), free(c.y), free(c.fa), free(c.fb), free(c.R);
}

static void test_quadconv_2d(void **state) {
    (void)state;
    const int ks[] = {1, 3, 5, 7};
    for (int t = 0; t < 4; t++) { /* tiny (one thread) and larger (the parallel path) */
        const int k = ks[t], big = t >= 2;
        qs_conv_shape s = {.B = rnd_int(1, 3), .H = rnd_int(1, big ? 13 : 6), .W = rnd_int(2, big ? 11 : 6),
                           .C = rnd_int(1, big ? 37 : 5), .KH = k, .KW = k, .pad_top = k / 2, .pad_left = k / 2};
        if (big) s.H = s.H < 9 ? 9 : s.H, s.C = s.C < 20 ? 20 : s.C; /* images smaller than the filter too */
        if (t == 3) s.C = rnd_int(33, 70); /* the forward's 32-channel register blocks and a tail */
        check_quadconv("quadconv 2d", s);
    }
}

static void test_quadconv_causal(void **state) {
    (void)state;
    for (int t = 0; t < 3; t++) {
        const int k = rnd_int(2, 6);
        qs_conv_shape s = {.B = rnd_int(1, 3), .H = 1, .W = rnd_int(1, 40), .C = rnd_int(1, 19), .KH = 1, .KW = k,
                           .pad_top = 0, .pad_left = k - 1};
        check_quadconv("quadconv causal", s);
    }
    /* Causality: changing step t changes no output before t. */
    qs_conv_shape s = {.B = 1, .H = 1, .W = 17, .C = 4, .KH = 1, .KW = 4, .pad_left = 3};
    const size_t n = qc_n(&s);
    float *x = rnd_tensor(n, -1, 1), *w = rnd_tensor(3 * qc_filt(&s), -1, 1), *b = rnd_tensor(12, -1, 1);
    float *y0 = alloc_f(n), *y1 = alloc_f(n), *fa = alloc_f(n), *fb = alloc_f(n);
    ops->quadconv_forward(y0, fa, fb, x, w, b, &s);
    const int t = rnd_int(0, 16);
    for (int ch = 0; ch < 4; ch++) x[(size_t)t * 4 + ch] += 1.0f;
    ops->quadconv_forward(y1, fa, fb, x, w, b, &s);
    assert_memory_equal(y0, y1, (size_t)t * 4 * sizeof(float));
    assert_memory_not_equal(y0 + (size_t)t * 4, y1 + (size_t)t * 4, 4 * sizeof(float));
    free(x), free(w), free(b), free(y0), free(y1), free(fa), free(fb);
}

/* ---- image layout ops and layer scale ---- */

typedef struct {
    int kind, B, H, W, C, p;
    float drop;
    uint64_t seed;
    float *inp, *resid, *gamma, *out, *R;
    uint64_t sample0; /* layer scale: global index of sample 0 */
} img_ctx;
enum { IMG_S2D, IMG_POOL, IMG_LSCALE };

static size_t img_in(const img_ctx *c) { return (size_t)c->B * c->H * c->W * c->C; }
static size_t img_out(const img_ctx *c) { return c->kind == IMG_POOL ? (size_t)c->B * c->C : img_in(c); }

static double img_loss(void *p) {
    img_ctx *c = p;
    poison(c->out, img_out(c));
    if (c->kind == IMG_S2D) ops->space_to_depth_forward(c->out, c->inp, c->B, c->H, c->W, c->C, c->p);
    else if (c->kind == IMG_POOL) ops->avgpool_forward(c->out, c->inp, c->B, c->H * c->W, c->C);
    else ops->layer_scale_forward(c->out, c->resid, c->inp, c->gamma, c->drop, c->seed, 5, c->sample0, c->B, c->H * c->W,
                                  c->C);
    return weighted_sum(c->out, c->R, img_out(c));
}
static void img_backward(void *p, float **g) {
    img_ctx *c = p;
    if (c->kind == IMG_S2D) ops->space_to_depth_backward(g[0], c->R, c->B, c->H, c->W, c->C, c->p);
    else if (c->kind == IMG_POOL) ops->avgpool_backward(g[0], c->R, c->B, c->H * c->W, c->C);
    else ops->layer_scale_backward(g[0], g[1], c->R, c->inp, c->gamma, c->drop, c->seed, 5, c->sample0, c->B,
                                   c->H * c->W, c->C);
}

static img_ctx img_make(int kind, int p) {
    img_ctx c = {kind, rnd_int(1, 4), p * rnd_int(1, 5), p * rnd_int(1, 5), rnd_int(1, 9), p, 0.0f, rnd_u64(),
                 NULL, NULL, NULL, NULL, NULL, 0};
    c.inp = rnd_tensor(img_in(&c), -1, 1);
    c.resid = rnd_tensor(img_in(&c), -1, 1);
    c.gamma = rnd_tensor((size_t)c.C, -1, 1);
    c.out = alloc_f(img_in(&c));
    c.R = rnd_tensor(img_out(&c), -1, 1);
    return c;
}
static void img_free(img_ctx *c) { free(c->inp), free(c->resid), free(c->gamma), free(c->out), free(c->R); }

static void test_space_to_depth_pool(void **state) {
    (void)state;
    for (int p = 1; p <= 3; p++) {
        img_ctx c = img_make(IMG_S2D, p);
        img_loss(&c);
        const size_t n = img_in(&c);
        double *want = alloc_d(n);
        const int Ho = c.H / p, Wo = c.W / p;
        for (int b = 0; b < c.B; b++)
            for (int h = 0; h < c.H; h++)
                for (int w = 0; w < c.W; w++)
                    for (int ch = 0; ch < c.C; ch++)
                        want[((((size_t)b * Ho + h / p) * Wo + w / p) * p * p + (size_t)(h % p) * p + w % p) * c.C + ch] =
                            c.inp[(((size_t)b * c.H + h) * c.W + w) * c.C + ch];
        check_close("space_to_depth", c.out, want, n, 0.0, 0.0);
        const param ps[] = {{"inp", c.inp, n}};
        check_gradients("space_to_depth", img_loss, img_backward, &c, ps, 1, 1e-2);
        free(want);
        img_free(&c);
    }
    img_ctx c = img_make(IMG_POOL, 1);
    img_loss(&c);
    double *want = alloc_d(img_out(&c));
    for (int b = 0; b < c.B; b++)
        for (int ch = 0; ch < c.C; ch++) {
            for (int n = 0; n < c.H * c.W; n++) want[(size_t)b * c.C + ch] += c.inp[((size_t)b * c.H * c.W + n) * c.C + ch];
            want[(size_t)b * c.C + ch] /= c.H * c.W;
        }
    check_close("avgpool", c.out, want, img_out(&c), 1e-5, 1e-6);
    const param ps[] = {{"inp", c.inp, img_in(&c)}};
    check_gradients("avgpool", img_loss, img_backward, &c, ps, 1, 1e-2);
    free(want);
    img_free(&c);
}

static void test_layer_scale(void **state) {
    (void)state;
    const float drops[] = {0.0f, 0.5f};
    for (int d = 0; d < 2; d++) {
        img_ctx c = img_make(IMG_LSCALE, 1);
        c.B += 8; /* enough samples that both kept and dropped ones occur */
        img_free(&c);
        c.inp = rnd_tensor(img_in(&c), -1, 1), c.resid = rnd_tensor(img_in(&c), -1, 1);
        c.gamma = rnd_tensor((size_t)c.C, -1, 1), c.out = alloc_f(img_in(&c)), c.R = rnd_tensor(img_in(&c), -1, 1);
        c.drop = drops[d];
        c.sample0 = rnd_u64() >> 16;
        /* a seed whose mask keeps some samples and drops others (all-or-none has
         * probability 2^(1-B) per draw) */
        for (int kept = 0; c.drop > 0 && (kept == 0 || kept == c.B);) {
            c.seed = rnd_u64();
            kept = 0;
            for (int b = 0; b < c.B; b++) kept += qs_rng_uniform(c.seed, 5, c.sample0 + (uint64_t)b) >= c.drop;
        }
        img_loss(&c);
        const size_t n = img_in(&c), per = (size_t)c.H * c.W * c.C;
        double *want = alloc_d(n);
        int dropped = 0;
        for (int b = 0; b < c.B; b++) {
            const int keep = qs_rng_uniform(c.seed, 5, c.sample0 + (uint64_t)b) >= c.drop;
            dropped += !keep;
            for (size_t i = 0; i < per; i++) {
                const size_t o = b * per + i;
                want[o] = c.resid[o] + (keep ? c.gamma[i % c.C] * c.inp[o] / (1.0 - c.drop) : 0.0);
            }
        }
        check_close("layer_scale", c.out, want, n, 1e-6, 1e-6);
        if (c.drop > 0) assert_true(dropped > 0 && dropped < c.B);
        /* in place over the residual */
        float *res = copy_tensor(c.resid, n);
        ops->layer_scale_forward(res, res, c.inp, c.gamma, c.drop, c.seed, 5, c.sample0, c.B, c.H * c.W, c.C);
        check_close("layer_scale in place", res, want, n, 1e-6, 1e-6);
        const param ps[] = {{"inp", c.inp, n}, {"gamma", c.gamma, (size_t)c.C}};
        check_gradients("layer_scale", img_loss, img_backward, &c, ps, 2, 1e-3);
        free(res), free(want);
        img_free(&c);
    }
}

int main(void) {
    test_seed = qs_test_seed("test_ops");
    /* Three threads unless told otherwise: uneven row splits and several partial
     * buffers exercise the deterministic reductions even on a two-core machine. */
    if (!getenv("OMP_NUM_THREADS")) omp_set_num_threads(3);
    ops = qs_backend_cpu()->ops;

    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backend_memory),  cmocka_unit_test(test_embed),
        cmocka_unit_test(test_layernorm),       cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_one_row),  cmocka_unit_test(test_matmul_few_rows),
        cmocka_unit_test(test_bf16_rounding),
        cmocka_unit_test(test_matmul_bf16),
        cmocka_unit_test(test_matmul_gelu),     cmocka_unit_test(test_matmul_grouped),
        cmocka_unit_test(test_attention),       cmocka_unit_test(test_gelu_relu),
        cmocka_unit_test(test_residual_layernorm),             cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_xent),            cmocka_unit_test(test_topk),
        cmocka_unit_test(test_assign_by_hand),  cmocka_unit_test(test_assign_random),
        cmocka_unit_test(test_route_losses),    cmocka_unit_test(test_route_gradients),
        cmocka_unit_test(test_dispatch_combine), cmocka_unit_test(test_sumsq),
        cmocka_unit_test(test_adamw),           cmocka_unit_test(test_quadconv_2d),
        cmocka_unit_test(test_quadconv_causal), cmocka_unit_test(test_space_to_depth_pool),
        cmocka_unit_test(test_layer_scale),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

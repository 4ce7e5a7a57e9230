/* Parity of the CUDA backend with the CPU reference (`make test-gpu`, GPU machines only).
 *
 * First the memory plan: an MoE GPT and its optimizer take the device memory the plan
 * computed from the config, and training steps take none (no allocation in the loop).
 * Then every op of qs_ops runs on both backends over the same fresh random inputs (seed
 * printed; QS_TEST_SEED replays it) at several awkward sizes (1, and none a multiple of
 * 32, 64 or 128). Before each call the outputs an op overwrites are poisoned with NaN on
 * both backends, and the ones it accumulates into get the same random values on both;
 * an output element the reference leaves alone must stay NaN on the GPU too. Then whole
 * models (GPT dense, also grouped-query / MoE with noisy gating / quadconv mixer, all with dropout on; a
 * QuadraNet with stochastic depth) built on both backends from the same init must give
 * the same loss and gradients (and the GPTs the same bits when the CUDA pass is
 * repeated, and the same logits through the KV cache; frozen dense and MoE GPTs the same
 * logits from bf16 weights), and a tiny GPT trained with AdamW on both must follow the
 * same loss curve (QS_PARITY_STEPS steps, 200 by default).
 *
 * Tolerances (fp32): an element passes when |cuda - cpu| <= tol * max(|cpu|, rms), rms
 * the root mean square of the reference tensor (so an element that cancels to nearly 0
 * is judged against the tensor's scale); NaN and infinities must match exactly.
 *   ELEM 1e-5: element-wise ops (activations, dropout, gating, layouts, AdamW);
 *   RED  1e-4: anything that sums (norms, GEMMs, softmaxes, attention, convolutions),
 *              and whole-model losses and every gradient tensor;
 *   TRAIN 1e-3: each step's loss of the training run (rounding differences compound
 *              through the updates; a first estimate, to be confirmed on a GPU).
 * Integer outputs (top-k choices, slots, counts) must be equal.
 *
 * Then the backend with bf16 matrix products (train.precision bf16): its attention (the
 * tensor-core kernels) over the same shapes, each of out, lse and the gradients within
 * BF16 as ||cuda - cpu|| / ||cpu|| and BF16_TENSOR element by element (check_sum), and
 * the model checks again against the same fp32 CPU reference, every loss and gradient
 * within BF16 2e-2 (issue 4's bound; for the gradients ||cuda - cpu|| / ||cpu|| over all
 * of them, and 1e-1 for each tensor alone: see compare_grads) and the training run's
 * losses too. bf16 moves router logits by ~1e-3, enough to flip a near-tied top-k
 * choice; where the MoE model's routing differs from the CPU's, its loss is still
 * compared but its gradients (which then differ by design) are not, and the line says so;
 * likewise its decode logits when the prompt's or the new tokens' routing differs.
 *
 * Last, the grouped products again with the emulated cuBLAS answering that it has no
 * grouped form (QS_EMU_NO_GROUPED; a GPU ignores it and repeats them): the backend's
 * fallback, a GEMM per group; and the linear layers with the emulated cuBLASLt finding
 * no algorithm for any epilogue (QS_EMU_NO_LT_EPILOGUE): a GEMM, then the bias and GELU
 * kernels.
 *
 * Output is TAP: one "ok - ..." or "not ok - ..." line per check (with a "# ..." line
 * saying why), then the plan and a count. Exits non-zero if any check failed or no CUDA
 * device is visible. `parity ops` runs the memory plans, the ops and the emulator's
 * fallbacks, `parity models` the models in fp32 and all of the bf16 pass: two processes
 * of about equal length (the emulated run in `make test` starts both at once). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../test_seed.h"
#include "quasar/backend.h"
#include "quasar/config.h"
#include "quasar/error.h"
#include "quasar/memplan.h"
#include "quasar/model.h"
#include "quasar/optim.h"
#include "quasar/quadranet.h"
#include "quasar/rng.h"

#define ELEM 1e-5
#define RED 1e-4
#define TRAIN 1e-3
#define BF16 2e-2
#define BF16_TENSOR 1e-1

static const qs_backend *be[2]; /* 0: the CPU reference, 1: CUDA */
static int side;                /* the backend BOTH is calling */
static uint64_t seed, draws;    /* draws: the random stream of the next array */
static int passed, failed;
static bool bf16; /* the second pass of the model checks: be[1] multiplies in bf16 */

/* The whole-model checks' bounds in the current pass. */
static double model_tol(void) { return bf16 ? BF16 : RED; }
static double train_tol(void) { return bf16 ? BF16 : TRAIN; }

/* ---- checks: one TAP line each ---- */

static char case_name[256], why[768];
static int bad;

static void fail(const char *fmt, ...) QS_PRINTF(1, 2);
static void fail(const char *fmt, ...) {
    if (bad++) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
}

static void case_begin(const char *fmt, ...) QS_PRINTF(1, 2);
static void case_begin(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(case_name, sizeof case_name, fmt, ap);
    va_end(ap);
    bad = 0;
}

static void release_tensors(void);

static void case_end(void) {
    release_tensors();
    if (bad) printf("not ok - %s\n# %s\n", case_name, why);
    else printf("ok - %s\n", case_name);
    fflush(stdout);
    bad ? failed++ : passed++;
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        printf("Bail out! out of host memory\n");
        exit(2);
    }
    return p;
}

/* c: the reference, g: the GPU's, n floats (see the header for the rule), each error
 * judged against at least `floor`. */
static void compare_floor(const char *what, const float *c, const float *g, size_t n, double tol, double floor) {
    double ss = 0.0;
    size_t finite = 0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(c[i])) {
            ss += (double)c[i] * c[i];
            finite++;
        }
    const double rms = finite ? sqrt(ss / (double)finite) : 0.0;
    double worst = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(c[i]) || !isfinite(g[i])) {
            if (!(isnan(c[i]) && isnan(g[i])) && c[i] != g[i]) {
                fail("%s[%zu]: cpu %g, cuda %g", what, i, c[i], g[i]);
                return;
            }
            continue;
        }
        const double ref = fmax(fmax(fabs(c[i]), rms), floor), diff = fabs((double)g[i] - c[i]);
        const double err = ref > 0.0 ? diff / ref : diff;
        if (err > worst) {
            worst = err;
            at = i;
        }
    }
    if (worst > tol)
        fail("%s[%zu]: cpu %.9g, cuda %.9g (error %.3g > %.0e, rms %.3g)", what, at, c[at], g[at], worst, tol, rms);
}

static void compare(const char *what, const float *c, const float *g, size_t n, double tol) {
    compare_floor(what, c, g, n, tol, 0.0);
}

/* Sums of squares of g - c and of c over n floats, added to dd and cc; pairs where the
 * reference is not finite are left to compare's exact rule. Returns the pairs summed. */
static size_t l2_terms(const float *c, const float *g, size_t n, double *dd, double *cc) {
    size_t summed = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(c[i])) continue;
        *dd += ((double)g[i] - c[i]) * ((double)g[i] - c[i]);
        *cc += (double)c[i] * c[i];
        summed++;
    }
    return summed;
}

static void compare_scalar(const char *what, double c, double g, double tol) {
    const float cf = (float)c, gf = (float)g;
    compare(what, &cf, &gf, 1, tol);
}

/* ---- tensors: the same array on both backends, freed at the end of the check ---- */

typedef struct tensor {
    size_t n, elt;
    void *p[2];
} tensor;

#define F(t) ((float *)(t).p[side])
#define I(t) ((int *)(t).p[side])
#define L(t) ((int64_t *)(t).p[side])

/* Runs `call` once on each backend, CPU first; inside it `ops` is that backend's table
 * and F/I/L(t) that backend's copy of t. */
#define BOTH(call)                                     \
    do {                                               \
        for (side = 0; side < 2; side++) {             \
            const qs_ops *ops = be[side]->ops;         \
            (void)ops;                                 \
            call;                                      \
        }                                              \
    } while (0)

#define MAX_LIVE 32
static tensor live[MAX_LIVE];
static int n_live;

static void release_tensors(void) {
    for (int i = 0; i < n_live; i++)
        for (int s = 0; s < 2; s++) be[s]->free(live[i].p[s]);
    n_live = 0;
}

/* A tensor holding host[n] of elt bytes each on both backends. */
static tensor t_host(const void *host, size_t n, size_t elt) {
    if (n_live == MAX_LIVE) {
        printf("Bail out! more than %d tensors in one check\n", MAX_LIVE);
        exit(2);
    }
    tensor t = {n, elt, {NULL, NULL}};
    for (int s = 0; s < 2; s++) {
        t.p[s] = be[s]->alloc(n * elt);
        if (!t.p[s]) {
            printf("Bail out! %s\n", qs_error_last());
            exit(2);
        }
        be[s]->upload(t.p[s], host, n * elt);
    }
    live[n_live++] = t;
    return t;
}

static float urand(float lo, float hi) { return lo + (hi - lo) * qs_rng_uniform(seed, 1, draws++); }

static tensor t_rand(size_t n, float lo, float hi) {
    float *h = xmalloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = urand(lo, hi);
    tensor t = t_host(h, n, sizeof *h);
    free(h);
    return t;
}

/* An output the op overwrites: NaN on both sides. */
static tensor t_out(size_t n) {
    float *h = xmalloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = NAN;
    tensor t = t_host(h, n, sizeof *h);
    free(h);
    return t;
}

/* An output the op accumulates into: the same random values on both sides. */
static tensor t_acc(size_t n) { return t_rand(n, -1.0f, 1.0f); }

/* Ints in [lo, hi). */
static tensor t_ints(size_t n, int lo, int hi) {
    int *h = xmalloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = lo + (int)qs_rng_below(seed, 2, draws++, (uint64_t)(hi - lo));
    tensor t = t_host(h, n, sizeof *h);
    free(h);
    return t;
}

static tensor t_int_out(size_t n) {
    int *h = xmalloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = -12345;
    tensor t = t_host(h, n, sizeof *h);
    free(h);
    return t;
}

/* Distinct global row ids, as a rank's rows of a larger batch have. */
static tensor t_row_ids(size_t n) {
    int64_t *h = xmalloc(n * sizeof *h);
    const int64_t first = (int64_t)qs_rng_below(seed, 3, draws++, 1000000);
    for (size_t i = 0; i < n; i++) h[i] = first + 3 * (int64_t)i + (int64_t)(i % 2);
    tensor t = t_host(h, n, sizeof *h);
    free(h);
    return t;
}

/* Side s's values on the host (caller frees). */
static void *t_get(tensor t, int s) {
    void *h = xmalloc(t.n * t.elt);
    be[s]->download(h, t.p[s], t.n * t.elt);
    return h;
}

/* The reference's values of t on both sides: a backward's inputs that a forward made. */
static void t_sync(tensor t) {
    void *h = t_get(t, 0);
    be[1]->upload(t.p[1], h, t.n * t.elt);
    free(h);
}

static void check_floor(const char *what, tensor t, double tol, double floor) {
    float *c = t_get(t, 0), *g = t_get(t, 1);
    compare_floor(what, c, g, t.n, tol, floor);
    free(c);
    free(g);
}

static void check(const char *what, tensor t, double tol) { check_floor(what, t, tol, 0.0); }

/* A sum against the CPU's in the current pass: in fp32 each element within RED; with bf16
 * products as compare_grads judges the models' gradients, the tensor's ||cuda - cpu|| /
 * ||cpu|| within BF16 and each element within BF16_TENSOR (a gradient summed over heads
 * and rows of rounded operands moves an element by 2% of the tensor's scale). bf16
 * rounds each operand to 2^-9 of its size, not of the result's: a row of few keys makes
 * an output that is a difference of a few v's far smaller than they are, and dS = P (dP -
 * delta) cancels to nearly 0 where a row sees one key. So the errors are judged against
 * at least `floor`, the size of the inputs, as the tensor's rms and each element's. */
static void check_sum(const char *what, tensor t, double floor) {
    if (!bf16) {
        check(what, t, RED);
        return;
    }
    float *c = t_get(t, 0), *g = t_get(t, 1);
    double dd = 0.0, cc = 0.0;
    const size_t finite = l2_terms(c, g, t.n, &dd, &cc);
    const double ref = fmax(cc, (double)finite * floor * floor), e = sqrt(dd / (ref > 0.0 ? ref : 1.0));
    if (!(e <= BF16)) fail("%s: error ||cuda - cpu|| / ||cpu|| %.3g > %.0e", what, e, BF16);
    compare_floor(what, c, g, t.n, BF16_TENSOR, floor);
    free(c);
    free(g);
}

static void check_ints(const char *what, tensor t) {
    int *c = t_get(t, 0), *g = t_get(t, 1);
    for (size_t i = 0; i < t.n; i++)
        if (c[i] != g[i]) {
            fail("%s[%zu]: cpu %d, cuda %d", what, i, c[i], g[i]);
            break;
        }
    free(c);
    free(g);
}

static void check_host_ints(const char *what, const int *c, const int *g, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (c[i] != g[i]) {
            fail("%s[%zu]: cpu %d, cuda %d", what, i, c[i], g[i]);
            return;
        }
}

/* ---- ops ---- */

static void test_embed(int N, int C, int V, int P) {
    case_begin("embed N=%d C=%d V=%d P=%d", N, C, V, P);
    tensor tok = t_ints((size_t)N, 0, V), pos = t_ints((size_t)N, 0, P);
    tensor wte = t_rand((size_t)V * C, -1, 1), wpe = t_rand((size_t)P * C, -1, 1), out = t_out((size_t)N * C);
    BOTH(ops->embed_forward(F(out), I(tok), I(pos), F(wte), F(wpe), N, C));
    check("out", out, ELEM);
    tensor dout = t_rand((size_t)N * C, -1, 1), dwte = t_acc((size_t)V * C), dwpe = t_acc((size_t)P * C);
    BOTH(ops->embed_backward(F(dwte), F(dwpe), F(dout), I(tok), I(pos), N, C));
    check("dwte", dwte, RED);
    check("dwpe", dwpe, RED);
    case_end();
}

static void test_layernorm(int N, int C) {
    case_begin("layernorm, and fused with the residual add, N=%d C=%d", N, C);
    tensor x = t_rand((size_t)N * C, -2, 3), w = t_rand((size_t)C, 0.5f, 1.5f), b = t_rand((size_t)C, -1, 1);
    tensor out = t_out((size_t)N * C), mean = t_out((size_t)N), rstd = t_out((size_t)N);
    BOTH(ops->layernorm_forward(F(out), F(mean), F(rstd), F(x), F(w), F(b), N, C));
    check("out", out, RED);
    check("mean", mean, RED);
    check("rstd", rstd, RED);
    t_sync(mean);
    t_sync(rstd);
    tensor dout = t_rand((size_t)N * C, -1, 1), dx = t_acc((size_t)N * C), dw = t_acc((size_t)C), db = t_acc((size_t)C);
    BOTH(ops->layernorm_backward(F(dx), F(dw), F(db), F(dout), F(x), F(w), F(mean), F(rstd), N, C));
    check("dinp", dx, RED);
    check("dw", dw, RED);
    check("db", db, RED);
    /* fused with the residual add, into a fresh buffer and in place over the residual */
    tensor branch = t_rand((size_t)N * C, -1, 1), res = t_out((size_t)N * C), rout = t_out((size_t)N * C),
           rmean = t_out((size_t)N), rrstd = t_out((size_t)N);
    BOTH(ops->residual_layernorm_forward(F(res), F(rout), F(rmean), F(rrstd), F(x), F(branch), F(w), F(b), N, C));
    check("residual sum", res, ELEM);
    check("residual out", rout, RED);
    check("residual mean", rmean, RED);
    check("residual rstd", rrstd, RED);
    tensor iout = t_out((size_t)N * C);
    BOTH(ops->residual_layernorm_forward(F(x), F(iout), F(rmean), F(rrstd), F(x), F(branch), F(w), F(b), N, C));
    check("residual sum in place", x, ELEM);
    check("residual out in place", iout, RED);
    case_end();
}

static void test_matmul(const char *label, int N, int n_in, int n_out, qs_weight_layout layout,
                        int with_bias) {
    case_begin("matmul %sN=%d in=%d out=%d %s%s", label, N, n_in, n_out,
               layout == QS_W_OUT_IN ? "[out,in]" : "[in,out]", with_bias ? " bias" : "");
    tensor x = t_rand((size_t)N * n_in, -1, 1), w = t_rand((size_t)n_in * n_out, -1, 1);
    tensor b = t_rand((size_t)n_out, -1, 1);
    tensor out = t_out((size_t)N * n_out);
    BOTH(ops->matmul_forward(F(out), F(x), F(w), with_bias ? F(b) : NULL, N, n_in, n_out, layout));
    check("out", out, RED);
    tensor acc = t_acc((size_t)N * n_out);
    const float alpha = urand(-2, 2);
    BOTH(ops->matmul_acc(F(acc), F(x), F(w), alpha, N, n_in, n_out, layout));
    check("matmul_acc out", acc, RED);
    tensor dout = t_rand((size_t)N * n_out, -1, 1), dx = t_acc((size_t)N * n_in), dw = t_acc((size_t)n_in * n_out);
    tensor db = t_acc((size_t)n_out);
    /* without a bias, also without dinp (the QuadraNet stem's call) */
    BOTH(ops->matmul_backward(with_bias ? F(dx) : NULL, F(dw), with_bias ? F(db) : NULL, F(dout), F(x), F(w), N, n_in,
                              n_out, layout));
    check("dinp", dx, RED);
    check("dw", dw, RED);
    check("dbias", db, RED);
    case_end();
}

/* A feed-forward pair with the GELU fused into its products: [N,C] -> GELU([N,H]) -> [N,C]
 * forward (pre and out both checked), and the second layer's backward through the GELU
 * (dpre written over its poison). cuBLASLt fuses only when H is a multiple of 8 (its aux
 * matrix's rows); other H take the unfused path. */
static void test_matmul_gelu(const char *label, int N, int C, int H, qs_weight_layout layout, int with_bias) {
    case_begin("matmul_gelu %sN=%d C=%d H=%d %s%s", label, N, C, H, layout == QS_W_OUT_IN ? "[out,in]" : "[in,out]",
               with_bias ? " bias" : "");
    tensor x = t_rand((size_t)N * C, -2, 2), w1 = t_rand((size_t)C * H, -1, 1), b1 = t_rand((size_t)H, -1, 1);
    tensor pre = t_out((size_t)N * H), out = t_out((size_t)N * H);
    BOTH(ops->matmul_gelu_forward(F(pre), F(out), F(x), F(w1), with_bias ? F(b1) : NULL, N, C, H, layout));
    check("pre", pre, RED);
    check("gelu(pre)", out, RED);
    tensor w2 = t_rand((size_t)H * C, -1, 1), dout = t_rand((size_t)N * C, -1, 1), dpre = t_out((size_t)N * H);
    tensor dw = t_acc((size_t)H * C), db = t_acc((size_t)C);
    BOTH(ops->matmul_backward_dgelu(F(dpre), F(dw), with_bias ? F(db) : NULL, F(dout), F(out), F(pre), F(w2), N, H, C,
                                    layout));
    check("dpre", dpre, RED);
    check("dw", dw, RED);
    check("dbias", db, RED);
    case_end();
}

static void test_epilogue_shapes(const char *label) {
    const int mm[][3] = {{1, 1, 1}, {7, 5, 3}, {67, 37, 97}, {301, 129, 65}};
    for (size_t i = 0; i < sizeof mm / sizeof *mm; i++)
        for (int l = 0; l < 2; l++) test_matmul(label, mm[i][0], mm[i][1], mm[i][2], (qs_weight_layout)l, i != 1 || l);
    /* H a multiple of 8 (fused) and not (unfused) */
    const int ff[][3] = {{1, 1, 8}, {7, 5, 30}, {67, 37, 96}, {301, 33, 200}};
    for (size_t i = 0; i < sizeof ff / sizeof *ff; i++)
        for (int l = 0; l < 2; l++)
            test_matmul_gelu(label, ff[i][0], ff[i][1], ff[i][2], (qs_weight_layout)l, i != 1 || l);
}

/* Grouped products (an MoE layer's experts) over groups of `rows` each (some empty). With
 * with_bias off, also without dinp (a frozen expert's first layer needs none). */
static void test_matmul_grouped(const char *label, int groups, const int *rows, int n_in, int n_out, int with_bias) {
    case_begin("matmul_grouped %s groups=%d in=%d out=%d%s", label, groups, n_in, n_out, with_bias ? " bias" : "");
    enum { GMAX = 16 };
    int off[GMAX + 1] = {0};
    for (int g = 0; g < groups; g++) off[g + 1] = off[g] + rows[g];
    const size_t R = (size_t)off[groups], nw = (size_t)groups * n_in * n_out;
    tensor x = t_rand(R * n_in, -1, 1), w = t_rand(nw, -1, 1), b = t_rand((size_t)groups * n_out, -1, 1);
    tensor out = t_out(R * n_out);
    BOTH(ops->matmul_grouped_forward(F(out), F(x), F(w), with_bias ? F(b) : NULL, off, groups, n_in, n_out));
    check_sum("out", out, 1.0);
    tensor dout = t_rand(R * n_out, -1, 1), dx = t_acc(R * n_in), dw = t_acc(nw), db = t_acc((size_t)groups * n_out);
    BOTH(ops->matmul_grouped_backward(with_bias ? F(dx) : NULL, F(dw), with_bias ? F(db) : NULL, F(dout), F(x), F(w),
                                      off, groups, n_in, n_out));
    check_sum("dinp", dx, 1.0);
    check_sum("dw", dw, 1.0);
    check_sum("dbias", db, 1.0);
    case_end();
}

static void test_matmul_grouped_shapes(const char *label) {
    const int one[] = {1}, ends_empty[] = {0, 7, 0, 13, 0}, none[] = {0, 0, 0};
    const int uneven[] = {3, 61, 0, 1, 40, 17, 0, 29}, tall[] = {130, 0, 70, 64};
    test_matmul_grouped(label, 1, one, 1, 1, 1);
    test_matmul_grouped(label, 5, ends_empty, 37, 65, 1);
    test_matmul_grouped(label, 8, uneven, 97, 33, 1);
    test_matmul_grouped(label, 8, uneven, 33, 97, 0);
    test_matmul_grouped(label, 3, none, 5, 3, 1);
    test_matmul_grouped(label, 4, tall, 40, 70, 1); /* groups of several 64-row tiles */
}

/* Products from bf16 weights: the packed bits equal the CPU's, then the forward: up to
 * 32 rows (a decode step) the panel kernel, in groups of 8 rows; more (a prefill) panels
 * widened to fp32, in chunks (n_in 4097: 15 panels a chunk, so 600 columns take two).
 * The panel kernel's inputs stay fp32 in either precision; the widened products round
 * them to bf16 under the bf16 backend, judged by check_sum. */
static void test_matmul_bf16(int N, int n_in, int n_out, qs_weight_layout layout, int with_bias) {
    case_begin("matmul_bf16 N=%d in=%d out=%d %s%s", N, n_in, n_out, layout == QS_W_OUT_IN ? "[out,in]" : "[in,out]",
               with_bias ? " bias" : "");
    const size_t n_packed = qs_bf16_packed_elems(n_in, n_out);
    uint16_t *poison = xmalloc(n_packed * sizeof *poison);
    memset(poison, 0xff, n_packed * sizeof *poison); /* NaN as bf16 */
    tensor packed = t_host(poison, n_packed, sizeof *poison);
    free(poison);
    tensor w = t_rand((size_t)n_in * n_out, -1, 1), x = t_rand((size_t)N * n_in, -1, 1);
    tensor b = t_rand((size_t)n_out, -1, 1), out = t_out((size_t)N * n_out);
    BOTH(ops->matmul_pack_bf16((uint16_t *)packed.p[side], F(w), n_in, n_out, layout));
    uint16_t *pc = t_get(packed, 0), *pg = t_get(packed, 1);
    for (size_t i = 0; i < n_packed; i++)
        if (pc[i] != pg[i]) {
            fail("packed[%zu]: cpu %#06x, cuda %#06x", i, pc[i], pg[i]);
            break;
        }
    free(pc);
    free(pg);
    BOTH(ops->matmul_forward_bf16(F(out), F(x), (const uint16_t *)packed.p[side], with_bias ? F(b) : NULL, N, n_in,
                                  n_out));
    check_sum("out", out, 0.0);
    case_end();
}

static void test_matmul_bf16_shapes(void) {
    const int mm[][3] = {{1, 1, 1}, {3, 37, 97}, {8, 97, 33}, {9, 64, 300}, {32, 129, 65}, {33, 37, 97},
                         {100, 5, 1}, {40, 4097, 600}};
    for (size_t i = 0; i < sizeof mm / sizeof *mm; i++)
        test_matmul_bf16(mm[i][0], mm[i][1], mm[i][2], (qs_weight_layout)(i % 2), i != 2);
}

/* The model's causal self-attention: whole sequences as one block, q, k, v read from
 * qkv [B,T,C+2Ckv] in place and their gradients written into dqkv in place; NKV < NH
 * is grouped-query attention. */
static void test_attention(int B, int T, int NH, int NKV, int hs) {
    const int C = NH * hs, W = C + 2 * NKV * hs;
    case_begin("%sattention B=%d T=%d NH=%d NKV=%d hs=%d", bf16 ? "bf16 " : "", B, T, NH, NKV, hs);
    const qs_attn_block k = qs_attn_block_self(B, T, C, NH, NKV, 1);
    tensor qkv = t_rand((size_t)B * T * W, -1, 1), out = t_out((size_t)B * T * C);
    tensor lse = t_out((size_t)B * NH * T), delta = t_out((size_t)B * NH * T);
    BOTH(ops->attention_block_forward(F(out), F(lse), F(qkv), F(qkv) + C, &k));
    check_sum("out", out, 1.0);
    check_sum("lse", lse, 1.0);
    t_sync(out);
    t_sync(lse);
    tensor dout = t_rand((size_t)B * T * C, -1, 1), dqkv = t_acc((size_t)B * T * W);
    BOTH(ops->attention_delta(F(delta), F(dout), F(out), B, T, C, NH));
    check("delta", delta, RED);
    t_sync(delta);
    BOTH(ops->attention_block_backward(F(dqkv), F(dqkv) + C, F(dout), F(qkv), F(qkv) + C, F(lse), F(delta), &k));
    check_sum("dqkv", dqkv, 1.0);
    case_end();
}

/* A block cut out of longer buffers; `shared`: q and kv are columns of one qkv
 * [.,C+2Ckv] (a ring's own block), else kv is a block of its own ([., 2Ckv] packed, or
 * wider rows). */
static void test_attention_block(const char *label, qs_attn_block k, int shared) {
    case_begin("%sattention_block %s B=%d NH=%d NKV=%d C=%d Tq=%d Tk=%d strides %d/%d pos %d/%d%s", bf16 ? "bf16 " : "",
               label, k.B, k.NH, k.NKV, k.C, k.Tq, k.Tk, k.q_stride, k.kv_stride, k.q_pos0, k.k_pos0,
               k.causal ? " causal" : "");
    const size_t nq = (size_t)k.B * k.q_len * k.q_stride, nkv = (size_t)k.B * k.kv_len * k.kv_stride;
    const size_t no = (size_t)k.B * k.q_len * k.C, ns = (size_t)k.B * k.NH * k.q_len;
    tensor q = t_rand(nq, -1.5f, 1.5f), kvb = shared ? q : t_rand(nkv, -1.5f, 1.5f);
    const size_t kv_at = shared ? (size_t)k.C : 0;
    tensor out = t_out(no), lse = t_out(ns);
    BOTH(ops->attention_block_forward(F(out), F(lse), F(q), F(kvb) + kv_at, &k));
    check_sum("out", out, 1.5);
    check_sum("lse", lse, 1.0);
    t_sync(out);
    t_sync(lse);
    /* merge a second block's result into this one; some of its rows saw no key */
    float *h = xmalloc(ns * sizeof *h);
    for (size_t i = 0; i < ns; i++) h[i] = i % 4 == 1 ? -INFINITY : urand(-3, 3);
    tensor out_b = t_rand(no, -1, 1), lse_b = t_host(h, ns, sizeof *h);
    free(h);
    BOTH(ops->attention_merge(F(out), F(lse), F(out_b), F(lse_b), &k));
    check("merged out", out, ELEM);
    check("merged lse", lse, ELEM);
    t_sync(out);
    t_sync(lse);
    tensor dout = t_rand(no, -1, 1), delta = t_rand(ns, -1, 1);
    tensor dq = t_acc(nq), dkv = shared ? dq : t_acc(nkv);
    BOTH(ops->attention_block_backward(F(dq), F(dkv) + kv_at, F(dout), F(q), F(kvb) + kv_at, F(lse), F(delta), &k));
    check_sum("dq", dq, 1.0);
    if (!shared) check_sum("dkv", dkv, 1.0);
    tensor dkv_only = t_acc(nkv + kv_at);
    BOTH(ops->attention_block_backward(NULL, F(dkv_only) + kv_at, F(dout), F(q), F(kvb) + kv_at, F(lse), F(delta),
                                       &k));
    check_sum("dkv (dq NULL)", dkv_only, 1.0);
    case_end();
}

/* q rows are qkv rows [C + 2Ckv]; kv rows are too (QKV) or packed [2Ckv] (KV), kv_pad
 * floats wider for kv rows that are neither. */
enum { KV, QKV };
static qs_attn_block block_of(int B, int NH, int NKV, int hs, int Tq, int Tk, int q_len, int kv_len, int kv_rows,
                              int kv_pad, int q_pos0, int k_pos0, int causal) {
    const int C = NH * hs, Ckv = NKV * hs;
    return (qs_attn_block){.B = B, .C = C, .NH = NH, .NKV = NKV, .Tq = Tq, .Tk = Tk, .q_len = q_len,
                           .kv_len = kv_len, .q_stride = C + 2 * Ckv,
                           .kv_stride = (kv_rows == QKV ? C + 2 * Ckv : 2 * Ckv) + kv_pad, .q_pos0 = q_pos0,
                           .k_pos0 = k_pos0, .causal = causal};
}

/* The attention kernels over every tile width (32, 64, 128, 256), T = 1 and T off every
 * tile, causal blocks whose early queries see nothing, grouped-query attention. */
static void test_attention_shapes(void) {
    /* whole sequences; then grouped-query attention (NKV < NH: kv heads shared by 2, 3
     * and 4 query heads) */
    const int at[][5] = {{1, 1, 1, 1, 1},    {2, 7, 3, 3, 5},     {3, 37, 2, 2, 13},  {2, 130, 3, 3, 11},
                         {1, 1, 2, 2, 64},   {2, 77, 2, 2, 64},   {1, 300, 2, 2, 128}, {2, 45, 1, 1, 200},
                         {1, 1, 4, 1, 3},    {2, 37, 6, 2, 5},    {3, 37, 4, 1, 13},  {2, 77, 4, 2, 64},
                         {1, 45, 6, 3, 128}, {1, 37, 4, 1, 200}};
    for (size_t i = 0; i < sizeof at / sizeof *at; i++)
        test_attention(at[i][0], at[i][1], at[i][2], at[i][3], at[i][4]);
    test_attention_block("1x1", block_of(1, 1, 1, 1, 1, 1, 1, 1, KV, 0, 0, 0, 1), 0);
    test_attention_block("non-causal packed", block_of(2, 2, 2, 3, 5, 7, 9, 11, KV, 0, 0, 0, 0), 0);
    test_attention_block("causal partial", block_of(2, 3, 3, 5, 13, 17, 13, 17, KV, 0, 10, 3, 1), 0);
    test_attention_block("causal, early queries see nothing", block_of(3, 2, 2, 7, 11, 6, 11, 6, KV, 0, 0, 5, 1), 0);
    test_attention_block("own block in qkv", block_of(2, 3, 3, 9, 37, 37, 40, 40, QKV, 0, 37, 37, 1), 1);
    test_attention_block("hs 64, a later query block", block_of(2, 2, 2, 64, 50, 70, 53, 75, KV, 0, 90, 40, 1), 0);
    test_attention_block("hs 128 non-causal", block_of(1, 2, 2, 128, 33, 100, 33, 100, KV, 0, 0, 0, 0), 0);
    test_attention_block("hs 96, keys ahead of most queries",
                         block_of(1, 1, 1, 96, 40, 90, 40, 90, KV, 0, 20, 30, 1), 0);
    /* grouped-query attention: the dk/dv kernel sums each kv head over its group's query
     * heads; packed kv, kv rows wider than 2Ckv, and kv inside qkv */
    test_attention_block("gqa 1x1", block_of(1, 4, 1, 3, 1, 1, 1, 1, KV, 0, 0, 0, 1), 0);
    test_attention_block("gqa non-causal packed", block_of(2, 6, 2, 5, 37, 37, 37, 37, KV, 0, 0, 0, 0), 0);
    test_attention_block("gqa causal, strided kv", block_of(2, 6, 2, 5, 37, 41, 40, 45, KV, 7, 20, 3, 1), 0);
    test_attention_block("gqa causal, early queries see nothing",
                         block_of(3, 4, 1, 7, 11, 6, 11, 6, KV, 3, 0, 5, 1), 0);
    test_attention_block("gqa own block in qkv", block_of(2, 4, 1, 9, 37, 37, 40, 40, QKV, 0, 37, 37, 1), 1);
    test_attention_block("gqa own block in qkv, non-causal", block_of(1, 6, 2, 5, 37, 37, 37, 37, QKV, 0, 0, 0, 0), 1);
    test_attention_block("gqa hs 64, a later query block, strided kv",
                         block_of(2, 4, 2, 64, 50, 70, 53, 75, KV, 5, 90, 40, 1), 0);
    test_attention_block("gqa hs 128, one query non-causal", block_of(1, 6, 3, 128, 1, 37, 1, 37, KV, 0, 0, 0, 0), 0);
}

static void test_attention_delta_pack(int B, int T, int NH, int NKV, int hs) {
    const int C = NH * hs, Ckv = NKV * hs, W = C + 2 * Ckv;
    case_begin("attention_delta, kv_pack B=%d T=%d NH=%d NKV=%d hs=%d", B, T, NH, NKV, hs);
    tensor dout = t_rand((size_t)B * T * C, -1, 1), out = t_rand((size_t)B * T * C, -1, 1);
    tensor delta = t_out((size_t)B * NH * T);
    BOTH(ops->attention_delta(F(delta), F(dout), F(out), B, T, C, NH));
    check("delta", delta, RED);
    tensor qkv = t_rand((size_t)B * T * W, -1, 1), kv = t_out((size_t)B * T * 2 * Ckv);
    BOTH(ops->kv_pack_forward(F(kv), F(qkv), B, T, C, Ckv));
    check("kv", kv, ELEM);
    tensor dqkv = t_acc((size_t)B * T * W), dkv = t_rand((size_t)B * T * 2 * Ckv, -1, 1);
    BOTH(ops->kv_pack_backward(F(dqkv), F(dkv), B, T, C, Ckv));
    check("dqkv", dqkv, ELEM);
    case_end();
}

static void test_kv_cache(int B, int T, int NH, int NKV, int hs, int S, int max_T) {
    const int C = NH * hs, W = C + 2 * NKV * hs;
    case_begin("kv_cache_fill, attention_decode B=%d T=%d NH=%d NKV=%d hs=%d slots=%d max_T=%d", B, T, NH, NKV, hs, S,
               max_T);
    const size_t ncache = (size_t)S * NKV * max_T * hs;
    tensor kc = t_out(ncache), vc = t_out(ncache), qkv = t_rand((size_t)B * T * W, -1, 1);
    BOTH(ops->kv_cache_fill(F(kc), F(vc), F(qkv), B, T, C, NH, NKV, max_T));
    check("kcache", kc, ELEM);
    check("vcache", vc, ELEM);
    /* decode: distinct slots (a rotation of 0..S-1), any position */
    tensor kd = t_rand(ncache, -1, 1), vd = t_rand(ncache, -1, 1), q1 = t_rand((size_t)B * W, -1, 1);
    int slots[64], pos[64];
    const int rot = (int)qs_rng_below(seed, 4, draws++, (uint64_t)S);
    for (int b = 0; b < B; b++) {
        slots[b] = (b + rot) % S;
        pos[b] = (int)qs_rng_below(seed, 5, draws++, (uint64_t)max_T);
    }
    tensor ts = t_host(slots, (size_t)B, sizeof(int)), tp = t_host(pos, (size_t)B, sizeof(int));
    tensor out = t_out((size_t)B * C);
    BOTH(ops->attention_decode(F(out), F(kd), F(vd), F(q1), B, C, NH, NKV, I(ts), I(tp), max_T));
    check("out", out, RED);
    check("kcache after", kd, ELEM);
    check("vcache after", vd, ELEM);
    case_end();
}

static void test_elementwise(size_t n) {
    case_begin("gelu, relu n=%zu", n);
    tensor x = t_rand(n, -6, 6), out = t_out(n), dout = t_rand(n, -1, 1), dx = t_acc(n);
    BOTH(ops->gelu_forward(F(out), F(x), n));
    check("gelu", out, ELEM);
    BOTH(ops->gelu_backward(F(dx), F(x), F(dout), n));
    check("gelu backward", dx, ELEM);
    BOTH(ops->relu_forward(F(out), F(x), n));
    check("relu", out, ELEM);
    BOTH(ops->relu_backward(F(dx), F(x), F(dout), n));
    check("relu backward", dx, ELEM);
    case_end();
}

static void test_dropout(size_t N, size_t W, float p, int with_ids) {
    case_begin("dropout N=%zu W=%zu p=%g%s", N, W, p, with_ids ? " row_ids" : "");
    const uint64_t s = qs_rng_u64(seed, 6, draws++), stream = qs_rng_below(seed, 7, draws++, 100);
    tensor ids = t_row_ids(N), x = t_rand(N * W, -1, 1), out = t_out(N * W);
    const int64_t *none = NULL;
    BOTH(ops->dropout_forward(F(out), F(x), p, s, stream, with_ids ? L(ids) : none, N, W));
    check("out", out, ELEM);
    tensor dout = t_rand(N * W, -1, 1), dx = t_acc(N * W);
    BOTH(ops->dropout_backward(F(dx), F(dout), p, s, stream, with_ids ? L(ids) : none, N, W));
    check("dinp", dx, ELEM);
    BOTH(ops->dropout_forward(F(x), F(x), p, s, stream, with_ids ? L(ids) : none, N, W)); /* in place */
    check("in place", x, ELEM);
    case_end();
}

static void test_xent(int N, int V) {
    case_begin("xent N=%d V=%d", N, V);
    int *tg = xmalloc((size_t)N * sizeof *tg);
    for (int n = 0; n < N; n++) tg[n] = n % 3 == 2 ? -1 : (int)qs_rng_below(seed, 8, draws++, (uint64_t)V);
    tensor targets = t_host(tg, (size_t)N, sizeof *tg);
    free(tg);
    tensor logits = t_rand((size_t)N * V, -8, 8), losses = t_out((size_t)N);
    BOTH(ops->xent_forward(F(losses), F(logits), I(targets), N, V));
    check("losses", losses, RED);
    const float dloss = urand(0.1f, 2.0f);
    BOTH(ops->xent_backward(F(logits), F(losses), I(targets), dloss, N, V)); /* in place; ignored rows become 0 */
    check("dlogits", logits, RED);
    case_end();
}

/* The router (noisy or not; clean logits on a coarse grid, so ties occur), each backward
 * from the reference's forward outputs; then dispatch and combine over its slots. */
static void test_moe(int N, int E, int K, int C, int capacity, bool noisy) {
    case_begin("moe N=%d E=%d K=%d C=%d capacity=%d%s", N, E, K, C, capacity, noisy ? " noisy" : "");
    const size_t NK = (size_t)N * K, NE = (size_t)N * E;
    float *lg = xmalloc(NE * sizeof *lg);
    for (size_t i = 0; i < NE; i++) lg[i] = 0.25f * (float)qs_rng_below(seed, 10, draws++, 9) - 1.0f;
    tensor clean = t_host(lg, NE, sizeof *lg);
    free(lg);
    tensor ids = t_row_ids((size_t)N), noise = t_rand(NE, -4, 4), h = t_out(NE);
    tensor idx = t_int_out(NK), gate = t_out(NK), slot = t_int_out(NK);
    enum { EMAX = 256 };
    int routed[2][EMAX], counts[2][EMAX], offsets[2][EMAX + 1];
    qs_moe_load load[2];
    for (int s = 0; s < 2; s++) load[s] = (qs_moe_load){.routed = routed[s], .counts = counts[s], .offsets = offsets[s]};
    const qs_moe_router r0 = {.N = N, .E = E, .K = K, .capacity = capacity, .seed = qs_rng_u64(seed, 9, draws++),
                              .stream = 5};
    qs_moe_router r[2] = {r0, r0};
    BOTH(r[side].row_ids = L(ids);
         ops->moe_route_forward(&load[side], I(idx), F(gate), I(slot), F(h), F(clean), noisy ? F(noise) : NULL,
                                &r[side]));
    check(noisy ? "h" : "h (not written)", h, ELEM);
    check_ints("idx", idx);
    check("gate", gate, RED);
    check_ints("slot", slot);
    check_host_ints("routed", routed[0], routed[1], (size_t)E);
    check_host_ints("counts", counts[0], counts[1], (size_t)E);
    check_host_ints("offsets", offsets[0], offsets[1], (size_t)E + 1);
    check_host_ints("dropped", &load[0].dropped, &load[1].dropped, 1);
    compare_scalar("balance", load[0].balance, load[1].balance, RED);
    compare_scalar("z", load[0].z, load[1].z, RED);
    t_sync(idx);
    t_sync(gate);
    t_sync(slot);
    t_sync(h);
    tensor dgate = t_rand(NK, -1, 1), dclean = t_acc(NE), dnoise = t_acc(NE);
    const float cb = urand(0.1f, 1.0f), cz = urand(0.1f, 1.0f);
    BOTH(ops->moe_route_backward(F(dclean), noisy ? F(dnoise) : NULL, F(dgate), I(idx), F(gate),
                                 noisy ? F(h) : F(clean), noisy ? F(noise) : NULL, &load[side], cb, cz, &r[side]));
    check("dclean", dclean, RED);
    check(noisy ? "dnoise" : "dnoise (untouched)", dnoise, RED);

    tensor x = t_rand((size_t)N * C, -1, 1), xe = t_out(NK * C);
    BOTH(ops->moe_dispatch_forward(F(xe), F(x), I(slot), N, K, C));
    check("xe", xe, ELEM);
    tensor dxe = t_rand(NK * C, -1, 1), dx = t_acc((size_t)N * C);
    BOTH(ops->moe_dispatch_backward(F(dx), F(dxe), I(slot), N, K, C));
    check("dispatch dx", dx, ELEM);
    tensor ye = t_rand(NK * C, -1, 1), y = t_out((size_t)N * C);
    BOTH(ops->moe_combine_forward(F(y), F(ye), F(gate), I(slot), N, K, C));
    check("y", y, RED);
    tensor dy = t_rand((size_t)N * C, -1, 1), dye = t_acc(NK * C), dg = t_acc(NK);
    BOTH(ops->moe_combine_backward(F(dye), F(dg), F(dy), F(ye), F(gate), I(slot), N, K, C));
    check("dye", dye, ELEM);
    check("dgate", dg, RED);
    case_end();
}

static void test_quadconv(const char *label, qs_conv_shape s) {
    case_begin("quadconv %s B=%d H=%d W=%d C=%d %dx%d pad %d,%d", label, s.B, s.H, s.W, s.C, s.KH, s.KW, s.pad_top,
               s.pad_left);
    const size_t n = (size_t)s.B * s.H * s.W * s.C, nw = 3 * (size_t)s.KH * s.KW * s.C;
    tensor x = t_rand(n, -1, 1), w = t_rand(nw, -0.5f, 0.5f), bias = t_rand(3 * (size_t)s.C, -0.5f, 0.5f);
    tensor y = t_out(n), fa = t_out(n), fb = t_out(n);
    BOTH(ops->quadconv_forward(F(y), F(fa), F(fb), F(x), F(w), F(bias), &s));
    check("y", y, RED);
    check("fa", fa, RED);
    check("fb", fb, RED);
    t_sync(fa);
    t_sync(fb);
    tensor dy = t_rand(n, -1, 1), dx = t_acc(n), dw = t_acc(nw), db = t_acc(3 * (size_t)s.C);
    BOTH(ops->quadconv_backward(F(dx), F(dw), F(db), F(dy), F(x), F(w), F(fa), F(fb), &s));
    check("dx", dx, RED);
    check("dw", dw, RED);
    check("dbias", db, RED);
    case_end();
}

static void test_spatial(int B, int H, int W, int C, int p) {
    case_begin("space_to_depth, avgpool B=%d H=%d W=%d C=%d p=%d", B, H, W, C, p);
    const size_t n = (size_t)B * H * W * C;
    tensor x = t_rand(n, -1, 1), out = t_out(n);
    BOTH(ops->space_to_depth_forward(F(out), F(x), B, H, W, C, p));
    check("patches", out, ELEM);
    tensor dout = t_rand(n, -1, 1), dx = t_acc(n);
    BOTH(ops->space_to_depth_backward(F(dx), F(dout), B, H, W, C, p));
    check("patches dinp", dx, ELEM);
    tensor pooled = t_out((size_t)B * C);
    BOTH(ops->avgpool_forward(F(pooled), F(x), B, H * W, C));
    check("pooled", pooled, RED);
    tensor dp = t_rand((size_t)B * C, -1, 1);
    BOTH(ops->avgpool_backward(F(dx), F(dp), B, H * W, C));
    check("pool dinp", dx, ELEM);
    case_end();
}

static void test_layer_scale(int B, int N, int C, float p) {
    case_begin("layer_scale B=%d N=%d C=%d p=%g", B, N, C, p);
    const uint64_t s = qs_rng_u64(seed, 11, draws++), sample0 = qs_rng_below(seed, 12, draws++, 100000);
    const size_t n = (size_t)B * N * C;
    tensor resid = t_rand(n, -1, 1), x = t_rand(n, -1, 1), gamma = t_rand((size_t)C, -1, 1), out = t_out(n);
    BOTH(ops->layer_scale_forward(F(out), F(resid), F(x), F(gamma), p, s, 3, sample0, B, N, C));
    check("out", out, ELEM);
    BOTH(ops->layer_scale_forward(F(resid), F(resid), F(x), F(gamma), p, s, 3, sample0, B, N, C)); /* in place */
    check("in place", resid, ELEM);
    tensor dout = t_rand(n, -1, 1), dx = t_acc(n), dgamma = t_acc((size_t)C);
    BOTH(ops->layer_scale_backward(F(dx), F(dgamma), F(dout), F(x), F(gamma), p, s, 3, sample0, B, N, C));
    check("dinp", dx, ELEM);
    check("dgamma", dgamma, RED);
    case_end();
}

static void test_optim(size_t n, int t) {
    case_begin("sumsq, adamw n=%zu t=%d", n, t);
    tensor g = t_rand(n, -3, 3), p = t_rand(n, -1, 1), m = t_rand(n, -0.1f, 0.1f), v = t_rand(n, 0.0f, 0.01f);
    double ss[2];
    BOTH(ss[side] = ops->sumsq(F(g), n));
    compare_scalar("sumsq", ss[0], ss[1], RED);
    if (fabs(ss[0] - ss[1]) > 1e-12 * ss[0]) fail("sumsq: cpu %.17g, cuda %.17g: not summed in double", ss[0], ss[1]);
    BOTH(ops->adamw_update(F(p), F(g), F(m), F(v), n, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t, 0.5f));
    check("p", p, ELEM);
    check("m", m, ELEM);
    check("v", v, ELEM);
    case_end();
}

static void test_ops(void) {
    const int embed[][4] = {{1, 1, 1, 1}, {7, 5, 3, 4}, {67, 37, 11, 13}, {301, 97, 50, 33}};
    for (size_t i = 0; i < sizeof embed / sizeof *embed; i++)
        test_embed(embed[i][0], embed[i][1], embed[i][2], embed[i][3]);
    const int ln[][2] = {{1, 1}, {5, 3}, {67, 97}, {300, 769}};
    for (size_t i = 0; i < sizeof ln / sizeof *ln; i++) test_layernorm(ln[i][0], ln[i][1]);
    const long unfused = qs_backend_cuda_unfused();
    test_epilogue_shapes("");
    /* every epilogue fused but the GELU pair's at H = 30, forward and backward, both layouts */
    case_begin("cuBLASLt fused every epilogue it can (not the aux rows of 30 floats: 4 products)");
    if (qs_backend_cuda_unfused() - unfused != 4)
        fail("%ld products went unfused, expected 4", qs_backend_cuda_unfused() - unfused);
    case_end();
    test_matmul_grouped_shapes("grouped");
    test_matmul_bf16_shapes();
    test_attention_shapes();
    const int dp[][5] = {{1, 1, 1, 1, 1}, {2, 9, 3, 3, 5}, {3, 67, 2, 2, 13}, {2, 9, 6, 2, 5}, {3, 67, 4, 1, 13}};
    for (size_t i = 0; i < sizeof dp / sizeof *dp; i++)
        test_attention_delta_pack(dp[i][0], dp[i][1], dp[i][2], dp[i][3], dp[i][4]);
    test_kv_cache(1, 1, 1, 1, 1, 1, 1);
    test_kv_cache(3, 5, 2, 2, 7, 4, 9);
    test_kv_cache(5, 37, 3, 3, 11, 7, 131);
    test_kv_cache(1, 1, 4, 1, 1, 1, 1);
    test_kv_cache(3, 5, 6, 2, 7, 4, 9);
    test_kv_cache(5, 37, 4, 1, 11, 7, 131);
    /* caches of many 64-position splits; heads wider than a warp, up to 256 */
    test_kv_cache(2, 3, 4, 2, 70, 3, 700);
    test_kv_cache(3, 2, 1, 1, 256, 4, 300);
    const size_t ew[] = {1, 7, 1000, 100003};
    for (size_t i = 0; i < sizeof ew / sizeof *ew; i++) test_elementwise(ew[i]);
    test_dropout(1, 1, 0.5f, 0);
    test_dropout(7, 5, 0.0f, 1);
    test_dropout(67, 37, 0.1f, 1);
    test_dropout(301, 97, 0.5f, 0);
    test_dropout(9, 13, 1.0f, 1);
    const int xe[][2] = {{1, 1}, {7, 5}, {67, 1000}, {5, 50257}};
    for (size_t i = 0; i < sizeof xe / sizeof *xe; i++) test_xent(xe[i][0], xe[i][1]);
    /* 1; ties; experts without tokens (7 x 2 over 13); capacity inside one chunk of the
     * router and across chunks (128 tokens each); k = E; E = 256, k = 8 (fine-grained);
     * more chunks than a warp scans at once (36) */
    test_moe(1, 1, 1, 1, 0, false);
    test_moe(7, 13, 2, 3, 0, true);
    test_moe(67, 13, 3, 37, 5, true);
    test_moe(130, 6, 2, 9, 30, false);
    test_moe(260, 7, 3, 11, 90, true);
    test_moe(300, 8, 8, 97, 0, false);
    test_moe(333, 256, 8, 16, 0, true);
    test_moe(4500, 40, 3, 2, 300, false);
    test_quadconv("1x1", (qs_conv_shape){1, 1, 1, 1, 1, 1, 0, 0});
    test_quadconv("same 3x3", (qs_conv_shape){2, 5, 7, 3, 3, 3, 1, 1});
    test_quadconv("same 5x5", (qs_conv_shape){1, 9, 6, 37, 5, 5, 2, 2});
    test_quadconv("same 7x7", (qs_conv_shape){3, 8, 8, 13, 7, 7, 3, 3});
    test_quadconv("causal k=3", (qs_conv_shape){2, 1, 9, 5, 1, 3, 0, 2});
    test_quadconv("causal k=4", (qs_conv_shape){3, 1, 40, 33, 1, 4, 0, 3});
    /* more taps than one block's group of 64 (the dW kernel's blockIdx.z), channels
     * past one 32-lane chunk, positions over several chunks */
    test_quadconv("same 9x9", (qs_conv_shape){2, 10, 11, 40, 9, 9, 4, 4});
    test_quadconv("causal k=70", (qs_conv_shape){2, 1, 83, 5, 1, 70, 0, 69});
    test_spatial(1, 2, 2, 1, 2);
    test_spatial(2, 6, 9, 5, 3);
    test_spatial(3, 8, 8, 13, 2);
    test_layer_scale(1, 1, 1, 0.0f);
    test_layer_scale(5, 9, 37, 0.4f);
    test_layer_scale(8, 49, 13, 0.5f);
    test_optim(1, 1);
    test_optim(1001, 7);
    test_optim(1234567, 3);
}

/* ---- whole models ---- */

/* fp32: every gradient element at the RED bound. bf16 rounds each product's operands by
 * up to 2^-9, and an element that nearly cancels, or sits behind a ReLU or a LayerNorm
 * of a near-constant row, moves by more than that against its tensor's scale; so bf16
 * bounds the whole gradient, ||cuda - cpu|| / ||cpu|| <= BF16, and each tensor's alone
 * by BF16_TENSOR, loose enough for the tiny test shapes (sums over 5-15 terms average
 * little rounding away) and tight enough to catch a tensor whose product is wrong. */
static void compare_grads(const qs_params *c, const qs_params *g) {
    float *hc = xmalloc(c->n * sizeof(float)), *hg = xmalloc(c->n * sizeof(float));
    c->be->download(hc, c->grad, c->n * sizeof(float));
    g->be->download(hg, g->grad, g->n * sizeof(float));
    double dd = 0.0, cc = 0.0, worst = 0.0;
    const char *worst_at = "";
    for (int t = 0; t < c->n_tensors; t++) {
        const qs_param_info *p = &c->info[t];
        if (!bf16) {
            compare(p->name, hc + p->offset, hg + p->offset, p->numel, model_tol());
            continue;
        }
        double tdd = 0.0, tcc = 0.0;
        l2_terms(hc + p->offset, hg + p->offset, p->numel, &tdd, &tcc);
        dd += tdd;
        cc += tcc;
        const double e = sqrt(tdd / (tcc > 0.0 ? tcc : 1.0));
        if (!(e <= worst)) { /* NaN counts as worst */
            worst = e;
            worst_at = p->name;
        }
    }
    if (bf16) {
        const double whole = sqrt(dd / (cc > 0.0 ? cc : 1.0));
        printf("# %s: gradient error ||cuda - cpu|| / ||cpu|| %.3g, largest in one tensor %.3g (%s)\n", case_name,
               whole, worst, worst_at);
        if (!(whole <= model_tol())) fail("gradient error %.3g > %.0e", whole, model_tol());
        if (!(worst <= BF16_TENSOR)) fail("%s: gradient error %.3g > %.0e", worst_at, worst, BF16_TENSOR);
    }
    free(hc);
    free(hg);
}

static qs_model_config gpt_config(void) {
    qs_config c;
    qs_config_defaults(&c);
    qs_model_config m = c.model;
    m.vocab_size = 37;
    m.seq_len = 13;
    m.n_layer = 2;
    m.n_head = 3;
    m.n_embd = 15;
    m.ffn_mult = 2;
    m.dropout = 0.1f;
    m.init_std = 0.1f;
    return m;
}

/* gpt_config's, its feed-forward a noisy top-2 MoE of 4 experts with capacity 1.0 and
 * both router losses. */
static qs_model_config moe_config(void) {
    qs_model_config m = gpt_config();
    m.moe.n_experts = 4;
    m.moe.top_k = 2;
    m.moe.gating = QS_GATING_NOISY_TOPK;
    m.moe.capacity_factor = 1.0f;
    m.moe.aux_loss_coef = 0.01f;
    m.moe.z_loss_coef = 0.001f;
    return m;
}

/* Whether the two models' last forward over `rows` tokens chose the same experts. */
static bool same_moe_routing(qs_gpt *const m[2], const qs_model_config *cfg, int rows) {
    if (cfg->moe.n_experts == 0) return true;
    const size_t n = (size_t)cfg->n_layer * rows * cfg->moe.top_k; /* [layer][row][k], packed */
    return !memcmp(qs_gpt_moe_routing(m[0]), qs_gpt_moe_routing(m[1]), n * sizeof(int));
}

/* KV-cache inference on both models: prompts of T - 2 tokens (B of them, B <= 8), then
 * one token each at distinct slots, whose logits must agree. bf16 may flip a near-tied
 * routing choice of the prompt or the new token, as in training. */
static void compare_inference(qs_gpt *const m[2], const qs_model_config *cfg, const int *x, int B, int T,
                              const char *label) {
    const int V = cfg->vocab_size;
    float *row[2] = {xmalloc((size_t)V * sizeof(float)), xmalloc((size_t)V * sizeof(float))};
    int slots[8], pos[8];
    for (int b = 0; b < B; b++) slots[b] = (b + 2) % B, pos[b] = T - 2;
    for (int s = 0; s < 2; s++)
        if (qs_gpt_prefill(m[s], x, B, T - 2)) fail("%s prefill: %s", be[s]->name, qs_error_last());
    bool infer_routing = same_moe_routing(m, cfg, B * (T - 2));
    for (int s = 0; s < 2; s++)
        if (qs_gpt_decode(m[s], x + 1, B, slots, pos)) fail("%s decode: %s", be[s]->name, qs_error_last());
    infer_routing = infer_routing && same_moe_routing(m, cfg, B);
    if (!infer_routing && bf16)
        printf("# %s: bf16 products flipped a near-tied routing choice in inference; logits not compared\n", label);
    else if (!infer_routing)
        fail("inference routing differs");
    for (int b = 0; b < B && infer_routing && !bad; b++) {
        for (int s = 0; s < 2; s++) qs_gpt_logits_row(m[s], b, row[s]);
        compare("decode logits", row[0], row[1], (size_t)V, model_tol());
    }
    free(row[0]);
    free(row[1]);
}

/* Loss, MoE statistics and routing, every gradient; then a prefill and one decode step. */
/* Three sequences of T tokens (cfg->seq_len > T). */
static void test_gpt(const char *label, const qs_model_config *cfg, int T) {
    case_begin("gpt %s (%s): loss and gradients, run-to-run bits, prefill and decode", label, be[1]->name);
    const int B = 3, N = B * T;
    int *x = xmalloc(2 * (size_t)N * sizeof(int)), *y = x + N;
    qs_gpt *m[2] = {NULL, NULL};
    for (int s = 0; s < 2; s++)
        if (qs_gpt_create(&m[s], cfg, be[s], B, T + 1) || qs_gpt_init(m[s], seed)) {
            fail("creating the %s model: %s", be[s]->name, qs_error_last());
            goto done;
        }
    for (int i = 0; i < N; i++) {
        x[i] = (int)qs_rng_below(seed, 20, (uint64_t)i, (uint64_t)cfg->vocab_size);
        y[i] = i % 7 == 3 ? -1 : (int)qs_rng_below(seed, 21, (uint64_t)i, (uint64_t)cfg->vocab_size);
    }
    const qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 0x5eed, .sample0 = 17, .grad_scale = 1.0f};
    double loss[2];
    for (int s = 0; s < 2; s++) {
        qs_params_zero_grad(qs_gpt_params(m[s]));
        loss[s] = qs_gpt_forward(m[s], x, y, B, T, &mode);
    }
    compare_scalar("loss", loss[0], loss[1], model_tol());
    bool same_routing = true;
    if (cfg->moe.n_experts > 0) {
        const size_t nr = (size_t)cfg->n_layer * N * cfg->moe.top_k;
        same_routing = same_moe_routing(m, cfg, N);
        if (same_routing || !bf16) {
            const qs_moe_stats *a = qs_gpt_moe_stats(m[0]), *b = qs_gpt_moe_stats(m[1]);
            compare_scalar("balance", a->balance, b->balance, model_tol());
            compare_scalar("z", a->z, b->z, model_tol());
            if (a->kept != b->kept || a->dropped != b->dropped)
                fail("kept/dropped: cpu %lld/%lld, cuda %lld/%lld", (long long)a->kept, (long long)a->dropped,
                     (long long)b->kept, (long long)b->dropped);
            check_host_ints("routing", qs_gpt_moe_routing(m[0]), qs_gpt_moe_routing(m[1]), nr);
        } else {
            printf("# %s: bf16 products flipped a near-tied routing choice; gradients not compared\n", label);
        }
    }
    for (int s = 0; s < 2; s++)
        if (qs_gpt_backward(m[s])) fail("%s backward: %s", be[s]->name, qs_error_last());
    if (same_routing) compare_grads(qs_gpt_params(m[0]), qs_gpt_params(m[1]));

    /* run to run, the CUDA model gives the same bits: no atomics, fixed summation orders */
    qs_params *pg = qs_gpt_params(m[1]);
    float *g1 = xmalloc(pg->n * sizeof(float)), *g2 = xmalloc(pg->n * sizeof(float));
    pg->be->download(g1, pg->grad, pg->n * sizeof(float));
    qs_params_zero_grad(pg);
    const double again = qs_gpt_forward(m[1], x, y, B, T, &mode);
    if (qs_gpt_backward(m[1])) fail("cuda backward: %s", qs_error_last());
    pg->be->download(g2, pg->grad, pg->n * sizeof(float));
    if (again != loss[1] || memcmp(g1, g2, pg->n * sizeof(float)))
        fail("a second identical forward and backward on CUDA gave other bits");
    free(g1);
    free(g2);

    compare_inference(m, cfg, x, B, T, label);
done:
    for (int s = 0; s < 2; s++) qs_gpt_free(m[s]);
    free(x);
    case_end();
}

/* Inference from bf16 weights (QS_GPT_INFER_BF16 models, packed as the weights load,
 * through the backend's staging buffer): 4 prompts of 10 tokens,
 * so the prefill's products widen panels (40 rows) and the decode's take the panel
 * kernel. */
static void test_gpt_bf16_weights(const char *label, const qs_model_config *cfg) {
    case_begin("gpt %s (%s): prefill and decode from bf16 weights", label, be[1]->name);
    const int B = 4, T = 12;
    int *x = xmalloc((size_t)B * T * sizeof(int));
    qs_gpt *m[2] = {NULL, NULL};
    for (int s = 0; s < 2; s++)
        if (qs_gpt_create_for(&m[s], cfg, be[s], B, T, QS_GPT_INFER_BF16) || qs_gpt_init(m[s], seed)) {
            fail("the %s model from bf16 weights: %s", be[s]->name, qs_error_last());
            goto done;
        }
    for (int i = 0; i < B * T; i++) x[i] = (int)qs_rng_below(seed, 22, (uint64_t)i, (uint64_t)cfg->vocab_size);
    compare_inference(m, cfg, x, B, T, label);
done:
    for (int s = 0; s < 2; s++) qs_gpt_free(m[s]);
    free(x);
    case_end();
}

static qs_model_config quadranet_config(void) {
    qs_config c;
    qs_config_defaults(&c);
    qs_model_config m = c.model;
    m.type = QS_MODEL_QUADRANET;
    m.ffn_mult = 2;
    m.init_std = 0.3f;
    qs_quadra_config *q = &m.quadra;
    q->in_channels = 2;
    q->image_size = 24;
    q->stem_patch = 3; /* maps of 8, 4, 2, 1 */
    q->num_classes = 5;
    /* bf16: LayerNorms over 5-9 channels turn the products' rounding into gradient errors
     * up to 3.3% (25% in one tensor; 1 seed in 8 failed the 2e-2 bound); over 13-19
     * channels they stayed at 0.6-0.8% (2.1% in one tensor) over 6 seeds, the failing
     * one among them, so the bf16 pass checks the wider net */
    const int w_fp32[4] = {7, 5, 9, 6}, w_bf16[4] = {17, 13, 19, 15}, d[4] = {2, 0, 1, 1};
    memcpy(q->widths, bf16 ? w_bf16 : w_fp32, sizeof w_fp32);
    memcpy(q->depths, d, sizeof d);
    q->kernel_size = 3;
    q->layer_scale_init = 0.5f;
    q->drop_path = 0.4f;
    m.recompute_layers = bf16 ? QS_RECOMPUTE_ALL : 0; /* the bf16 pass also checks the blocks made again */
    return m;
}

static void test_quadranet(void) {
    const qs_model_config cfg = quadranet_config();
    const qs_quadra_config *q = &cfg.quadra;
    const int B = 8;
    case_begin("quadranet (%s): loss, accuracy count and gradients (stochastic depth on%s)", be[1]->name,
               cfg.recompute_layers ? ", recompute_layers" : "");
    qs_quadranet *m[2] = {NULL, NULL};
    for (int s = 0; s < 2; s++)
        if (qs_quadranet_create(&m[s], &cfg, be[s], B) || qs_quadranet_init(m[s], seed)) {
            fail("creating the %s model: %s", be[s]->name, qs_error_last());
            goto done;
        }
    /* random biases, the same on both: with the zero init a near-constant row makes a
     * LayerNorm amplify rounding without bound */
    qs_params *ps0 = qs_quadranet_params(m[0]);
    float *w = xmalloc(ps0->n * sizeof(float));
    qs_params_download(ps0, w);
    for (int t = 0; t < ps0->n_tensors; t++) {
        const qs_param_info *p = &ps0->info[t];
        if (p->role == QS_ROLE_BIAS || p->role == QS_ROLE_NORM_BIAS)
            for (size_t j = 0; j < p->numel; j++) w[p->offset + j] = qs_rng_uniform(seed, 30 + (uint64_t)t, j) - 0.5f;
    }
    for (int s = 0; s < 2; s++) qs_params_upload(qs_quadranet_params(m[s]), w);
    free(w);
    const size_t npix = (size_t)B * q->image_size * q->image_size * q->in_channels;
    float *img = xmalloc(npix * sizeof(float));
    int labels[8];
    for (size_t i = 0; i < npix; i++) img[i] = 2.0f * qs_rng_uniform(seed, 22, i) - 1.0f;
    for (int b = 0; b < B; b++) labels[b] = (int)qs_rng_below(seed, 23, (uint64_t)b, (uint64_t)q->num_classes);
    const qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 0x9a9a, .sample0 = 5};
    double loss[2];
    int correct[2];
    for (int s = 0; s < 2; s++) {
        qs_params_zero_grad(qs_quadranet_params(m[s]));
        loss[s] = qs_quadranet_forward(m[s], img, labels, B, &mode, &correct[s]);
        qs_quadranet_backward(m[s], 1.0f);
    }
    free(img);
    compare_scalar("loss", loss[0], loss[1], model_tol());
    if (!bf16) check_host_ints("correct", &correct[0], &correct[1], 1); /* bf16 may flip a near tie */
    compare_grads(qs_quadranet_params(m[0]), qs_quadranet_params(m[1]));
done:
    for (int s = 0; s < 2; s++) qs_quadranet_free(m[s]);
    case_end();
}

/* Window b of step `step`: a noisy affine sequence (next = 3 x + 1 mod V, or a random
 * token 30% of the time), so the loss falls and then levels off above 0. */
static void training_batch(int step, int B, int T, int V, int *x, int *y) {
    for (int b = 0; b < B; b++) {
        const uint64_t row = (uint64_t)step * B + b;
        int tok = (int)qs_rng_below(seed, 40, row, (uint64_t)V);
        for (int t = 0; t <= T; t++) {
            if (t < T) x[b * T + t] = tok;
            if (t > 0) y[b * T + t - 1] = tok;
            const uint64_t c = row * (uint64_t)(T + 1) + (uint64_t)t;
            tok = qs_rng_uniform(seed, 41, c) < 0.3f ? (int)qs_rng_below(seed, 42, c, (uint64_t)V) : (3 * tok + 1) % V;
        }
    }
}

/* One AdamW step of m on its batch of step `step`; returns the loss. */
static double train_step(qs_gpt *m, qs_adamw *opt, const qs_train_config *tc, int step, int B, int T) {
    int x[B * T], y[B * T];
    training_batch(step, B, T, qs_gpt_config(m)->vocab_size, x, y);
    const qs_forward_mode mode = {.train = true, .rng_seed = qs_rng_u64(seed, 43, (uint64_t)step),
                                  .sample0 = (uint64_t)step * B, .grad_scale = 1.0f};
    qs_params *ps = qs_gpt_params(m);
    qs_params_zero_grad(ps);
    const double loss = qs_gpt_forward(m, x, y, B, T, &mode);
    if (qs_gpt_backward(m)) fail("backward: %s", qs_error_last());
    qs_adamw_apply(opt, ps, tc, qs_lr_at(tc, step), qs_adamw_grad_norm(ps));
    return loss;
}

static qs_train_config training_config(void) {
    qs_config conf;
    qs_config_defaults(&conf);
    qs_train_config tc = conf.train;
    tc.lr = 3e-3f;
    tc.lr_schedule = QS_LR_CONSTANT;
    tc.warmup_steps = 0;
    tc.grad_clip = 1.0f;
    return tc;
}

/* The memory plan on the device: creating an MoE GPT and its optimizer on backend b takes
 * what the plan says (cudaMalloc rounds a block up, by less than 2 MiB a block), and
 * training steps take nothing more: the op scratch and cuBLAS's workspace were reserved
 * at creation. The CUDA backends share those two: *held is the workspace that earlier
 * cases reserved (0 for the first), which creation grows only by what the plan adds to
 * it. Runs before any other case, so nothing else has grown the scratch yet. */
static void test_memory_plan(const qs_backend *b, size_t *held) {
    case_begin("memory plan (%s): an MoE GPT and AdamW take what the plan says, a training step nothing more",
               b->name);
    qs_model_config cfg = moe_config();
    /* 66 x 8 rows: the MoE balance loss's scratch outgrows the gradient norm's, and the
     * bf16 attention's staged heads outgrow both, with one K/V head, so that dk/dv split
     * the three query heads (one small layer: the emulator takes a while over this many
     * rows) */
    cfg.seq_len = 8;
    cfg.n_kv_head = 1;
    cfg.n_layer = 1;
    cfg.ffn_mult = 1;
    enum { B = 66, T = 8, BLOCKS = 10 /* the most cudaMallocs creation makes */ };
    const qs_train_config tc = training_config();
    qs_gpt *m = NULL;
    qs_adamw opt = {0};
    qs_mem_plan plan;
    size_t free0, free1, free2, total;
    if (qs_gpt_plan(&cfg, b, B, T, QS_GPT_TRAIN, 1, &plan) || b->mem_info(&free0, &total)) {
        fail("planning: %s", qs_error_last());
        goto done;
    }
    plan.optimizer = qs_mem_plan_optimizer(plan.grads / sizeof(float), 1);
    if (qs_gpt_create(&m, &cfg, b, B, T) || qs_gpt_init(m, seed) ||
        qs_adamw_create(&opt, b, qs_gpt_params(m)->n) || b->mem_info(&free1, &total)) {
        fail("creating the model: %s", qs_error_last());
        goto done;
    }
    const size_t used = free0 - free1, held0 = *held < plan.workspace ? *held : plan.workspace,
                 need = qs_mem_plan_total(&plan) - held0;
    if (plan.workspace > *held) *held = plan.workspace;
    printf("# memory plan (%s): %zu bytes planned (%zu of them held already), %zu taken\n", b->name,
           qs_mem_plan_total(&plan), held0, used);
    /* (a scratch given back may leave its 2 MiB block held) */
    if (used + (held0 ? 2u << 20 : 0) < need || used > need + (size_t)BLOCKS * (2u << 20))
        fail("creation took %zu bytes of device memory; the plan says %zu", used, need);
    train_step(m, &opt, &tc, 0, B, T); /* every op that takes scratch runs in one step */
    if (b->mem_info(&free2, &total)) {
        fail("cudaMemGetInfo: %s", qs_error_last());
        goto done;
    }
    if (free2 != free1) fail("a training step took %lld bytes of device memory", (long long)free1 - (long long)free2);
done:
    qs_adamw_free(&opt);
    qs_gpt_free(m);
    case_end();
}

static void test_training(int steps) {
    case_begin("training (%s): %d AdamW steps of a tiny GPT, CUDA loss within %.0e of the CPU's at every step",
               be[1]->name, steps, train_tol());
    qs_model_config cfg = gpt_config();
    cfg.vocab_size = 23;
    const qs_train_config tc = training_config();
    enum { B = 4, T = 12 };
    qs_gpt *m[2] = {NULL, NULL};
    qs_adamw opt[2];
    memset(opt, 0, sizeof opt);
    for (int s = 0; s < 2; s++)
        if (qs_gpt_create(&m[s], &cfg, be[s], B, T) || qs_gpt_init(m[s], seed) ||
            qs_adamw_create(&opt[s], be[s], qs_gpt_params(m[s])->n)) {
            fail("creating the %s model: %s", be[s]->name, qs_error_last());
            goto done;
        }
    double first = 0.0, last = 0.0, worst = 0.0;
    int worst_at = 0;
    for (int step = 0; step < steps; step++) {
        double loss[2];
        for (int s = 0; s < 2; s++) loss[s] = train_step(m[s], &opt[s], &tc, step, B, T);
        const double rel = fabs(loss[1] - loss[0]) / fabs(loss[0]);
        if (!(rel <= worst)) { /* NaN counts as worst */
            worst = rel;
            worst_at = step;
        }
        if (step == 0) first = loss[0];
        last = loss[0];
    }
    printf("# training (%s): loss %.4f -> %.4f (cpu), largest relative difference %.3g at step %d\n", be[1]->name,
           first, last, worst, worst_at);
    if (!(worst <= train_tol())) fail("step %d: relative loss difference %.3g > %.0e", worst_at, worst, train_tol());
    if (steps >= 100 && !(last < 0.8 * first)) fail("the loss did not fall: %.4f -> %.4f", first, last);
done:
    for (int s = 0; s < 2; s++) {
        qs_adamw_free(&opt[s]);
        qs_gpt_free(m[s]);
    }
    case_end();
}

static void test_models(void) {
    qs_model_config dense = gpt_config();
    test_gpt("dense gelu, dropout", &dense, 11);
    /* 3 x 347 rows: the classifier in two chunks (1024 + 17 rows); a quadconv mixer, as
     * emulated attention over 347 positions would take minutes */
    qs_model_config chunked = gpt_config();
    chunked.seq_len = 348;
    chunked.n_layer = 1;
    chunked.mixer = QS_MIXER_QUADCONV;
    chunked.quadra.kernel_size = 4;
    test_gpt("quadconv mixer, 3 x 347 tokens, the classifier in 2 chunks", &chunked, 347);
    /* F = 32, a multiple of 8: the GELU fused into cuBLASLt's epilogues (F = 30 above is
     * not); its 4 query heads share 2 K/V heads (grouped-query attention) */
    qs_model_config fused = gpt_config();
    fused.n_embd = 16;
    fused.n_head = 4;
    fused.n_kv_head = 2;
    test_gpt("dense gelu, F = 32 (fused epilogues), 4 heads over 2 K/V heads, dropout", &fused, 11);
    /* activation checkpointing: the backward runs the first layer's forward again */
    qs_model_config moe = moe_config();
    moe.recompute_layers = QS_RECOMPUTE_ALL;
    test_gpt("moe noisy top-2, capacity 1.0, dropout, recompute_layers", &moe, 11);
    qs_model_config qc = gpt_config();
    qc.mixer = QS_MIXER_QUADCONV;
    qc.quadra.kernel_size = 4;
    /* ReLU's derivative jumps at 0: bf16's rounding moves a few of these tiny models'
     * units across it and their whole gradient with them, a difference of precision, not
     * of code (measured 3-4% against GELU's 0.4%). ReLU's CUDA path is checked at fp32. */
    const bool relu = !bf16;
    qc.activation = relu ? QS_ACT_RELU : QS_ACT_GELU;
    qc.tie_embeddings = false;
    test_gpt(relu ? "quadconv mixer k=4, relu, untied, dropout" : "quadconv mixer k=4, gelu, untied, dropout", &qc,
             11);
    test_gpt_bf16_weights("dense", &dense);
    test_gpt_bf16_weights("moe noisy top-2, capacity 1.0", &moe);
    test_quadranet();
    const char *env = getenv("QS_PARITY_STEPS");
    test_training(env && *env ? atoi(env) : 200);
}

int main(int argc, char **argv) {
    /* `parity ops` or `parity models`: one half (memory plans and ops / the models, fp32
     * then bf16), so the emulated run in `make test` takes its halves side by side */
    const char *part = argc > 1 ? argv[1] : "all";
    const bool all = !strcmp(part, "all"), ops_half = all || !strcmp(part, "ops"),
               models_half = all || !strcmp(part, "models");
    if (argc > 2 || (!ops_half && !models_half)) {
        printf("Bail out! usage: parity [ops|models] (no argument: both)\n");
        return 2;
    }
    qs_backend_cpu_pick_blas(argv); /* the CPU reference at its BLAS's full speed: device time is short */
    /* every kernel loaded with the context, not at its first launch, so that device
     * memory changes only by what the backend allocates (test_memory_plan) */
    setenv("CUDA_MODULE_LOADING", "EAGER", 1);
    seed = qs_test_seed("parity");
    be[0] = qs_backend_cpu();
    be[1] = qs_backend_cuda(QS_PRECISION_FP32);
    if (!be[1]) {
        printf("Bail out! no CUDA backend: %s\n", qs_error_last());
        return 1;
    }
    if (ops_half) {
        size_t held = 0;
        test_memory_plan(be[1], &held);
        test_memory_plan(qs_backend_cuda(QS_PRECISION_BF16), &held); /* its attention stages more */
        test_ops();
    }
    if (models_half) {
        test_models();
        be[1] = qs_backend_cuda(QS_PRECISION_BF16);
        bf16 = true;
        test_attention_shapes();
        test_matmul_bf16_shapes();
        /* the experts' products through Quasar's grouped kernel (grouped_gemm.cu) */
        setenv("QS_CUDA_GROUPED", "quasar", 1);
        test_matmul_grouped_shapes("grouped (Quasar's bf16 kernel)");
        unsetenv("QS_CUDA_GROUPED");
        test_models();
        be[1] = qs_backend_cuda(QS_PRECISION_FP32);
        bf16 = false;
    }
    if (ops_half) {
        /* The emulated cuBLAS can answer that it lacks the grouped form, as a real one may
         * for a compute type; the products then go one GEMM per group. On a GPU this
         * repeats the grouped checks. */
        setenv("QS_EMU_NO_GROUPED", "1", 1);
        test_matmul_grouped_shapes("(emulator: no grouped cuBLAS, a GEMM per group)");
        setenv("QS_EMU_NO_LT_EPILOGUE", "1", 1);
        test_epilogue_shapes("(emulator: no cuBLASLt epilogues, unfused) ");
    }
    printf("1..%d\n# %d passed, %d failed\n", passed + failed, passed, failed);
    return failed ? 1 : 0;
}

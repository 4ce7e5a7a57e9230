/* The blockwise attention ops behind the model's and ring attention (ops.h
 * attention_block_forward, attention_merge, attention_delta, attention_block_backward,
 * kv_pack_*): a causal attention cut into query x key tiles and merged by log-sum-exp
 * reproduces a double-precision attention over the whole sequence, at lengths that
 * span several of the CPU backend's query tiles; single blocks with arbitrary positions,
 * strides and masks match a double-precision reference and leave everything outside the
 * block alone; merge is exact at -inf on either side; block_backward agrees with finite
 * differences of a merged forward. Every check also runs grouped-query blocks (fewer
 * K/V heads than query heads, each shared by a group of query heads). Inputs and sizes
 * are fresh every run (the seed is printed; QS_TEST_SEED replays a failure). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "quasar/backend.h"
#include "quasar/rng.h"
#include "test_seed.h"

static const qs_ops *ops;
static uint64_t seed, draws;

static float uni(float lo, float hi) { return lo + (hi - lo) * qs_rng_uniform(seed, 0xb10c, draws++); }
static int irand(int lo, int hi) { return lo + (int)qs_rng_below(seed, 0xb10c, draws++, (uint64_t)(hi - lo + 1)); }

static float *floats(size_t n, float fill) {
    float *p = malloc((n ? n : 1) * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = fill;
    return p;
}
static float *randoms(size_t n, float lo, float hi) {
    float *p = floats(n, 0.0f);
    for (size_t i = 0; i < n; i++) p[i] = uni(lo, hi);
    return p;
}
static float *copy_of(const float *x, size_t n) {
    float *p = floats(n, 0);
    memcpy(p, x, n * sizeof *p);
    return p;
}

/* The double twin of a float buffer, starting from its contents. */
static double *widen(const float *x, size_t n) {
    double *p = malloc((n ? n : 1) * sizeof *p);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++) p[i] = x[i];
    return p;
}

/* atol of outputs and gradients: the CPU softmax's exponential (qs_cpu_expf, 2.4e-7
 * relative) moves each probability, and a value near zero, the sum of up to ~300 keys'
 * terms of order one, by 1-2e-6 */
#define VALUE_ATOL 4e-6

/* Fails unless |got - want| <= rtol |want| + atol everywhere; NaN fails, equal
 * infinities pass. */
static void expect_close(const char *what, const float *got, const double *want, size_t n, double rtol,
                         double atol) {
    for (size_t i = 0; i < n; i++)
        if ((double)got[i] != want[i] && !(fabs(got[i] - want[i]) <= rtol * fabs(want[i]) + atol))
            fail_msg("%s[%zu]: got %.9g, want %.9g", what, i, (double)got[i], want[i]);
}

/* Outputs the ops overwrite are fed NaN first: an element they fail to write shows. */
static void poison(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

/* ---- a double-precision reference for one block ---- */

static int visible(const qs_attn_block *k, int i, int j) { return !k->causal || k->k_pos0 + j <= k->q_pos0 + i; }

/* Over the op's own buffer layouts: writes the block's rows of out and lse (0 and -inf
 * where a query sees no key) and, given dout, adds its gradients into dq and dkv as if
 * this block were the whole attention (its lse final). */
static void ref_block(double *out, double *lse, double *dq, double *dkv, const float *dout, const float *q,
                      const float *kv, const qs_attn_block *k) {
    const int hs = k->C / k->NH, Ckv = k->NKV * hs;
    const double scale = 1.0 / sqrt(hs);
    double *p = malloc(((size_t)k->Tk + 1) * sizeof *p), *o = malloc((size_t)hs * sizeof *o);
    assert_non_null(p), assert_non_null(o);
    for (int b = 0; b < k->B; b++)
        for (int h = 0; h < k->NH; h++)
            for (int i = 0; i < k->Tq; i++) {
                const size_t g = (size_t)h / (k->NH / k->NKV); /* the K/V head it reads */
                const size_t qi = ((size_t)b * k->q_len + i) * k->q_stride + (size_t)h * hs,
                             oi = ((size_t)b * k->q_len + i) * k->C + (size_t)h * hs,
                             si = ((size_t)b * k->NH + h) * k->q_len + i;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j < k->Tk; j++) {
                    const float *kj = kv + ((size_t)b * k->kv_len + j) * k->kv_stride + g * hs;
                    double s = 0.0;
                    for (int c = 0; c < hs; c++) s += (double)q[qi + c] * kj[c];
                    p[j] = visible(k, i, j) ? s * scale : -INFINITY;
                    mx = fmax(mx, p[j]);
                }
                memset(o, 0, (size_t)hs * sizeof *o);
                if (mx == -INFINITY) {
                    lse[si] = -INFINITY;
                    memcpy(out + oi, o, (size_t)hs * sizeof *o);
                    continue;
                }
                for (int j = 0; j < k->Tk; j++) sum += p[j] = exp(p[j] - mx);
                lse[si] = mx + log(sum);
                for (int j = 0; j < k->Tk; j++) {
                    p[j] /= sum;
                    for (int c = 0; c < hs; c++)
                        o[c] += p[j] * kv[((size_t)b * k->kv_len + j) * k->kv_stride + Ckv + g * hs + c];
                }
                memcpy(out + oi, o, (size_t)hs * sizeof *o);
                if (!dout) continue;
                double D = 0.0;
                for (int c = 0; c < hs; c++) D += (double)dout[oi + c] * o[c];
                for (int j = 0; j < k->Tk; j++) {
                    if (!visible(k, i, j)) continue;
                    const size_t kj = ((size_t)b * k->kv_len + j) * k->kv_stride + g * hs;
                    double dp = 0.0;
                    for (int c = 0; c < hs; c++) dp += (double)dout[oi + c] * kv[kj + Ckv + c];
                    const double ds = p[j] * (dp - D) * scale;
                    for (int c = 0; c < hs; c++) {
                        dkv[kj + Ckv + c] += p[j] * dout[oi + c];
                        dq[qi + c] += ds * kv[kj + c];
                        dkv[kj + c] += ds * q[qi + c];
                    }
                }
            }
    free(p), free(o);
}

/* ---- causal attention cut into tiles = the whole attention ---- */

/* n >= 1 blocks covering [0, T): starts[0] = 0 < starts[1] < ... < starts[n] = T. */
static int random_cuts(int *starts, int T) {
    const int n = irand(1, T < 4 ? T : 4);
    starts[0] = 0;
    for (int i = 1; i < n; i++) starts[i] = irand(starts[i - 1] + 1, T - (n - i));
    starts[n] = T;
    return n;
}

/* Query rows [q0, q1) against key rows [k0, k1) of one [B,T] sequence batch of qkv
 * [B,T,C+2Ckv] rows. */
static qs_attn_block tile(int B, int T, int C, int NH, int NKV, int kv_stride, int q0, int q1, int k0, int k1) {
    return (qs_attn_block){.B = B, .C = C, .NH = NH, .NKV = NKV, .Tq = q1 - q0, .Tk = k1 - k0, .q_len = T,
                           .kv_len = T, .q_stride = C + 2 * (C / NH) * NKV, .kv_stride = kv_stride, .q_pos0 = q0,
                           .k_pos0 = k0, .causal = 1};
}

/* K/V read in place from qkv (stride W = C + 2Ckv, dk/dv straight into dqkv), or packed
 * [B,T,2Ckv] as a ring carries them (then unpacked into dqkv). */
static void check_tiles(int B, int T, int NH, int NKV, int hs, int packed) {
    const int C = NH * hs, Ckv = NKV * hs, W = C + 2 * Ckv;
    const size_t nqkv = (size_t)B * T * W, nout = (size_t)B * T * C, nst = (size_t)B * NH * T;
    float *qkv = randoms(nqkv, -2, 2), *dout = randoms(nout, -1, 1), *pre = randoms(nqkv, -1, 1);
    /* the reference: one whole block in double, its gradients onto the same prefill */
    double *wout = malloc(nout * sizeof *wout), *wlse = malloc(nst * sizeof *wlse), *wd = widen(pre, nqkv);
    assert_non_null(wlse), assert_non_null(wout);
    const qs_attn_block whole = tile(B, T, C, NH, NKV, W, 0, T, 0, T);
    ref_block(wout, wlse, wd, wd + C, dout, qkv, qkv + C, &whole);

    const size_t nkvp = (size_t)B * T * 2 * Ckv;
    float *kvp = packed ? floats(nkvp, NAN) : NULL, *dkvp = packed ? floats(nkvp, 0) : NULL;
    if (packed) ops->kv_pack_forward(kvp, qkv, B, T, C, Ckv);
    const float *kv = packed ? kvp : qkv + C;
    const int kvs = packed ? 2 * Ckv : W;

    int qs[5], ks[5], order[4];
    const int nq = random_cuts(qs, T), nk = random_cuts(ks, T);
    float *out = floats(nout, NAN), *lse = floats(nst, NAN), *ob = floats(nout, NAN), *lb = floats(nst, NAN);
    for (int a = 0; a < nq; a++) {
        /* key blocks in a random order: a first block wholly in the future leaves -inf
         * rows for the merges to fill */
        for (int c = 0; c < nk; c++) order[c] = c;
        for (int c = nk - 1; c > 0; c--) {
            const int j = irand(0, c), t = order[c];
            order[c] = order[j], order[j] = t;
        }
        for (int i = 0; i < nk; i++) {
            const int c = order[i], q0 = qs[a];
            const qs_attn_block blk = tile(B, T, C, NH, NKV, kvs, q0, qs[a + 1], ks[c], ks[c + 1]);
            const float *qv = qkv + (size_t)q0 * W, *kvv = kv + (size_t)ks[c] * kvs;
            if (i == 0) {
                ops->attention_block_forward(out + (size_t)q0 * C, lse + q0, qv, kvv, &blk);
                continue;
            }
            poison(ob, nout), poison(lb, nst);
            ops->attention_block_forward(ob + (size_t)q0 * C, lb + q0, qv, kvv, &blk);
            ops->attention_merge(out + (size_t)q0 * C, lse + q0, ob + (size_t)q0 * C, lb + q0, &blk);
        }
    }
    expect_close("tiled out vs double", out, wout, nout, 1e-5, VALUE_ATOL);
    expect_close("tiled lse vs double", lse, wlse, nst, 1e-5, 1e-6);

    float *delta = floats(nst, NAN);
    ops->attention_delta(delta, dout, out, B, T, C, NH);
    /* delta = rowsum(dout * out) over a head, from the out it was given: against double
     * sums, within 1e-5 of the sum of the terms' sizes (a delta near zero is a
     * cancellation, only as exact as its terms) */
    for (size_t r = 0; r < (size_t)B * T; r++)
        for (int h = 0; h < NH; h++) {
            double d = 0.0, size = 0.0;
            for (int c = 0; c < hs; c++) {
                const double term = (double)dout[r * C + (size_t)h * hs + c] * out[r * C + (size_t)h * hs + c];
                d += term, size += fabs(term);
            }
            const size_t s = ((r / T) * NH + h) * T + r % T;
            if (!(fabs(delta[s] - d) <= 1e-5 * size + 1e-7))
                fail_msg("delta[%zu]: got %.9g, want %.9g (terms' sizes %.3g)", s, (double)delta[s], d, size);
        }

    /* Gradients accumulate onto a random prefill. */
    float *dqkv = copy_of(pre, nqkv);
    float *dkv = packed ? dkvp : dqkv + C;
    for (int a = 0; a < nq; a++)
        for (int c = 0; c < nk; c++) {
            const int q0 = qs[a], k0 = ks[c];
            const qs_attn_block blk = tile(B, T, C, NH, NKV, kvs, q0, qs[a + 1], k0, ks[c + 1]);
            ops->attention_block_backward(dqkv + (size_t)q0 * W, dkv + (size_t)k0 * kvs, dout + (size_t)q0 * C,
                                          qkv + (size_t)q0 * W, kv + (size_t)k0 * kvs, lse + q0, delta + q0, &blk);
        }
    if (packed) ops->kv_pack_backward(dqkv, dkvp, B, T, C, Ckv);
    expect_close("tiled dqkv vs double", dqkv, wd, nqkv, 1e-5, VALUE_ATOL);
    print_message("  B=%d T=%d NH=%d NKV=%d hs=%d %s: %d x %d tiles\n", B, T, NH, NKV, hs,
                  packed ? "packed K/V" : "K/V in qkv", nq, nk);

    free(qkv), free(dout), free(pre), free(kvp), free(dkvp);
    free(out), free(lse), free(ob), free(lb), free(wlse), free(wout), free(delta);
    free(dqkv), free(wd);
}

static void test_tiles_reproduce_attention(void **state) {
    (void)state;
    /* B, T, NH, NKV, hs: multi-head, then grouped (2 and 3 query heads a K/V head) and
     * multi-query (one K/V head) */
    const int fixed[][5] = {{1, 1, 1, 1, 3},   {2, 37, 3, 3, 5},  {1, 41, 2, 2, 37}, {3, 24, 4, 4, 8},
                            {1, 200, 2, 2, 16}, {2, 129, 1, 1, 7}, {2, 37, 6, 3, 5},  {1, 150, 6, 2, 9},
                            {3, 24, 4, 1, 8},   {1, 1, 3, 1, 4}};
    for (int i = 0; i < 10; i++) check_tiles(fixed[i][0], fixed[i][1], fixed[i][2], fixed[i][3], fixed[i][4], i % 2);
    for (int i = 0; i < 4; i++) {
        const int B = irand(1, 3), T = irand(1, i % 2 ? 40 : 300), NKV = irand(1, 3), NH = NKV * irand(1, 3);
        check_tiles(B, T, NH, NKV, irand(1, 20), i % 2);
    }
}

/* ---- single blocks: positions, strides, offsets and both masks against double ---- */

static void check_block(int causal, int max_rows) {
    const int B = irand(1, 3), NKV = irand(1, 3), NH = NKV * irand(1, 3), hs = irand(1, 9), C = NH * hs;
    const int Tq = irand(1, max_rows), Tk = irand(1, max_rows);
    /* the block sits inside longer buffers whose rows are padded */
    const int q_len = Tq + irand(0, 3), kv_len = Tk + irand(0, 3);
    const int qoff = irand(0, q_len - Tq), koff = irand(0, kv_len - Tk);
    const qs_attn_block blk = {.B = B, .C = C, .NH = NH, .NKV = NKV, .Tq = Tq, .Tk = Tk, .q_len = q_len,
                               .kv_len = kv_len, .q_stride = C + irand(0, 4), .kv_stride = 2 * NKV * hs + irand(0, 4),
                               .q_pos0 = irand(0, max_rows + 8), .k_pos0 = irand(0, max_rows + 8),
                               .causal = causal};
    const size_t nq = (size_t)B * q_len * blk.q_stride, nkv = (size_t)B * kv_len * blk.kv_stride,
                 nout = (size_t)B * q_len * C, nst = (size_t)B * NH * q_len;
    const size_t qo = (size_t)qoff * blk.q_stride, ko = (size_t)koff * blk.kv_stride;
    float *q = randoms(nq, -2, 2), *kv = randoms(nkv, -2, 2), *dout = randoms(nout, -1, 1);
    /* outside the block out and lse keep what they hold; inside they start as NaN */
    float *out = randoms(nout, 5, 6), *lse = randoms(nst, 5, 6);
    double *wout = widen(out, nout), *wlse = widen(lse, nst);
    for (int b = 0; b < B; b++) {
        poison(out + ((size_t)b * q_len + qoff) * C, (size_t)Tq * C);
        for (int h = 0; h < NH; h++) poison(lse + ((size_t)b * NH + h) * q_len + qoff, (size_t)Tq);
    }
    float *dq = randoms(nq, -1, 1), *dkv = randoms(nkv, -1, 1);
    double *wdq = widen(dq, nq), *wdkv = widen(dkv, nkv);
    ref_block(wout + (size_t)qoff * C, wlse + qoff, wdq + qo, wdkv + ko, dout + (size_t)qoff * C, q + qo, kv + ko, &blk);

    ops->attention_block_forward(out + (size_t)qoff * C, lse + qoff, q + qo, kv + ko, &blk);
    expect_close("block out", out, wout, nout, 1e-5, VALUE_ATOL);
    expect_close("block lse", lse, wlse, nst, 1e-5, 1e-6);
    int empty = 0;
    for (size_t i = 0; i < nst; i++) empty += lse[i] == -INFINITY;

    float *delta = floats(nst, NAN);
    ops->attention_delta(delta, dout, out, B, q_len, C, NH);
    /* One thread takes the fused backward; four times as many threads as K/V heads split
     * dq from dK/dV (attention_block.c). Both onto the same prefill, against double. */
    const int threads = omp_get_max_threads();
    for (int split = 0; split < 2; split++) {
        omp_set_num_threads(split ? 4 * B * NKV : 1);
        float *dqs = copy_of(dq, nq), *dkvs = copy_of(dkv, nkv);
        ops->attention_block_backward(dqs + qo, dkvs + ko, dout + (size_t)qoff * C, q + qo, kv + ko, lse + qoff,
                                      delta + qoff, &blk);
        expect_close(split ? "block dq, split" : "block dq, fused", dqs, wdq, nq, 1e-5, VALUE_ATOL);
        expect_close(split ? "block dkv, split" : "block dkv, fused", dkvs, wdkv, nkv, 1e-5, VALUE_ATOL);
        /* A NULL gradient output is skipped and changes nothing about the other. */
        float *dq1 = copy_of(dq, nq), *dkv1 = copy_of(dkv, nkv);
        ops->attention_block_backward(dq1 + qo, NULL, dout + (size_t)qoff * C, q + qo, kv + ko, lse + qoff,
                                      delta + qoff, &blk);
        ops->attention_block_backward(NULL, dkv1 + ko, dout + (size_t)qoff * C, q + qo, kv + ko, lse + qoff,
                                      delta + qoff, &blk);
        assert_memory_equal(dq1, dqs, nq * sizeof *dq);
        assert_memory_equal(dkv1, dkvs, nkv * sizeof *dkv);
        free(dqs), free(dkvs), free(dq1), free(dkv1);
    }
    omp_set_num_threads(threads);
    print_message("  %s B=%d NH=%d NKV=%d hs=%d Tq=%d at %d, Tk=%d at %d: %d query rows see no key\n",
                  causal ? "causal" : "full", B, NH, NKV, hs, Tq, blk.q_pos0, Tk, blk.k_pos0, empty);

    free(q), free(kv), free(dout), free(out), free(lse), free(wout), free(wlse), free(dq), free(dkv);
    free(wdq), free(wdkv), free(delta);
}

static void test_block_vs_double(void **state) {
    (void)state;
    /* short blocks, and blocks of several query tiles */
    for (int i = 0; i < 16; i++) check_block(i % 3 != 0, i < 12 ? 12 : 300);
}

/* ---- merge at the edges ---- */

static void test_merge_infinities(void **state) {
    (void)state;
    /* (running, block) lse pairs: close, far beyond float exp's range, one side -inf, both */
    static const float pairs[][2] = {{0.3f, -1.2f},      {-2.0f, 0.5f},      {90.0f, 80.0f}, {-1000.0f, 1000.0f},
                                     {-INFINITY, 0.7f}, {0.4f, -INFINITY}, {-INFINITY, -INFINITY}};
    const int NP = 7, B = 2, NH = 3, hs = irand(1, 7), C = NH * hs, len = NP + 2;
    /* the block's rows are 1..NP of buffers of len rows: rows 0 and len-1 stay as they are */
    const qs_attn_block blk = {.B = B, .C = C, .NH = NH, .NKV = NH, .Tq = NP, .Tk = 1, .q_len = len, .kv_len = 1,
                               .q_stride = 3 * C, .kv_stride = 2 * C, .causal = 1};
    const size_t nout = (size_t)B * len * C, nst = (size_t)B * NH * len;
    float *out = randoms(nout, -1, 1), *ob = randoms(nout, -1, 1), *lse = randoms(nst, -1, 1), *lb = randoms(nst, -1, 1);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < NP; i++) {
                const float *pr = pairs[(i + b + h) % NP];
                const size_t s = ((size_t)b * NH + h) * len + 1 + (size_t)i;
                lse[s] = pr[0], lb[s] = pr[1];
                /* a -inf row's output is 0, as block_forward writes it */
                for (int c = 0; c < hs; c++) {
                    const size_t o = ((size_t)b * len + 1 + (size_t)i) * C + (size_t)h * hs + (size_t)c;
                    if (pr[0] == -INFINITY) out[o] = 0.0f;
                    if (pr[1] == -INFINITY) ob[o] = 0.0f;
                }
            }
    double *wout = widen(out, nout), *wlse = widen(lse, nst);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int i = 1; i <= NP; i++) {
                const size_t s = ((size_t)b * NH + h) * len + (size_t)i;
                const double la = lse[s], lbv = lb[s], m = fmax(la, lbv);
                if (m == -INFINITY) continue; /* both empty: stays empty */
                const double l = m + log(exp(la - m) + exp(lbv - m));
                for (int c = 0; c < hs; c++) {
                    const size_t o = ((size_t)b * len + (size_t)i) * C + (size_t)h * hs + (size_t)c;
                    wout[o] = out[o] * exp(la - l) + ob[o] * exp(lbv - l);
                }
                wlse[s] = l;
            }
    ops->attention_merge(out + C, lse + 1, ob + C, lb + 1, &blk);
    expect_close("merged out", out, wout, nout, 1e-5, VALUE_ATOL);
    expect_close("merged lse", lse, wlse, nst, 1e-6, 1e-6);
    free(out), free(ob), free(lse), free(lb), free(wout), free(wlse);
}

/* ---- block_backward by finite differences of a merged forward ---- */

typedef struct {
    qs_attn_block blk[4]; /* the key blocks, over one packed K/V */
    int nb, koff[4];
    float *q, *kv, *R, *out, *lse, *ob, *lb;
    size_t nq, nkv, nout, nst;
} merged_ctx;

/* L = sum(R * out), out merged over the key blocks. */
static double merged_loss(void *p, bool *same) {
    (void)same;
    merged_ctx *c = p;
    poison(c->out, c->nout), poison(c->lse, c->nst);
    for (int i = 0; i < c->nb; i++) {
        const float *kv = c->kv + (size_t)c->koff[i] * c->blk[i].kv_stride;
        if (i == 0) {
            ops->attention_block_forward(c->out, c->lse, c->q, kv, &c->blk[i]);
        } else {
            ops->attention_block_forward(c->ob, c->lb, c->q, kv, &c->blk[i]);
            ops->attention_merge(c->out, c->lse, c->ob, c->lb, &c->blk[i]);
        }
    }
    double L = 0.0;
    for (size_t i = 0; i < c->nout; i++) L += (double)c->out[i] * c->R[i];
    return L;
}

static void test_block_backward_gradcheck(void **state) {
    (void)state;
    /* two query heads over one K/V head or two */
    const int B = 2, NH = 2, NKV = irand(1, 2), hs = 3, C = NH * hs, Tq = irand(4, 7), Tk = irand(6, 10);
    const qs_attn_block whole = {.B = B, .C = C, .NH = NH, .NKV = NKV, .Tq = Tq, .Tk = Tk, .q_len = Tq,
                                 .kv_len = Tk, .q_stride = C + 1, .kv_stride = 2 * NKV * hs + 1,
                                 .q_pos0 = irand(2, 6), .k_pos0 = irand(0, 4), .causal = 1};
    merged_ctx c = {.nq = (size_t)B * Tq * whole.q_stride, .nkv = (size_t)B * Tk * whole.kv_stride,
                    .nout = (size_t)B * Tq * C, .nst = (size_t)B * NH * Tq};
    int starts[5];
    c.nb = random_cuts(starts, Tk);
    for (int i = 0; i < c.nb; i++) {
        c.blk[i] = whole;
        c.blk[i].Tk = starts[i + 1] - starts[i];
        c.blk[i].k_pos0 = whole.k_pos0 + starts[i];
        c.koff[i] = starts[i];
    }
    c.q = randoms(c.nq, -1.5f, 1.5f), c.kv = randoms(c.nkv, -1.5f, 1.5f), c.R = randoms(c.nout, -1, 1);
    c.out = floats(c.nout, 0), c.ob = floats(c.nout, 0), c.lse = floats(c.nst, 0), c.lb = floats(c.nst, 0);

    bool same = true;
    merged_loss(&c, &same);
    float *delta = floats(c.nst, NAN), *dq = floats(c.nq, 0), *dkv = floats(c.nkv, 0);
    ops->attention_delta(delta, c.R, c.out, B, Tq, C, NH);
    for (int i = 0; i < c.nb; i++) {
        const size_t ko = (size_t)c.koff[i] * whole.kv_stride;
        ops->attention_block_backward(dq, dkv + ko, c.R, c.q, c.kv + ko, c.lse, delta, &c.blk[i]);
    }
    /* floor 3e-3: the loss sums ~80 fp32 outputs, so a difference over 1e-3 carries
     * ~1e-4 of rounding noise, which at the default floor could read as 0.1 */
    gc_score sc = {.floor = 3e-3};
    for (size_t j = 0; j < c.nq; j++) gc_score_add(&sc, "q", j, gc_nearest_fd(merged_loss, &c, c.q + j, dq[j], &same), dq[j]);
    for (size_t j = 0; j < c.nkv; j++)
        gc_score_add(&sc, "kv", j, gc_nearest_fd(merged_loss, &c, c.kv + j, dkv[j], &same), dkv[j]);
    print_message("  %d key blocks, NKV=%d, Tq=%d at %d, Tk=%d at %d: %d coordinates, rel err %.2e, worst %.2e at %s\n",
                  c.nb, NKV, Tq, whole.q_pos0, Tk, whole.k_pos0, sc.checked, gc_score_rel(&sc), sc.worst, sc.worst_at);
    assert_true(gc_score_rel(&sc) < 5e-3);
    assert_true(sc.worst < 5e-2);
    free(c.q), free(c.kv), free(c.R), free(c.out), free(c.ob), free(c.lse), free(c.lb);
    free(delta), free(dq), free(dkv);
}

int main(void) {
    seed = qs_test_seed("test_attention_block");
    /* Three threads unless told otherwise, as test_ops: uneven splits over (b, h). */
    if (!getenv("OMP_NUM_THREADS")) omp_set_num_threads(3);
    ops = qs_backend_cpu()->ops;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiles_reproduce_attention),
        cmocka_unit_test(test_block_vs_double),
        cmocka_unit_test(test_merge_infinities),
        cmocka_unit_test(test_block_backward_gradcheck),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Blockwise attention: a query block against one key/value block, returning its
 * log-sum-exp so that blocks can be merged (ring attention, and the model's own
 * attention as one whole block), and that block's share of the backward from the merged
 * output's statistics.
 *
 * The algorithm of FlashAttention on the CPU: the queries of a (sequence, head) pair are
 * taken QT rows at a time, each tile owning its head's columns of its output rows (the
 * backward's split is at qs_cpu_attention_block_backward). A tile's scores against the keys it sees are the only T-long
 * scratch (QT x Tk per thread), so memory is linear in the sequence; the backward
 * recomputes them from the saved log-sum-exp instead of keeping probabilities. Every
 * product is a single-threaded sgemm that reads q, k and v where they lie (BLAS runs on
 * one thread in this engine; matmul.c). */
#include <cblas.h>
#include <omp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

/* Query rows per tile: large enough for BLAS to run at speed, small enough that the
 * tile's scores stay in cache at the usual block lengths. */
enum { QT = 64 };
/* Keys per block when dK/dV are split from dq: wider blocks make faster products (38 ms
 * against 41 at 64, bench kernels attention_mqa_bwd on 2 cores); each block's tiles fit
 * the QT x Tk scratch. */
enum { KB = 128 };

/* Where (sequence b, query head h) = bh starts in each of the block's tensors, in
 * floats: q and dq; kv and dkv at its key/value head (v qs_attn_kv_width further); out,
 * dout, out_b; lse, delta, lse_b. */
typedef struct {
    size_t q, kv, o, s;
} head_at;

static head_at head_of(const qs_attn_block *k, int bh) {
    const int b = bh / k->NH, h = bh % k->NH, hs = k->C / k->NH, g = h / (k->NH / k->NKV);
    return (head_at){
        .q = (size_t)b * k->q_len * k->q_stride + (size_t)h * hs,
        .kv = (size_t)b * k->kv_len * k->kv_stride + (size_t)g * hs,
        .o = (size_t)b * k->q_len * k->C + (size_t)h * hs,
        .s = (size_t)bh * k->q_len,
    };
}

/* One query tile of one head: rows [i0, i0 + m) see at most n keys (the last row's). */
typedef struct {
    head_at at;
    int i0, m, n;
} tile;

static tile tile_of(const qs_attn_block *k, int bh, int i0) {
    const int m = k->Tq - i0 < QT ? k->Tq - i0 : QT;
    return (tile){head_of(k, bh), i0, m, qs_attn_visible_keys(k, i0 + m - 1)};
}

static int tiles_per_head(const qs_attn_block *k) { return (k->Tq + QT - 1) / QT; }

/* s[m, n] = scale * (m rows of x) (n rows of y)^T: a tile's rows from its first (row r
 * at x + r * ldx) against n of its keys. */
static void tile_products(float *s, const float *x, int ldx, const float *y, int ldy, int m, int n, int hs,
                          float scale) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, hs, scale, x, ldx, y, ldy, 0.0f, s, n);
}

void qs_cpu_attention_block_forward(float *out, float *lse, const float *q, const float *kv,
                                    const qs_attn_block *k) {
    const int hs = k->C / k->NH, nt = tiles_per_head(k), Ckv = qs_attn_kv_width(k);
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        float *p = qs_cpu_scratch((size_t)QT * k->Tk * sizeof *p); /* a tile's probabilities */
        /* tiles own disjoint rows; dynamic, as causal tiles grow with their position */
#pragma omp for schedule(dynamic, 1)
        for (long w = 0; w < (long)k->B * k->NH * nt; w++) {
            const tile t = tile_of(k, (int)(w / nt), (int)(w % nt) * QT);
            float *o = out + t.at.o + (size_t)t.i0 * k->C;
            if (t.n == 0) { /* the whole tile sees no key */
                for (int r = 0; r < t.m; r++) {
                    memset(o + (size_t)r * k->C, 0, (size_t)hs * sizeof *o);
                    lse[t.at.s + t.i0 + r] = -INFINITY;
                }
                continue;
            }
            tile_products(p, q + t.at.q + (size_t)t.i0 * k->q_stride, k->q_stride, kv + t.at.kv, k->kv_stride, t.m,
                          t.n, hs, scale);
            /* exp(S - max) in place, one pass a row; a row is normalised on the shorter
             * side of P V: its n probabilities before, or its hs outputs after (inv) */
            float inv[QT];
            for (int r = 0; r < t.m; r++) {
                float *pr = p + (size_t)r * t.n;
                const int n = qs_attn_visible_keys(k, t.i0 + r);
                double sum = 0.0;
                const float mx = qs_cpu_softmax_pass(pr, pr, n, &sum);
                lse[t.at.s + t.i0 + r] = n ? mx + (float)log(sum) : -INFINITY;
                inv[r] = n ? (float)(1.0 / sum) : 0.0f;
                if (n <= hs) {
                    for (int j = 0; j < n; j++) pr[j] *= inv[r];
                    inv[r] = 1.0f;
                }
                memset(pr + n, 0, (size_t)(t.n - n) * sizeof *pr);
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t.m, hs, t.n, 1.0f, p, t.n, kv + t.at.kv + Ckv,
                        k->kv_stride, 0.0f, o, k->C);
            for (int r = 0; r < t.m; r++)
                if (inv[r] != 1.0f)
                    for (int c = 0; c < hs; c++) o[(size_t)r * k->C + c] *= inv[r];
        }
        free(p);
    }
}

void qs_cpu_attention_merge(float *out, float *lse, const float *out_b, const float *lse_b,
                            const qs_attn_block *k) {
    const int hs = k->C / k->NH;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < k->B * k->NH; bh++) {
        const head_at at = head_of(k, bh);
        for (int i = 0; i < k->Tq; i++) {
            const float la = lse[at.s + i], lb = lse_b[at.s + i];
            /* The block adds nothing; this also keeps -inf - -inf (NaN) out below. */
            if (lb == -INFINITY) continue;
            float *o = out + at.o + (size_t)i * k->C;
            const float *ob = out_b + at.o + (size_t)i * k->C;
            /* logaddexp from the larger side, so neither exp overflows; a -inf running
             * side gets weight exp(-inf) = 0 and the block's row is taken as it is. */
            const float l = (la > lb ? la : lb) + log1pf(expf(-fabsf(la - lb)));
            const float wa = expf(la - l), wb = expf(lb - l);
            for (int c = 0; c < hs; c++) o[c] = wa * o[c] + wb * ob[c];
            lse[at.s + i] = l;
        }
    }
}

void qs_cpu_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int C,
                            int NH) {
    const int hs = C / NH;
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
        const size_t at = (size_t)(bh / NH) * T * C + (size_t)(bh % NH) * hs;
        for (int t = 0; t < T; t++)
            delta[(size_t)bh * T + t] = qs_cpu_dot(dout + at + (size_t)t * C, out + at + (size_t)t * C, hs);
    }
}

/* A query tile's share of the backward over keys [j0, j1) of its head (j1 <= t->n): P
 * from the final lse (already normalised over every block), dP = dout V^T, then
 * dS = scale P (dP - delta), zero where a key is not visible; then dq += dS K, and
 * dk += dS^T Q, dv += P^T dout over those keys, for whichever of dq and dkv is given.
 * p and ds hold [t->m, j1 - j0] floats each. */
static void tile_backward(float *dq, float *dkv, const float *dout, const float *q, const float *kv,
                          const float *lse, const float *delta, const qs_attn_block *k, const tile *t, int j0, int j1,
                          float *p, float *ds) {
    const int hs = k->C / k->NH, Ckv = qs_attn_kv_width(k), w = j1 - j0;
    const float scale = 1.0f / sqrtf((float)hs);
    const float *qt = q + t->at.q + (size_t)t->i0 * k->q_stride, *kb = kv + t->at.kv + (size_t)j0 * k->kv_stride;
    const float *dout_t = dout + t->at.o + (size_t)t->i0 * k->C;
    tile_products(p, qt, k->q_stride, kb, k->kv_stride, t->m, w, hs, scale);
    tile_products(ds, dout_t, k->C, kb + Ckv, k->kv_stride, t->m, w, hs, 1.0f);
    for (int r = 0; r < t->m; r++) {
        float *pr = p + (size_t)r * w, *dr = ds + (size_t)r * w;
        const int seen = qs_attn_visible_keys(k, t->i0 + r) - j0, n = seen < 0 ? 0 : seen > w ? w : seen;
        const float l = lse[t->at.s + t->i0 + r], d = delta[t->at.s + t->i0 + r];
        for (int j = 0; j < n; j++) {
            pr[j] = qs_cpu_expf(pr[j] - l);
            dr[j] = scale * pr[j] * (dr[j] - d);
        }
        memset(pr + n, 0, (size_t)(w - n) * sizeof *pr);
        memset(dr + n, 0, (size_t)(w - n) * sizeof *dr);
    }
    if (dq)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t->m, hs, w, 1.0f, ds, w, kb, k->kv_stride, 1.0f,
                    dq + t->at.q + (size_t)t->i0 * k->q_stride, k->q_stride);
    if (!dkv) return;
    float *dk = dkv + t->at.kv + (size_t)j0 * k->kv_stride;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, w, hs, t->m, 1.0f, ds, w, qt, k->q_stride, 1.0f, dk,
                k->kv_stride);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, w, hs, t->m, 1.0f, p, w, dout_t, k->C, 1.0f, dk + Ckv,
                k->kv_stride);
}

/* Fused, a key/value head's tiles (those of every query head of its group, all adding
 * into its dK/dV) go to one thread in order: five products a tile. With fewer such heads
 * than threads can share (multi-query attention at a small batch), dq goes over (query
 * head, query tile) and dK/dV over (key/value head, key block) instead: every piece owns
 * its rows, but P and dP are made twice, seven products a tile. The cheaper wins. */
void qs_cpu_attention_block_backward(float *dq, float *dkv, const float *dout, const float *q,
                                     const float *kv, const float *lse, const float *delta,
                                     const qs_attn_block *k) {
    if (!dq && !dkv) return;
    const int nt = tiles_per_head(k), nkb = (k->Tk + KB - 1) / KB, group = k->NH / k->NKV;
    const long heads = (long)k->B * k->NKV, threads = omp_get_max_threads();
    /* by shape and threads only, so that a NULL dq or dkv changes nothing of the other */
    const bool fused = 5 * ((heads + threads - 1) / threads) * threads <= 7 * heads;
#pragma omp parallel
    {
        float *p = qs_cpu_scratch((size_t)2 * QT * k->Tk * sizeof *p), *ds = p + (size_t)QT * k->Tk;
        if (fused) {
#pragma omp for schedule(static)
            for (long bg = 0; bg < heads; bg++)
                for (int it = 0; it < group * nt; it++) {
                    const tile t = tile_of(k, (int)bg * group + it / nt, it % nt * QT);
                    if (t.n > 0) tile_backward(dq, dkv, dout, q, kv, lse, delta, k, &t, 0, t.n, p, ds);
                }
        } else {
            if (dq) {
                /* causal tiles grow with their position, as in the forward */
#pragma omp for schedule(dynamic, 1) nowait
                for (long w = 0; w < (long)k->B * k->NH * nt; w++) {
                    const tile t = tile_of(k, (int)(w / nt), (int)(w % nt) * QT);
                    if (t.n > 0) tile_backward(dq, NULL, dout, q, kv, lse, delta, k, &t, 0, t.n, p, ds);
                }
            }
            if (dkv) {
#pragma omp for schedule(dynamic, 1)
                for (long w = 0; w < heads * nkb; w++) {
                    const int bg = (int)(w / nkb), j0 = (int)(w % nkb) * KB;
                    for (int it = 0; it < group * nt; it++) {
                        const tile t = tile_of(k, bg * group + it / nt, it % nt * QT);
                        if (t.n > j0)
                            tile_backward(NULL, dkv, dout, q, kv, lse, delta, k, &t, j0,
                                          t.n < j0 + KB ? t.n : j0 + KB, p, ds);
                    }
                }
            }
        }
        free(p);
    }
}

void qs_cpu_kv_pack_forward(float *kv, const float *qkv, int B, int T, int C, int Ckv) {
    const long rows = (long)B * T;
    const size_t w = 2 * (size_t)Ckv, stride = C + w;
#pragma omp parallel for schedule(static) if ((size_t)rows * stride >= QS_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) memcpy(kv + (size_t)r * w, qkv + (size_t)r * stride + C, w * sizeof *kv);
}

void qs_cpu_kv_pack_backward(float *dqkv, const float *dkv, int B, int T, int C, int Ckv) {
    const long rows = (long)B * T;
    const size_t w = 2 * (size_t)Ckv, stride = C + w;
#pragma omp parallel for schedule(static) if ((size_t)rows * stride >= QS_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++) qs_cpu_axpy(dqkv + (size_t)r * stride + C, 1.0f, dkv + (size_t)r * w, (int)w);
}

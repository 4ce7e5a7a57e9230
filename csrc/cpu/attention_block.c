/* Blockwise attention: a query block against one key/value block, returning its
 * log-sum-exp so that blocks can be merged (ring attention, and the model's own
 * attention as one whole block), and that block's share of the backward from the merged
 * output's statistics.
 *
 * The algorithm of FlashAttention on the CPU: work is split over (sequence, head) pairs,
 * each owning its head's columns of every output row, and the queries of a pair are taken
 * QT rows at a time. A tile's scores against the keys it sees are the only T-long
 * scratch (QT x Tk per thread), so memory is linear in the sequence; the backward
 * recomputes them from the saved log-sum-exp instead of keeping probabilities. Every
 * product is a single-threaded sgemm that reads q, k and v where they lie (BLAS runs on
 * one thread in this engine; matmul.c). */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

/* Query rows per tile: large enough for BLAS to run at speed, small enough that the
 * tile's scores stay in cache at the usual block lengths. */
enum { QT = 64 };

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

/* s[m, n] = scale * (rows of x) (rows of y)^T for the tile: row r of x is x + r * ldx
 * from the tile's first row, y's rows are its n keys. */
static void tile_products(float *s, const float *x, int ldx, const float *y, int ldy, const tile *t, int hs,
                          float scale) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t->m, t->n, hs, scale, x, ldx, y, ldy, 0.0f, s, t->n);
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
            tile_products(p, q + t.at.q + (size_t)t.i0 * k->q_stride, k->q_stride, kv + t.at.kv, k->kv_stride,
                          &t, hs, scale);
            for (int r = 0; r < t.m; r++) {
                float *pr = p + (size_t)r * t.n;
                const int n = qs_attn_visible_keys(k, t.i0 + r);
                float mx = -INFINITY;
                for (int j = 0; j < n; j++) mx = pr[j] > mx ? pr[j] : mx;
                for (int j = 0; j < n; j++) pr[j] = qs_cpu_expf(pr[j] - mx);
                double sum = 0.0;
                for (int j = 0; j < n; j++) sum += pr[j];
                lse[t.at.s + t.i0 + r] = n ? mx + (float)log(sum) : -INFINITY;
                const float inv = n ? (float)(1.0 / sum) : 0.0f;
                for (int j = 0; j < n; j++) pr[j] *= inv;
                memset(pr + n, 0, (size_t)(t.n - n) * sizeof *pr);
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t.m, hs, t.n, 1.0f, p, t.n, kv + t.at.kv + Ckv,
                        k->kv_stride, 0.0f, o, k->C);
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

void qs_cpu_attention_block_backward(float *dq, float *dkv, const float *dout, const float *q,
                                     const float *kv, const float *lse, const float *delta,
                                     const qs_attn_block *k) {
    if (!dq && !dkv) return;
    const int hs = k->C / k->NH, nt = tiles_per_head(k), Ckv = qs_attn_kv_width(k), group = k->NH / k->NKV;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        float *p = qs_cpu_scratch((size_t)2 * QT * k->Tk * sizeof *p), *ds = p + (size_t)QT * k->Tk;
        /* A key/value head's tiles (those of every query head of its group) all add into
         * its dK/dV: one thread takes them in order. */
#pragma omp for schedule(static)
        for (int bg = 0; bg < k->B * k->NKV; bg++)
            for (int it = 0; it < group * nt; it++) {
                const tile t = tile_of(k, bg * group + it / nt, it % nt * QT);
                if (t.n == 0) continue;
                const float *qt = q + t.at.q + (size_t)t.i0 * k->q_stride, *kb = kv + t.at.kv;
                const float *dout_t = dout + t.at.o + (size_t)t.i0 * k->C;
                /* P from the final lse (already normalised over every block), dP = dout V^T,
                 * then dS = scale P (dP - delta), zero where a key is not visible */
                tile_products(p, qt, k->q_stride, kb, k->kv_stride, &t, hs, scale);
                tile_products(ds, dout_t, k->C, kb + Ckv, k->kv_stride, &t, hs, 1.0f);
                for (int r = 0; r < t.m; r++) {
                    float *pr = p + (size_t)r * t.n, *dr = ds + (size_t)r * t.n;
                    const int n = qs_attn_visible_keys(k, t.i0 + r);
                    const float l = lse[t.at.s + t.i0 + r], d = delta[t.at.s + t.i0 + r];
                    for (int j = 0; j < n; j++) {
                        pr[j] = qs_cpu_expf(pr[j] - l);
                        dr[j] = scale * pr[j] * (dr[j] - d);
                    }
                    memset(pr + n, 0, (size_t)(t.n - n) * sizeof *pr);
                    memset(dr + n, 0, (size_t)(t.n - n) * sizeof *dr);
                }
                /* dq += dS K; dk += dS^T Q, dv += P^T dout over the tile's keys */
                if (dq)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t.m, hs, t.n, 1.0f, ds, t.n, kb,
                                k->kv_stride, 1.0f, dq + t.at.q + (size_t)t.i0 * k->q_stride, k->q_stride);
                if (!dkv) continue;
                float *dk = dkv + t.at.kv;
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t.n, hs, t.m, 1.0f, ds, t.n, qt, k->q_stride,
                            1.0f, dk, k->kv_stride);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t.n, hs, t.m, 1.0f, p, t.n, dout_t, k->C,
                            1.0f, dk + Ckv, k->kv_stride);
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

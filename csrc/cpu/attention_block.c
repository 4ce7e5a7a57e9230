/* Blockwise attention: a query block against one key/value block, returning its
 * log-sum-exp so that blocks can be merged (ring attention), and that block's share of
 * the backward from the merged output's statistics. Laid out like attention.c: work is
 * split over (sequence, head) pairs, each owning its head's columns of every output
 * row, and every product is a qs_cpu_vec_mat with K or V transposed into scratch. */
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

/* Keys query row i sees: a prefix of the block, as positions rise with the row. */
static int visible_keys(const qs_attn_block *k, int i) {
    if (!k->causal) return k->Tk;
    const long long n = (long long)k->q_pos0 + i - k->k_pos0 + 1;
    return n < 0 ? 0 : n > k->Tk ? k->Tk : (int)n;
}

/* The first query row that sees key row j; all later rows see it too. */
static int first_query(const qs_attn_block *k, int j) {
    if (!k->causal) return 0;
    const long long i = (long long)k->k_pos0 + j - k->q_pos0;
    return i < 0 ? 0 : i > k->Tq ? k->Tq : (int)i;
}

/* Where (sequence b, head h) = bh starts in each of the block's tensors, in floats:
 * q and dq; kv and dkv (its v C further); out, dout, out_b; lse, delta, lse_b. */
typedef struct {
    size_t q, kv, o, s;
} head_at;

static head_at head_of(const qs_attn_block *k, int bh) {
    const int b = bh / k->NH, h = bh % k->NH, hs = k->C / k->NH;
    return (head_at){
        .q = (size_t)b * k->q_len * k->q_stride + (size_t)h * hs,
        .kv = (size_t)b * k->kv_len * k->kv_stride + (size_t)h * hs,
        .o = (size_t)b * k->q_len * k->C + (size_t)h * hs,
        .s = (size_t)bh * k->q_len,
    };
}

/* s[j] = scale * (x . column j of mt) for j < n, mt a head's K or V transposed [hs, Tk]. */
static void row_times(float *s, const float *x, const float *mt, const qs_attn_block *k, int n,
                      float scale) {
    for (int j = 0; j < n; j++) s[j] = 0.0f;
    qs_cpu_vec_mat(s, x, k->C / k->NH, mt, k->Tk, n);
    for (int j = 0; j < n; j++) s[j] *= scale;
}

void qs_cpu_attention_block_forward(float *out, float *lse, const float *q, const float *kv,
                                    const qs_attn_block *k) {
    const int hs = k->C / k->NH;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        /* K transposed [hs, Tk], then one row of probabilities [Tk]. */
        float *kt = qs_cpu_scratch((size_t)(hs + 1) * k->Tk * sizeof *kt);
        float *p = kt + (size_t)hs * k->Tk;
#pragma omp for schedule(static)
        for (int bh = 0; bh < k->B * k->NH; bh++) {
            const head_at at = head_of(k, bh);
            const float *kb = kv + at.kv;
            qs_cpu_transpose_head(kt, kb, k->kv_stride, k->Tk, hs);
            for (int i = 0; i < k->Tq; i++) {
                const int n = visible_keys(k, i);
                float *o = out + at.o + (size_t)i * k->C;
                memset(o, 0, (size_t)hs * sizeof *o);
                if (n == 0) {
                    lse[at.s + i] = -INFINITY;
                    continue;
                }
                row_times(p, q + at.q + (size_t)i * k->q_stride, kt, k, n, scale);
                float mx = -INFINITY;
                for (int j = 0; j < n; j++) mx = p[j] > mx ? p[j] : mx;
                double sum = 0.0;
                for (int j = 0; j < n; j++) sum += p[j] = expf(p[j] - mx);
                lse[at.s + i] = mx + (float)log(sum);
                const float inv = (float)(1.0 / sum);
                for (int j = 0; j < n; j++) p[j] *= inv;
                qs_cpu_vec_mat(o, p, n, kb + k->C, k->kv_stride, hs);
            }
        }
        free(kt);
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
    const int hs = k->C / k->NH, Tq = k->Tq, Tk = k->Tk;
    const float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel
    {
        /* K and V transposed [hs, Tk] each, P and dS [Tq, Tk] (the visible entries),
         * one column of either [Tq]. */
        const size_t kt_n = (size_t)hs * Tk, p_n = (size_t)Tq * Tk;
        float *kt = qs_cpu_scratch((2 * kt_n + 2 * p_n + (size_t)Tq) * sizeof *kt);
        float *vt = kt + kt_n, *p = vt + kt_n, *ds = p + p_n, *col = ds + p_n;
#pragma omp for schedule(static)
        for (int bh = 0; bh < k->B * k->NH; bh++) {
            const head_at at = head_of(k, bh);
            const float *qb = q + at.q, *kb = kv + at.kv, *dob = dout + at.o;
            qs_cpu_transpose_head(kt, kb, k->kv_stride, Tk, hs);
            qs_cpu_transpose_head(vt, kb + k->C, k->kv_stride, Tk, hs);
            /* Row i: P from the final lse (so it is already normalised over every
             * block), dP = dout_i . v_j, dS with the scale folded in; dq_i += dS_i K. */
            for (int i = 0; i < Tq; i++) {
                const int n = visible_keys(k, i);
                if (n == 0) continue;
                float *pi = p + (size_t)i * Tk, *di = ds + (size_t)i * Tk;
                row_times(pi, qb + (size_t)i * k->q_stride, kt, k, n, scale);
                row_times(di, dob + (size_t)i * k->C, vt, k, n, 1.0f);
                const float l = lse[at.s + i], d = delta[at.s + i];
                for (int j = 0; j < n; j++) pi[j] = expf(pi[j] - l);
                for (int j = 0; j < n; j++) di[j] = scale * pi[j] * (di[j] - d);
                if (dq) qs_cpu_vec_mat(dq + at.q + (size_t)i * k->q_stride, di, n, kb, k->kv_stride, hs);
            }
            if (!dkv) continue;
            /* Key j collects from the queries i >= first_query(j) that see it:
             * dk_j += sum_i dS[i,j] q_i, dv_j += sum_i P[i,j] dout_i. */
            for (int j = 0; j < Tk; j++) {
                const int i0 = first_query(k, j), m = Tq - i0;
                float *dk = dkv + at.kv + (size_t)j * k->kv_stride;
                for (int i = i0; i < Tq; i++) col[i - i0] = ds[(size_t)i * Tk + j];
                qs_cpu_vec_mat(dk, col, m, qb + (size_t)i0 * k->q_stride, k->q_stride, hs);
                for (int i = i0; i < Tq; i++) col[i - i0] = p[(size_t)i * Tk + j];
                qs_cpu_vec_mat(dk + k->C, col, m, dob + (size_t)i0 * k->C, k->C, hs);
            }
        }
        free(kt);
    }
}

void qs_cpu_kv_pack_forward(float *kv, const float *qkv, int B, int T, int C) {
    const long rows = (long)B * T;
#pragma omp parallel for schedule(static) if ((size_t)rows * C >= QS_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++)
        memcpy(kv + (size_t)r * 2 * C, qkv + (size_t)r * 3 * C + C, 2 * (size_t)C * sizeof *kv);
}

void qs_cpu_kv_pack_backward(float *dqkv, const float *dkv, int B, int T, int C) {
    const long rows = (long)B * T;
#pragma omp parallel for schedule(static) if ((size_t)rows * C >= QS_CPU_PAR_MIN)
    for (long r = 0; r < rows; r++)
        qs_cpu_axpy(dqkv + (size_t)r * 3 * C + C, 1.0f, dkv + (size_t)r * 2 * C, 2 * C);
}

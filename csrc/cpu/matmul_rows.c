/* Linear layers of a few rows from fp32 weights: a batch's decode step, a short prefill.
 * SGEMM packs each weight block before using it, which for a few rows costs more than
 * the products (GPT-2 124M, 8 rows: 52 ms a step against 18 ms for one row's GEMV), and
 * blocked GEMVs read the weights once per row. Here each weight is read once for all
 * the rows, its products summed in registers.
 *  - [in, out] weights: a strip of STRIP columns walks down BLOCK_IN input rows with
 *    the sums of up to QS_CPU_TILE_ROWS rows in registers, then the next strip; the
 *    block's rows are each read left to right, BLOCK_IN streams the prefetcher follows,
 *    and the next block is prefetched a block ahead.
 *  - [out, in] weights (the tied classifier): VB weight rows at a time, each dotted with
 *    up to QS_CPU_TILE_ROWS input rows, VECTOR lanes of sums per pair.
 * Threads own columns of the output, and every sum runs over the input in order: the
 * result does not depend on the thread count. */
#include <string.h>

#include "cpu_ops.h"

enum {
    STRIP = 32, /* 8 rows x 32 columns of sums: 16 AVX-512 registers */
    BLOCK_IN = 16,
    VB = 2,    /* weight rows a dot tile: 8 x 2 x 16 sums, 16 registers */
    VECTOR = 16,
    PREFETCH_FLOATS = 1024,
    CHUNK_ROWS = 64 /* [out, in] weight rows a chunk: 192 KiB at n_in 768 */
};

/* out[0..R) x [j0, j0 + STRIP) += x[0..R) x [i0, i1) @ w[i0, i1) x [j0, j0 + STRIP). */
static inline __attribute__((always_inline)) void strip_tile(const int R, float *out, const float *x,
                                                             const float *w, int n_in, int n_out, int i0, int i1,
                                                             int j0) {
    float acc[QS_CPU_TILE_ROWS][STRIP];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < STRIP; c++) acc[r][c] = out[(size_t)r * n_out + j0 + c];
    for (int i = i0; i < i1; i++) {
        const float *wr = w + (size_t)i * n_out + j0;
        /* the same strip a block down: read when the block after this one starts */
        __builtin_prefetch(wr + (size_t)BLOCK_IN * n_out);
        __builtin_prefetch(wr + (size_t)BLOCK_IN * n_out + STRIP / 2);
        for (int r = 0; r < R; r++) {
            const float a = x[(size_t)r * n_in + i];
            for (int c = 0; c < STRIP; c++) acc[r][c] = QS_CPU_MADD(a, wr[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < STRIP; c++) out[(size_t)r * n_out + j0 + c] = acc[r][c];
}

/* The columns past the last whole strip, one at a time. */
static void column_tail(float *out, const float *x, const float *w, int R, int n_in, int n_out, int i0, int i1,
                        int j0, int j1) {
    for (int r = 0; r < R; r++)
        for (int j = j0; j < j1; j++) {
            float s = out[(size_t)r * n_out + j];
            for (int i = i0; i < i1; i++) s = QS_CPU_MADD(x[(size_t)r * n_in + i], w[(size_t)i * n_out + j], s);
            out[(size_t)r * n_out + j] = s;
        }
}

static void in_out(float *out, const float *x, const float *w, int N, int n_in, int n_out, int c0, int c1) {
    const int strips_end = c0 + (c1 - c0) / STRIP * STRIP;
    for (int i0 = 0; i0 < n_in; i0 += BLOCK_IN) {
        const int i1 = n_in - i0 < BLOCK_IN ? n_in : i0 + BLOCK_IN;
        for (int j0 = c0; j0 < strips_end; j0 += STRIP)
            for (int r0 = 0; r0 < N; r0 += QS_CPU_TILE_ROWS) {
#define STRIP_TILE(R) strip_tile(R, out + (size_t)r0 * n_out, x + (size_t)r0 * n_in, w, n_in, n_out, i0, i1, j0)
                QS_CPU_TILE_SWITCH(N - r0, STRIP_TILE)
#undef STRIP_TILE
            }
        column_tail(out, x, w, N, n_in, n_out, i0, i1, strips_end, c1);
    }
}

/* out[r, v0 + v] += the VECTOR lanes of sums[r * VB + v], and the products past the
 * last whole vector. Out of line: the tile's sums then stay in registers until they are
 * stored here whole (read lane by lane inside the tile, they lived on the stack). */
static __attribute__((noinline)) void dot_finish(float *out, const float (*sums)[VECTOR], const float *x,
                                                 const float *w, int R, int V, int n_in, int n_out, int v0) {
    const int k_end = n_in / VECTOR * VECTOR;
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) {
            float s = 0.0f;
            for (int l = 0; l < VECTOR; l++) s += sums[r * VB + v][l];
            for (int k = k_end; k < n_in; k++)
                s = QS_CPU_MADD(x[(size_t)r * n_in + k], w[(size_t)(v0 + v) * n_in + k], s);
            out[(size_t)r * n_out + v0 + v] += s;
        }
}

/* out[0..R) x [v0, v0 + V) += x[0..R) . w[v0, v0 + V), V <= VB weight rows of n_in. */
static inline __attribute__((always_inline)) void dot_tile(const int R, const int V, float *out, const float *x,
                                                           const float *w, int n_in, int n_out, int v0) {
    float acc[QS_CPU_TILE_ROWS * VB][VECTOR] = {{0}};
    const int k_end = n_in / VECTOR * VECTOR;
    for (int k = 0; k < k_end; k += VECTOR) {
        float wl[VB][VECTOR];
        for (int v = 0; v < V; v++) {
            const float *wv = w + (size_t)(v0 + v) * n_in + k;
            __builtin_prefetch(wv + PREFETCH_FLOATS);
            for (int l = 0; l < VECTOR; l++) wl[v][l] = wv[l];
        }
#pragma GCC unroll 8 /* whole, or the sums go through memory */
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++)
                for (int l = 0; l < VECTOR; l++)
                    acc[r * VB + v][l] = QS_CPU_MADD(x[(size_t)r * n_in + k + l], wl[v][l], acc[r * VB + v][l]);
    }
    float sums[QS_CPU_TILE_ROWS * VB][VECTOR];
    for (int i = 0; i < R * VB; i++)
        for (int l = 0; l < VECTOR; l++) sums[i][l] = acc[i][l];
    dot_finish(out, (const float (*)[VECTOR])sums, x, w, R, V, n_in, n_out, v0);
}

/* Weight rows a chunk at a time (in L2 after the first row tile reads them), so each
 * row tile's inputs stay in L1 across the chunk: streamed from L2 for every pair of
 * weight rows, 16 input rows (48 KiB at n_in 768) made 16 rows 2.4x slower than 8. */
static void out_in(float *out, const float *x, const float *w, int N, int n_in, int n_out, int c0, int c1) {
    for (int ch = c0; ch < c1; ch += CHUNK_ROWS) {
        const int ch_end = c1 - ch < CHUNK_ROWS ? c1 : ch + CHUNK_ROWS;
        for (int r0 = 0; r0 < N; r0 += QS_CPU_TILE_ROWS) {
            float *o = out + (size_t)r0 * n_out;
            const float *xr = x + (size_t)r0 * n_in;
            const int R = N - r0 < QS_CPU_TILE_ROWS ? N - r0 : QS_CPU_TILE_ROWS;
            for (int v0 = ch; v0 < ch_end; v0 += VB) {
                if (ch_end - v0 < VB) { /* one weight row left */
                    for (int r = 0; r < R; r++)
                        dot_tile(1, 1, o + (size_t)r * n_out, xr + (size_t)r * n_in, w, n_in, n_out, v0);
                    continue;
                }
#define DOT_TILE(RR) dot_tile(RR, VB, o, xr, w, n_in, n_out, v0)
                QS_CPU_TILE_SWITCH(R, DOT_TILE)
#undef DOT_TILE
            }
        }
    }
}

void qs_cpu_matmul_rows_forward(float *out, const float *inp, const float *w, const float *bias, int N, int n_in,
                                int n_out, qs_weight_layout layout) {
    /* each thread's columns: whole strips (and the rest to the last) */
    const int nt = (size_t)N * n_in * n_out < QS_CPU_GEMM_PAR_MIN ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int units = (n_out + STRIP - 1) / STRIP;
        int c0 = (int)((long)units * t / T) * STRIP, c1 = (int)((long)units * (t + 1) / T) * STRIP;
        if (c1 > n_out) c1 = n_out;
        if (c0 < c1) {
            for (int r = 0; r < N; r++) {
                float *o = out + (size_t)r * n_out + c0;
                if (bias) memcpy(o, bias + c0, (size_t)(c1 - c0) * sizeof *o);
                else memset(o, 0, (size_t)(c1 - c0) * sizeof *o);
            }
            if (layout == QS_W_IN_OUT) in_out(out, inp, w, N, n_in, n_out, c0, c1);
            else out_in(out, inp, w, N, n_in, n_out, c0, c1);
        }
    }
}

/* Quadratic depthwise convolution, y = (Wa*x + ba) * (Wb*x + bb) + (Wc*x + bc).
 * Forward and dx: a thread takes QC_RW consecutive outputs along W of one channel. A
 * tap row's inputs slide through a window of QC_RW registers, so each is loaded once per
 * tap row rather than once per tap, and each tap's three weights once for QC_RW outputs.
 * A warp is 32 channels (coalesced 128-byte pieces of a position); a block's QC_WARPS
 * warps take consecutive rows h of the same columns, so the input rows their taps share
 * come from L1. KW_T > 0 fixes the filter width at compile time (3, 5, 7, 9): the tap
 * loop unrolls and the window's shifts become register renaming; KW_T = 0 takes s.KW.
 * The filter gradients are sums over positions, per tap in registers. */
#include "common.cuh"

enum { QC_RW = 8, QC_WARPS = 8 };

/* A thread's outputs: channel c, row h, columns w0 .. w0 + QC_RW - 1 of the image row
 * that starts at position `row`. False for a thread past the work. */
typedef struct qc_place {
    int c, h, w0;
    long long row;
} qc_place;

__device__ static inline bool qc_locate(const qs_conv_shape &s, qc_place *q) {
    const int wblocks = (s.W + QC_RW - 1) / QC_RW;
    const long long rb = (long long)blockIdx.x * QC_WARPS + (threadIdx.x >> 5), bw = rb / s.H;
    q->c = blockIdx.y * 32 + (threadIdx.x & 31);
    if (q->c >= s.C || rb >= (long long)s.B * wblocks * s.H) return false;
    q->h = (int)(rb % s.H);
    q->w0 = (int)(bw % wblocks) * QC_RW;
    q->row = (bw / wblocks * s.H + q->h) * s.W;
    return true;
}

/* *p, the input of column iw, or 0 when iw lies outside the image. */
__device__ static inline float qc_at(const float *p, int iw, int W) { return (unsigned)iw < (unsigned)W ? *p : 0.0f; }

/* The window moves one column on: next enters at the end. */
__device__ static inline void qc_slide(float *win, float next) {
#pragma unroll
    for (int r = 0; r + 1 < QC_RW; r++) win[r] = win[r + 1];
    win[QC_RW - 1] = next;
}

static dim3 qc_grid(const qs_conv_shape *s) {
    const long long blocks = (long long)s->B * s->H * ((s->W + QC_RW - 1) / QC_RW);
    return dim3((unsigned)((blocks + QC_WARPS - 1) / QC_WARPS), (s->C + 31) / 32);
}

/* kernel<KW> for the widths it unrolls, kernel<0> for the others. */
#define QC_BY_WIDTH(kernel, KW)                                                                                       \
    ((KW) == 3 ? kernel<3> : (KW) == 5 ? kernel<5> : (KW) == 7 ? kernel<7> : (KW) == 9 ? kernel<9> : kernel<0>)

template <int KW_T>
__global__ static void __launch_bounds__(QC_WARPS * 32)
    quadconv_forward_kernel(float *y, float *fa, float *fb, const float *x, const float *w, const float *bias,
                            qs_conv_shape s) {
    qc_place q;
    if (!qc_locate(s, &q)) return;
    const int C = s.C, c = q.c, KW = KW_T ? KW_T : s.KW;
    const size_t filt = (size_t)s.KH * KW * C; /* Wa, Wb, Wc follow each other */
    float ya[QC_RW], yb[QC_RW], yc[QC_RW];
#pragma unroll
    for (int r = 0; r < QC_RW; r++) {
        ya[r] = bias[c];
        yb[r] = bias[C + c];
        yc[r] = bias[2 * C + c];
    }
    for (int i = 0; i < s.KH; i++) {
        const int ih = q.h + i - s.pad_top, iw0 = q.w0 - s.pad_left;
        if (ih < 0 || ih >= s.H) continue;
        /* column iw0 - 1 of input row ih; pointers move a column (C floats) at a time */
        const float *in = x + (q.row + (long long)(ih - q.h) * s.W + iw0 - 1) * C + c, *wt = w + (size_t)i * KW * C + c;
        float win[QC_RW]; /* at tap j: the inputs of columns iw0 + j + r */
#pragma unroll
        for (int r = 1; r < QC_RW; r++) win[r] = qc_at(in += C, iw0 + r - 1, s.W);
#pragma unroll
        for (int j = 0; j < KW; j++, wt += C) {
            qc_slide(win, qc_at(in += C, iw0 + j + QC_RW - 1, s.W));
            const float wa = wt[0], wb = wt[filt], wc = wt[2 * filt];
#pragma unroll
            for (int r = 0; r < QC_RW; r++) {
                ya[r] += wa * win[r];
                yb[r] += wb * win[r];
                yc[r] += wc * win[r];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < QC_RW; r++)
        if (q.w0 + r < s.W) {
            const size_t o = (size_t)(q.row + q.w0 + r) * C + c;
            fa[o] = ya[r];
            fb[o] = yb[r];
            y[o] = yc[r] + ya[r] * yb[r];
        }
}

void qs_cuda_quadconv_forward(float *y, float *fa, float *fb, const float *x, const float *w, const float *bias,
                              const qs_conv_shape *s) {
    QS_LAUNCH(QC_BY_WIDTH(quadconv_forward_kernel, s->KW), qc_grid(s), QC_WARPS * 32, 0, y, fa, fb, x, w, bias, *s);
}

/* dx gathers from the outputs whose filters touched it: for tap (i, j), the output at
 * (h + pad_top - i, w + pad_left - j) adds dy (fb Wa + fa Wb + Wc) there. Along a tap row
 * the neighbours slide as the forward's inputs do (j from KW - 1 down), in three windows:
 * dy fb, dy fa and dy of columns n0 + jj + r. */
template <int KW_T>
__global__ static void __launch_bounds__(QC_WARPS * 32)
    quadconv_dx_kernel(float *dx, const float *dy, const float *w, const float *fa, const float *fb, qs_conv_shape s) {
    qc_place q;
    if (!qc_locate(s, &q)) return;
    const int C = s.C, c = q.c, KW = KW_T ? KW_T : s.KW;
    const size_t filt = (size_t)s.KH * KW * C;
    float acc[QC_RW];
#pragma unroll
    for (int r = 0; r < QC_RW; r++) acc[r] = 0.0f;
    for (int i = 0; i < s.KH; i++) {
        const int nh = q.h + s.pad_top - i, n0 = q.w0 + s.pad_left - KW + 1;
        if (nh < 0 || nh >= s.H) continue;
        /* column n0 of neighbour row nh, a column (C floats) on per step; the taps backwards */
        const long long off = (q.row + (long long)(nh - q.h) * s.W + n0) * C + c;
        const float *g = dy + off, *a = fa + off, *b = fb + off, *wt = w + ((size_t)i * KW + KW - 1) * C + c;
        float u[QC_RW], v[QC_RW], d[QC_RW];
#pragma unroll
        for (int r = 1; r < QC_RW; r++, g += C, a += C, b += C) {
            d[r] = qc_at(g, n0 + r - 1, s.W);
            u[r] = d[r] * qc_at(b, n0 + r - 1, s.W);
            v[r] = d[r] * qc_at(a, n0 + r - 1, s.W);
        }
#pragma unroll
        for (int jj = 0; jj < KW; jj++, g += C, a += C, b += C, wt -= C) {
            const int n = n0 + jj + QC_RW - 1;
            const float gn = qc_at(g, n, s.W);
            qc_slide(u, gn * qc_at(b, n, s.W));
            qc_slide(v, gn * qc_at(a, n, s.W));
            qc_slide(d, gn);
            const float wa = wt[0], wb = wt[filt], wc = wt[2 * filt];
#pragma unroll
            for (int r = 0; r < QC_RW; r++) acc[r] += u[r] * wa + v[r] * wb + d[r] * wc;
        }
    }
#pragma unroll
    for (int r = 0; r < QC_RW; r++)
        if (q.w0 + r < s.W) dx[(size_t)(q.row + q.w0 + r) * C + c] += acc[r];
}

/* The parameter gradients: dWa = sum over positions p of (dy fb)(p) x(p + tap), dWb the
 * same with dy fa, dWc with dy; the biases' gradients are the three factor gradients' sums.
 * A block takes 32 channels (a lane each: a warp's loads are coalesced row pieces), a
 * chunk of positions, and up to DW_WARPS pieces of the filter: a warp takes QC_RW
 * consecutive taps of one tap row, three sums per tap in registers, and walks its
 * positions with the taps' inputs in a window of registers that slides one column per
 * position (reloaded where an image row starts). Each block writes one partial per
 * column; qs_colsum_finish adds the chunks' partials in order (no atomics). */
enum { DW_WARPS = 8 };

__global__ static void __launch_bounds__(DW_WARPS * 32)
    quadconv_dw_kernel(float *part, const float *dy, const float *x, const float *fa, const float *fb, qs_conv_shape s,
                       int per_chunk, int cols) {
    const int C = s.C, filt = s.KH * s.KW * C, runs = (s.KW + QC_RW - 1) / QC_RW;
    const int c = blockIdx.x * 32 + (threadIdx.x & 31);
    const int piece = blockIdx.z * (blockDim.x >> 5) + (threadIdx.x >> 5), i = piece / runs;
    const int j0 = piece % runs * QC_RW, di = i - s.pad_top, dj = j0 - s.pad_left;
    const bool bias_sums = piece == 0;
    if (c >= C || i >= s.KH) return;
    const long long positions = (long long)s.B * s.H * s.W, p0 = (long long)blockIdx.y * per_chunk;
    const long long p1 = min(positions, p0 + per_chunk);
    float acc[QC_RW][3], bsum[3] = {0.0f, 0.0f, 0.0f}, win[QC_RW];
#pragma unroll
    for (int k = 0; k < QC_RW; k++) acc[k][0] = acc[k][1] = acc[k][2] = 0.0f;
    const float *in = x; /* input row (b, h + di), channel c, when row_ok */
    bool row_ok = false;
    for (long long p = p0; p < p1; p++) {
        const int w = (int)(p % s.W);
        if (p == p0 || w == 0) {
            const int ih = (int)(p / s.W % s.H) + di;
            row_ok = (unsigned)ih < (unsigned)s.H;
            in = x + (p - w + (long long)di * s.W) * C + c;
#pragma unroll
            for (int k = 1; k < QC_RW; k++) {
                const int n = w + dj + k - 1;
                win[k] = row_ok ? qc_at(in + (long long)n * C, n, s.W) : 0.0f;
            }
        }
        const long long o = p * C + c;
        const float gc = dy[o], ga = gc * fb[o], gb = gc * fa[o];
        if (bias_sums) {
            bsum[0] += ga;
            bsum[1] += gb;
            bsum[2] += gc;
        }
        if (!row_ok) continue;
        const int n = w + dj + QC_RW - 1; /* the column that enters: tap j0 + k sees column w + dj + k */
        qc_slide(win, qc_at(in + (long long)n * C, n, s.W));
#pragma unroll
        for (int k = 0; k < QC_RW; k++) {
            acc[k][0] += ga * win[k];
            acc[k][1] += gb * win[k];
            acc[k][2] += gc * win[k];
        }
    }
    float *row = part + (size_t)blockIdx.y * cols;
#pragma unroll
    for (int k = 0; k < QC_RW; k++)
        if (j0 + k < s.KW)
            for (int f = 0; f < 3; f++) row[f * filt + (i * s.KW + j0 + k) * C + c] = acc[k][f];
    if (bias_sums)
        for (int f = 0; f < 3; f++) row[3 * filt + f * C + c] = bsum[f];
}

void qs_cuda_quadconv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w,
                               const float *fa, const float *fb, const qs_conv_shape *s) {
    const int positions = s->B * s->H * s->W, taps = s->KH * s->KW, filt = taps * s->C, cols = 3 * filt + 3 * s->C;
    if (dx) QS_LAUNCH(QC_BY_WIDTH(quadconv_dx_kernel, s->KW), qc_grid(s), QC_WARPS * 32, 0, dx, dy, w, fa, fb, *s);
    if ((!dw && !dbias) || positions <= 0) return;
    int per;
    const int chunks = qs_colsum_chunks(positions, cols, &per);
    float *part = (float *)qs_cuda_scratch((size_t)chunks * cols * sizeof(float));
    const int pieces = s->KH * ((s->KW + QC_RW - 1) / QC_RW), warps = pieces < DW_WARPS ? pieces : DW_WARPS;
    const dim3 grid((s->C + 31) / 32, chunks, (pieces + warps - 1) / warps);
    QS_LAUNCH(quadconv_dw_kernel, grid, dim3(warps * 32), 0, part, dy, x, fa, fb, *s, per, cols);
    qs_colsum_finish(dw, 3 * filt, dbias, part, cols, chunks);
}

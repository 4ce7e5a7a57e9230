/* Quadratic depthwise convolution, y = (Wa*x + ba) * (Wb*x + bb) + (Wc*x + bc).
 * Channels are innermost, so every tap is a contiguous multiply-add over C that the
 * compiler vectorises; the three filters share each input load. */
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

/* Channels per register block of the forward: two AVX-512 or four AVX2 vectors a sum. */
#define QS_QUAD_BLOCK 32

static size_t conv_work(const qs_conv_shape *s) {
    return (size_t)s->B * s->H * s->W * s->C * s->KH * s->KW * 3;
}

/* The taps of a k-wide filter that land inside [0, n) from output position p with
 * padding pad: first..end. */
static void tap_range(int p, int pad, int k, int n, int *first, int *end) {
    *first = pad - p > 0 ? pad - p : 0;
    *end = n - p + pad < k ? n - p + pad : k;
}

/* Channels c0..c0+cw-1 of one output position over the taps [i0,i1) x [j0,j1), with the
 * three sums held in registers across all taps (cw is a compile-time constant in the
 * main call, so the arrays become vector registers): loads of x and the filters only,
 * one store of each output at the end. x0 is the input at the first tap, (i0, j0). */
static inline void quad_block(float *ya, float *yb, float *yc, const float *x0, const float *w,
                              const float *bias, const qs_conv_shape *s, int i0, int i1, int j0, int j1, int c0,
                              int cw) {
    const int C = s->C, KW = s->KW;
    const size_t filt = (size_t)s->KH * KW * C, row = (size_t)s->W * C; /* Wa, Wb, Wc follow each other */
    float a[QS_QUAD_BLOCK], b[QS_QUAD_BLOCK], c[QS_QUAD_BLOCK];
    for (int k = 0; k < cw; k++) a[k] = bias[c0 + k], b[k] = bias[C + c0 + k], c[k] = bias[2 * C + c0 + k];
    for (int i = i0; i < i1; i++)
        for (int j = j0; j < j1; j++) {
            const float *xp = x0 + (size_t)(i - i0) * row + (size_t)(j - j0) * C + c0;
            const float *wa = w + ((size_t)i * KW + j) * C + c0, *wb = wa + filt, *wc = wb + filt;
#pragma omp simd
            for (int k = 0; k < cw; k++) {
                a[k] += wa[k] * xp[k];
                b[k] += wb[k] * xp[k];
                c[k] += wc[k] * xp[k];
            }
        }
    for (int k = 0; k < cw; k++) {
        ya[c0 + k] = a[k];
        yb[c0 + k] = b[k];
        yc[c0 + k] = c[k] + a[k] * b[k];
    }
}

void qs_cpu_quadconv_forward(float *y, float *fa, float *fb, const float *x, const float *w,
                             const float *bias, const qs_conv_shape *s) {
    const int H = s->H, W = s->W, C = s->C;
#pragma omp parallel for collapse(2) schedule(static) if (conv_work(s) >= QS_CPU_PAR_MIN)
    for (int b = 0; b < s->B; b++)
        for (int h = 0; h < H; h++)
            for (int ow = 0; ow < W; ow++) {
                const size_t o = (((size_t)b * H + h) * W + ow) * C;
                int i0, i1, j0, j1;
                tap_range(h, s->pad_top, s->KH, H, &i0, &i1);
                tap_range(ow, s->pad_left, s->KW, W, &j0, &j1);
                const float *x0 = x + (((size_t)b * H + h + i0 - s->pad_top) * W + ow + j0 - s->pad_left) * C;
                int c0 = 0;
                for (; c0 + QS_QUAD_BLOCK <= C; c0 += QS_QUAD_BLOCK)
                    quad_block(fa + o, fb + o, y + o, x0, w, bias, s, i0, i1, j0, j1, c0, QS_QUAD_BLOCK);
                if (c0 < C) quad_block(fa + o, fb + o, y + o, x0, w, bias, s, i0, i1, j0, j1, c0, C - c0);
            }
}

/* dfa = dy * fb, dfb = dy * fa, dfc = dy are formed on the fly, never stored:
 * - dx gathers over the positions whose filters touched it: dx = sum over taps of
 *   dy' * (fb' Wa + fa' Wb + Wc) at the neighbour (h - i + pad_top, w - j + pad_left);
 * - dW and dbias sum over positions, in one private buffer per thread, added up in
 *   thread order afterwards so reruns give the same bits. */
void qs_cpu_quadconv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                              const float *w, const float *fa, const float *fb,
                              const qs_conv_shape *s) {
    const int H = s->H, W = s->W, C = s->C, KH = s->KH, KW = s->KW;
    const size_t filt = (size_t)KH * KW * C, per_thread = 3 * filt + 3 * (size_t)C;
    const int par = conv_work(s) >= QS_CPU_PAR_MIN, nt = par ? omp_get_max_threads() : 1;
    const int want_params = dw || dbias;
    /* scratch: per-thread dW/dbias, and three rows of C for the factors' gradients */
    const size_t scratch_n = (size_t)nt * (per_thread + 3 * (size_t)C);
    float *scratch = qs_cpu_scratch(scratch_n * sizeof(float));
    memset(scratch, 0, scratch_n * sizeof(float));
#pragma omp parallel num_threads(nt) if (par)
    {
        float *acc = scratch + (size_t)omp_get_thread_num() * (per_thread + 3 * (size_t)C);
        float *dwa = acc, *dwb = acc + filt, *dwc = acc + 2 * filt, *dba = acc + 3 * filt;
        float *ga = acc + per_thread, *gb = ga + C;
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < s->B; b++)
            for (int h = 0; h < H; h++)
                for (int ow = 0; ow < W; ow++) {
                    const size_t o = (((size_t)b * H + h) * W + ow) * C;
                    if (want_params) {
                        const float *g = dy + o, *pa = fa + o, *pb = fb + o;
#pragma omp simd
                        for (int c = 0; c < C; c++) {
                            ga[c] = g[c] * pb[c];
                            gb[c] = g[c] * pa[c];
                            dba[c] += ga[c];
                            dba[C + c] += gb[c];
                            dba[2 * C + c] += g[c];
                        }
                        for (int i = 0; i < KH; i++) {
                            const int ih = h + i - s->pad_top;
                            if (ih < 0 || ih >= H) continue;
                            for (int j = 0; j < KW; j++) {
                                const int iw = ow + j - s->pad_left;
                                if (iw < 0 || iw >= W) continue;
                                const float *xp = x + (((size_t)b * H + ih) * W + iw) * C;
                                const size_t t = ((size_t)i * KW + j) * C;
#pragma omp simd
                                for (int c = 0; c < C; c++) {
                                    dwa[t + c] += ga[c] * xp[c];
                                    dwb[t + c] += gb[c] * xp[c];
                                    dwc[t + c] += g[c] * xp[c];
                                }
                            }
                        }
                    }
                    if (!dx) continue;
                    float *dxp = dx + o;
                    for (int i = 0; i < KH; i++) {
                        const int oh = h - i + s->pad_top;
                        if (oh < 0 || oh >= H) continue;
                        for (int j = 0; j < KW; j++) {
                            const int ow2 = ow - j + s->pad_left;
                            if (ow2 < 0 || ow2 >= W) continue;
                            const size_t n = (((size_t)b * H + oh) * W + ow2) * C;
                            const float *g = dy + n, *pa = fa + n, *pb = fb + n;
                            const float *wa = w + ((size_t)i * KW + j) * C, *wb = wa + filt, *wc = wb + filt;
#pragma omp simd
                            for (int c = 0; c < C; c++) dxp[c] += g[c] * (pb[c] * wa[c] + pa[c] * wb[c] + wc[c]);
                        }
                    }
                }
    }
    for (int t = 0; t < nt; t++) {
        const float *acc = scratch + (size_t)t * (per_thread + 3 * (size_t)C);
        if (dw)
            for (size_t k = 0; k < 3 * filt; k++) dw[k] += acc[k];
        if (dbias)
            for (size_t k = 0; k < 3 * (size_t)C; k++) dbias[k] += acc[3 * filt + k];
    }
    free(scratch);
}

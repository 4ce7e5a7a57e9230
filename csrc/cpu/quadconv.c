/* Quadratic depthwise convolution, y = (Wa*x + ba) * (Wb*x + bb) + (Wc*x + bc).
 * Channels are innermost, so every tap is a contiguous multiply-add over C that the
 * compiler vectorises; the three filters share each input load. */
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

static size_t conv_work(const qs_conv_shape *s) {
    return (size_t)s->B * s->H * s->W * s->C * s->KH * s->KW * 3;
}

void qs_cpu_quadconv_forward(float *y, float *fa, float *fb, const float *x, const float *w,
                             const float *bias, const qs_conv_shape *s) {
    const int H = s->H, W = s->W, C = s->C, KH = s->KH, KW = s->KW;
    const size_t filt = (size_t)KH * KW * C; /* Wa, Wb, Wc follow each other */
#pragma omp parallel for collapse(2) schedule(static) if (conv_work(s) >= QS_CPU_PAR_MIN)
    for (int b = 0; b < s->B; b++)
        for (int h = 0; h < H; h++)
            for (int ow = 0; ow < W; ow++) {
                const size_t o = (((size_t)b * H + h) * W + ow) * C;
                float *ya = fa + o, *yb = fb + o, *yc = y + o;
                memcpy(ya, bias, C * sizeof(float));
                memcpy(yb, bias + C, C * sizeof(float));
                memcpy(yc, bias + 2 * C, C * sizeof(float));
                for (int i = 0; i < KH; i++) {
                    const int ih = h + i - s->pad_top;
                    if (ih < 0 || ih >= H) continue;
                    for (int j = 0; j < KW; j++) {
                        const int iw = ow + j - s->pad_left;
                        if (iw < 0 || iw >= W) continue;
                        const float *xp = x + (((size_t)b * H + ih) * W + iw) * C;
                        const float *wa = w + ((size_t)i * KW + j) * C, *wb = wa + filt, *wc = wb + filt;
#pragma omp simd
                        for (int c = 0; c < C; c++) {
                            ya[c] += wa[c] * xp[c];
                            yb[c] += wb[c] * xp[c];
                            yc[c] += wc[c] * xp[c];
                        }
                    }
                }
#pragma omp simd
                for (int c = 0; c < C; c++) yc[c] += ya[c] * yb[c];
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

/* Quadratic depthwise convolution, y = (Wa*x + ba) * (Wb*x + bb) + (Wc*x + bc), one
 * thread per output element (channels innermost, so a warp reads consecutive channels
 * of each tap). The filter gradients are column sums over positions (common.cuh). */
#include "common.cuh"

/* Where input (b, h + i - pad_top, w + j - pad_left) lies for output position p, or -1
 * outside the image. */
__device__ static inline long long tap_at(const qs_conv_shape &s, size_t p, int i, int j) {
    const int w = (int)(p % s.W), h = (int)(p / s.W % s.H);
    const int ih = h + i - s.pad_top, iw = w + j - s.pad_left;
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return -1;
    return (long long)p + (long long)(i - s.pad_top) * s.W + (j - s.pad_left);
}

__global__ static void quadconv_forward_kernel(float *y, float *fa, float *fb, const float *x, const float *w,
                                               const float *bias, qs_conv_shape s) {
    const int C = s.C;
    const size_t filt = (size_t)s.KH * s.KW * C; /* Wa, Wb, Wc follow each other */
    QS_GRID_LOOP(o, (size_t)s.B * s.H * s.W * C) {
        const size_t p = o / C;
        const int c = (int)(o % C);
        float ya = bias[c], yb = bias[C + c], yc = bias[2 * C + c];
        for (int i = 0; i < s.KH; i++)
            for (int j = 0; j < s.KW; j++) {
                const long long q = tap_at(s, p, i, j);
                if (q < 0) continue;
                const float xv = x[(size_t)q * C + c];
                const size_t t = ((size_t)i * s.KW + j) * C + c;
                ya += w[t] * xv;
                yb += w[filt + t] * xv;
                yc += w[2 * filt + t] * xv;
            }
        fa[o] = ya;
        fb[o] = yb;
        y[o] = yc + ya * yb;
    }
}

void qs_cuda_quadconv_forward(float *y, float *fa, float *fb, const float *x, const float *w, const float *bias,
                              const qs_conv_shape *s) {
    QS_LAUNCH_N(quadconv_forward_kernel, (size_t)s->B * s->H * s->W * s->C, y, fa, fb, x, w, bias, *s);
}

/* dx gathers from the outputs whose filters touched it:
 * dx += sum over taps of dy' (fb' Wa + fa' Wb + Wc) at the neighbour (h - i + pad_top, w - j + pad_left). */
__global__ static void quadconv_dx_kernel(float *dx, const float *dy, const float *w, const float *fa, const float *fb,
                                          qs_conv_shape s) {
    const int C = s.C;
    const size_t filt = (size_t)s.KH * s.KW * C;
    QS_GRID_LOOP(o, (size_t)s.B * s.H * s.W * C) {
        const size_t p = o / C;
        const int c = (int)(o % C);
        float acc = dx[o];
        for (int i = 0; i < s.KH; i++)
            for (int j = 0; j < s.KW; j++) {
                /* the mirrored tap: the output at (h - i + pad_top, w - j + pad_left) */
                const long long q = tap_at(s, p, 2 * s.pad_top - i, 2 * s.pad_left - j);
                if (q < 0) continue;
                const size_t n = (size_t)q * C + c, t = ((size_t)i * s.KW + j) * C + c;
                acc += dy[n] * (fb[n] * w[t] + fa[n] * w[filt + t] + w[2 * filt + t]);
            }
        dx[o] = acc;
    }
}

/* Column j of the parameter gradients at output position p: columns [0, 3 filt) are
 * dWa, dWb, dWc (factor gradient dy fb, dy fa, dy times the tap's input), then
 * [3 filt, 3 filt + 3C) dba, dbb, dbc (the factor gradients alone). */
struct quadconv_param_term {
    qs_conv_shape s;
    const float *dy, *x, *fa, *fb;
    __device__ float operator()(int p, int j) const {
        const int C = s.C, filt = s.KH * s.KW * C;
        const int f = j < 3 * filt ? j / filt : (j - 3 * filt) / C;
        const int c = (j < 3 * filt ? j % filt : j - 3 * filt) % C;
        const size_t o = (size_t)p * C + c;
        const float g = f == 0 ? dy[o] * fb[o] : f == 1 ? dy[o] * fa[o] : dy[o];
        if (j >= 3 * filt) return g;
        const int tap = j % filt / C;
        const long long q = tap_at(s, (size_t)p, tap / s.KW, tap % s.KW);
        return q < 0 ? 0.0f : g * x[(size_t)q * C + c];
    }
};

void qs_cuda_quadconv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w,
                               const float *fa, const float *fb, const qs_conv_shape *s) {
    const int positions = s->B * s->H * s->W, filt = s->KH * s->KW * s->C;
    if (dx) QS_LAUNCH_N(quadconv_dx_kernel, (size_t)positions * s->C, dx, dy, w, fa, fb, *s);
    qs_colsum(quadconv_param_term{*s, dy, x, fa, fb}, positions, 3 * filt + 3 * s->C, dw, 3 * filt, dbias);
}

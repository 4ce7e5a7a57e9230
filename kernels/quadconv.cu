/* Quadratic depthwise convolution, y = (Wa*x + ba) * (Wb*x + bb) + (Wc*x + bc), one
 * thread per output element (channels innermost, so a warp reads consecutive channels
 * of each tap). The filter gradients are sums over positions, per tap in registers. */
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

/* The parameter gradients: dWa = sum over positions p of (dy fb)(p) x(p + tap), dWb the
 * same with dy fa, dWc with dy; the biases' gradients are the three factor gradients' sums.
 * A block takes 32 channels (a lane each: the loads of a warp are one coalesced row
 * piece), a chunk of positions and a group of up to DW_TAPS taps; warp w sums taps
 * w, w + DW_WARPS, ... of the group, three sums per tap in registers, so each position's
 * factor gradients are loaded once per warp for all its taps. Each block writes one
 * partial per column; qs_colsum_finish adds the chunks' partials in order (no atomics). */
enum { DW_WARPS = 8, DW_TAPS_PER_WARP = 8, DW_TAPS = DW_WARPS * DW_TAPS_PER_WARP };

__global__ static void __launch_bounds__(DW_WARPS * 32)
    quadconv_dw_kernel(float *part, const float *dy, const float *x, const float *fa, const float *fb, qs_conv_shape s,
                       int per_chunk, int cols) {
    const int C = s.C, taps = s.KH * s.KW, filt = taps * C;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c = blockIdx.x * 32 + lane;
    const int first_tap = blockIdx.z * DW_TAPS + warp;
    const int n_taps = min((int)DW_TAPS_PER_WARP, (taps - first_tap + DW_WARPS - 1) / DW_WARPS);
    const bool bias_sums = blockIdx.z == 0 && warp == 0;
    if (c >= C || (n_taps <= 0 && !bias_sums)) return;
    /* the warp's taps as row and column offsets of the input, worked out once */
    int di[DW_TAPS_PER_WARP], dj[DW_TAPS_PER_WARP];
#pragma unroll
    for (int k = 0; k < DW_TAPS_PER_WARP; k++) {
        const int t = first_tap + k * DW_WARPS;
        di[k] = t / s.KW - s.pad_top;
        dj[k] = t % s.KW - s.pad_left;
    }
    const size_t positions = (size_t)s.B * s.H * s.W, p0 = (size_t)blockIdx.y * per_chunk;
    const size_t p1 = min(positions, p0 + per_chunk);
    float acc[DW_TAPS_PER_WARP][3] = {}, bsum[3] = {0.0f, 0.0f, 0.0f};
    for (size_t p = p0; p < p1; p++) {
        const size_t o = p * C + c;
        const int w = (int)(p % s.W), h = (int)(p / s.W % s.H);
        const float gc = dy[o], ga = gc * fb[o], gb = gc * fa[o];
        if (bias_sums) {
            bsum[0] += ga;
            bsum[1] += gb;
            bsum[2] += gc;
        }
#pragma unroll
        for (int k = 0; k < DW_TAPS_PER_WARP; k++) {
            const int ih = h + di[k], iw = w + dj[k];
            if (k >= n_taps || ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
            const float xv = x[((long long)p + (long long)di[k] * s.W + dj[k]) * C + c];
            acc[k][0] += ga * xv;
            acc[k][1] += gb * xv;
            acc[k][2] += gc * xv;
        }
    }
    float *row = part + (size_t)blockIdx.y * cols;
#pragma unroll
    for (int k = 0; k < DW_TAPS_PER_WARP; k++)
        if (k < n_taps)
            for (int f = 0; f < 3; f++) row[f * filt + (first_tap + k * DW_WARPS) * C + c] = acc[k][f];
    if (bias_sums)
        for (int f = 0; f < 3; f++) row[3 * filt + f * C + c] = bsum[f];
}

void qs_cuda_quadconv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w,
                               const float *fa, const float *fb, const qs_conv_shape *s) {
    const int positions = s->B * s->H * s->W, taps = s->KH * s->KW, filt = taps * s->C, cols = 3 * filt + 3 * s->C;
    if (dx) QS_LAUNCH_N(quadconv_dx_kernel, (size_t)positions * s->C, dx, dy, w, fa, fb, *s);
    if ((!dw && !dbias) || positions <= 0) return;
    int per;
    const int chunks = qs_colsum_chunks(positions, cols, &per);
    float *part = (float *)qs_cuda_scratch((size_t)chunks * cols * sizeof(float));
    const dim3 grid((s->C + 31) / 32, chunks, (taps + DW_TAPS - 1) / DW_TAPS);
    QS_LAUNCH(quadconv_dw_kernel, grid, dim3(DW_WARPS * 32), 0, part, dy, x, fa, fb, *s, per, cols);
    qs_colsum_finish(dw, 3 * filt, dbias, part, cols, chunks);
}

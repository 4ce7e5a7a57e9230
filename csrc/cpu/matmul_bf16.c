/* Linear layers from bf16 weights (inference). A decode step's products have a few rows
 * and are bound by reading the weights (GPT-2 124M: 497 MB of fp32 a token); bf16
 * halves that. The weights live in panels of QS_BF16_PANEL columns (ops.h), so a panel's
 * walk down its rows is one contiguous stream, and a tile of up to QS_CPU_TILE_ROWS rows
 * of the input keeps its 32-column sums in registers (8 x 32 fp32: 16 AVX-512
 * registers) while the panel streams past once.
 * Hundreds of rows (a long prefill) widen a group of panels back to fp32 and hand it to
 * SGEMM, which is as fast as the tile there and faster beyond. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "cpu_ops.h"
#include "quasar/bf16.h"

enum {
    SGEMM_MIN_ROWS = 256, /* SGEMM over widened panels catches up with the tiles at 256-512 rows (bench/NOTES.md) */
    WIDE_PANELS = 8,      /* panels widened together for one SGEMM: 256 columns */
    PREFETCH_ROWS = 64    /* panel rows a tile prefetches ahead (bench/NOTES.md) */
};

void qs_cpu_matmul_pack_bf16(uint16_t *dst, const float *w, int n_in, int n_out, qs_weight_layout layout) {
    const int panels = (n_out + QS_BF16_PANEL - 1) / QS_BF16_PANEL;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++)
        for (int i = 0; i < n_in; i++) {
            uint16_t *d = dst + ((size_t)p * n_in + i) * QS_BF16_PANEL;
            for (int c = 0; c < QS_BF16_PANEL; c++) {
                const int j = p * QS_BF16_PANEL + c;
                d[c] = j >= n_out                  ? 0
                       : layout == QS_W_OUT_IN ? qs_bf16_from_float(w[(size_t)j * n_in + i])
                                               : qs_bf16_from_float(w[(size_t)i * n_out + j]);
            }
        }
}

/* out rows [0, R) x columns [j0, j0 + nv) = inp rows @ one panel (+ bias). R is a
 * constant at each call site below, so the sums stay in registers. */
static inline __attribute__((always_inline)) void panel_tile(const int R, float *out, const float *inp,
                                                             const uint16_t *panel, const float *bias, int n_in,
                                                             int n_out, int j0, int nv) {
    float acc[QS_CPU_TILE_ROWS][QS_BF16_PANEL] = {{0}};
    for (int i = 0; i < n_in; i++) {
        /* 4 KiB ahead of the stream (past the panel's end: the next panel's, or nothing);
         * the hardware prefetcher alone left a core at ~60% of its read bandwidth */
        __builtin_prefetch((const void *)((uintptr_t)panel + ((size_t)i + PREFETCH_ROWS) * QS_BF16_PANEL * 2));
        float w[QS_BF16_PANEL];
        for (int c = 0; c < QS_BF16_PANEL; c++) w[c] = qs_bf16_to_float(panel[(size_t)i * QS_BF16_PANEL + c]);
        for (int r = 0; r < R; r++) {
            const float a = inp[(size_t)r * n_in + i];
            for (int c = 0; c < QS_BF16_PANEL; c++) acc[r][c] = QS_CPU_MADD(a, w[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < nv; c++) out[(size_t)r * n_out + j0 + c] = acc[r][c] + (bias ? bias[j0 + c] : 0.0f);
}

static void tiles(float *out, const float *inp, const uint16_t *w, const float *bias, int N, int n_in, int n_out) {
    const int panels = (n_out + QS_BF16_PANEL - 1) / QS_BF16_PANEL;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) {
        const uint16_t *panel = w + (size_t)p * n_in * QS_BF16_PANEL;
        const int j0 = p * QS_BF16_PANEL, nv = n_out - j0 < QS_BF16_PANEL ? n_out - j0 : QS_BF16_PANEL;
        for (int r0 = 0; r0 < N; r0 += QS_CPU_TILE_ROWS) {
#define PANEL_TILE(R) panel_tile(R, out + (size_t)r0 * n_out, inp + (size_t)r0 * n_in, panel, bias, n_in, n_out, j0, nv)
            QS_CPU_TILE_SWITCH(N - r0, PANEL_TILE)
#undef PANEL_TILE
        }
    }
}

/* Each thread widens WIDE_PANELS panels at a time into its own [n_in, 256] fp32 block
 * and runs the rows through it with one SGEMM. */
static void widened(float *out, const float *inp, const uint16_t *w, const float *bias, int N, int n_in,
                    int n_out) {
    enum { WIDTH = WIDE_PANELS * QS_BF16_PANEL };
    const int panels = (n_out + QS_BF16_PANEL - 1) / QS_BF16_PANEL, groups = (panels + WIDE_PANELS - 1) / WIDE_PANELS;
#pragma omp parallel
    {
        float *block = qs_cpu_scratch((size_t)n_in * WIDTH * sizeof(float));
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++) {
            const int p0 = g * WIDE_PANELS, np = panels - p0 < WIDE_PANELS ? panels - p0 : WIDE_PANELS;
            const int j0 = p0 * QS_BF16_PANEL, nv = n_out - j0 < WIDTH ? n_out - j0 : WIDTH;
            for (int i = 0; i < n_in; i++)
                for (int p = 0; p < np; p++) {
                    const uint16_t *src = w + ((size_t)(p0 + p) * n_in + i) * QS_BF16_PANEL;
                    float *dst = block + (size_t)i * WIDTH + p * QS_BF16_PANEL;
                    for (int c = 0; c < QS_BF16_PANEL; c++) dst[c] = qs_bf16_to_float(src[c]);
                }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, nv, n_in, 1.0f, inp, n_in, block, WIDTH, 0.0f,
                        out + j0, n_out);
            if (bias)
                for (int r = 0; r < N; r++)
                    for (int c = 0; c < nv; c++) out[(size_t)r * n_out + j0 + c] += bias[j0 + c];
        }
        free(block);
    }
}

void qs_cpu_matmul_forward_bf16(float *out, const float *inp, const uint16_t *w, const float *bias, int N, int n_in,
                                int n_out) {
    if (N <= 0) return;
    if (N >= SGEMM_MIN_ROWS) widened(out, inp, w, bias, N, n_in, n_out);
    else tiles(out, inp, w, bias, N, n_in, n_out);
}

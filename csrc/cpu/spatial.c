/* Layout ops of the image models: patches to channels, global average pooling. */
#include "cpu_ops.h"

void qs_cpu_space_to_depth_forward(float *out, const float *inp, int B, int H, int W, int C, int p) {
    const int Ho = H / p, Wo = W / p;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * H * W * C >= QS_CPU_PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < Ho; i++)
            for (int j = 0; j < Wo; j++) {
                float *o = out + (((size_t)b * Ho + i) * Wo + j) * p * p * C;
                for (int di = 0; di < p; di++)
                    for (int dj = 0; dj < p; dj++) {
                        const float *x = inp + (((size_t)b * H + i * p + di) * W + j * p + dj) * C;
                        float *od = o + ((size_t)di * p + dj) * C;
                        for (int c = 0; c < C; c++) od[c] = x[c];
                    }
            }
}

void qs_cpu_space_to_depth_backward(float *dinp, const float *dout, int B, int H, int W, int C, int p) {
    const int Ho = H / p, Wo = W / p;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * H * W * C >= QS_CPU_PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < Ho; i++)
            for (int j = 0; j < Wo; j++) {
                const float *o = dout + (((size_t)b * Ho + i) * Wo + j) * p * p * C;
                for (int di = 0; di < p; di++)
                    for (int dj = 0; dj < p; dj++) {
                        float *x = dinp + (((size_t)b * H + i * p + di) * W + j * p + dj) * C;
                        const float *od = o + ((size_t)di * p + dj) * C;
                        for (int c = 0; c < C; c++) x[c] += od[c];
                    }
            }
}

void qs_cpu_avgpool_forward(float *out, const float *inp, int B, int N, int C) {
    for (int b = 0; b < B; b++) {
        float *o = out + (size_t)b * C;
        for (int c = 0; c < C; c++) o[c] = 0.0f;
        for (int n = 0; n < N; n++) {
            const float *x = inp + ((size_t)b * N + n) * C;
            for (int c = 0; c < C; c++) o[c] += x[c];
        }
        for (int c = 0; c < C; c++) o[c] /= (float)N;
    }
}

void qs_cpu_avgpool_backward(float *dinp, const float *dout, int B, int N, int C) {
    for (int b = 0; b < B; b++)
        for (int n = 0; n < N; n++) {
            float *dx = dinp + ((size_t)b * N + n) * C;
            const float *g = dout + (size_t)b * C;
            for (int c = 0; c < C; c++) dx[c] += g[c] / (float)N;
        }
}

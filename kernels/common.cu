/* The host side of the shared reductions (common.cuh). */
#include "common.cuh"

#define COLSUM_MAX_CHUNKS 4096
#define COLSUM_MAX_PARTIALS (1 << 24)
#define COLSUM_MIN_ROWS 64

int qs_colsum_chunks(int rows, int cols, int *rows_per_chunk) {
    int chunks = (rows + COLSUM_MIN_ROWS - 1) / COLSUM_MIN_ROWS;
    int cap = COLSUM_MAX_PARTIALS / cols;
    if (cap > COLSUM_MAX_CHUNKS) cap = COLSUM_MAX_CHUNKS;
    if (cap < 1) cap = 1;
    if (chunks > cap) chunks = cap;
    *rows_per_chunk = (rows + chunks - 1) / chunks;
    return (rows + *rows_per_chunk - 1) / *rows_per_chunk;
}

__global__ static void colsum_finish_kernel(float *dst0, int n0, float *dst1, const float *part, int cols,
                                            int chunks) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float *dst = j < n0 ? (dst0 ? dst0 + j : NULL) : (dst1 ? dst1 + (j - n0) : NULL);
    if (!dst) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += part[(size_t)k * cols + j];
    *dst += s;
}

void qs_colsum_finish(float *dst0, int n0, float *dst1, const float *part, int cols, int chunks) {
    QS_LAUNCH_N(colsum_finish_kernel, (size_t)cols, dst0, n0, dst1, part, cols, chunks);
}

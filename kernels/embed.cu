/* Token + position embedding. The backward is deterministic without atomics: the rows
 * are stably sorted by the table row they add into (CUB radix sort), and the first row
 * of each run of equal indices adds the whole run, in row order, for its columns. That
 * is the CPU's order of additions, so the sums come out the same. */
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

__global__ static void embed_forward_kernel(float *out, const int *tok, const int *pos, const float *wte,
                                            const float *wpe, int N, int C) {
    QS_GRID_LOOP(i, (size_t)N * C) {
        const size_t r = i / C, c = i % C;
        out[i] = wte[(size_t)tok[r] * C + c] + wpe[(size_t)pos[r] * C + c];
    }
}

void qs_cuda_embed_forward(float *out, const int *tok, const int *pos, const float *wte, const float *wpe, int N,
                           int C) {
    QS_LAUNCH_N(embed_forward_kernel, (size_t)N * C, out, tok, pos, wte, wpe, N, C);
}

__global__ static void iota_kernel(int *v, int n) { QS_GRID_LOOP(i, (size_t)n) v[i] = (int)i; }

#define SCATTER_COLS 128

/* Rows rows[0..N) sorted by key; the first of each run of equal keys owns its table row. */
__global__ static void scatter_runs_kernel(float *table, const float *dout, const int *keys, const int *rows, int N,
                                           int C) {
    const int i = blockIdx.x, c = blockIdx.y * SCATTER_COLS + threadIdx.x;
    if (c >= C || (i > 0 && keys[i - 1] == keys[i])) return;
    float *g = table + (size_t)keys[i] * C + c;
    float acc = *g;
    for (int j = i; j < N && keys[j] == keys[i]; j++) acc += dout[(size_t)rows[j] * C + c];
    *g = acc;
}

/* CUB's temporary storage for sorting N (key, row) pairs. */
static size_t sort_bytes_of(int N) {
    size_t bytes = 0;
    QS_CUDA(cub::DeviceRadixSort::SortPairs(NULL, bytes, (const int *)NULL, (int *)NULL, (const int *)NULL,
                                            (int *)NULL, N));
    return bytes;
}

/* keys, rows in, rows out, then the sort's storage */
static size_t scratch_of(int N, size_t sort_bytes) { return 3 * qs_cuda_room((size_t)N * sizeof(int)) + sort_bytes; }

size_t qs_cuda_embed_scratch(int N) { return scratch_of(N, sort_bytes_of(N)); }

static void scatter_rows(float *table, const float *dout, const int *index, int N, int C) {
    size_t sort_bytes = sort_bytes_of(N); /* not const: SortPairs takes it by reference */
    char *at = (char *)qs_cuda_scratch(scratch_of(N, sort_bytes));
    int *keys = (int *)qs_cuda_carve(&at, (size_t)N * sizeof(int));
    int *rows_in = (int *)qs_cuda_carve(&at, (size_t)N * sizeof(int));
    int *rows = (int *)qs_cuda_carve(&at, (size_t)N * sizeof(int));
    QS_LAUNCH_N(iota_kernel, (size_t)N, rows_in, N);
    QS_CUDA(cub::DeviceRadixSort::SortPairs(at, sort_bytes, index, keys, rows_in, rows, N));
    QS_LAUNCH(scatter_runs_kernel, dim3(N, (C + SCATTER_COLS - 1) / SCATTER_COLS), SCATTER_COLS, 0, table, dout,
              keys, rows, N, C);
}

void qs_cuda_embed_backward(float *dwte, float *dwpe, const float *dout, const int *tok, const int *pos, int N,
                            int C) {
    if (N <= 0 || C <= 0) return;
    if (dwte) scatter_rows(dwte, dout, tok, N, C);
    if (dwpe) scatter_rows(dwpe, dout, pos, N, C);
}

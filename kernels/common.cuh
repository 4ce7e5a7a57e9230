/* Device helpers shared by the kernels: grid-stride loops, warp and block reductions,
 * and the deterministic column sum behind every parameter gradient that sums over rows.
 *
 * Determinism: no floating-point atomics. Each output element is owned by one thread,
 * and every sum over threads combines them in a fixed tree that depends only on sizes. */
#ifndef QUASAR_KERNELS_COMMON_CUH
#define QUASAR_KERNELS_COMMON_CUH

#include "cuda_ops.h"

/* i over [0, n) spread over the whole grid. */
#define QS_GRID_LOOP(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

struct qs_sum_op {
    template <class T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct qs_max_op {
    template <class T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

/* Every lane of the warp gets op over the 32 lanes' v (a butterfly: the same tree in
 * every lane, so every lane holds the same bits). */
template <class T, class Op> __device__ inline T qs_warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Every thread of the block gets op over the block's v; blockDim.x a multiple of 32, at
 * most 1024. `identity` fills the missing warps' places. Ends with a barrier, so it can
 * be called again straight away. */
template <class T, class Op> __device__ inline T qs_block_reduce(T v, Op op, T identity) {
    __shared__ T part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = qs_warp_reduce(v, op);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = qs_warp_reduce(lane < nwarps ? part[lane] : identity, op);
    __syncthreads();
    return v;
}

/* ---- deterministic column sums ----
 * dst[j] += sum over rows r of f(r, j) for j < cols, where f is a functor
 * (__device__ float operator()(int r, int j) const). Rows are cut into chunks of a fixed
 * size; within a chunk a column's 8 lanes each sum every 8th row in order and are added
 * in lane order; the chunks' partials are then added in chunk order. The result depends
 * only on the sizes, never on scheduling. Columns j < n0 go to dst0[j], the rest to
 * dst1[j - n0] (NULL: skipped), so one pass can fill two gradients (a weight and its
 * bias). */
#define QS_COLSUM_LANES 8

/* A block of (32, QS_COLSUM_LANES) threads sums f(r, j) over rows [r0, r1) for its 32
 * columns j, each column's lanes every QS_COLSUM_LANES-th row in order, then the lanes
 * in order; the sum is valid in the threads with threadIdx.y == 0 and j < cols. */
template <class F> __device__ float qs_colsum_rows(F f, int r0, int r1, int j, int cols) {
    __shared__ float acc[QS_COLSUM_LANES][33];
    float s = 0.0f;
    if (j < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += QS_COLSUM_LANES) s += f(r, j);
    acc[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    float t = 0.0f;
    if (threadIdx.y == 0)
        for (int l = 0; l < QS_COLSUM_LANES; l++) t += acc[l][threadIdx.x];
    return t;
}

template <class F>
__global__ void qs_colsum_partial_kernel(F f, float *part, int rows, int cols, int rows_per_chunk) {
    const int j = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    const float t = qs_colsum_rows(f, r0, r1, j, cols);
    if (threadIdx.y == 0 && j < cols) part[(size_t)blockIdx.y * cols + j] = t;
}

/* Adds the chunks' partials in order (common.cu). */
void qs_colsum_finish(float *dst0, int n0, float *dst1, const float *part, int cols, int chunks);
/* Chunks for a rows x cols sum: rows of up to 64 each, at most 2^24 partials in all. */
int qs_colsum_chunks(int rows, int cols, int *rows_per_chunk);

template <class F> void qs_colsum(F f, int rows, int cols, float *dst0, int n0, float *dst1) {
    if ((!dst0 && !dst1) || rows <= 0 || cols <= 0) return;
    int per;
    const int chunks = qs_colsum_chunks(rows, cols, &per);
    float *part = (float *)qs_cuda_scratch((size_t)chunks * cols * sizeof(float));
    QS_LAUNCH(qs_colsum_partial_kernel<F>, dim3((cols + 31) / 32, chunks), dim3(32, QS_COLSUM_LANES), 0, f, part,
              rows, cols, per);
    qs_colsum_finish(dst0, n0, dst1, part, cols, chunks);
}

#endif

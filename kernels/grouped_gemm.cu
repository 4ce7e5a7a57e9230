/* The MoE experts' grouped products on the tensor cores, Quasar's own kernel beside
 * cublasGemmGroupedBatchedEx (matmul.cu), for the bf16 backend: a product whose rows
 * vary by group, C_g = A_g op(W_g) (+ bias_g), A_g the rows off[g] .. off[g+1]-1 of A
 * [rows, K] and C [rows, N], W_g = w + g K N stored [K][N] (the forward) or [N][K] (the
 * input gradient, which uses W_g^T). fp32 in memory; each tile is rounded to bf16 on its
 * way into shared memory, multiplied by mma.sync m16n8k16 with fp32 accumulation.
 *
 * A block of four warps (2 x 2) takes a 64 x 64 tile of one group's C, each warp 32 x 32
 * (two row tiles by four column tiles of 8), and walks K in steps of 32. Blocks are
 * numbered group by group, ceil(rows / 64) for each, so that no block spans two groups
 * and an empty group costs nothing; a block finds its group by counting. The tiles are read by plain loads, a pair of floats a
 * thread at a time (any K, N and alignment), and stored as bf16 pairs; the rows past a
 * group's end, and the columns past K or N, as zeros. */
#include "mma.cuh"

enum {
    GG_THREADS = 128,
    GG_BM = 64, /* rows of C a block */
    GG_BN = 64, /* columns of C a block */
    GG_BK = 32, /* the K step */
    GG_A_PITCH = GG_BK / 2 + 4,  /* words a row of the A tile (and of a [N][K] W tile) */
    GG_KN_PITCH = GG_BN / 2 + 4, /* words a row of a [K][N] W tile */
};

/* Element (r, c) of a row-major [rows, cols] float matrix as a bf16 pair with (r, c + 1),
 * zeros outside it. */
__device__ static inline uint32_t gg_pair(const float *m, int ld, int r, int c, int rows, int cols) {
    if (r >= rows) return 0;
    const float *row = m + (size_t)r * ld;
    return qs_bf16x2(c < cols ? row[c] : 0.0f, c + 1 < cols ? row[c + 1] : 0.0f);
}

/* C_g (=|+=) A_g op(W_g) (+ bias_g) for row tile blockIdx.x (numbered group by group),
 * columns from blockIdx.y * 64. W_NK: W_g stored [N][K]. */
template <bool W_NK>
__global__ static void __launch_bounds__(GG_THREADS)
    grouped_gemm_kernel(float *C, const float *A, const float *w, const float *bias, const int *off, int K, int N,
                        bool accumulate) {
    QS_DYNAMIC_SMEM(uint32_t, smem); /* the A tile, then the W tile */
    uint32_t *as = smem, *bs = smem + GG_BM * GG_A_PITCH;
    int grp = 0, first = 0; /* the block's group, and that group's first row tile */
    for (int n; (int)blockIdx.x >= first + (n = (off[grp + 1] - off[grp] + GG_BM - 1) / GG_BM); grp++) first += n;
    const int row0 = off[grp] + ((int)blockIdx.x - first) * GG_BM, end = off[grp + 1], n0 = blockIdx.y * GG_BN;
    const float *wg = w + (size_t)grp * K * N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wm = warp / 2, wn = warp % 2;
    float acc[2][4][4] = {};
    for (int k0 = 0; k0 < K; k0 += GG_BK) {
        __syncthreads(); /* every warp is done with the previous step's tiles */
        for (int e = threadIdx.x; e < GG_BM * GG_BK / 2; e += GG_THREADS) {
            const int r = e / (GG_BK / 2), c = 2 * (e % (GG_BK / 2));
            as[r * GG_A_PITCH + c / 2] = gg_pair(A, K, row0 + r, k0 + c, end, K);
        }
        for (int e = threadIdx.x; e < GG_BN * GG_BK / 2; e += GG_THREADS) {
            if (W_NK) { /* row n of the tile: W_g's row n0 + n, its columns k0 .. */
                const int n = e / (GG_BK / 2), c = 2 * (e % (GG_BK / 2));
                bs[n * GG_A_PITCH + c / 2] = gg_pair(wg, K, n0 + n, k0 + c, N, K);
            } else { /* row k of the tile: W_g's row k0 + k, its columns n0 .. */
                const int k = e / (GG_BN / 2), c = 2 * (e % (GG_BN / 2));
                bs[k * GG_KN_PITCH + c / 2] = gg_pair(wg + n0, N, k0 + k, c, K, N - n0);
            }
        }
        __syncthreads();
        const uint32_t *aw = as + wm * 32 * GG_A_PITCH;
        if (W_NK)
            qs_mma_tiles<2, 4, GG_BK / 16, false>(acc, aw, GG_A_PITCH, bs + wn * 32 * GG_A_PITCH, GG_A_PITCH, lane);
        else
            qs_mma_tiles<2, 4, GG_BK / 16, true>(acc, aw, GG_A_PITCH, bs + wn * 16, GG_KN_PITCH, lane);
    }
    /* the lane's elements: rows g + 8h of row tile m, columns 2t, 2t + 1 of column tile n */
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = row0 + wm * 32 + 16 * m + g + 8 * h;
            if (r >= end) continue;
            float *row = C + (size_t)r * N;
#pragma unroll
            for (int n = 0; n < 4; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int c = n0 + wn * 32 + 8 * n + 2 * t + e;
                    if (c >= N) continue;
                    const float v = acc[m][n][2 * h + e] + (bias ? bias[(size_t)grp * N + c] : 0.0f);
                    row[c] = accumulate ? row[c] + v : v;
                }
        }
}

void qs_cuda_grouped_gemm_bf16(float *C, const float *A, const float *w, const float *bias, const int *offsets,
                               const int *off_dev, int groups, int K, int N, bool w_nk, bool accumulate) {
    int n_tiles = 0;
    for (int g = 0; g < groups; g++) n_tiles += (offsets[g + 1] - offsets[g] + GG_BM - 1) / GG_BM;
    if (n_tiles == 0 || N <= 0) return;
    const dim3 grid(n_tiles, (N + GG_BN - 1) / GG_BN);
    const size_t a_bytes = GG_BM * GG_A_PITCH * sizeof(uint32_t);
    if (w_nk)
        QS_LAUNCH(grouped_gemm_kernel<true>, grid, GG_THREADS, a_bytes + GG_BN * GG_A_PITCH * sizeof(uint32_t), C, A,
                  w, bias, off_dev, K, N, accumulate);
    else
        QS_LAUNCH(grouped_gemm_kernel<false>, grid, GG_THREADS, a_bytes + GG_BK * GG_KN_PITCH * sizeof(uint32_t), C,
                  A, w, bias, off_dev, K, N, accumulate);
}

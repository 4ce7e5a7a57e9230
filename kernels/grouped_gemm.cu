/* The MoE experts' grouped products on the tensor cores, Quasar's own kernel beside
 * cublasGemmGroupedBatchedEx (matmul.cu), for the bf16 backend: the three products of an
 * expert layer, forward (bias in the epilogue), input gradient and weight gradient, over
 * groups of rows off[g] .. off[g+1]-1 (an expert's packed rows). fp32 in memory; each
 * tile is rounded to bf16 on its way into shared memory and multiplied by mma.sync
 * m16n8k16 with fp32 accumulation.
 *
 * A block of four warps (2 x 2) takes a 64 x 64 tile of C, each warp 32 x 32 (two row
 * tiles by four column tiles of 8), and walks the depth in steps of 32. In the forward
 * and the input gradient a group's rows are C's rows: blocks are numbered group by
 * group, ceil(rows / 64) for each, so that no block spans two groups and an empty group
 * costs nothing; a block finds its group by counting. In the weight gradient they are
 * the depth: a block per (group, tile of C_g), A's tile read down its columns. The tiles
 * are read by plain loads, a pair of floats a thread at a time (any size and
 * alignment), and stored as bf16 pairs; what lies past a group's rows or a matrix's
 * edge, as zeros. */
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

/* The same element with (r + 1, c) instead: a pair along a column, for a transposed tile. */
__device__ static inline uint32_t gg_pair_down(const float *m, int ld, int r, int c, int rows, int cols) {
    if (c >= cols) return 0;
    return qs_bf16x2(r < rows ? m[(size_t)r * ld + c] : 0.0f, r + 1 < rows ? m[(size_t)(r + 1) * ld + c] : 0.0f);
}

/* The three products of an expert layer: the forward, C_g = A_g W_g (+ bias_g), W_g
 * [K][N]; the input gradient, C_g += A_g W_g^T, W_g [N][K]; the weight gradient,
 * C_g += A_g^T B_g, A_g and B_g the group's rows of A [rows, M] and B [rows, N], C_g
 * [M][N] (there the group's rows are the depth). */
enum gg_kind { GG_FORWARD, GG_DINP, GG_DW };

struct gg_problem {
    float *C;
    const float *A, *B, *bias; /* B: the weights, or the weight gradient's dout */
    const int *off;            /* device copy of the group offsets */
    int M, K, N;               /* M: the weight gradient's rows; K: the other two's depth */
};

/* One 64 x 64 tile of C. Forward and input gradient: row tile blockIdx.x (numbered
 * group by group), columns from blockIdx.y * 64. Weight gradient: group blockIdx.z, rows
 * from blockIdx.x * 64 and columns from blockIdx.y * 64 of its C_g. */
template <gg_kind KIND>
__global__ static void __launch_bounds__(GG_THREADS) grouped_gemm_kernel(gg_problem p) {
    constexpr bool B_NK = KIND == GG_DINP; /* B's tile as [N][K] rows, else [K][N] */
    QS_DYNAMIC_SMEM(uint32_t, smem);       /* the A tile, then the B tile */
    uint32_t *as = smem, *bs = smem + GG_BM * GG_A_PITCH;
    int grp = 0, m0, m_end, k_beg, k_end; /* C_g's rows [m0, m_end), the depth [k_beg, k_end) */
    const float *bg;
    float *cg;
    if constexpr (KIND == GG_DW) {
        grp = blockIdx.z, m0 = blockIdx.x * GG_BM, m_end = p.M, k_beg = p.off[grp], k_end = p.off[grp + 1];
        if (k_beg == k_end) return; /* an expert without rows adds nothing */
        bg = p.B, cg = p.C + (size_t)grp * p.M * p.N;
    } else {
        int first = 0; /* the block's group, and that group's first row tile */
        for (int n; (int)blockIdx.x >= first + (n = (p.off[grp + 1] - p.off[grp] + GG_BM - 1) / GG_BM); grp++)
            first += n;
        m0 = p.off[grp] + ((int)blockIdx.x - first) * GG_BM, m_end = p.off[grp + 1], k_beg = 0, k_end = p.K;
        bg = p.B + (size_t)grp * p.K * p.N, cg = p.C;
    }
    const int n0 = blockIdx.y * GG_BN, N = p.N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wm = warp / 2, wn = warp % 2;
    float acc[2][4][4] = {};
    for (int k0 = k_beg; k0 < k_end; k0 += GG_BK) {
        __syncthreads(); /* every warp is done with the previous step's tiles */
        for (int e = threadIdx.x; e < GG_BM * GG_BK / 2; e += GG_THREADS) {
            const int r = e / (GG_BK / 2), c = 2 * (e % (GG_BK / 2)); /* tile row r, depth c, c + 1 */
            as[r * GG_A_PITCH + c / 2] = KIND == GG_DW ? gg_pair_down(p.A, p.M, k0 + c, m0 + r, k_end, p.M)
                                                        : gg_pair(p.A, p.K, m0 + r, k0 + c, m_end, p.K);
        }
        for (int e = threadIdx.x; e < GG_BN * GG_BK / 2; e += GG_THREADS) {
            if (B_NK) { /* row n of the tile: W_g's row n0 + n, its columns k0 .. */
                const int n = e / (GG_BK / 2), c = 2 * (e % (GG_BK / 2));
                bs[n * GG_A_PITCH + c / 2] = gg_pair(bg, p.K, n0 + n, k0 + c, N, p.K);
            } else { /* row k of the tile: B's row k0 + k, its columns n0 .. */
                const int k = e / (GG_BN / 2), c = 2 * (e % (GG_BN / 2));
                bs[k * GG_KN_PITCH + c / 2] = gg_pair(bg + n0, N, k0 + k, c, k_end, N - n0);
            }
        }
        __syncthreads();
        const uint32_t *aw = as + wm * 32 * GG_A_PITCH;
        if (B_NK)
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
            const int r = m0 + wm * 32 + 16 * m + g + 8 * h;
            if (r >= m_end) continue;
            float *row = cg + (size_t)r * N;
#pragma unroll
            for (int n = 0; n < 4; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int c = n0 + wn * 32 + 8 * n + 2 * t + e;
                    if (c >= N) continue;
                    const float v = acc[m][n][2 * h + e];
                    if (KIND == GG_FORWARD) row[c] = v + (p.bias ? p.bias[(size_t)grp * N + c] : 0.0f);
                    else row[c] += v;
                }
        }
}

/* Shared memory: the A tile and the B tile in its layout. */
template <gg_kind KIND> static size_t gg_smem(void) {
    return sizeof(uint32_t) * (GG_BM * GG_A_PITCH + (KIND == GG_DINP ? GG_BN * GG_A_PITCH : GG_BK * GG_KN_PITCH));
}

/* Row tiles of the forward's and input gradient's grid: ceil(rows / 64) a group. */
static int row_tiles(const int *offsets, int groups) {
    int n = 0;
    for (int g = 0; g < groups; g++) n += (offsets[g + 1] - offsets[g] + GG_BM - 1) / GG_BM;
    return n;
}

void qs_cuda_grouped_forward_bf16(float *out, const float *inp, const float *w, const float *bias, const int *offsets,
                                  const int *off_dev, int groups, int n_in, int n_out) {
    const int tiles = row_tiles(offsets, groups);
    if (tiles == 0 || n_out <= 0) return;
    const gg_problem p = {out, inp, w, bias, off_dev, 0, n_in, n_out};
    QS_LAUNCH(grouped_gemm_kernel<GG_FORWARD>, dim3(tiles, (n_out + GG_BN - 1) / GG_BN), GG_THREADS,
              gg_smem<GG_FORWARD>(), p);
}

void qs_cuda_grouped_backward_bf16(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                   const int *offsets, const int *off_dev, int groups, int n_in, int n_out) {
    const int tiles = row_tiles(offsets, groups);
    if (tiles == 0) return; /* no rows: nothing to add anywhere */
    if (dinp && n_in > 0) {
        const gg_problem p = {dinp, dout, w, NULL, off_dev, 0, n_out, n_in};
        QS_LAUNCH(grouped_gemm_kernel<GG_DINP>, dim3(tiles, (n_in + GG_BN - 1) / GG_BN), GG_THREADS,
                  gg_smem<GG_DINP>(), p);
    }
    if (dw && n_in > 0 && n_out > 0) {
        const gg_problem p = {dw, inp, dout, NULL, off_dev, n_in, 0, n_out};
        QS_LAUNCH(grouped_gemm_kernel<GG_DW>, dim3((n_in + GG_BM - 1) / GG_BM, (n_out + GG_BN - 1) / GG_BN, groups),
                  GG_THREADS, gg_smem<GG_DW>(), p);
    }
}

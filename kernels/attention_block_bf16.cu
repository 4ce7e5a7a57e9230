/* Blockwise attention (ops.h qs_attn_block) on the tensor cores, for the backend with
 * bf16 products (train.precision bf16): FlashAttention-2's algorithm with mma.sync
 * m16n8k16 (mma.cuh), bf16 operands and fp32 accumulation, the softmax in fp32.
 *
 * The tensors are fp32 in memory, as the rest of the backend keeps them. A first pass
 * stages the heads the kernels read into the op scratch as bf16, each head's rows
 * contiguous and D wide (zeros past the head size), q times the softmax scale and
 * log2 e (the exponentials are exp2): that halves what every tile load moves, once per
 * query tile, and lets whole rows move by cp.async (async_copy.cuh) with no registers
 * held. The kernels load the next tile while the warps multiply this one (two buffers,
 * one barrier a tile). Tiles are row-major in shared memory, their row pitch padded by
 * 16 bytes so that the 8 rows of an ldmatrix piece hit distinct banks; fragments come
 * out by ldmatrix, four 8 x 8 pieces a load, transposed on the way for a B operand whose
 * sum runs along the tile's rows (v in P V), so no tile is stored twice.
 *
 * Forward: a block of four warps takes 128 query rows of one (sequence, query head), 32
 * per warp as two 16-row tiles that share each k and v fragment the warp loads (half
 * the shared-memory reads per product of one tile a warp), and walks the keys they see
 * in tiles of 64. Per tile, S = q k^T (32 x 64 a warp) lands in registers, the lane's
 * rows are masked (causal, ragged tails) and rescaled by their running max (reduced over
 * the row's four lanes; the sum stays per lane until the end), and P, packed to bf16
 * straight from the accumulators, multiplies V into the 32 x D output. Saved: out and the log-sum-exp, as the fp32 kernel saves
 * them, so the ring merge and either backward take them.
 *
 * Backward, two kernels as in attention_block.cu (deterministic, no atomics), over one
 * staging of q, k, v and dout: dq over query tiles (P = exp2(S - lse) recomputed,
 * dP = dout v^T, dS = P (dP - delta), dq += scale dS k, keys in order), and dk, dv over
 * tiles of 64 keys of one kv head, a warp owning 16, summing over the query heads of its
 * group and their 64-row chunks in order (S^T = k q^T, dv += P^T dout,
 * dk += scale dS^T q).
 *
 * Head sizes up to 128 (tiles of 32, 64, 128 columns); wider heads take
 * attention_block.cu's kernels. */
#include "async_copy.cuh"
#include "attention_block.cuh"
#include "mma.cuh"

enum {
    TC_THREADS = 128,
    TC_ROWS = 64,                /* query rows (dq) or keys (dk/dv) a block owns: 16 a warp */
    TC_FWD_MT = 2,               /* 16-row tiles of q a warp owns in the forward */
    TC_FWD_ROWS = 4 * 16 * TC_FWD_MT, /* query rows a forward block owns (four warps) */
    TC_KEYS = 64,                /* keys a tile (forward, dq) */
    TC_QCHUNK = 64,              /* query rows a chunk (dk/dv) */
    TC_MAX_HEAD = 128,
};

/* Words a row of a q, k, v or dout tile in shared memory (two bf16 a word). */
template <int D> __host__ __device__ constexpr int tc_pitch() { return D / 2 + 4; }
/* Words of a 64-row tile in shared memory (every tile here is 64 queries or keys). */
template <int D> __host__ __device__ constexpr int tc_tile() { return 64 * tc_pitch<D>(); }
/* Shared memory, in bytes, of `tiles` tiles and `floats` more. */
template <int D> static size_t tc_smem(int tiles, int floats) {
    return sizeof(uint32_t) * (tiles * tc_tile<D>() + floats);
}

/* The staged heads (bf16 pairs, rows of D / 2 words, zeros past the head size): q (times
 * the scale and log2 e) and dout [B][NH][Tq], k and v [B][NKV][Tk]; dout only for the
 * backward. */
struct tc_staged {
    const uint32_t *q, *k, *v, *dout;
};

/* Where query head h (of NH) or kv head g (of NKV) of sequence b starts in them, in words. */
template <int D> __device__ static inline size_t staged_q(const qs_attn_block &k, int b, int h) {
    return ((size_t)b * k.NH + h) * k.Tq * (D / 2);
}
template <int D> __device__ static inline size_t staged_kv(const qs_attn_block &k, int b, int g) {
    return ((size_t)b * k.NKV + g) * k.Tk * (D / 2);
}

/* Rows [0, T) of the H heads of B sequences of src (head h of sequence b at
 * b len stride + h hs, a row `stride` floats on) times mul, into dst [B][H][T] rows of
 * D / 2 words; grid (B H, chunks of rows). */
template <int D>
__global__ static void stage_heads_kernel(uint32_t *dst, const float *src, int len, int stride, int H, int T, int hs,
                                          float mul) {
    const int b = blockIdx.x / H, h = blockIdx.x % H;
    const float *head = src + (size_t)b * len * stride + (size_t)h * hs;
    uint32_t *to = dst + (size_t)blockIdx.x * T * (D / 2);
    for (size_t e = (size_t)blockIdx.y * blockDim.x + threadIdx.x; e < (size_t)T * (D / 2);
         e += (size_t)gridDim.y * blockDim.x) {
        const int c = 2 * (int)(e % (D / 2));
        const float *row = head + e / (D / 2) * stride;
        to[e] = qs_bf16x2(c < hs ? mul * row[c] : 0.0f, c + 1 < hs ? mul * row[c + 1] : 0.0f);
    }
}

/* Rows [r0, r0 + ROWS) of a staged head into a tile by the block's cp.async, 16 bytes a
 * copy; rows at or past `rows` become 0 (rows >= 1). */
template <int D, int ROWS = 64> __device__ static void load_tile(uint32_t *dst, const uint32_t *head, int r0, int rows) {
    constexpr int CH = D / 8; /* 16-byte pieces a row */
    for (int c = threadIdx.x; c < ROWS * CH; c += blockDim.x) {
        const int r = c / CH, x = c % CH;
        const bool in = r0 + r < rows;
        qs_cp_async<16>(dst + r * tc_pitch<D>() + 4 * x, head + (size_t)(in ? r0 + r : 0) * (D / 2) + 4 * x, in);
    }
}

/* Keys [j0, j0 + 64) of a staged k and v head into the k and v tiles of buffer
 * j0 / 64 % 2 at kvs, so that the next key tile loads beside the one in use. */
template <int D>
__device__ static void load_keys(uint32_t *kvs, const uint32_t *kh, const uint32_t *vh, int j0, int Tk) {
    uint32_t *to = kvs + 2 * tc_tile<D>() * (j0 / TC_KEYS % 2);
    load_tile<D>(to, kh, j0, Tk);
    load_tile<D>(to + tc_tile<D>(), vh, j0, Tk);
}
/* The k tile of key tile j0 (its v tile follows). */
template <int D> __device__ static const uint32_t *key_tile(const uint32_t *kvs, int j0) {
    return kvs + 2 * tc_tile<D>() * (j0 / TC_KEYS % 2);
}

/* acc = A B (mma.cuh's qs_mma_tiles): A rows of a tile of q, k, v or dout; B stored
 * transposed, its columns as the rows of a tile (k for S = q k^T, q for S^T = k q^T, v
 * and dout for dP). */
template <int MT, int NT, int KT>
__device__ static inline void tile_product(float (*acc)[NT][4], const uint32_t *a, const uint32_t *bt, int pitch,
                                           int lane) {
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int n = 0; n < NT; n++) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.0f;
    qs_mma_tiles<MT, NT, KT, false>(acc, a, pitch, bt, pitch, lane);
}

/* acc += X B into MT x NT tiles of 8 columns: X (MT row tiles of 16 x 16 KT) in
 * accumulator tiles, packed pairwise to bf16 as the A operand (tiles 2kk and 2kk + 1 are
 * the fragment of columns [16kk, 16kk + 16)); B a row-major tile with the sum along its
 * rows (v for P V, k for dS k, q and dout for dk and dv), its B fragments by ldmatrix's
 * transpose, each used by all MT row tiles. */
template <int MT, int NT, int KT>
__device__ static inline void tile_product_acc(float (*acc)[NT][4], const float (*x)[2 * KT][4], const uint32_t *b,
                                               int pitch, int lane) {
    const uint32_t *row = b + (lane % 16) * pitch + 4 * (lane / 16);
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) {
            a[m][0] = qs_bf16x2(x[m][2 * kk][0], x[m][2 * kk][1]);
            a[m][1] = qs_bf16x2(x[m][2 * kk][2], x[m][2 * kk][3]);
            a[m][2] = qs_bf16x2(x[m][2 * kk + 1][0], x[m][2 * kk + 1][1]);
            a[m][3] = qs_bf16x2(x[m][2 * kk + 1][2], x[m][2 * kk + 1][3]);
        }
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            uint32_t f[4];
            qs_ldmatrix_x4_trans(f, row + 16 * kk * pitch + 4 * n);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                qs_mma_bf16_16816(acc[m][n], a[m], f);
                qs_mma_bf16_16816(acc[m][n + 1], a[m], f + 2);
            }
        }
    }
}

/* A 16 x D accumulator's two rows of this lane, r0 and r0 + 8 (those under `rows`), times
 * mul[0] and mul[1] into rows of dst (row stride `stride`), columns under hs: stored, or
 * added to what is there. */
template <int DT>
__device__ static inline void put_rows(float *dst, int stride, int r0, int rows, int hs, const float acc[DT][4],
                                       const float mul[2], bool add, int t) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (r0 + 8 * h >= rows) continue;
        float *row = dst + (size_t)(r0 + 8 * h) * stride;
#pragma unroll
        for (int n = 0; n < DT; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int c = 8 * n + 2 * t + e;
                if (c < hs) row[c] = (add ? row[c] : 0.0f) + mul[h] * acc[n][2 * h + e];
            }
    }
}

/* The keys the rows of a query tile starting at i0 see, a warp owning MT 16-row tiles of
 * it: each of this lane's rows (row0 + 16 m and row0 + 16 m + 8; 0 past Tq), the most
 * any of its warp's rows sees, the most any of the block's rows sees (the last rows see
 * the most: positions rise with i). */
template <int MT> struct tc_seen {
    int row0, lane[MT][2], warp, block;
};
template <int MT> __device__ static inline tc_seen<MT> keys_seen(const qs_attn_block &k, int i0, int warp, int g) {
    constexpr int WR = 16 * MT; /* a warp's rows */
    tc_seen<MT> s;
    s.row0 = i0 + warp * WR + g;
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int i = s.row0 + 16 * m + 8 * h;
            s.lane[m][h] = i < k.Tq ? qs_attn_visible_keys(&k, i) : 0;
        }
    const int warp_last = min(k.Tq, i0 + warp * WR + WR) - 1;
    s.warp = warp_last >= i0 + warp * WR ? qs_attn_visible_keys(&k, warp_last) : 0;
    s.block = qs_attn_visible_keys(&k, min(k.Tq, i0 + TC_THREADS / 32 * WR) - 1);
    return s;
}

/* ---- forward: grid (B * NH, query tiles of TC_FWD_ROWS) ---- */

template <int D>
__global__ static void __launch_bounds__(TC_THREADS)
    flash_forward_bf16_kernel(float *out, float *lse, tc_staged st, qs_attn_block k) {
    constexpr int P = tc_pitch<D>(), TILE = tc_tile<D>(), MT = TC_FWD_MT, NT = TC_KEYS / 8, DT = D / 8;
    QS_DYNAMIC_SMEM(uint32_t, smem);
    uint32_t *qs = smem, *kvs = qs + MT * TILE; /* q; then k, v of key tile j at kvs + 2 TILE (j % 2) */
    const fa_head at = head_at(k);
    const int b = blockIdx.x / k.NH, qh = blockIdx.x % k.NH;
    const uint32_t *kh = st.k + staged_kv<D>(k, b, qh / (k.NH / k.NKV)), *vh = st.v + (kh - st.k);
    const int i0 = blockIdx.y * TC_FWD_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2,
              t = lane & 3;
    /* the lane's rows: row0 + 16 m + 8 h, accumulator halves h = 0, 1 of row tile m */
    const tc_seen<MT> seen = keys_seen<MT>(k, i0, warp, g);
    const uint32_t *qw = qs + warp * 16 * MT * P; /* the warp's rows of q */
    load_tile<D, TC_FWD_ROWS>(qs, st.q + staged_q<D>(k, b, qh), i0, k.Tq);
    if (seen.block > 0) load_keys<D>(kvs, kh, vh, 0, k.Tk);
    qs_cp_async_commit();
    float o[MT][DT][4], m[MT][2], l[MT][2];
#pragma unroll
    for (int r = 0; r < MT; r++) {
        m[r][0] = m[r][1] = -INFINITY;
        l[r][0] = l[r][1] = 0.0f;
#pragma unroll
        for (int n = 0; n < DT; n++) o[r][n][0] = o[r][n][1] = o[r][n][2] = o[r][n][3] = 0.0f;
    }
    for (int j0 = 0; j0 < seen.block; j0 += TC_KEYS) {
        qs_cp_async_wait<0>();
        __syncthreads(); /* this tile (and q) is in, and every warp is done with the previous one */
        const uint32_t *ks = key_tile<D>(kvs, j0), *vs = ks + TILE;
        if (j0 + TC_KEYS < seen.block) load_keys<D>(kvs, kh, vh, j0 + TC_KEYS, k.Tk); /* the previous tile's buffer */
        qs_cp_async_commit();
        if (j0 >= seen.warp) continue; /* none of the warp's rows sees the tile (uniform) */
        float s[MT][NT][4];
        tile_product<MT, NT, D / 16>(s, qw, ks, P, lane);
#pragma unroll
        for (int r = 0; r < MT; r++) {
            /* mask the keys a row does not see, then the rows' new max (over the row's 4 lanes) */
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    if (j0 + 8 * n + 2 * t + (e & 1) >= seen.lane[r][e >> 1]) s[r][n][e] = -INFINITY;
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[r][n][e]);
                }
            float base[2], alpha[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                const float m_new = fmaxf(m[r][h], mx[h]);
                base[h] = m_new == -INFINITY ? 0.0f : m_new; /* a row that has seen no key yet: all p are 0 */
                alpha[h] = exp2f(m[r][h] - base[h]);
                m[r][h] = m_new;
                l[r][h] *= alpha[h];
            }
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s[r][n][e] = exp2f(s[r][n][e] - base[e >> 1]);
                    l[r][e >> 1] += s[r][n][e];
                }
#pragma unroll
            for (int n = 0; n < DT; n++)
                o[r][n][0] *= alpha[0], o[r][n][1] *= alpha[0], o[r][n][2] *= alpha[1], o[r][n][3] *= alpha[1];
        }
        /* O += P V, P straight from the accumulators */
        tile_product_acc<MT, DT, TC_KEYS / 16>(o, s, vs, P, lane);
    }
    qs_cp_async_wait<0>(); /* no copy outlives the block (rows that see no key) */
#pragma unroll
    for (int r = 0; r < MT; r++) {
        float inv[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int i = seen.row0 + 16 * r + 8 * h;
            l[r][h] += __shfl_xor_sync(0xffffffffu, l[r][h], 1);
            l[r][h] += __shfl_xor_sync(0xffffffffu, l[r][h], 2);
            /* a row that sees no key: out 0, lse -inf */
            inv[h] = l[r][h] > 0.0f ? 1.0f / l[r][h] : 0.0f;
            if (t == 0 && i < k.Tq) lse[at.s + i] = l[r][h] > 0.0f ? (m[r][h] + log2f(l[r][h])) * (float)M_LN2 : -INFINITY;
        }
        put_rows<DT>(out + at.o, k.C, seen.row0 + 16 * r, k.Tq, at.hs, o[r], inv, false, t);
    }
}

/* ---- backward, dq: grid (B * NH, query tiles of 64); dq += scale dS k ---- */

template <int D>
__global__ static void __launch_bounds__(TC_THREADS)
    flash_dq_bf16_kernel(float *dq, tc_staged st, const float *lse, const float *delta, qs_attn_block k, float scale) {
    constexpr int P = tc_pitch<D>(), TILE = tc_tile<D>(), NT = TC_KEYS / 8, DT = D / 8;
    QS_DYNAMIC_SMEM(uint32_t, smem);
    uint32_t *qs = smem, *dos = qs + TILE, *kvs = dos + TILE; /* k, v of key tile j at kvs + 2 TILE (j % 2) */
    const fa_head at = head_at(k);
    const int b = blockIdx.x / k.NH, qh = blockIdx.x % k.NH;
    const uint32_t *kh = st.k + staged_kv<D>(k, b, qh / (k.NH / k.NKV)), *vh = st.v + (kh - st.k);
    const int i0 = blockIdx.y * TC_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const tc_seen<1> seen = keys_seen<1>(k, i0, warp, g);
    load_tile<D>(qs, st.q + staged_q<D>(k, b, qh), i0, k.Tq);
    load_tile<D>(dos, st.dout + staged_q<D>(k, b, qh), i0, k.Tq);
    if (seen.block > 0) load_keys<D>(kvs, kh, vh, 0, k.Tk);
    qs_cp_async_commit();
    const int row0 = seen.row0;
    float lse2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int i = row0 + 8 * h;
        lse2[h] = i < k.Tq ? lse[at.s + i] * (float)M_LOG2E : 0.0f;
        dl[h] = i < k.Tq ? delta[at.s + i] : 0.0f;
    }
    float acc[DT][4];
#pragma unroll
    for (int n = 0; n < DT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    for (int j0 = 0; j0 < seen.block; j0 += TC_KEYS) {
        qs_cp_async_wait<0>();
        __syncthreads(); /* this tile (and q, dout) is in, and every warp is done with the previous one */
        const uint32_t *ks = key_tile<D>(kvs, j0), *vs = ks + TILE;
        if (j0 + TC_KEYS < seen.block) load_keys<D>(kvs, kh, vh, j0 + TC_KEYS, k.Tk); /* the previous tile's buffer */
        qs_cp_async_commit();
        if (j0 >= seen.warp) continue;
        float s[NT][4], dp[NT][4];
        tile_product<1, NT, D / 16>(&s, qs + warp * 16 * P, ks, P, lane);
        tile_product<1, NT, D / 16>(&dp, dos + warp * 16 * P, vs, P, lane); /* dP = dout v^T */
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int h = e >> 1;
                const float p = j0 + 8 * n + 2 * t + (e & 1) < seen.lane[0][h] ? exp2f(s[n][e] - lse2[h]) : 0.0f;
                s[n][e] = p * (dp[n][e] - dl[h]); /* dS */
            }
        tile_product_acc<1, DT, TC_KEYS / 16>(&acc, &s, ks, P, lane);
    }
    qs_cp_async_wait<0>(); /* no copy outlives the block (a block whose rows see no key) */
    const float mul[2] = {scale, scale};
    put_rows<DT>(dq + at.q, k.q_stride, row0, k.Tq, at.hs, acc, mul, true, t);
}

/* ---- backward, dk and dv: grid (B * NKV, key tiles of 64, splits); a warp owns 16 keys ----
 * Transposed products, keys down and queries across: S^T = k q^T, dP^T = v dout^T, then
 * dv += P^T dout and dk += dS^T (scale q), over the query heads of the kv head's group
 * (head by head, then chunk by chunk). Where those blocks are too few to fill the GPU
 * (few kv heads and one short sequence, as multi-query attention at batch 1), the
 * group's heads are split over blockIdx.z, each split storing its sums into its own copy
 * of dkv (`out`), which dkv_sum_kernel then adds in split order. */

/* Where dk/dv's blocks put their sums: added into dkv itself, or stored into split z's
 * dense [B][Tk][2 Ckv] copy at part + z B Tk 2 Ckv. */
struct tc_dkv_out {
    float *dkv, *part;
    int heads; /* query heads a split takes */
};

/* Query rows [c0, c0 + 64) of query head h of sequence b into chunk buffer x of dk/dv:
 * the q and dout tiles at cs + 2 TILE x, their lse and delta at stats + 2 * 64 x (0
 * past Tq). */
template <int D>
__device__ static void load_chunk(uint32_t *cs, float *stats, const tc_staged &st, const float *lse,
                                  const float *delta, const qs_attn_block &k, int b, int h, int c0, int x) {
    const size_t s = head_of(k, b, h).s;
    load_tile<D>(cs + 2 * tc_tile<D>() * x, st.q + staged_q<D>(k, b, h), c0, k.Tq);
    load_tile<D>(cs + 2 * tc_tile<D>() * x + tc_tile<D>(), st.dout + staged_q<D>(k, b, h), c0, k.Tq);
    for (int i = threadIdx.x; i < 2 * TC_QCHUNK; i += blockDim.x) {
        const int r = i % TC_QCHUNK;
        const bool in = c0 + r < k.Tq;
        qs_cp_async<4>(stats + 2 * TC_QCHUNK * x + i, (i < TC_QCHUNK ? lse : delta) + s + (in ? c0 + r : c0), in);
    }
}

template <int D>
__global__ static void __launch_bounds__(TC_THREADS)
    flash_dkv_bf16_kernel(tc_dkv_out out, tc_staged st, const float *lse, const float *delta, qs_attn_block k) {
    constexpr int P = tc_pitch<D>(), TILE = tc_tile<D>(), NT = TC_QCHUNK / 8, DT = D / 8;
    QS_DYNAMIC_SMEM(uint32_t, smem);
    uint32_t *ks = smem, *vs = ks + TILE, *cs = vs + TILE; /* then two chunk buffers: q, dout */
    float *stats = (float *)(cs + 4 * TILE);              /* their lse and delta rows */
    const int b = blockIdx.x / k.NKV, h0 = blockIdx.x % k.NKV * (k.NH / k.NKV) + blockIdx.z * out.heads;
    const fa_head kvh = head_of(k, b, h0); /* its kv columns are all the group's heads' */
    const int j0 = blockIdx.y * TC_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const size_t kv_at = staged_kv<D>(k, b, blockIdx.x % k.NKV);
    load_tile<D>(ks, st.k + kv_at, j0, k.Tk);
    load_tile<D>(vs, st.v + kv_at, j0, k.Tk);
    /* the work: the kv head's query heads in order, each its chunks of 64 rows from the
     * first that sees the block's first key (earlier rows see none of its keys) */
    const int c_first = first_query(k, j0), chunks = (k.Tq - c_first + TC_QCHUNK - 1) / TC_QCHUNK;
    const int work = out.heads * chunks;
    if (work > 0) load_chunk<D>(cs, stats, st, lse, delta, k, b, h0, c_first, 0);
    qs_cp_async_commit();
    const int warp_key = j0 + warp * 16, key0 = warp_key + g; /* the lane's keys: key0 and key0 + 8 */
    float dk[DT][4], dv[DT][4];
#pragma unroll
    for (int n = 0; n < DT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;
    for (int w = 0; w < work; w++) {
        qs_cp_async_wait<0>();
        __syncthreads(); /* this chunk (and the keys) is in, and every warp is done with the previous one */
        if (w + 1 < work)
            load_chunk<D>(cs, stats, st, lse, delta, k, b, h0 + (w + 1) / chunks,
                          c_first + (w + 1) % chunks * TC_QCHUNK, (w + 1) % 2);
        qs_cp_async_commit();
        const int c0 = c_first + w % chunks * TC_QCHUNK;
        const uint32_t *qs = cs + 2 * TILE * (w % 2), *dos = qs + TILE; /* q pre-scaled */
        const float *ls = stats + 2 * TC_QCHUNK * (w % 2), *dl = ls + TC_QCHUNK;
        /* the chunk's last row sees the most keys: none of the warp's, nothing to add (uniform) */
        if (warp_key >= qs_attn_visible_keys(&k, min(k.Tq, c0 + TC_QCHUNK) - 1)) continue;
        float s[NT][4], dp[NT][4];
        tile_product<1, NT, D / 16>(&s, ks + warp * 16 * P, qs, P, lane);    /* S^T */
        tile_product<1, NT, D / 16>(&dp, vs + warp * 16 * P, dos, P, lane); /* dP^T */
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int ci = 8 * n + 2 * t + (e & 1), i = c0 + ci, j = key0 + 8 * (e >> 1);
                const float p =
                i < k.Tq && j < qs_attn_visible_keys(&k, i) ? exp2f(s[n][e] - ls[ci] * (float)M_LOG2E) : 0.0f;
                s[n][e] = p;
                dp[n][e] = p * (dp[n][e] - dl[ci]); /* dS^T */
            }
        tile_product_acc<1, DT, TC_QCHUNK / 16>(&dv, &s, dos, P, lane);
        tile_product_acc<1, DT, TC_QCHUNK / 16>(&dk, &dp, qs, P, lane); /* times log2 e: q's pre-scaling */
    }
    qs_cp_async_wait<0>(); /* no copy outlives the block (keys no query sees) */
    const float one[2] = {1.0f, 1.0f}, ln2[2] = {(float)M_LN2, (float)M_LN2};
    const int Ckv = qs_attn_kv_width(&k);
    float *dst = out.part ? out.part + ((size_t)blockIdx.z * k.B + b) * k.Tk * 2 * Ckv + (kvh.kv - (size_t)b * k.kv_len * k.kv_stride)
                          : out.dkv + kvh.kv;
    const int stride = out.part ? 2 * Ckv : k.kv_stride;
    put_rows<DT>(dst, stride, key0, k.Tk, kvh.hs, dk, ln2, !out.part, t);
    put_rows<DT>(dst + kvh.v, stride, key0, k.Tk, kvh.hs, dv, one, !out.part, t);
}

/* dkv += the splits' copies, added in split order (deterministic). */
__global__ static void dkv_sum_kernel(float *dkv, const float *part, int splits, qs_attn_block k) {
    const int W = 2 * qs_attn_kv_width(&k);
    const size_t n = (size_t)k.B * k.Tk * W;
    QS_GRID_LOOP(e, n) {
        const size_t row = e / W;
        float s = 0.0f;
        for (int z = 0; z < splits; z++) s += part[(size_t)z * n + e];
        dkv[(row / k.Tk * k.kv_len + row % k.Tk) * k.kv_stride + e % W] += s;
    }
}

/* ---- launch: the staging, then the kernels' instance for the block's head size ---- */

/* The staged regions' bytes: q, k, v (and dout), bf16 rows of D. */
template <int D> static void staged_sizes(const qs_attn_block *k, size_t *q, size_t *kv) {
    *q = (size_t)k->B * k->NH * k->Tq * D * sizeof(uint16_t);
    *kv = (size_t)k->B * k->NKV * k->Tk * D * sizeof(uint16_t);
}

template <int D> static void stage_heads(uint32_t *dst, const float *src, int B, int len, int stride, int H, int T,
                                        int hs, float mul) {
    const unsigned chunks = qs_cuda_blocks((size_t)T * (D / 2), QS_THREADS);
    QS_LAUNCH(stage_heads_kernel<D>, dim3(B * H, chunks < 65535 ? chunks : 65535), QS_THREADS, 0, dst, src, len,
              stride, H, T, hs, mul);
}

/* The block's q, k, v, and dout when it is given, staged into the op scratch, which also
 * gives *extra `extra_bytes` of its own (dk/dv's split copies). */
template <int D>
static tc_staged stage_block(const qs_attn_block *k, const float *q, const float *kv, const float *dout,
                             size_t extra_bytes = 0, float **extra = NULL) {
    const int hs = k->C / k->NH;
    size_t nq, nkv;
    staged_sizes<D>(k, &nq, &nkv);
    char *at = (char *)qs_cuda_scratch(qs_cuda_room(nq) * (dout ? 2 : 1) + 2 * qs_cuda_room(nkv) +
                                       qs_cuda_room(extra_bytes));
    if (extra) *extra = (float *)qs_cuda_carve(&at, extra_bytes);
    uint32_t *sq = (uint32_t *)qs_cuda_carve(&at, nq), *sk = (uint32_t *)qs_cuda_carve(&at, nkv),
             *sv = (uint32_t *)qs_cuda_carve(&at, nkv), *sdo = dout ? (uint32_t *)qs_cuda_carve(&at, nq) : NULL;
    stage_heads<D>(sq, q, k->B, k->q_len, k->q_stride, k->NH, k->Tq, hs, scale_of(k) * (float)M_LOG2E);
    stage_heads<D>(sk, kv, k->B, k->kv_len, k->kv_stride, k->NKV, k->Tk, hs, 1.0f);
    stage_heads<D>(sv, kv + qs_attn_kv_width(k), k->B, k->kv_len, k->kv_stride, k->NKV, k->Tk, hs, 1.0f);
    if (dout) stage_heads<D>(sdo, dout, k->B, k->q_len, k->C, k->NH, k->Tq, hs, 1.0f);
    return tc_staged{sq, sk, sv, sdo};
}

/* dk/dv's splits of a kv head's query heads: the largest divisor of the group's size
 * that keeps the blocks (B NKV key tiles, times the splits) within two a multiprocessor;
 * 1 when the blocks alone fill the GPU. */
static int dkv_splits(const qs_attn_block *k) {
    const long blocks = (long)k->B * k->NKV * ((k->Tk + TC_ROWS - 1) / TC_ROWS), most = 2L * qs_cuda_sm_count();
    const int per_kv = k->NH / k->NKV;
    for (int s = per_kv; s > 1; s--)
        if (per_kv % s == 0 && blocks * s <= most) return s;
    return 1;
}

size_t qs_cuda_attention_bf16_scratch(const qs_op_sizes *s) {
    if (s->heads <= 0 || s->head_size > TC_MAX_HEAD) return 0;
    /* a block's rows (B Tq, B Tk) are at most the forward's rows; each region rounds up */
    const size_t row = (size_t)fa_tile_width(s->head_size) * sizeof(uint16_t);
    /* split copies only where splits x blocks <= 2 SMs: at most that many key tiles' rows of 2 hs */
    const size_t splits = s->kv_heads < s->heads
                              ? 2 * (size_t)qs_cuda_sm_count() * TC_ROWS * 2 * s->head_size * sizeof(float)
                              : 0;
    return (size_t)s->rows * (2 * s->heads + 2 * s->kv_heads) * row + splits + 5 * qs_cuda_room(1);
}

struct fa_forward_bf16 {
    template <int D> static void run(float *out, float *lse, const float *q, const float *kv, const qs_attn_block *k) {
        if constexpr (D > TC_MAX_HEAD) {
            qs_cuda_attention_block_forward(out, lse, q, kv, k);
        } else {
            const tc_staged st = stage_block<D>(k, q, kv, NULL);
            /* q's rows (TC_FWD_MT tiles), then two buffers of a k and a v tile */
            constexpr int tiles = TC_FWD_MT + 4;
            allow_smem<flash_forward_bf16_kernel<D>>(tc_smem<D>(tiles, 0));
            QS_LAUNCH(flash_forward_bf16_kernel<D>, dim3(k->B * k->NH, (k->Tq + TC_FWD_ROWS - 1) / TC_FWD_ROWS),
                      TC_THREADS, tc_smem<D>(tiles, 0), out, lse, st, *k);
        }
    }
};

void qs_cuda_attention_block_forward_bf16(float *out, float *lse, const float *q, const float *kv,
                                          const qs_attn_block *k) {
    at_head_size<fa_forward_bf16>(k, out, lse, q, kv, k);
}

struct fa_backward_bf16 {
    template <int D>
    static void run(float *dq, float *dkv, const float *dout, const float *q, const float *kv, const float *lse,
                    const float *delta, const qs_attn_block *k) {
        if constexpr (D > TC_MAX_HEAD) {
            qs_cuda_attention_block_backward(dq, dkv, dout, q, kv, lse, delta, k);
        } else {
            if (!dq && !dkv) return;
            const int splits = dkv ? dkv_splits(k) : 1;
            float *part = NULL;
            const tc_staged st =
                stage_block<D>(k, q, kv, dout,
                               splits > 1 ? (size_t)splits * k->B * k->Tk * 2 * qs_attn_kv_width(k) * sizeof(float) : 0,
                               &part);
            if (dq) {
                allow_smem<flash_dq_bf16_kernel<D>>(tc_smem<D>(6, 0));
                QS_LAUNCH(flash_dq_bf16_kernel<D>, dim3(k->B * k->NH, (k->Tq + TC_ROWS - 1) / TC_ROWS), TC_THREADS,
                          tc_smem<D>(6, 0), dq, st, lse, delta, *k, scale_of(k));
            }
            if (dkv) {
                const tc_dkv_out out = {dkv, splits > 1 ? part : NULL, k->NH / k->NKV / splits};
                allow_smem<flash_dkv_bf16_kernel<D>>(tc_smem<D>(6, 4 * TC_QCHUNK));
                QS_LAUNCH(flash_dkv_bf16_kernel<D>, dim3(k->B * k->NKV, (k->Tk + TC_ROWS - 1) / TC_ROWS, splits),
                          TC_THREADS, tc_smem<D>(6, 4 * TC_QCHUNK), out, st, lse, delta, *k);
                if (splits > 1)
                    QS_LAUNCH_N(dkv_sum_kernel, (size_t)k->B * k->Tk * 2 * qs_attn_kv_width(k), dkv, part, splits, *k);
            }
        }
    }
};

void qs_cuda_attention_block_backward_bf16(float *dq, float *dkv, const float *dout, const float *q, const float *kv,
                                           const float *lse, const float *delta, const qs_attn_block *k) {
    at_head_size<fa_backward_bf16>(k, dq, dkv, dout, q, kv, lse, delta, k);
}

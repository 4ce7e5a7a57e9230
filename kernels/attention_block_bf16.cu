/* Blockwise attention (ops.h qs_attn_block) on the tensor cores, for the backend with
 * bf16 products (train.precision bf16): FlashAttention-2's algorithm with mma.sync
 * m16n8k16 (mma.cuh), bf16 operands and fp32 accumulation, the softmax in fp32. The
 * tensors stay fp32 in memory, as the rest of the backend keeps them: each tile is
 * rounded to bf16 on its way into shared memory, row-major, q times the softmax scale
 * and log2 e (the exponentials are exp2). Fragments come out of shared memory by
 * ldmatrix, four 8 x 8 pieces a load, transposed on the way for a B operand whose sum
 * runs along the tile's rows (v in P V), so no tile is stored twice. Row pitches are
 * padded by 16 bytes: the 8 rows of a piece hit distinct banks.
 *
 * Forward: a block of four warps takes 64 query rows of one (sequence, query head), 16
 * per warp, and walks the keys they see in tiles of 64. Per tile, S = q k^T (16 x 64 a
 * warp) lands in registers, the lane's rows are masked (causal, ragged tails) and
 * rescaled by their running max (reduced over the row's four lanes; the sum stays per
 * lane until the end), and P, packed to bf16 straight from the accumulators, multiplies
 * V into the 16 x D output. Saved: out and the log-sum-exp, as the fp32 kernel saves
 * them, so the ring merge and either backward take them.
 *
 * Backward, two kernels as in attention_block.cu (deterministic, no atomics): dq over
 * query tiles (P = exp2(S - lse) recomputed, dP = dout v^T, dS = P (dP - delta),
 * dq += scale dS k, keys in order), and dk, dv over tiles of 64 keys of one kv head, a
 * warp owning 16, summing over the query heads of its group and their 64-row chunks in
 * order (S^T = k q^T, dv += P^T dout, dk += scale dS^T q).
 *
 * Head sizes up to 128 (tiles of 32, 64, 128 columns, zero-padded); wider heads take
 * attention_block.cu's kernels. */
#include "attention_block.cuh"
#include "mma.cuh"

enum {
    TC_THREADS = 128,
    TC_ROWS = 64,                /* query rows (forward, dq) or keys (dk/dv) a block owns: 16 a warp */
    TC_KEYS = 64,                /* keys a tile (forward, dq) */
    TC_QCHUNK = 64,              /* query rows a chunk (dk/dv) */
    TC_MAX_HEAD = 128,
};

/* Words a row of a q, k, v or dout tile in shared memory (two bf16 a word). */
template <int D> __host__ __device__ constexpr int tc_pitch() { return D / 2 + 4; }
/* Shared memory, in bytes, of `tiles` row tiles (every tile here is 64 queries or keys)
 * and `floats` more. */
template <int D> static size_t tc_smem(int tiles, int floats) {
    return sizeof(uint32_t) * (tiles * 64 * tc_pitch<D>() + floats);
}

/* Rows [r0, r0 + n) of a head's columns (row stride `stride`) times mul into dst
 * [n][tc_pitch<D>()] as bf16 pairs, by the whole block; rows at or past `rows` and
 * columns past hs become 0. */
template <int D>
__device__ static void load_bf16_rows(uint32_t *dst, const float *src, int stride, int r0, int n, int rows, int hs,
                                      float mul) {
    for (int e = threadIdx.x; e < n * (D / 2); e += blockDim.x) {
        const int r = e / (D / 2), c = 2 * (e % (D / 2));
        const float *row = src + (size_t)(r0 + r) * stride;
        const bool in = r0 + r < rows;
        dst[r * tc_pitch<D>() + c / 2] = qs_bf16x2(in && c < hs ? mul * row[c] : 0.0f,
                                                   in && c + 1 < hs ? mul * row[c + 1] : 0.0f);
    }
}

/* A fragments of a warp's 16 rows of a row-major tile (at m) over all D columns: per
 * 16-column step, one ldmatrix of its four 8 x 8 quarters (rows 0-7, then 8-15, of columns
 * 0-7, then of 8-15: mma.cuh's a[0..3]). */
template <int D> __device__ static inline void a_fragments(uint32_t a[D / 16][4], const uint32_t *m, int lane) {
    const uint32_t *row = m + (lane % 16) * tc_pitch<D>() + 4 * (lane / 16);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) qs_ldmatrix_x4(a[kk], row + 8 * kk);
}

/* acc = A B over KT 16-deep steps into NT tiles of 8 columns: A as fragments; B stored
 * transposed, its columns as the rows of a row-major tile (k for S = q k^T, q for
 * S^T = k q^T, v and dout for dP); one ldmatrix gives two tiles' B fragments for a step. */
template <int NT, int KT>
__device__ static inline void tile_product(float acc[NT][4], const uint32_t a[KT][4], const uint32_t *bt, int pitch,
                                           int lane) {
    const uint32_t *row = bt + (lane % 8 + 8 * (lane / 16)) * pitch + 4 * (lane / 8 % 2);
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
    for (int n = 0; n < NT; n += 2)
#pragma unroll
        for (int kk = 0; kk < KT; kk++) {
            uint32_t b[4];
            qs_ldmatrix_x4(b, row + 8 * n * pitch + 8 * kk);
            qs_mma_bf16_16816(acc[n], a[kk], b);
            qs_mma_bf16_16816(acc[n + 1], a[kk], b + 2);
        }
}

/* acc += X B into NT tiles of 8 columns: X (16 x 16 KT) in accumulator tiles, packed
 * pairwise to bf16 as the A operand (tiles 2kk and 2kk + 1 are the fragment of columns
 * [16kk, 16kk + 16)); B a row-major tile with the sum along its rows (v for P V, k for
 * dS k, q and dout for dk and dv), its B fragments by ldmatrix's transpose. */
template <int NT, int KT>
__device__ static inline void tile_product_acc(float acc[NT][4], const float x[2 * KT][4], const uint32_t *b,
                                               int pitch, int lane) {
    const uint32_t *row = b + (lane % 16) * pitch + 4 * (lane / 16);
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
        const uint32_t a[4] = {qs_bf16x2(x[2 * kk][0], x[2 * kk][1]), qs_bf16x2(x[2 * kk][2], x[2 * kk][3]),
                               qs_bf16x2(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                               qs_bf16x2(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            uint32_t f[4];
            qs_ldmatrix_x4_trans(f, row + 16 * kk * pitch + 4 * n);
            qs_mma_bf16_16816(acc[n], a, f);
            qs_mma_bf16_16816(acc[n + 1], a, f + 2);
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

/* The keys the rows of a 64-row query tile starting at i0 see: each of this lane's two
 * rows (row0 and row0 + 8; 0 past Tq), the most any of its warp's 16 rows sees, the most
 * any of the block's rows sees (the last rows see the most: positions rise with i). */
struct tc_seen {
    int row0, lane[2], warp, block;
};
__device__ static inline tc_seen keys_seen(const qs_attn_block &k, int i0, int warp, int g) {
    tc_seen s;
    s.row0 = i0 + warp * 16 + g;
#pragma unroll
    for (int h = 0; h < 2; h++) s.lane[h] = s.row0 + 8 * h < k.Tq ? qs_attn_visible_keys(&k, s.row0 + 8 * h) : 0;
    const int warp_last = min(k.Tq, i0 + warp * 16 + 16) - 1;
    s.warp = warp_last >= i0 + warp * 16 ? qs_attn_visible_keys(&k, warp_last) : 0;
    s.block = qs_attn_visible_keys(&k, min(k.Tq, i0 + TC_ROWS) - 1);
    return s;
}

/* ---- forward: grid (B * NH, query tiles of 64) ---- */

template <int D>
__global__ static void __launch_bounds__(TC_THREADS)
    flash_forward_bf16_kernel(float *out, float *lse, const float *q, const float *kv, qs_attn_block k, float qmul) {
    constexpr int P = tc_pitch<D>(), NT = TC_KEYS / 8, DT = D / 8;
    QS_DYNAMIC_SMEM(uint32_t, smem);
    uint32_t *qs = smem, *ks = qs + TC_ROWS * P, *vs = ks + TC_KEYS * P; /* q pre-scaled */
    const fa_head at = head_at(k);
    const int i0 = blockIdx.y * TC_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    load_bf16_rows<D>(qs, q + at.q, k.q_stride, i0, TC_ROWS, k.Tq, at.hs, qmul);
    __syncthreads();
    uint32_t qa[D / 16][4]; /* the warp's 16 rows, for the whole walk */
    a_fragments<D>(qa, qs + warp * 16 * P, lane);
    const tc_seen seen = keys_seen(k, i0, warp, g); /* the lane's rows: accumulator halves h = 0, 1 */
    const int row0 = seen.row0;
    float o[DT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < DT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    for (int j0 = 0; j0 < seen.block; j0 += TC_KEYS) {
        __syncthreads(); /* the previous tile is used up */
        load_bf16_rows<D>(ks, kv + at.kv, k.kv_stride, j0, TC_KEYS, k.Tk, at.hs, 1.0f);
        load_bf16_rows<D>(vs, kv + at.kv + at.v, k.kv_stride, j0, TC_KEYS, k.Tk, at.hs, 1.0f);
        __syncthreads();
        if (j0 >= seen.warp) continue; /* none of the warp's rows sees the tile (uniform) */
        float s[NT][4];
        tile_product<NT, D / 16>(s, qa, ks, P, lane);
        /* mask the keys a row does not see, then the rows' new max (over the row's 4 lanes) */
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                if (j0 + 8 * n + 2 * t + (e & 1) >= seen.lane[e >> 1]) s[n][e] = -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
            }
        float base[2], alpha[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float m_new = fmaxf(m[h], mx[h]);
            base[h] = m_new == -INFINITY ? 0.0f : m_new; /* a row that has seen no key yet: all p are 0 */
            alpha[h] = exp2f(m[h] - base[h]);
            m[h] = m_new;
            l[h] *= alpha[h];
        }
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[n][e] = exp2f(s[n][e] - base[e >> 1]);
                l[e >> 1] += s[n][e];
            }
#pragma unroll
        for (int n = 0; n < DT; n++) o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
        /* O += P V, P straight from the accumulators */
        tile_product_acc<DT, TC_KEYS / 16>(o, s, vs, P, lane);
    }
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        /* a row that sees no key: out 0, lse -inf */
        inv[h] = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        if (t == 0 && row0 + 8 * h < k.Tq)
            lse[at.s + row0 + 8 * h] = l[h] > 0.0f ? (m[h] + log2f(l[h])) * (float)M_LN2 : -INFINITY;
    }
    put_rows<DT>(out + at.o, k.C, row0, k.Tq, at.hs, o, inv, false, t);
}

/* ---- backward, dq: grid (B * NH, query tiles of 64); dq += scale dS k ---- */

template <int D>
__global__ static void __launch_bounds__(TC_THREADS)
    flash_dq_bf16_kernel(float *dq, const float *dout, const float *q, const float *kv, const float *lse,
                         const float *delta, qs_attn_block k, float scale) {
    constexpr int P = tc_pitch<D>(), NT = TC_KEYS / 8, DT = D / 8;
    QS_DYNAMIC_SMEM(uint32_t, smem);
    uint32_t *qs = smem, *dos = qs + TC_ROWS * P, *ks = dos + TC_ROWS * P, *vs = ks + TC_KEYS * P; /* q pre-scaled */
    const fa_head at = head_at(k);
    const int i0 = blockIdx.y * TC_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    load_bf16_rows<D>(qs, q + at.q, k.q_stride, i0, TC_ROWS, k.Tq, at.hs, scale * (float)M_LOG2E);
    load_bf16_rows<D>(dos, dout + at.o, k.C, i0, TC_ROWS, k.Tq, at.hs, 1.0f);
    const tc_seen seen = keys_seen(k, i0, warp, g);
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
        __syncthreads();
        load_bf16_rows<D>(ks, kv + at.kv, k.kv_stride, j0, TC_KEYS, k.Tk, at.hs, 1.0f);
        load_bf16_rows<D>(vs, kv + at.kv + at.v, k.kv_stride, j0, TC_KEYS, k.Tk, at.hs, 1.0f);
        __syncthreads();
        if (j0 >= seen.warp) continue;
        uint32_t a[D / 16][4];
        float s[NT][4], dp[NT][4];
        a_fragments<D>(a, qs + warp * 16 * P, lane);
        tile_product<NT, D / 16>(s, a, ks, P, lane);
        a_fragments<D>(a, dos + warp * 16 * P, lane);
        tile_product<NT, D / 16>(dp, a, vs, P, lane); /* dP = dout v^T */
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int h = e >> 1;
                const float p = j0 + 8 * n + 2 * t + (e & 1) < seen.lane[h] ? exp2f(s[n][e] - lse2[h]) : 0.0f;
                s[n][e] = p * (dp[n][e] - dl[h]); /* dS */
            }
        tile_product_acc<DT, TC_KEYS / 16>(acc, s, ks, P, lane);
    }
    const float mul[2] = {scale, scale};
    put_rows<DT>(dq + at.q, k.q_stride, row0, k.Tq, at.hs, acc, mul, true, t);
}

/* ---- backward, dk and dv: grid (B * NKV, key tiles of 64); a warp owns 16 keys ----
 * Transposed products, keys down and queries across: S^T = k q^T, dP^T = v dout^T, then
 * dv += P^T dout and dk += dS^T (scale q), over every query head of the kv head's group
 * (head by head, then chunk by chunk). */

template <int D>
__global__ static void __launch_bounds__(TC_THREADS)
    flash_dkv_bf16_kernel(float *dkv, const float *dout, const float *q, const float *kv, const float *lse,
                          const float *delta, qs_attn_block k, float scale) {
    constexpr int P = tc_pitch<D>(), NT = TC_QCHUNK / 8, DT = D / 8;
    QS_DYNAMIC_SMEM(uint32_t, smem);
    uint32_t *ks = smem, *vs = ks + TC_ROWS * P, *qs = vs + TC_ROWS * P, *dos = qs + TC_QCHUNK * P; /* q pre-scaled */
    float *ls = (float *)(dos + TC_QCHUNK * P), *dl = ls + TC_QCHUNK;
    const int per_kv = k.NH / k.NKV, b = blockIdx.x / k.NKV, h0 = blockIdx.x % k.NKV * per_kv;
    const fa_head kvh = head_of(k, b, h0); /* its kv columns are all per_kv heads' */
    const int j0 = blockIdx.y * TC_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    load_bf16_rows<D>(ks, kv + kvh.kv, k.kv_stride, j0, TC_ROWS, k.Tk, kvh.hs, 1.0f);
    load_bf16_rows<D>(vs, kv + kvh.kv + kvh.v, k.kv_stride, j0, TC_ROWS, k.Tk, kvh.hs, 1.0f);
    const int warp_key = j0 + warp * 16, key0 = warp_key + g; /* the lane's keys: key0 and key0 + 8 */
    float dk[DT][4], dv[DT][4];
#pragma unroll
    for (int n = 0; n < DT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;
    for (int h = h0; h < h0 + per_kv; h++) { /* the kv head's query heads, in order */
        const fa_head at = head_of(k, b, h);
        /* rows before the first that sees the block's first key see none of its keys */
        for (int c0 = first_query(k, j0); c0 < k.Tq; c0 += TC_QCHUNK) {
            __syncthreads(); /* the previous chunk is used up (and the keys are in) */
            load_bf16_rows<D>(qs, q + at.q, k.q_stride, c0, TC_QCHUNK, k.Tq, at.hs, scale * (float)M_LOG2E);
            load_bf16_rows<D>(dos, dout + at.o, k.C, c0, TC_QCHUNK, k.Tq, at.hs, 1.0f);
            for (int i = threadIdx.x; i < TC_QCHUNK; i += blockDim.x) {
                const bool in = c0 + i < k.Tq;
                ls[i] = in ? lse[at.s + c0 + i] * (float)M_LOG2E : 0.0f;
                dl[i] = in ? delta[at.s + c0 + i] : 0.0f;
            }
            __syncthreads();
            /* the chunk's last row sees the most keys: none of the warp's, nothing to add (uniform) */
            if (warp_key >= qs_attn_visible_keys(&k, min(k.Tq, c0 + TC_QCHUNK) - 1)) continue;
            uint32_t a[D / 16][4];
            float s[NT][4], dp[NT][4];
            a_fragments<D>(a, ks + warp * 16 * P, lane);
            tile_product<NT, D / 16>(s, a, qs, P, lane); /* S^T */
            a_fragments<D>(a, vs + warp * 16 * P, lane);
            tile_product<NT, D / 16>(dp, a, dos, P, lane); /* dP^T */
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int ci = 8 * n + 2 * t + (e & 1), i = c0 + ci, j = key0 + 8 * (e >> 1);
                    const float p = i < k.Tq && j < qs_attn_visible_keys(&k, i) ? exp2f(s[n][e] - ls[ci]) : 0.0f;
                    s[n][e] = p;
                    dp[n][e] = p * (dp[n][e] - dl[ci]); /* dS^T */
                }
            tile_product_acc<DT, TC_QCHUNK / 16>(dv, s, dos, P, lane);
            tile_product_acc<DT, TC_QCHUNK / 16>(dk, dp, qs, P, lane); /* times log2 e: q's pre-scaling */
        }
    }
    const float one[2] = {1.0f, 1.0f}, ln2[2] = {(float)M_LN2, (float)M_LN2};
    put_rows<DT>(dkv + kvh.kv, k.kv_stride, key0, k.Tk, kvh.hs, dk, ln2, true, t);
    put_rows<DT>(dkv + kvh.kv + kvh.v, k.kv_stride, key0, k.Tk, kvh.hs, dv, one, true, t);
}

/* ---- launch: the kernels' instance for the block's head size ---- */

struct fa_forward_bf16 {
    template <int D> static void run(float *out, float *lse, const float *q, const float *kv, const qs_attn_block *k) {
        if constexpr (D > TC_MAX_HEAD) {
            qs_cuda_attention_block_forward(out, lse, q, kv, k);
        } else {
            allow_smem(flash_forward_bf16_kernel<D>, tc_smem<D>(3, 0));
            QS_LAUNCH(flash_forward_bf16_kernel<D>, dim3(k->B * k->NH, (k->Tq + TC_ROWS - 1) / TC_ROWS),
                      TC_THREADS, tc_smem<D>(3, 0), out, lse, q, kv, *k, scale_of(k) * (float)M_LOG2E);
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
            if (dq) {
                allow_smem(flash_dq_bf16_kernel<D>, tc_smem<D>(4, 0));
                QS_LAUNCH(flash_dq_bf16_kernel<D>, dim3(k->B * k->NH, (k->Tq + TC_ROWS - 1) / TC_ROWS), TC_THREADS,
                          tc_smem<D>(4, 0), dq, dout, q, kv, lse, delta, *k, scale_of(k));
            }
            if (dkv) {
                allow_smem(flash_dkv_bf16_kernel<D>, tc_smem<D>(4, 2 * TC_QCHUNK));
                QS_LAUNCH(flash_dkv_bf16_kernel<D>, dim3(k->B * k->NKV, (k->Tk + TC_ROWS - 1) / TC_ROWS), TC_THREADS,
                          tc_smem<D>(4, 2 * TC_QCHUNK), dkv, dout, q, kv, lse, delta, *k, scale_of(k));
            }
        }
    }
};

void qs_cuda_attention_block_backward_bf16(float *dq, float *dkv, const float *dout, const float *q, const float *kv,
                                           const float *lse, const float *delta, const qs_attn_block *k) {
    at_head_size<fa_backward_bf16>(k, dq, dkv, dout, q, kv, lse, delta, k);
}

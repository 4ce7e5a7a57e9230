/* Blockwise attention (ops.h qs_attn_block) on the GPU: FlashAttention's algorithm in
 * fp32 on the CUDA cores, so no T x T matrix exists anywhere. A thread block takes 16
 * query rows of one (sequence, head), 4 per warp, and walks the keys they see in tiles
 * of 32, one key per lane: a lane computes its key's score against the row (q and k
 * from shared memory), the warp reduces the row's running max and sum (online softmax),
 * and then every lane, owning the head dimensions d = lane + 32 c, adds the tile's
 * probabilities times V. The forward saves only the log-sum-exp.
 *
 * The backward recomputes P = exp(S - lse) and, to stay deterministic without atomics,
 * runs as two kernels: dq (query tiles again, summing dS K over the key tiles in order)
 * and dk/dv (each warp owning a few keys and summing over 32-row query chunks in order,
 * the query chunk shared by the block). Every sum runs in an order fixed by the sizes.
 *
 * Grouped-query attention: the forward and dq kernels run per query head, each reading
 * its kv head h / (NH / NKV); the dk/dv kernel runs per kv head and sums over the query
 * heads of its group in order, so a key's gradient still has one owner and no atomics.
 *
 * Head sizes up to 256, the register and shared-memory tiles sized by the next of 32,
 * 64, 128, 256 (rows zero-padded to it). Tiles over 48 KiB opt in to more shared memory.
 * The merge, delta and K/V packing are plain warp-per-row and element-wise kernels. */
#include "attention_block.cuh"

enum {
    FA_WARPS = 4,
    FA_THREADS = FA_WARPS * 32,
    FA_ROWS = 4,                    /* query rows per warp */
    FA_QTILE = FA_WARPS * FA_ROWS,  /* query rows per block (forward, dq) */
    FA_KEYS = 32,                   /* keys per tile: one per lane */
    FA_QCHUNK = 32,                 /* query rows per chunk of the dk/dv kernel: one per lane */
};

/* Rows [r0, r0 + n) of a head's columns (row stride `stride`) into dst [n][pitch] times
 * mul, by the whole block; rows at or past `rows` and columns past hs become 0, so the
 * tiles' sums can run over the padded width. */
__device__ static void load_rows(float *dst, int pitch, const float *src, int stride, int r0, int n, int rows, int hs,
                                 float mul) {
    for (int e = threadIdx.x; e < n * pitch; e += blockDim.x) {
        const int r = e / pitch, d = e % pitch;
        dst[e] = r0 + r < rows && d < hs ? mul * src[(size_t)(r0 + r) * stride + d] : 0.0f;
    }
}

template <int D> __device__ static inline float dot(const float *a, const float *b) {
    float s = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

/* The block's rows of the dq / forward kernels: this warp's FA_ROWS query rows, each with
 * the number of keys it sees (0 past the block's end). */
__device__ static inline void warp_rows(const qs_attn_block &k, int i0, int warp, int *n) {
#pragma unroll
    for (int r = 0; r < FA_ROWS; r++) {
        const int i = i0 + warp * FA_ROWS + r;
        n[r] = i < k.Tq ? qs_attn_visible_keys(&k, i) : 0;
    }
}

/* ---- forward: grid (B * NH, query tiles) ---- */

template <int D> static size_t forward_smem() { return sizeof(float) * (FA_QTILE * D + FA_KEYS * (D + 1) + FA_KEYS * D); }

template <int D>
__global__ static void __launch_bounds__(FA_THREADS)
    flash_forward_kernel(float *out, float *lse, const float *q, const float *kv, qs_attn_block k, float scale) {
    QS_DYNAMIC_SMEM(float, smem);
    float *qs = smem, *ks = qs + FA_QTILE * D, *vs = ks + FA_KEYS * (D + 1); /* q pre-scaled; k padded */
    const fa_head at = head_at(k);
    const int i0 = blockIdx.y * FA_QTILE, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    load_rows(qs, D, q + at.q, k.q_stride, i0, FA_QTILE, k.Tq, at.hs, scale);
    int n[FA_ROWS];
    float m[FA_ROWS], l[FA_ROWS], o[FA_ROWS][D / 32];
    warp_rows(k, i0, warp, n);
#pragma unroll
    for (int r = 0; r < FA_ROWS; r++) {
        m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < D / 32; c++) o[r][c] = 0.0f;
    }
    const int n_block = qs_attn_visible_keys(&k, min(k.Tq, i0 + FA_QTILE) - 1); /* the block's last row sees the most */
    for (int j0 = 0; j0 < n_block; j0 += FA_KEYS) {
        __syncthreads(); /* the previous tile is used up */
        load_rows(ks, D + 1, kv + at.kv, k.kv_stride, j0, FA_KEYS, k.Tk, at.hs, 1.0f);
        load_rows(vs, D, kv + at.kv + at.v, k.kv_stride, j0, FA_KEYS, k.Tk, at.hs, 1.0f);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < FA_ROWS; r++) {
            if (j0 >= n[r]) continue; /* the row sees none of the tile (uniform over the warp) */
            const bool seen = j0 + lane < n[r];
            const float s = seen ? dot<D>(qs + (warp * FA_ROWS + r) * D, ks + lane * (D + 1)) : -INFINITY;
            /* lane 0's key is seen, so the new max is finite */
            const float m_new = fmaxf(m[r], qs_warp_reduce(s, qs_max_op()));
            const float p = seen ? expf(s - m_new) : 0.0f, alpha = expf(m[r] - m_new);
            l[r] = l[r] * alpha + qs_warp_reduce(p, qs_sum_op());
            m[r] = m_new;
#pragma unroll
            for (int c = 0; c < D / 32; c++) o[r][c] *= alpha;
            for (int t = 0; t < FA_KEYS; t++) {
                const float pt = __shfl_sync(0xffffffffu, p, t);
#pragma unroll
                for (int c = 0; c < D / 32; c++) o[r][c] += pt * vs[t * D + c * 32 + lane];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FA_ROWS; r++) {
        const int i = i0 + warp * FA_ROWS + r;
        if (i >= k.Tq) continue;
        /* a row that sees no key: out 0, lse -inf */
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int c = 0; c < D / 32; c++)
            if (c * 32 + lane < at.hs) out[at.o + (size_t)i * k.C + c * 32 + lane] = o[r][c] * inv;
        if (lane == 0) lse[at.s + i] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
    }
}

/* ---- backward, dq: grid (B * NH, query tiles); dq += scale dS K ---- */

template <int D> static size_t dq_smem() { return sizeof(float) * (2 * FA_QTILE * D + 2 * FA_KEYS * (D + 1)); }

template <int D>
__global__ static void __launch_bounds__(FA_THREADS)
    flash_dq_kernel(float *dq, const float *dout, const float *q, const float *kv, const float *lse,
                    const float *delta, qs_attn_block k, float scale) {
    QS_DYNAMIC_SMEM(float, smem);
    float *qs = smem, *dos = qs + FA_QTILE * D, *ks = dos + FA_QTILE * D, *vs = ks + FA_KEYS * (D + 1);
    const fa_head at = head_at(k);
    const int i0 = blockIdx.y * FA_QTILE, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    load_rows(qs, D, q + at.q, k.q_stride, i0, FA_QTILE, k.Tq, at.hs, scale);
    load_rows(dos, D, dout + at.o, k.C, i0, FA_QTILE, k.Tq, at.hs, 1.0f);
    int n[FA_ROWS];
    float acc[FA_ROWS][D / 32];
    warp_rows(k, i0, warp, n);
#pragma unroll
    for (int r = 0; r < FA_ROWS; r++)
#pragma unroll
        for (int c = 0; c < D / 32; c++) acc[r][c] = 0.0f;
    const int n_block = qs_attn_visible_keys(&k, min(k.Tq, i0 + FA_QTILE) - 1);
    for (int j0 = 0; j0 < n_block; j0 += FA_KEYS) {
        __syncthreads();
        load_rows(ks, D + 1, kv + at.kv, k.kv_stride, j0, FA_KEYS, k.Tk, at.hs, 1.0f);
        load_rows(vs, D + 1, kv + at.kv + at.v, k.kv_stride, j0, FA_KEYS, k.Tk, at.hs, 1.0f);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < FA_ROWS; r++) {
            if (j0 >= n[r]) continue;
            const int row = warp * FA_ROWS + r, i = i0 + row;
            float ds = 0.0f;
            if (j0 + lane < n[r]) {
                const float p = expf(dot<D>(qs + row * D, ks + lane * (D + 1)) - lse[at.s + i]);
                ds = scale * p * (dot<D>(dos + row * D, vs + lane * (D + 1)) - delta[at.s + i]);
            }
            for (int t = 0; t < FA_KEYS; t++) {
                const float dst = __shfl_sync(0xffffffffu, ds, t);
#pragma unroll
                for (int c = 0; c < D / 32; c++) acc[r][c] += dst * ks[t * (D + 1) + c * 32 + lane];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < FA_ROWS; r++) {
        const int i = i0 + warp * FA_ROWS + r;
        if (i >= k.Tq) continue;
#pragma unroll
        for (int c = 0; c < D / 32; c++)
            if (c * 32 + lane < at.hs) dq[at.q + (size_t)i * k.q_stride + c * 32 + lane] += acc[r][c];
    }
}

/* ---- backward, dk and dv: grid (B * NKV, key groups); a warp owns dkv_keys<D>() keys ----
 * dv_j += sum_i P_ij dout_i, dk_j += sum_i scale dS_ij q_i over the rows i that see j, of
 * every query head of the kv head's group (head by head, then chunk by chunk). */

template <int D> __host__ __device__ constexpr int dkv_keys() { return D >= 256 ? 2 : D >= 128 ? 4 : 8; }
template <int D> __host__ __device__ constexpr int dkv_group() { return FA_WARPS * dkv_keys<D>(); }
template <int D> static size_t dkv_smem() {
    return sizeof(float) * (2 * dkv_group<D>() * D + 2 * FA_QCHUNK * (D + 1) + 2 * FA_QCHUNK);
}

template <int D>
__global__ static void __launch_bounds__(FA_THREADS)
    flash_dkv_kernel(float *dkv, const float *dout, const float *q, const float *kv, const float *lse,
                     const float *delta, qs_attn_block k, float scale) {
    constexpr int KW = dkv_keys<D>(), G = dkv_group<D>();
    QS_DYNAMIC_SMEM(float, smem);
    float *ks = smem, *vs = ks + G * D, *qs = vs + G * D, *dos = qs + FA_QCHUNK * (D + 1);
    float *ls = dos + FA_QCHUNK * (D + 1), *dl = ls + FA_QCHUNK;
    const int per_kv = k.NH / k.NKV, b = blockIdx.x / k.NKV, h0 = blockIdx.x % k.NKV * per_kv;
    const fa_head kvh = head_of(k, b, h0); /* its kv columns are all per_kv heads' */
    const int j0 = blockIdx.y * G, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    load_rows(ks, D, kv + kvh.kv, k.kv_stride, j0, G, k.Tk, kvh.hs, 1.0f);
    load_rows(vs, D, kv + kvh.kv + kvh.v, k.kv_stride, j0, G, k.Tk, kvh.hs, 1.0f);
    float dk[KW][D / 32], dv[KW][D / 32];
#pragma unroll
    for (int w = 0; w < KW; w++)
#pragma unroll
        for (int c = 0; c < D / 32; c++) dk[w][c] = dv[w][c] = 0.0f;
    for (int h = h0; h < h0 + per_kv; h++) { /* the kv head's query heads, in order */
        const fa_head at = head_of(k, b, h);
        /* rows before the first that sees the block's first key see none of its keys */
        for (int c0 = first_query(k, j0); c0 < k.Tq; c0 += FA_QCHUNK) {
            __syncthreads(); /* the previous chunk is used up (and the keys are in) */
            load_rows(qs, D + 1, q + at.q, k.q_stride, c0, FA_QCHUNK, k.Tq, at.hs, scale);
            load_rows(dos, D + 1, dout + at.o, k.C, c0, FA_QCHUNK, k.Tq, at.hs, 1.0f);
            for (int t = threadIdx.x; t < FA_QCHUNK; t += blockDim.x) {
                ls[t] = c0 + t < k.Tq ? lse[at.s + c0 + t] : 0.0f;
                dl[t] = c0 + t < k.Tq ? delta[at.s + c0 + t] : 0.0f;
            }
            __syncthreads();
            const int i = c0 + lane;
#pragma unroll
            for (int w = 0; w < KW; w++) {
                const int kj = warp * KW + w, j = j0 + kj;
                if (j >= k.Tk) break; /* uniform over the warp */
                /* lane = query row; q is pre-scaled, so q_i . k_j is the scaled score and
                 * dS q_i below already carries the scale */
                float p = 0.0f, ds = 0.0f;
                if (i < k.Tq && j < qs_attn_visible_keys(&k, i)) {
                    p = expf(dot<D>(qs + lane * (D + 1), ks + kj * D) - ls[lane]);
                    ds = p * (dot<D>(dos + lane * (D + 1), vs + kj * D) - dl[lane]);
                }
                for (int t = 0; t < FA_QCHUNK; t++) {
                    const float pt = __shfl_sync(0xffffffffu, p, t), dst = __shfl_sync(0xffffffffu, ds, t);
#pragma unroll
                    for (int c = 0; c < D / 32; c++) {
                        dv[w][c] += pt * dos[t * (D + 1) + c * 32 + lane];
                        dk[w][c] += dst * qs[t * (D + 1) + c * 32 + lane];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int w = 0; w < KW; w++) {
        const int j = j0 + warp * KW + w;
        if (j >= k.Tk) break;
        float *row = dkv + kvh.kv + (size_t)j * k.kv_stride;
#pragma unroll
        for (int c = 0; c < D / 32; c++)
            if (c * 32 + lane < kvh.hs) {
                row[c * 32 + lane] += dk[w][c];
                row[kvh.v + c * 32 + lane] += dv[w][c];
            }
    }
}

/* ---- launch: the kernels' instance for the block's head size ---- */

struct fa_forward {
    template <int D> static void run(float *out, float *lse, const float *q, const float *kv, const qs_attn_block *k) {
        allow_smem<flash_forward_kernel<D>>(forward_smem<D>());
        QS_LAUNCH(flash_forward_kernel<D>, dim3(k->B * k->NH, (k->Tq + FA_QTILE - 1) / FA_QTILE), FA_THREADS,
                  forward_smem<D>(), out, lse, q, kv, *k, scale_of(k));
    }
};

struct fa_backward {
    template <int D>
    static void run(float *dq, float *dkv, const float *dout, const float *q, const float *kv, const float *lse,
                    const float *delta, const qs_attn_block *k) {
        if (dq) {
            allow_smem<flash_dq_kernel<D>>(dq_smem<D>());
            QS_LAUNCH(flash_dq_kernel<D>, dim3(k->B * k->NH, (k->Tq + FA_QTILE - 1) / FA_QTILE), FA_THREADS,
                      dq_smem<D>(), dq, dout, q, kv, lse, delta, *k, scale_of(k));
        }
        if (dkv) {
            allow_smem<flash_dkv_kernel<D>>(dkv_smem<D>());
            QS_LAUNCH(flash_dkv_kernel<D>, dim3(k->B * k->NKV, (k->Tk + dkv_group<D>() - 1) / dkv_group<D>()),
                      FA_THREADS, dkv_smem<D>(), dkv, dout, q, kv, lse, delta, *k, scale_of(k));
        }
    }
};

void qs_cuda_attention_block_forward(float *out, float *lse, const float *q, const float *kv,
                                     const qs_attn_block *k) {
    at_head_size<fa_forward>(k, out, lse, q, kv, k);
}

void qs_cuda_attention_block_backward(float *dq, float *dkv, const float *dout, const float *q, const float *kv,
                                      const float *lse, const float *delta, const qs_attn_block *k) {
    at_head_size<fa_backward>(k, dq, dkv, dout, q, kv, lse, delta, k);
}

/* ---- merge, delta, K/V packing ---- */

/* One warp per (sequence, head, query row). */
__global__ static void merge_kernel(float *out, float *lse, const float *out_b, const float *lse_b, qs_attn_block k) {
    const int r = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (r >= k.B * k.NH * k.Tq) return;
    const int bh = r / k.Tq, i = r % k.Tq, b = bh / k.NH, h = bh % k.NH, hs = k.C / k.NH;
    const size_t s = (size_t)bh * k.q_len + i;
    const float la = lse[s], lb = lse_b[s];
    /* the block adds nothing; this also keeps -inf - -inf (NaN) out below */
    if (lb == -INFINITY) return;
    /* logaddexp from the larger side, so neither exp overflows */
    const float l = fmaxf(la, lb) + log1pf(expf(-fabsf(la - lb)));
    const float wa = expf(la - l), wb = expf(lb - l);
    const size_t o = ((size_t)b * k.q_len + i) * k.C + (size_t)h * hs;
    for (int c = lane; c < hs; c += 32) out[o + c] = wa * out[o + c] + wb * out_b[o + c];
    __syncwarp();
    if (lane == 0) lse[s] = l;
}

void qs_cuda_attention_merge(float *out, float *lse, const float *out_b, const float *lse_b,
                             const qs_attn_block *k) {
    const int rows = k->B * k->NH * k->Tq;
    QS_LAUNCH_ROWS(merge_kernel, rows, out, lse, out_b, lse_b, *k);
}

/* One warp per (sequence, head, row): delta = dout . out over the head's columns. */
__global__ static void delta_kernel(float *delta, const float *dout, const float *out, int B, int T, int C, int NH) {
    const int r = blockIdx.x * QS_WARPS + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (r >= B * NH * T) return;
    const int bh = r / T, t = r % T, hs = C / NH;
    const size_t o = ((size_t)(bh / NH) * T + t) * C + (size_t)(bh % NH) * hs;
    float s = 0.0f;
    for (int c = lane; c < hs; c += 32) s += dout[o + c] * out[o + c];
    s = qs_warp_reduce(s, qs_sum_op());
    if (lane == 0) delta[r] = s;
}

void qs_cuda_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int C, int NH) {
    const int rows = B * NH * T;
    QS_LAUNCH_ROWS(delta_kernel, rows, delta, dout, out, B, T, C, NH);
}

/* Rows of qkv are [C + 2Ckv]: the 2Ckv k and v columns start at column C. */
__global__ static void kv_pack_kernel(float *kv, const float *qkv, size_t rows, int C, int Ckv) {
    QS_GRID_LOOP(i, rows * 2 * Ckv) {
        const size_t r = i / (2 * Ckv), c = i % (2 * Ckv);
        kv[i] = qkv[r * (C + 2 * Ckv) + C + c];
    }
}

__global__ static void kv_unpack_add_kernel(float *dqkv, const float *dkv, size_t rows, int C, int Ckv) {
    QS_GRID_LOOP(i, rows * 2 * Ckv) {
        const size_t r = i / (2 * Ckv), c = i % (2 * Ckv);
        dqkv[r * (C + 2 * Ckv) + C + c] += dkv[i];
    }
}

void qs_cuda_kv_pack_forward(float *kv, const float *qkv, int B, int T, int C, int Ckv) {
    QS_LAUNCH_N(kv_pack_kernel, (size_t)B * T * 2 * Ckv, kv, qkv, (size_t)B * T, C, Ckv);
}

void qs_cuda_kv_pack_backward(float *dqkv, const float *dkv, int B, int T, int C, int Ckv) {
    QS_LAUNCH_N(kv_unpack_add_kernel, (size_t)B * T * 2 * Ckv, dqkv, dkv, (size_t)B * T, C, Ckv);
}

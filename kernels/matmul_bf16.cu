/* Linear layers from bf16 weights on the GPU (inference), in ops.h's panels of 32
 * columns, as csrc/cpu/matmul_bf16.c computes them on the CPU. A decode step's few rows
 * are bound by reading the weights: a block of warps takes one panel, whose rows are a
 * contiguous stream (64 bytes each), each lane reading 16 bytes of it a step and
 * keeping its 8 columns' sums for every input row in registers, so the weights are read
 * once (per 8 input rows) at 2 bytes an element, half of what the fp32 products read.
 * The inputs stay fp32, as on the CPU. Many rows (a prefill) widen chunks of panels back
 * to fp32 in scratch and run them through the backend's GEMM (bf16 products under the
 * bf16 precision), as the CPU hands them to SGEMM. */
#include "common.cuh"
#include "mma.cuh"

enum {
    PANEL_WARPS = 8,     /* warps sharing a panel's rows, every 8th group of 8 rows each */
    PANEL_ROWS = 8,      /* input rows a block sums together (blockIdx.y: which 8) */
    PANEL_MAX_ROWS = 32, /* more widen instead: a guess until a GPU measures it */
};
/* A widened chunk's floats at most (8 MiB of scratch): whole panels, at least one. */
static const size_t WIDEN_FLOATS = (size_t)1 << 21;

/* Blocks for an element-wise pass over n elements: enough to fill the GPU (each thread
 * loops), not one per 256 elements. */
static unsigned filling_blocks(size_t n) {
    const unsigned most = 8u * (unsigned)qs_cuda_sm_count(), need = qs_cuda_blocks(n, QS_THREADS);
    return need < most ? need : most;
}

static int chunk_panels(int n_in, int n_out) {
    const int panels = (n_out + QS_BF16_PANEL - 1) / QS_BF16_PANEL;
    const size_t fit = WIDEN_FLOATS / ((size_t)n_in * QS_BF16_PANEL);
    return fit < 1 ? 1 : fit < (size_t)panels ? (int)fit : panels;
}

/* The widening's scratch: one chunk. */
static float *widen_scratch(int n_in, int n_out) {
    return (float *)qs_cuda_scratch((size_t)chunk_panels(n_in, n_out) * n_in * QS_BF16_PANEL * sizeof(float));
}

/* dst as ops.h lays a packed weight out: element k is panel k / (32 n_in), row
 * (k / 32) % n_in, column k % 32 of that panel; zeros past n_out. */
__global__ static void pack_kernel(uint16_t *dst, const float *w, int n_in, int n_out, int out_in, size_t total) {
    QS_GRID_LOOP(k, total) {
        const size_t row = k / QS_BF16_PANEL;
        const int i = (int)(row % n_in), j = (int)(row / n_in) * QS_BF16_PANEL + (int)(k % QS_BF16_PANEL);
        const float v = j >= n_out ? 0.0f : out_in ? w[(size_t)j * n_in + i] : w[(size_t)i * n_out + j];
        dst[k] = (uint16_t)(qs_bf16x2(v, 0.0f) & 0xffffu);
    }
}

static void matmul_pack_bf16(uint16_t *dst, const float *w, int n_in, int n_out, qs_weight_layout layout) {
    const size_t total = qs_bf16_packed_elems(n_in, n_out);
    QS_LAUNCH(pack_kernel, filling_blocks(total), QS_THREADS, 0, dst, w, n_in, n_out, layout == QS_W_OUT_IN, total);
    /* the prefill's widening scratch taken now, so that generating allocates nothing */
    widen_scratch(n_in, n_out);
}

static __device__ inline float bf16_lo(uint32_t word) { return __uint_as_float(word << 16); }
static __device__ inline float bf16_hi(uint32_t word) { return __uint_as_float(word & 0xffff0000u); }

/* out rows r0 .. r0 + 7 (r0 = 8 blockIdx.y) x the 32 columns of panel blockIdx.x. Warp v
 * walks the panel's rows i = 8 v + lane / 4, then 64 further each step; lane % 4 picks
 * 8 of the row's 32 columns (16 bytes, aligned: panels and rows start at multiples of 64
 * bytes). The lanes of a column group then add up by shuffles, the warps through shared
 * memory. */
__global__ static void __launch_bounds__(PANEL_WARPS * 32)
    panel_kernel(float *out, const float *inp, const uint16_t *w, const float *bias, int N, int n_in, int n_out) {
    __shared__ float part[PANEL_WARPS][PANEL_ROWS][QS_BF16_PANEL];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane % 4;
    const int j0 = blockIdx.x * QS_BF16_PANEL, r0 = blockIdx.y * PANEL_ROWS, rows = min(PANEL_ROWS, N - r0);
    const uint4 *panel = reinterpret_cast<const uint4 *>(w + (size_t)blockIdx.x * n_in * QS_BF16_PANEL);
    const float *x = inp + (size_t)r0 * n_in;
    float acc[PANEL_ROWS][8] = {};
#pragma unroll 4 /* four loads in flight a lane: one alone leaves the memory system idle */
    for (int i = warp * 8 + lane / 4; i < n_in; i += PANEL_WARPS * 8) {
        const uint4 q = panel[(size_t)i * (QS_BF16_PANEL / 8) + quad];
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        float wv[8];
#pragma unroll
        for (int h = 0; h < 4; h++) wv[2 * h] = bf16_lo(words[h]), wv[2 * h + 1] = bf16_hi(words[h]);
#pragma unroll
        for (int r = 0; r < PANEL_ROWS; r++)
            if (r < rows) {
                const float a = x[(size_t)r * n_in + i];
#pragma unroll
                for (int c = 0; c < 8; c++) acc[r][c] += a * wv[c];
            }
    }
#pragma unroll
    for (int r = 0; r < PANEL_ROWS; r++)
        if (r < rows) /* the same for the whole block */
#pragma unroll
            for (int c = 0; c < 8; c++) {
                float v = acc[r][c];
                for (int d = 4; d < 32; d *= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
                if (lane < 4) part[warp][r][quad * 8 + c] = v;
            }
    __syncthreads();
    for (int k = threadIdx.x; k < rows * QS_BF16_PANEL; k += blockDim.x) {
        const int r = k / QS_BF16_PANEL, c = k % QS_BF16_PANEL, j = j0 + c;
        if (j >= n_out) continue;
        float s = 0.0f;
        for (int v = 0; v < PANEL_WARPS; v++) s += part[v][r][c];
        out[(size_t)(r0 + r) * n_out + j] = s + (bias ? bias[j] : 0.0f);
    }
}

/* chunk [n_in, cols] = the columns of panels p0 .. widened to fp32. */
__global__ static void widen_kernel(float *chunk, const uint16_t *w, int n_in, int p0, int cols) {
    QS_GRID_LOOP(k, (size_t)n_in * cols) {
        const int i = (int)(k / cols), c = (int)(k % cols);
        const uint16_t h = w[((size_t)(p0 + c / QS_BF16_PANEL) * n_in + i) * QS_BF16_PANEL + c % QS_BF16_PANEL];
        chunk[k] = __uint_as_float((uint32_t)h << 16);
    }
}

template <qs_precision P>
static void matmul_forward_bf16(float *out, const float *inp, const uint16_t *w, const float *bias, int N, int n_in,
                                int n_out) {
    if (N <= 0) return;
    const int panels = (n_out + QS_BF16_PANEL - 1) / QS_BF16_PANEL;
    if (N <= PANEL_MAX_ROWS) {
        QS_LAUNCH(panel_kernel, dim3(panels, (N + PANEL_ROWS - 1) / PANEL_ROWS), PANEL_WARPS * 32, 0, out, inp, w,
                  bias, N, n_in, n_out);
        return;
    }
    const int per = chunk_panels(n_in, n_out);
    float *chunk = widen_scratch(n_in, n_out);
    for (int p0 = 0; p0 < panels; p0 += per) { /* in stream order: a widening waits for the last GEMM */
        const int j0 = p0 * QS_BF16_PANEL, cols = min(n_out - j0, per * QS_BF16_PANEL);
        QS_LAUNCH(widen_kernel, filling_blocks((size_t)n_in * cols), QS_THREADS, 0, chunk, w, n_in, p0, cols);
        qs_cuda_gemm(P, 0, 0, N, cols, n_in, 1.0f, inp, n_in, chunk, cols, 0.0f, out + j0, n_out);
    }
    if (bias) qs_cuda_add_bias(out, bias, N, n_out);
}

void qs_cuda_set_matmul_bf16_ops(qs_ops *ops, qs_precision p) {
    ops->matmul_pack_bf16 = matmul_pack_bf16;
    ops->matmul_forward_bf16 =
        p == QS_PRECISION_BF16 ? matmul_forward_bf16<QS_PRECISION_BF16> : matmul_forward_bf16<QS_PRECISION_FP32>;
}

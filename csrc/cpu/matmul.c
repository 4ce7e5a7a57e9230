/* Linear layer via BLAS. OpenBLAS runs single-threaded (qs_cpu_blas_init, blas.c) and we split
 * each product into blocks of the output over OpenMP threads: BLAS's own thread pool
 * and OpenMP's otherwise spin against each other (measured 2.5x slower on 2 cores),
 * and with each output element owned by one thread the result is deterministic.
 * N can be 0 (an expert that received no tokens). */
#include <cblas.h>
#include <omp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

/* C[M,N] = alpha op(A)[M,K] op(B)[K,N] + beta C, row-major, split over the larger of
 * M and N into one block per thread. */
static void par_sgemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                      int ldb, float beta, float *C, int ldc) {
    enum CBLAS_TRANSPOSE TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
    int split_rows = M >= N, len = split_rows ? M : N;
    int nt = omp_in_parallel() ? 1 : omp_get_max_threads(); /* inside a grouped product's team: alone */
    if (nt > 1 && (size_t)M * N * K < QS_CPU_GEMM_PAR_MIN) nt = 1;
    int chunk = (len + nt - 1) / nt;
    chunk = (chunk + 15) & ~15; /* whole SIMD-friendly blocks */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int s = 0; s < len; s += chunk) {
        int n = len - s < chunk ? len - s : chunk;
        if (split_rows) /* rows of C need rows of op(A) */
            cblas_sgemm(CblasRowMajor, TA, TB, n, N, K, alpha, ta ? A + s : A + (size_t)s * lda, lda, B, ldb,
                        beta, C + (size_t)s * ldc, ldc);
        else if (M == 1) /* one row (a decode step): GEMV streams op(B), which GEMM would pack first */
            cblas_sgemv(CblasRowMajor, tb ? CblasNoTrans : CblasTrans, tb ? n : K, tb ? K : n, alpha,
                        tb ? B + (size_t)s * ldb : B + s, ldb, A, ta ? lda : 1, beta, C + s, 1);
        else /* columns of C need columns of op(B) */
            cblas_sgemm(CblasRowMajor, TA, TB, M, n, K, alpha, A, lda, tb ? B + (size_t)s * ldb : B + s, ldb,
                        beta, C + s, ldc);
    }
}

void qs_cpu_matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N,
                           int n_in, int n_out, qs_weight_layout layout) {
    if (N <= 0) return;
    /* one row of [in, out] weights: par_sgemm's GEMV is as fast; along [out, in] rows
     * the tile's prefetching reads 15-20% faster */
    if (N < QS_CPU_FEW_ROWS && (N >= 2 || layout == QS_W_OUT_IN)) {
        qs_cpu_matmul_rows_forward(out, inp, w, bias, N, n_in, n_out, layout);
        return;
    }
    const int out_in = layout == QS_W_OUT_IN;
    par_sgemm(0, out_in, N, n_out, n_in, 1.0f, inp, n_in, w, out_in ? n_in : n_out, 0.0f, out, n_out);
    if (!bias) return;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * n_out;
        for (int j = 0; j < n_out; j++) o[j] += bias[j];
    }
}

void qs_cpu_matmul_acc(float *out, const float *inp, const float *w, float alpha, int N, int n_in, int n_out,
                       qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    par_sgemm(0, out_in, N, n_out, n_in, alpha, inp, n_in, w, out_in ? n_in : n_out, 1.0f, out, n_out);
}

void qs_cpu_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                            const float *inp, const float *w, int N, int n_in, int n_out,
                            qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    /* dinp[N,n_in] += dout[N,n_out] @ W^T, where W^T is [n_out,n_in] (already so for [out,in]). */
    if (dinp) par_sgemm(0, !out_in, N, n_in, n_out, 1.0f, dout, n_out, w, out_in ? n_in : n_out, 1.0f, dinp, n_in);
    if (dw) {
        if (out_in) /* dW[n_out,n_in] += dout^T @ inp */
            par_sgemm(1, 0, n_out, n_in, N, 1.0f, dout, n_out, inp, n_in, 1.0f, dw, n_in);
        else /* dW[n_in,n_out] += inp^T @ dout */
            par_sgemm(1, 0, n_in, n_out, N, 1.0f, inp, n_in, dout, n_out, 1.0f, dw, n_out);
    }
    if (dbias) {
        /* Column sums: each thread owns a range of columns and streams the rows, so
         * every column is summed in row order whatever the thread count. */
#pragma omp parallel
        {
            int nt = omp_get_num_threads(), t = omp_get_thread_num();
            int j0 = (int)((long)n_out * t / nt), j1 = (int)((long)n_out * (t + 1) / nt);
            for (int n = 0; n < N; n++) {
                const float *row = dout + (size_t)n * n_out;
                for (int j = j0; j < j1; j++) dbias[j] += row[j];
            }
        }
    }
}

/* The CPU has no epilogue to fuse into: the GELU is its own pass, with the bits of the
 * separate ops. */
void qs_cpu_matmul_gelu_forward(float *pre, float *out, const float *inp, const float *w, const float *bias, int N,
                                int n_in, int n_out, qs_weight_layout layout) {
    qs_cpu_matmul_forward(pre, inp, w, bias, N, n_in, n_out, layout);
    qs_cpu_gelu_forward(out, pre, N > 0 ? (size_t)N * n_out : 0);
}

void qs_cpu_matmul_backward_dgelu(float *dpre, float *dw, float *dbias, const float *dout, const float *act,
                                  const float *pre, const float *w, int N, int n_in, int n_out,
                                  qs_weight_layout layout) {
    if (N <= 0) return;
    const size_t n = (size_t)N * n_in;
    memset(dpre, 0, n * sizeof *dpre);
    qs_cpu_matmul_backward(dpre, dw, dbias, dout, act, w, N, n_in, n_out, layout);
    qs_cpu_gelu_grad_scale(dpre, pre, n);
}

/* Each group's rows through its slice of the stacked weights, as a matmul of its own.
 * With at least two groups a thread, whole groups go to the threads, each product on
 * one (an MoE layer's many small products then fork once, not once each, and run whole
 * rather than split in two); each group is one single-threaded call whichever thread
 * takes it, so the result stays run-to-run identical. */
static bool by_group(int groups) {
    const int nt = omp_get_max_threads();
    return nt > 1 && groups >= 2 * nt;
}

void qs_cpu_matmul_grouped_forward(float *out, const float *inp, const float *w, const float *bias,
                                   const int *offsets, int groups, int n_in, int n_out) {
#pragma omp parallel for schedule(dynamic, 1) if (by_group(groups))
    for (int g = 0; g < groups; g++) {
        const size_t r0 = (size_t)offsets[g], wg = (size_t)g * n_in * n_out;
        qs_cpu_matmul_forward(out + r0 * n_out, inp + r0 * n_in, w + wg, bias ? bias + (size_t)g * n_out : NULL,
                              offsets[g + 1] - offsets[g], n_in, n_out, QS_W_IN_OUT);
    }
}

void qs_cpu_matmul_grouped_backward(float *dinp, float *dw, float *dbias, const float *dout,
                                    const float *inp, const float *w, const int *offsets, int groups,
                                    int n_in, int n_out) {
#pragma omp parallel for schedule(dynamic, 1) if (by_group(groups))
    for (int g = 0; g < groups; g++) {
        const size_t r0 = (size_t)offsets[g], wg = (size_t)g * n_in * n_out;
        qs_cpu_matmul_backward(dinp ? dinp + r0 * n_in : NULL, dw ? dw + wg : NULL,
                               dbias ? dbias + (size_t)g * n_out : NULL, dout + r0 * n_out, inp + r0 * n_in, w + wg,
                               offsets[g + 1] - offsets[g], n_in, n_out, QS_W_IN_OUT);
    }
}

/* Linear layers through cuBLAS sgemm (plain fp32, see backend.cu), bias in a kernel of
 * its own, the bias gradient as a deterministic column sum. N can be 0 (an expert that
 * received no tokens). */
#include "common.cuh"

void qs_cuda_gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, long long strideA,
                  const float *B, int ldb, long long strideB, float beta, float *C, int ldc, long long strideC,
                  int batch) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    /* cuBLAS is column-major: a row-major C[M,N] is a column-major C^T[N,M], and
     * C^T = op(B)^T op(A)^T, so the operands swap places and keep their transposes. */
    QS_CUBLAS(cublasSgemmStridedBatched(qs_cuda_blas(), tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                        N, M, K, &alpha, B, ldb, strideB, A, lda, strideA, &beta, C, ldc, strideC,
                                        batch));
}

/* One row-major product (no batch). */
static void gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                 float beta, float *C, int ldc) {
    qs_cuda_gemm(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}

__global__ static void add_bias_kernel(float *out, const float *bias, size_t N, int n_out) {
    QS_GRID_LOOP(i, N * n_out) out[i] += bias[i % n_out];
}

void qs_cuda_matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int n_in,
                            int n_out, qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    gemm(0, out_in, N, n_out, n_in, 1.0f, inp, n_in, w, out_in ? n_in : n_out, 0.0f, out, n_out);
    if (bias)
        QS_LAUNCH_N(add_bias_kernel, (size_t)N * n_out, out, bias, (size_t)N, n_out);
}

void qs_cuda_matmul_acc(float *out, const float *inp, const float *w, float alpha, int N, int n_in, int n_out,
                        qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    gemm(0, out_in, N, n_out, n_in, alpha, inp, n_in, w, out_in ? n_in : n_out, 1.0f, out, n_out);
}

/* Element (r, j) of a row-major matrix with rows of `cols`: a column sum's term. */
struct matrix_term {
    const float *m;
    int cols;
    __device__ float operator()(int r, int j) const { return m[(size_t)r * cols + j]; }
};

void qs_cuda_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                             const float *w, int N, int n_in, int n_out, qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    /* dinp[N,n_in] += dout[N,n_out] @ W^T, where W^T is [n_out,n_in] (already so for [out,in]). */
    if (dinp) gemm(0, !out_in, N, n_in, n_out, 1.0f, dout, n_out, w, out_in ? n_in : n_out, 1.0f, dinp, n_in);
    if (dw) {
        if (out_in) /* dW[n_out,n_in] += dout^T @ inp */
            gemm(1, 0, n_out, n_in, N, 1.0f, dout, n_out, inp, n_in, 1.0f, dw, n_in);
        else /* dW[n_in,n_out] += inp^T @ dout */
            gemm(1, 0, n_in, n_out, N, 1.0f, inp, n_in, dout, n_out, 1.0f, dw, n_out);
    }
    qs_colsum(matrix_term{dout, n_out}, N, n_out, dbias, n_out, NULL);
}

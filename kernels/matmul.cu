/* Linear layers through cuBLAS, bias in a kernel of its own, the bias gradient as a
 * deterministic column sum. N can be 0 (an expert that received no tokens). The
 * products' precision is a template parameter: the backend has one op table for each. */
#include "common.cuh"

/* fp32: plain FMA (CUBLAS_COMPUTE_32F under the default math mode, no TF32), so products
 * match the CPU to fp32 rounding. bf16: cuBLAS may round both fp32 operands to bf16 and
 * run the tensor cores, accumulating in fp32 (the input and output buffers stay fp32). */
static cublasComputeType_t compute_type(qs_precision p) {
    return p == QS_PRECISION_BF16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
}

/* Row-major C[M,N] = alpha op(A) op(B) + beta C, op(A) [M,K] (A stored [K,M] when ta),
 * op(B) [K,N] (B stored [N,K] when tb); lda/ldb/ldc are row strides. */
template <qs_precision P>
static void gemm(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                 float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    /* cuBLAS is column-major: a row-major C[M,N] is a column-major C^T[N,M], and
     * C^T = op(B)^T op(A)^T, so the operands swap places and keep their transposes. */
    QS_CUBLAS(cublasGemmEx(qs_cuda_blas(), tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                           &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C, CUDA_R_32F, ldc, compute_type(P),
                           CUBLAS_GEMM_DEFAULT));
}

__global__ static void add_bias_kernel(float *out, const float *bias, size_t N, int n_out) {
    QS_GRID_LOOP(i, N * n_out) out[i] += bias[i % n_out];
}

template <qs_precision P>
static void matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int n_in, int n_out,
                           qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    gemm<P>(0, out_in, N, n_out, n_in, 1.0f, inp, n_in, w, out_in ? n_in : n_out, 0.0f, out, n_out);
    if (bias)
        QS_LAUNCH_N(add_bias_kernel, (size_t)N * n_out, out, bias, (size_t)N, n_out);
}

template <qs_precision P>
static void matmul_acc(float *out, const float *inp, const float *w, float alpha, int N, int n_in, int n_out,
                       qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    gemm<P>(0, out_in, N, n_out, n_in, alpha, inp, n_in, w, out_in ? n_in : n_out, 1.0f, out, n_out);
}

/* Element (r, j) of a row-major matrix with rows of `cols`: a column sum's term. */
struct matrix_term {
    const float *m;
    int cols;
    __device__ float operator()(int r, int j) const { return m[(size_t)r * cols + j]; }
};

template <qs_precision P>
static void matmul_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp, const float *w,
                            int N, int n_in, int n_out, qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    /* dinp[N,n_in] += dout[N,n_out] @ W^T, where W^T is [n_out,n_in] (already so for [out,in]). */
    if (dinp) gemm<P>(0, !out_in, N, n_in, n_out, 1.0f, dout, n_out, w, out_in ? n_in : n_out, 1.0f, dinp, n_in);
    if (dw) {
        if (out_in) /* dW[n_out,n_in] += dout^T @ inp */
            gemm<P>(1, 0, n_out, n_in, N, 1.0f, dout, n_out, inp, n_in, 1.0f, dw, n_in);
        else /* dW[n_in,n_out] += inp^T @ dout */
            gemm<P>(1, 0, n_in, n_out, N, 1.0f, inp, n_in, dout, n_out, 1.0f, dw, n_out);
    }
    qs_colsum(matrix_term{dout, n_out}, N, n_out, dbias, n_out, NULL);
}

template <qs_precision P> static void set_matmul_ops(qs_ops *ops) {
    ops->matmul_forward = matmul_forward<P>;
    ops->matmul_backward = matmul_backward<P>;
    ops->matmul_acc = matmul_acc<P>;
}

void qs_cuda_set_matmul_ops(qs_ops *ops, qs_precision p) {
    if (p == QS_PRECISION_BF16) set_matmul_ops<QS_PRECISION_BF16>(ops);
    else set_matmul_ops<QS_PRECISION_FP32>(ops);
}

/* An emulated cuBLAS for the CUDA backend on the CPU (see cuda_runtime.h here): the
 * calls kernels/matmul.cu and kernels/backend.cu make, with cuBLAS's column-major
 * semantics carried out by the CPU's CBLAS, so matmul.cu's mapping of row-major products
 * onto cuBLAS is what gets tested. */
#ifndef QUASAR_EMU_CUBLAS_V2_H
#define QUASAR_EMU_CUBLAS_V2_H

#include <cblas.h>

#include "cuda_runtime.h"

typedef struct emu_cublas *cublasHandle_t;
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15
} cublasStatus_t;
typedef enum { CUBLAS_OP_N, CUBLAS_OP_T } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH } cublasMath_t;

static inline const char *cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS            ? "CUBLAS_STATUS_SUCCESS"
           : s == CUBLAS_STATUS_NOT_SUPPORTED    ? "CUBLAS_STATUS_NOT_SUPPORTED"
           : s == CUBLAS_STATUS_EXECUTION_FAILED ? "CUBLAS_STATUS_EXECUTION_FAILED"
                                                 : "CUBLAS_STATUS_INVALID_VALUE";
}
static inline cublasStatus_t cublasCreate(cublasHandle_t *h) {
    static char handle;
    *h = (cublasHandle_t)(void *)&handle;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasSetWorkspace(cublasHandle_t, void *, size_t) { return CUBLAS_STATUS_SUCCESS; }

typedef enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 } cudaDataType_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_16BF = 75 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;

/* x rounded to the nearest bf16 (ties to even), as a float; NaN and infinities kept. */
static inline float emu_round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* A copy of the `rows` x `cols` column-major operand at p (leading dimension ld), each
 * element rounded to bf16: what CUBLAS_COMPUTE_32F_FAST_16BF allows cuBLAS to multiply. */
static inline float *emu_bf16_operand(const float *p, int rows, int cols, int ld) {
    const size_t n = cols > 0 ? (size_t)(cols - 1) * ld + rows : 0;
    float *q = (float *)malloc(n ? n * sizeof(float) : 1);
    for (size_t i = 0; i < n; i++) q[i] = emu_round_bf16(p[i]);
    return q;
}

/* C = alpha op(A) op(B) + beta C, column-major, all three fp32. COMPUTE_32F is plain
 * fp32; COMPUTE_32F_FAST_16BF rounds both operands to bf16 first (the most a real
 * cuBLAS may round them) and accumulates in fp32. cuBLAS's own argument checks: a
 * leading dimension below the rows it holds is an error, not a guess. */
static inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType_t at, int lda,
                                          const void *B, cudaDataType_t bt, int ldb, const void *beta, void *C,
                                          cudaDataType_t ct, int ldc, cublasComputeType_t compute, cublasGemmAlgo_t) {
    const int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
    if (!h || m < 0 || n < 0 || k < 0 || lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1) || at != CUDA_R_32F || bt != CUDA_R_32F || ct != CUDA_R_32F ||
        (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_16BF))
        return CUBLAS_STATUS_INVALID_VALUE;
    const float *a = (const float *)A, *b = (const float *)B;
    float *ra = NULL, *rb = NULL;
    if (compute == CUBLAS_COMPUTE_32F_FAST_16BF) {
        a = ra = emu_bf16_operand(a, a_rows, ta == CUBLAS_OP_N ? k : m, lda);
        b = rb = emu_bf16_operand(b, b_rows, tb == CUBLAS_OP_N ? n : k, ldb);
    }
    cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, *(const float *)alpha, a, lda, b, ldb,
                *(const float *)beta, (float *)C, ldc);
    free(ra);
    free(rb);
    return CUBLAS_STATUS_SUCCESS;
}

/* group_count groups of group_size[i] problems sharing group i's sizes, transposes,
 * leading dimensions and scalars (host arrays); the problems' matrices come from the
 * device pointer arrays, in order. Each is one cublasGemmEx above. QS_EMU_NO_GROUPED set
 * makes it CUBLAS_STATUS_NOT_SUPPORTED, as a cuBLAS without the grouped form for a
 * compute type answers, so the backend's fallback can be tested. */
static inline cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[], const int m[], const int n[],
    const int k[], const void *alpha, const void *const A[], cudaDataType_t at, const int lda[], const void *const B[],
    cudaDataType_t bt, const int ldb[], const void *beta, void *const C[], cudaDataType_t ct, const int ldc[],
    int group_count, const int group_size[], cublasComputeType_t compute) {
    const char *no = getenv("QS_EMU_NO_GROUPED");
    if (no && *no) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
    for (int g = 0, p = 0; g < group_count; g++)
        for (int j = 0; j < group_size[g]; j++, p++) {
            const cublasStatus_t st =
                cublasGemmEx(h, ta[g], tb[g], m[g], n[g], k[g], (const float *)alpha + g, A[p], at, lda[g], B[p], bt,
                             ldb[g], (const float *)beta + g, C[p], ct, ldc[g], compute, CUBLAS_GEMM_DEFAULT);
            if (st != CUBLAS_STATUS_SUCCESS) return st;
        }
    return CUBLAS_STATUS_SUCCESS;
}

#endif

/* An emulated cuBLAS for the CUDA backend on the CPU (see cuda_runtime.h here): the
 * calls kernels/matmul.cu and kernels/backend.cu make, with cuBLAS's column-major
 * semantics carried out by the CPU's CBLAS, so matmul.cu's mapping of row-major products
 * onto cuBLAS is what gets tested. */
#ifndef QUASAR_EMU_CUBLAS_V2_H
#define QUASAR_EMU_CUBLAS_V2_H

#include <cblas.h>

#include "cuda_runtime.h"

typedef struct emu_cublas *cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 } cublasStatus_t;
typedef enum { CUBLAS_OP_N, CUBLAS_OP_T } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH } cublasMath_t;

static inline const char *cublasGetStatusString(cublasStatus_t s) {
    return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_INVALID_VALUE";
}
static inline cublasStatus_t cublasCreate(cublasHandle_t *h) {
    static char handle;
    *h = (cublasHandle_t)(void *)&handle;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }

/* C_i = alpha op(A_i) op(B_i) + beta C_i, column-major, i < batch. cuBLAS's own argument
 * checks: a leading dimension below the rows it holds is an error, not a guess. */
static inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                                       int m, int n, int k, const float *alpha, const float *A,
                                                       int lda, long long sA, const float *B, int ldb, long long sB,
                                                       const float *beta, float *C, int ldc, long long sC,
                                                       int batch) {
    const int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
    if (!h || m < 0 || n < 0 || k < 0 || batch < 0 || lda < (a_rows > 1 ? a_rows : 1) ||
        ldb < (b_rows > 1 ? b_rows : 1) || ldc < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int i = 0; i < batch; i++)
        cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                    tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, *alpha, A + i * sA, lda, B + i * sB, ldb,
                    *beta, C + i * sC, ldc);
    return CUBLAS_STATUS_SUCCESS;
}

#endif

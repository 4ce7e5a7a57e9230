/* An emulated cuBLASLt (see cublas_v2.h here): the descriptors, the heuristic and the
 * matmul that kernels/matmul.cu uses for products with a fused epilogue (bias, GELU
 * with its input kept, GELU's gradient), with the documented constraints checked:
 *   - the layouts agree with the product's sizes and transposes;
 *   - the bias is set for a BIAS epilogue, the aux buffer and its leading dimension
 *     (a multiple of 8, at least D's rows) for GELU_AUX and DGELU;
 *   - every matrix pointer (and leading dimension) is as aligned as the preference
 *     said, the heuristic's default being 256 bytes: a real kernel chosen for that
 *     alignment faults on a less aligned pointer, so here cublasLtMatmul fails.
 * GELU is the tanh form computed with tanhf (the backend's kernels use the sigmoid form:
 * equal up to float rounding). QS_EMU_NO_LT_EPILOGUE set: the heuristic finds no
 * algorithm for any epilogue but DEFAULT, as a cuBLASLt without it would answer, so the
 * backend's unfused fallback can be tested. */
#ifndef QUASAR_EMU_CUBLASLT_H
#define QUASAR_EMU_CUBLASLT_H

#include "cublas_v2.h"

typedef enum {
    CUBLASLT_EPILOGUE_DEFAULT = 1,
    CUBLASLT_EPILOGUE_BIAS = 4,
    CUBLASLT_EPILOGUE_GELU = 32,
    CUBLASLT_EPILOGUE_GELU_AUX = 32 | 128,
    CUBLASLT_EPILOGUE_GELU_BIAS = 32 | 4,
    CUBLASLT_EPILOGUE_GELU_AUX_BIAS = 32 | 128 | 4,
    CUBLASLT_EPILOGUE_DGELU = 64 | 128,
} cublasLtEpilogue_t;

typedef enum {
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
} cublasLtMatmulDescAttributes_t;

typedef enum {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
} cublasLtMatmulPreferenceAttributes_t;

typedef struct emu_lt *cublasLtHandle_t;
typedef struct emu_lt_desc {
    cublasComputeType_t compute;
    int32_t ta, tb;
    uint32_t epilogue;
    const void *bias;
    void *aux;
    int64_t aux_ld;
} *cublasLtMatmulDesc_t;
typedef struct emu_lt_layout {
    cudaDataType_t type;
    uint64_t rows, cols;
    int64_t ld;
} *cublasLtMatrixLayout_t;
typedef struct emu_lt_pref {
    uint64_t workspace;
    uint32_t align[4]; /* A, B, C, D */
} *cublasLtMatmulPreference_t;
typedef struct {
    uint64_t data[8];
} cublasLtMatmulAlgo_t;
typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;

static inline cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    static char handle;
    *h = (cublasLtHandle_t)(void *)&handle;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t) { return CUBLAS_STATUS_SUCCESS; }

static inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                                      cudaDataType_t scale) {
    if (scale != CUDA_R_32F || (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_16BF))
        return CUBLAS_STATUS_INVALID_VALUE;
    *d = (cublasLtMatmulDesc_t)calloc(1, sizeof **d);
    (*d)->compute = compute;
    (*d)->epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    free(d);
    return CUBLAS_STATUS_SUCCESS;
}

/* Each attribute takes exactly its documented type's size. */
static inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                                            const void *buf, size_t size) {
    switch (a) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB:
        if (size != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(a == CUBLASLT_MATMUL_DESC_TRANSA ? &d->ta : &d->tb, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
        if (size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->epilogue, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER:
        if (size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(a == CUBLASLT_MATMUL_DESC_BIAS_POINTER ? (void *)&d->bias : (void *)&d->aux, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD:
        if (size != sizeof(int64_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->aux_ld, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

static inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type, uint64_t rows,
                                                        uint64_t cols, int64_t ld) {
    if (type != CUDA_R_32F || ld < (int64_t)(rows > 1 ? rows : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    *l = (cublasLtMatrixLayout_t)malloc(sizeof **l);
    **l = (struct emu_lt_layout){type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    free(l);
    return CUBLAS_STATUS_SUCCESS;
}

static inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = (cublasLtMatmulPreference_t)malloc(sizeof **p);
    **p = (struct emu_lt_pref){0, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    free(p);
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                                  cublasLtMatmulPreferenceAttributes_t a,
                                                                  const void *buf, size_t size) {
    if (a == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == sizeof(uint64_t)) {
        memcpy(&p->workspace, buf, size);
        return CUBLAS_STATUS_SUCCESS;
    }
    if (a >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && a <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES &&
        size == sizeof(uint32_t)) {
        memcpy(&p->align[a - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, size);
        return CUBLAS_STATUS_SUCCESS;
    }
    return CUBLAS_STATUS_INVALID_VALUE;
}

/* Whether the layouts describe D[m,n] = op(A) op(B) with C like D, and the epilogue's
 * buffers are set as documented. */
static inline int emu_lt_valid(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                               cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D) {
    const uint64_t m = D->rows, n = D->cols, k = d->ta == CUBLAS_OP_N ? A->cols : A->rows;
    const int a_ok = d->ta == CUBLAS_OP_N ? A->rows == m : A->cols == m;
    const int b_ok = d->tb == CUBLAS_OP_N ? B->rows == k && B->cols == n : B->cols == k && B->rows == n;
    if (!a_ok || !b_ok || C->rows != m || C->cols != n || C->ld != D->ld) return 0;
    const uint32_t e = d->epilogue;
    if ((e & CUBLASLT_EPILOGUE_BIAS) && !d->bias) return 0;
    if ((e & 128) && (!d->aux || d->aux_ld % 8 || d->aux_ld < (int64_t)m)) return 0;
    return e == CUBLASLT_EPILOGUE_DEFAULT || e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_AUX ||
           e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || e == CUBLASLT_EPILOGUE_DGELU;
}

/* One algorithm, which remembers the alignments it was chosen for. */
static inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                                            cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                                                            cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                            cublasLtMatmulPreference_t p, int requested,
                                                            cublasLtMatmulHeuristicResult_t *results, int *found) {
    *found = 0;
    if (!h || requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    const char *no = getenv("QS_EMU_NO_LT_EPILOGUE");
    if (!emu_lt_valid(d, A, B, C, D) || (no && *no && d->epilogue != CUBLASLT_EPILOGUE_DEFAULT))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(&results[0], 0, sizeof results[0]);
    for (int i = 0; i < 4; i++) results[0].algo.data[i] = p->align[i];
    results[0].state = CUBLAS_STATUS_SUCCESS;
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}

static inline int emu_lt_aligned(const void *ptr, int64_t ld, uint64_t need) {
    return ((uintptr_t)ptr % need) == 0 && ((uint64_t)ld * sizeof(float)) % need == 0;
}

static inline float emu_lt_gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
static inline float emu_lt_gelu_tanh_grad(float x) {
    const float t = tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
}

/* D = epilogue(alpha op(A) op(B) + beta C): the product as cublasGemmEx (bf16 rounding
 * of the operands under COMPUTE_32F_FAST_16BF), then bias (per row of D), GELU (its
 * input kept in aux) or GELU's gradient (D times gelu'(aux)). */
static inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha,
                                            const void *A, cublasLtMatrixLayout_t Al, const void *B,
                                            cublasLtMatrixLayout_t Bl, const void *beta, const void *C,
                                            cublasLtMatrixLayout_t Cl, void *D, cublasLtMatrixLayout_t Dl,
                                            const cublasLtMatmulAlgo_t *algo, void *, size_t, cudaStream_t) {
    if (!h || !algo || !emu_lt_valid(d, Al, Bl, Cl, Dl)) return CUBLAS_STATUS_INVALID_VALUE;
    const void *const ptr[4] = {A, B, C, D};
    const int64_t ld[4] = {Al->ld, Bl->ld, Cl->ld, Dl->ld};
    for (int i = 0; i < 4; i++)
        if (!emu_lt_aligned(ptr[i], ld[i], algo->data[i])) {
            fprintf(stderr, "emulated cuBLASLt: matrix %c at %p (ld %lld) is not %llu-byte aligned as its algorithm "
                            "assumes\n", "ABCD"[i], ptr[i], (long long)ld[i], (unsigned long long)algo->data[i]);
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    const int m = (int)Dl->rows, n = (int)Dl->cols, k = (int)(d->ta == CUBLAS_OP_N ? Al->cols : Al->rows);
    float *out = (float *)D;
    if (C != D)
        for (int j = 0; j < n; j++) memcpy(out + (size_t)j * Dl->ld, (const float *)C + (size_t)j * Cl->ld,
                   (size_t)m * sizeof(float));
    const cublasStatus_t st = cublasGemmEx((cublasHandle_t)(void *)h, (cublasOperation_t)d->ta,
                                           (cublasOperation_t)d->tb, m, n, k, alpha, A, CUDA_R_32F, (int)Al->ld, B,
                                           CUDA_R_32F, (int)Bl->ld, beta, out, CUDA_R_32F, (int)Dl->ld, d->compute,
                                           CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    const uint32_t e = d->epilogue;
    const float *bias = (const float *)d->bias;
    float *aux = (float *)d->aux;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float *x = out + (size_t)j * Dl->ld + i;
            if (e & CUBLASLT_EPILOGUE_BIAS) *x += bias[i];
            if (e == CUBLASLT_EPILOGUE_DGELU) {
                *x *= emu_lt_gelu_tanh_grad(aux[(size_t)j * d->aux_ld + i]);
            } else if (e & CUBLASLT_EPILOGUE_GELU) {
                aux[(size_t)j * d->aux_ld + i] = *x;
                *x = emu_lt_gelu_tanh(*x);
            }
        }
    return CUBLAS_STATUS_SUCCESS;
}

#endif

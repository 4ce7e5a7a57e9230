/* Linear layers through cuBLAS: the forward products through cuBLASLt with the bias and
 * the GELU (or GELU's gradient) in their epilogue, the rest through cublasGemmEx; the
 * bias gradient as a deterministic column sum; and their grouped form for MoE experts.
 * N can be 0 (an expert that received no tokens). The products' precision is a template
 * parameter: the backend has one op table for each. */
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

/* ---- cuBLASLt: a product and its epilogue in one kernel ----
 * What follows the GEMM: nothing, the bias (per output column of the row-major C), GELU
 * of it all with its input kept in aux (GELU_AUX), or GELU's gradient by aux (DGELU). */
struct epilogue {
    cublasLtEpilogue_t kind;
    const float *bias; /* NULL: none */
    const float *aux;  /* [M, N] row-major, as C: GELU's input (written by GELU_AUX) */
};

/* The alignment cuBLASLt may count on for a matrix: its pointer's and its rows' (ld) in
 * bytes, at most 256. Parameters sit at any float offset of the flat buffer, while the
 * heuristic otherwise assumes 256 and may pick a kernel that faults on less. */
static uint32_t alignment_of(const void *p, int ld) {
    const uintptr_t bits = (uintptr_t)p | (uintptr_t)ld * sizeof(float) | 256;
    return (uint32_t)(bits & (~bits + 1));
}

static long unfused; /* products cuBLASLt could not fuse */

extern "C" long qs_backend_cuda_unfused(void) { return unfused; }

/* Row-major C[M,N] = epilogue(op(A) op(B)), as gemm() maps it to column-major. False when
 * cuBLASLt has no algorithm for it (e.g. an aux row not a multiple of 8 floats, or an
 * epilogue this cuBLASLt lacks for the compute type): the caller does it unfused. A
 * heuristic that answers with an error rather than NOT_SUPPORTED is treated the same: a
 * training run should not stop for what the unfused path does as well (the count shows it). */
template <qs_precision P>
static bool lt_gemm(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C,
                    int ldc, epilogue ep) {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulPreference_t pref;
    QS_CUBLAS(cublasLtMatmulDescCreate(&desc, compute_type(P), CUDA_R_32F));
    /* the column-major product C^T = op(B)^T op(A)^T: cuBLASLt's A is our B */
    const int32_t opa = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    const uint32_t kind = ep.kind;
    QS_CUBLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    QS_CUBLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    QS_CUBLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &kind, sizeof kind));
    if (ep.bias) QS_CUBLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ep.bias,
                                                          sizeof ep.bias));
    if (ep.aux) {
        const int64_t aux_ld = ldc;
        QS_CUBLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &ep.aux,
                                                 sizeof ep.aux));
        QS_CUBLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof aux_ld));
    }
    QS_CUBLAS(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, tb ? K : N, tb ? N : K, ldb));
    QS_CUBLAS(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, ta ? M : K, ta ? K : M, lda));
    QS_CUBLAS(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, N, M, ldc));
    size_t ws_bytes;
    void *ws = qs_cuda_blas_workspace(&ws_bytes);
    const uint64_t ws_max = ws_bytes;
    const uint32_t align[4] = {alignment_of(B, ldb), alignment_of(A, lda), alignment_of(C, ldc),
                               alignment_of(C, ldc)};
    QS_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
    QS_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_max,
                                                   sizeof ws_max));
    for (int i = 0; i < 4; i++)
        QS_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
            pref, (cublasLtMatmulPreferenceAttributes_t)(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES + i), &align[i],
            sizeof align[i]));
    cublasLtMatmulHeuristicResult_t found;
    int n_found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(qs_cuda_blas_lt(), desc, la, lb, lc, lc, pref, 1, &found,
                                                             &n_found);
    const bool ok = st == CUBLAS_STATUS_SUCCESS && n_found > 0;
    unfused += !ok;
    if (ok) {
        const float one = 1.0f, zero = 0.0f;
        QS_CUBLAS(cublasLtMatmul(qs_cuda_blas_lt(), desc, &one, B, la, A, lb, &zero, C, lc, C, lc, &found.algo, ws,
                                 ws_bytes, 0));
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
    return ok;
}

__global__ static void add_bias_kernel(float *out, const float *bias, size_t N, int n_out) {
    QS_GRID_LOOP(i, N * n_out) out[i] += bias[i % n_out];
}

void qs_cuda_add_bias(float *out, const float *bias, int N, int n_out) {
    QS_LAUNCH_N(add_bias_kernel, (size_t)N * n_out, out, bias, (size_t)N, n_out);
}

void qs_cuda_gemm(qs_precision p, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                  const float *B, int ldb, float beta, float *C, int ldc) {
    if (p == QS_PRECISION_BF16) gemm<QS_PRECISION_BF16>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else gemm<QS_PRECISION_FP32>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* out = inp @ W (+ bias), through cuBLASLt when it has the epilogue, else a GEMM and the
 * bias kernel; aux given: GELU too, out = gelu(aux), aux = inp @ W + bias. */
template <qs_precision P>
static void linear_forward(float *out, float *aux, const float *inp, const float *w, const float *bias, int N, int n_in,
                           int n_out, qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN;
    const int ldw = out_in ? n_in : n_out;
    epilogue ep = {bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, bias, NULL};
    if (aux) ep = {bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX, bias, aux};
    if (lt_gemm<P>(0, out_in, N, n_out, n_in, inp, n_in, w, ldw, out, n_out, ep)) return;
    float *pre = aux ? aux : out;
    gemm<P>(0, out_in, N, n_out, n_in, 1.0f, inp, n_in, w, ldw, 0.0f, pre, n_out);
    if (bias) qs_cuda_add_bias(pre, bias, N, n_out);
    if (aux) qs_cuda_gelu_forward(out, aux, (size_t)N * n_out);
}

template <qs_precision P>
static void matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int n_in, int n_out,
                           qs_weight_layout layout) {
    linear_forward<P>(out, NULL, inp, w, bias, N, n_in, n_out, layout);
}

template <qs_precision P>
static void matmul_gelu_forward(float *pre, float *out, const float *inp, const float *w, const float *bias, int N,
                                int n_in, int n_out, qs_weight_layout layout) {
    linear_forward<P>(out, pre, inp, w, bias, N, n_in, n_out, layout);
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

template <qs_precision P>
static void matmul_backward_dgelu(float *dpre, float *dw, float *dbias, const float *dout, const float *act,
                                  const float *pre, const float *w, int N, int n_in, int n_out,
                                  qs_weight_layout layout) {
    if (N <= 0) return;
    const int out_in = layout == QS_W_OUT_IN, ldw = out_in ? n_in : n_out;
    /* dpre[N,n_in] = gelu'(pre) * (dout[N,n_out] @ W^T) */
    if (!lt_gemm<P>(0, !out_in, N, n_in, n_out, dout, n_out, w, ldw, dpre, n_in,
                    epilogue{CUBLASLT_EPILOGUE_DGELU, NULL, pre})) {
        gemm<P>(0, !out_in, N, n_in, n_out, 1.0f, dout, n_out, w, ldw, 0.0f, dpre, n_in);
        qs_cuda_gelu_grad_scale(dpre, pre, (size_t)N * n_in);
    }
    matmul_backward<P>(NULL, dw, dbias, dout, act, w, N, n_in, n_out, layout);
}

/* ---- grouped: an MoE layer's experts, each group its own rows and weight ----
 * Each product is one cublasGemmGroupedBatchedEx over the non-empty groups (each a group
 * of one problem, as their sizes differ), with the problems' pointers uploaded to
 * scratch; biases and their gradients are one kernel each, rows finding their group in
 * the uploaded offsets. Where this cuBLAS has no grouped form for the compute type
 * (CUBLAS_STATUS_NOT_SUPPORTED), every later grouped product goes one cublasGemmEx per
 * group instead, the same arithmetic. */

/* Row-major C[M,N] = alpha op(A) op(B) + beta C of one group, as gemm() takes it. */
struct gemm_problem {
    int M, N, K;
    const float *A, *B;
    float *C;
};

static bool grouped_unsupported[2]; /* per precision */

size_t qs_cuda_grouped_scratch(int groups) {
    return qs_cuda_room(((size_t)groups + 1) * sizeof(int)) + 2 * qs_cuda_room(3 * (size_t)groups * sizeof(void *));
}

/* Each group's product through gemm(), one cuBLAS call each: the fallback. */
template <qs_precision P, class Problem>
static void gemm_each(int ta, int tb, int lda, int ldb, int ldc, float alpha, float beta, int groups, Problem problem) {
    for (int g = 0; g < groups; g++) {
        const gemm_problem p = problem(g);
        gemm<P>(ta, tb, p.M, p.N, p.K, alpha, p.A, lda, p.B, ldb, beta, p.C, ldc);
    }
}

/* problem(g) gives group g's product (M = 0: none); ptrs: room for 3 * groups device
 * pointers. Every product shares the transposes, leading dimensions, alpha and beta. */
template <qs_precision P, class Problem>
static void gemm_groups(int ta, int tb, int lda, int ldb, int ldc, float alpha, float beta, int groups, void **ptrs,
                        Problem problem) {
    if (grouped_unsupported[P]) {
        gemm_each<P>(ta, tb, lda, ldb, ldc, alpha, beta, groups, problem);
        return;
    }
    size_t n = 0;
    for (int g = 0; g < groups; g++) {
        const gemm_problem p = problem(g);
        n += p.M > 0 && p.N > 0;
    }
    if (!n) return;
    /* host arrays of the n products, each in the column-major view gemm() maps it to */
    char *h = (char *)qs_cuda_host_scratch(n * (3 * sizeof(void *) + 2 * sizeof(cublasOperation_t) +
                                                7 * sizeof(int) + 2 * sizeof(float)));
    const void **abc = (const void **)h; /* the n A's, then the B's, then the C's */
    cublasOperation_t *opa = (cublasOperation_t *)(abc + 3 * n), *opb = opa + n;
    int *m = (int *)(opb + n), *nn = m + n, *k = nn + n, *la = k + n, *lb = la + n, *lc = lb + n, *one = lc + n;
    float *al = (float *)(one + n), *be = al + n;
    size_t i = 0;
    for (int g = 0; g < groups; g++) {
        const gemm_problem p = problem(g);
        if (p.M <= 0 || p.N <= 0) continue;
        opa[i] = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb[i] = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        m[i] = p.N, nn[i] = p.M, k[i] = p.K, la[i] = ldb, lb[i] = lda, lc[i] = ldc, one[i] = 1;
        al[i] = alpha, be[i] = beta;
        abc[i] = p.B, abc[n + i] = p.A, abc[2 * n + i] = p.C;
        i++;
    }
    qs_cuda_upload(ptrs, abc, 3 * n * sizeof(void *));
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        qs_cuda_blas(), opa, opb, m, nn, k, al, (const void *const *)ptrs, CUDA_R_32F, la,
        (const void *const *)(ptrs + n), CUDA_R_32F, lb, be, ptrs + 2 * n, CUDA_R_32F, lc, (int)n, one,
        compute_type(P));
    if (st == CUBLAS_STATUS_NOT_SUPPORTED) {
        grouped_unsupported[P] = true;
        gemm_each<P>(ta, tb, lda, ldb, ldc, alpha, beta, groups, problem);
        return;
    }
    qs_cublas_check(st, "cublasGemmGroupedBatchedEx", __FILE__, __LINE__);
}

/* The group of packed row r: the last g with off[g] <= r (empty groups share offsets). */
__device__ static inline int group_of(const int *off, int groups, int r) {
    int lo = 0, hi = groups - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (off[mid] <= r) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

__global__ static void add_group_bias_kernel(float *out, const float *bias, const int *off, int groups, int n_out) {
    QS_GRID_LOOP(i, (size_t)off[groups] * n_out) {
        const int r = (int)(i / n_out), j = (int)(i % n_out);
        out[i] += bias[(size_t)group_of(off, groups, r) * n_out + j];
    }
}

/* dbias[g, j] += sum of dout's column j over group g's rows: a block per (32 columns,
 * group), summed as qs_colsum's chunks are. */
__global__ static void group_colsum_kernel(float *dbias, const float *dout, const int *off, int n_out) {
    const int g = blockIdx.y, j = blockIdx.x * 32 + threadIdx.x;
    const float t = qs_colsum_rows(matrix_term{dout, n_out}, off[g], off[g + 1], j, n_out);
    if (threadIdx.y == 0 && j < n_out) dbias[(size_t)g * n_out + j] += t;
}

/* The grouped ops' scratch: the offsets, then two regions of problem pointers. */
struct grouped_scratch {
    int *off;
    void **ptrs[2];
};
static grouped_scratch grouped_scratch_take(const int *offsets, int groups) {
    char *at = (char *)qs_cuda_scratch(qs_cuda_grouped_scratch(groups));
    grouped_scratch s;
    s.off = (int *)qs_cuda_carve(&at, ((size_t)groups + 1) * sizeof(int));
    for (int i = 0; i < 2; i++) s.ptrs[i] = (void **)qs_cuda_carve(&at, 3 * (size_t)groups * sizeof(void *));
    qs_cuda_upload(s.off, offsets, ((size_t)groups + 1) * sizeof(int));
    return s;
}

/* QS_CUDA_GROUPED=quasar: the bf16 backend's grouped products take grouped_gemm.cu's
 * kernel instead of cuBLAS's grouped GEMM (issue 6 measures both). */
template <qs_precision P> static bool own_grouped(void) {
    const char *e = getenv("QS_CUDA_GROUPED");
    return P == QS_PRECISION_BF16 && e && !strcmp(e, "quasar");
}

extern "C" const char *qs_backend_cuda_grouped_gemm(qs_precision p) {
    const bool own = p == QS_PRECISION_BF16 ? own_grouped<QS_PRECISION_BF16>() : own_grouped<QS_PRECISION_FP32>();
    return own ? "quasar" : "cublas";
}

template <qs_precision P>
static void matmul_grouped_forward(float *out, const float *inp, const float *w, const float *bias, const int *offsets,
                                   int groups, int n_in, int n_out) {
    const grouped_scratch s = grouped_scratch_take(offsets, groups);
    if (own_grouped<P>()) { /* the bias in its epilogue */
        qs_cuda_grouped_forward_bf16(out, inp, w, bias, offsets, s.off, groups, n_in, n_out);
        return;
    }
    gemm_groups<P>(0, 0, n_in, n_out, n_out, 1.0f, 0.0f, groups, s.ptrs[0], [&](int g) {
        const size_t r0 = (size_t)offsets[g];
        return gemm_problem{offsets[g + 1] - offsets[g], n_out, n_in, inp + r0 * n_in, w + (size_t)g * n_in * n_out,
                            out + r0 * n_out};
    });
    if (bias)
        QS_LAUNCH_N(add_group_bias_kernel, (size_t)offsets[groups] * n_out, out, bias, s.off, groups, n_out);
}

template <qs_precision P>
static void matmul_grouped_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                                    const float *w, const int *offsets, int groups, int n_in, int n_out) {
    const grouped_scratch s = grouped_scratch_take(offsets, groups);
    const bool own = own_grouped<P>();
    if (own) qs_cuda_grouped_backward_bf16(dinp, dw, dout, inp, w, offsets, s.off, groups, n_in, n_out);
    if (dinp && !own) /* dinp_g[rows,n_in] += dout_g[rows,n_out] @ W_g^T */
        gemm_groups<P>(0, 1, n_out, n_out, n_in, 1.0f, 1.0f, groups, s.ptrs[0], [&](int g) {
            const size_t r0 = (size_t)offsets[g];
            return gemm_problem{offsets[g + 1] - offsets[g], n_in, n_out, dout + r0 * n_out,
                                w + (size_t)g * n_in * n_out, dinp + r0 * n_in};
        });
    if (dw && !own) /* dW_g[n_in,n_out] += inp_g^T @ dout_g, nothing for an empty group */
        gemm_groups<P>(1, 0, n_in, n_out, n_out, 1.0f, 1.0f, groups, s.ptrs[1], [&](int g) {
            const int rows = offsets[g + 1] - offsets[g];
            const size_t r0 = (size_t)offsets[g];
            return gemm_problem{rows > 0 ? n_in : 0, n_out, rows, inp + r0 * n_in, dout + r0 * n_out,
                                dw + (size_t)g * n_in * n_out};
        });
    if (dbias)
        QS_LAUNCH(group_colsum_kernel, dim3((n_out + 31) / 32, groups), dim3(32, QS_COLSUM_LANES), 0, dbias, dout, s.off,
                  n_out);
}

template <qs_precision P> static void set_matmul_ops(qs_ops *ops) {
    ops->matmul_forward = matmul_forward<P>;
    ops->matmul_backward = matmul_backward<P>;
    ops->matmul_acc = matmul_acc<P>;
    ops->matmul_gelu_forward = matmul_gelu_forward<P>;
    ops->matmul_backward_dgelu = matmul_backward_dgelu<P>;
    ops->matmul_grouped_forward = matmul_grouped_forward<P>;
    ops->matmul_grouped_backward = matmul_grouped_backward<P>;
}

void qs_cuda_set_matmul_ops(qs_ops *ops, qs_precision p) {
    if (p == QS_PRECISION_BF16) set_matmul_ops<QS_PRECISION_BF16>(ops);
    else set_matmul_ops<QS_PRECISION_FP32>(ops);
    qs_cuda_set_matmul_bf16_ops(ops, p);
}

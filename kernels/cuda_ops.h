/* CUDA backend internals: one qs_cuda_<op> per qs_ops field (same signature, same
 * semantics as documented in quasar/ops.h, and the same numbers as csrc/cpu up to
 * float rounding), plus the host-side helpers the op files share.
 *
 * Every kernel and copy runs on the legacy default stream, in issue order: ops need no
 * events, a download after an op sees its result, and the NCCL comm layer's blocking
 * streams order themselves against it. */
#ifndef QUASAR_CUDA_OPS_H
#define QUASAR_CUDA_OPS_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "quasar/backend.h"
#include "quasar/error.h"
}

/* ---- errors ----
 * A failing CUDA or cuBLAS call becomes a qs_error naming the call. Ops return void, so
 * inside an op the failure is then fatal (message on stderr, abort), as the CPU backend
 * treats running out of scratch: training on after a failed kernel would give wrong
 * gradients silently. Allocation and set-up report it instead (qs_cuda_failed). */
void qs_cuda_check(cudaError_t err, const char *call, const char *file, int line);
void qs_cublas_check(cublasStatus_t st, const char *call, const char *file, int line);
/* Records the failure as a qs_error and returns -1; 0 on success. */
int qs_cuda_failed(cudaError_t err, const char *call);

#define QS_CUDA(call) qs_cuda_check((call), #call, __FILE__, __LINE__)
#define QS_CUBLAS(call) qs_cublas_check((call), #call, __FILE__, __LINE__)

/* Threads per block of the element-wise kernels, and their grid for n elements (the
 * kernels loop, so the grid may be capped). */
#define QS_THREADS 256
static inline unsigned qs_cuda_blocks(size_t n, unsigned threads) {
    const size_t b = (n + threads - 1) / threads;
    return b > 1048576 ? 1048576u : (unsigned)b;
}

/* The two pieces of CUDA syntax the kernels use, here so that an emulated runtime
 * (tests/emu/include/cuda_runtime.h, which defines them first) can run the kernels on
 * the host: a launch, and the block's dynamic shared memory. */
#ifndef QS_LAUNCH_KERNEL
#define QS_LAUNCH_KERNEL(kernel, grid, block, smem, ...) kernel<<<(grid), (block), (smem)>>>(__VA_ARGS__)
#define QS_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

/* Launches kernel over grid x block (with smem bytes of dynamic shared memory) and checks
 * the launch. An empty grid (a zero size) launches nothing, so ops need no size guards. */
#define QS_LAUNCH(kernel, grid, block, smem, ...)                                 \
    do {                                                                          \
        const dim3 qs_grid_ = (grid);                                             \
        if (qs_grid_.x && qs_grid_.y && qs_grid_.z) {                             \
            QS_LAUNCH_KERNEL(kernel, qs_grid_, (block), (smem), __VA_ARGS__);     \
            qs_cuda_check(cudaGetLastError(), #kernel, __FILE__, __LINE__);       \
        }                                                                         \
    } while (0)

/* An element-wise kernel over n items: QS_THREADS a block, qs_cuda_blocks of them. */
#define QS_LAUNCH_N(kernel, n, ...) QS_LAUNCH(kernel, qs_cuda_blocks((n), QS_THREADS), QS_THREADS, 0, __VA_ARGS__)
/* A kernel with one warp per row: row blockIdx.x * QS_WARPS + threadIdx.x / 32. */
#define QS_WARPS (QS_THREADS / 32)
#define QS_LAUNCH_ROWS(kernel, rows, ...) \
    QS_LAUNCH(kernel, ((rows) + QS_WARPS - 1) / QS_WARPS, QS_THREADS, 0, __VA_ARGS__)

/* ---- memory ---- */
/* Device scratch for one op's temporaries: grow-only, valid until the next call. Ops run
 * in stream order, so the next op may take it over while this one's kernels are still
 * queued. An op takes all its regions from one call (qs_cuda_carve). */
void *qs_cuda_scratch(size_t bytes);
/* The scratch the ops that take any need at most (with the backend's reserve hook, which
 * takes their maximum up front): the embedding backward's sort of N rows, the MoE
 * router over N rows and E experts, the grouped expert GEMMs, the gradient norm, the
 * bf16 attention's staged heads (and dk/dv's split copies). Decoding's (kv_cache.cu) is
 * taken at the first decode step, outside training. */
size_t qs_cuda_embed_scratch(int N);
size_t qs_cuda_moe_scratch(int N, int E);
size_t qs_cuda_grouped_scratch(int groups);
/* grouped_gemm.cu: matmul_grouped_forward and _backward's products (dbias aside) with
 * bf16 products and fp32 accumulation; offsets on the host, off_dev its device copy. */
void qs_cuda_grouped_forward_bf16(float *out, const float *inp, const float *w, const float *bias, const int *offsets,
                                  const int *off_dev, int groups, int n_in, int n_out);
void qs_cuda_grouped_backward_bf16(float *dinp, float *dw, const float *dout, const float *inp, const float *w,
                                   const int *offsets, const int *off_dev, int groups, int n_in, int n_out);
size_t qs_cuda_sumsq_scratch(void);
size_t qs_cuda_attention_bf16_scratch(const qs_op_sizes *s);
/* The bytes a region takes: whole 256-byte units, so every region is aligned. */
static inline size_t qs_cuda_room(size_t bytes) { return (bytes + 255) & ~(size_t)255; }
/* The next region of `bytes` from *at, advancing *at. */
static inline void *qs_cuda_carve(char **at, size_t bytes) {
    void *p = *at;
    *at += qs_cuda_room(bytes);
    return p;
}
/* Host scratch for ops that do bookkeeping on the host (aborts when out of memory). */
void *qs_cuda_host_scratch(size_t bytes);
void qs_cuda_upload(void *dst, const void *host_src, size_t bytes);
void qs_cuda_download(void *host_dst, const void *src, size_t bytes);

cublasHandle_t qs_cuda_blas(void);
cublasLtHandle_t qs_cuda_blas_lt(void);
/* The workspace cuBLAS and cuBLASLt share (their calls take turns on the one stream);
 * NULL and 0 before the memory plan reserved it. */
void *qs_cuda_blas_workspace(size_t *bytes);
/* The device's multiprocessors, for kernels that size their grid to fill it. */
int qs_cuda_sm_count(void);

/* ---- the ops ---- */

/* embed.cu */
void qs_cuda_embed_forward(float *out, const int *tok, const int *pos, const float *wte, const float *wpe, int N,
                           int C);
void qs_cuda_embed_backward(float *dwte, float *dwpe, const float *dout, const int *tok, const int *pos, int N,
                            int C);

/* layernorm.cu */
void qs_cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                               const float *b, int N, int C);
void qs_cuda_residual_layernorm_forward(float *res, float *out, float *mean, float *rstd, const float *inp,
                                        const float *branch, const float *w, const float *b, int N, int C);
void qs_cuda_layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                const float *w, const float *mean, const float *rstd, int N, int C);

/* matmul.cu: sets ops' matmul_forward, matmul_backward, matmul_acc, the GELU-fused pair,
 * the two grouped matmuls and the bf16-weight pair to the versions whose products run in
 * precision p. qs_cuda_gemm is the row-major C[M,N] = alpha op(A) op(B) + beta C they
 * share (op(A) [M,K], A stored [K,M] when ta; likewise B; ld* are row strides), and
 * qs_cuda_add_bias adds bias[n_out] to each of out's N rows. */
void qs_cuda_set_matmul_ops(qs_ops *ops, qs_precision p);
void qs_cuda_gemm(qs_precision p, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                  const float *B, int ldb, float beta, float *C, int ldc);
void qs_cuda_add_bias(float *out, const float *bias, int N, int n_out);
/* matmul_bf16.cu: ops' matmul_pack_bf16 and matmul_forward_bf16 (prefill's in precision p) */
void qs_cuda_set_matmul_bf16_ops(qs_ops *ops, qs_precision p);

/* kv_cache.cu */
void qs_cuda_kv_cache_fill(float *kcache, float *vcache, const float *qkv, int B, int T, int C, int NH, int NKV,
                           int max_T);
void qs_cuda_attention_decode(float *out, float *kcache, float *vcache, const float *qkv, int B, int C, int NH, int NKV,
                              const int *slots, const int *pos, int max_T);

/* attention_block.cu */
void qs_cuda_attention_block_forward(float *out, float *lse, const float *q, const float *kv,
                                     const qs_attn_block *blk);
void qs_cuda_attention_merge(float *out, float *lse, const float *out_b, const float *lse_b,
                             const qs_attn_block *blk);
void qs_cuda_attention_delta(float *delta, const float *dout, const float *out, int B, int T, int C, int NH);
void qs_cuda_attention_block_backward(float *dq, float *dkv, const float *dout, const float *q, const float *kv,
                                      const float *lse, const float *delta, const qs_attn_block *blk);
/* attention_block_bf16.cu: the same two ops on the tensor cores (bf16 products), the
 * backend "cuda-bf16"'s; heads over 128 wide take the fp32 kernels. */
void qs_cuda_attention_block_forward_bf16(float *out, float *lse, const float *q, const float *kv,
                                          const qs_attn_block *blk);
void qs_cuda_attention_block_backward_bf16(float *dq, float *dkv, const float *dout, const float *q, const float *kv,
                                           const float *lse, const float *delta, const qs_attn_block *blk);
void qs_cuda_kv_pack_forward(float *kv, const float *qkv, int B, int T, int C, int Ckv);
void qs_cuda_kv_pack_backward(float *dqkv, const float *dkv, int B, int T, int C, int Ckv);

/* activation.cu */
void qs_cuda_gelu_forward(float *out, const float *inp, size_t n);
void qs_cuda_gelu_backward(float *dinp, const float *inp, const float *dout, size_t n);
/* d[i] = d[i] * gelu'(pre[i]): matmul_backward_dgelu's GELU when it is not fused */
void qs_cuda_gelu_grad_scale(float *d, const float *pre, size_t n);
void qs_cuda_relu_forward(float *out, const float *inp, size_t n);
void qs_cuda_relu_backward(float *dinp, const float *inp, const float *dout, size_t n);
void qs_cuda_dropout_forward(float *out, const float *inp, float p, uint64_t seed, uint64_t stream,
                             const int64_t *row_ids, size_t N, size_t W);
void qs_cuda_dropout_backward(float *dinp, const float *dout, float p, uint64_t seed, uint64_t stream,
                              const int64_t *row_ids, size_t N, size_t W);

/* xent.cu */
void qs_cuda_xent_forward(float *losses, const float *logits, const int *targets, int N, int V);
void qs_cuda_xent_backward(float *logits, const float *losses, const int *targets, float dloss, int N, int V);

/* moe.cu */
void qs_cuda_moe_route_forward(qs_moe_load *load, int *idx, float *gate, int *slot, float *h, const float *clean,
                               const float *noise_logits, const qs_moe_router *r);
void qs_cuda_moe_route_backward(float *dclean, float *dnoise, const float *dgate, const int *idx, const float *gate,
                                const float *x, const float *noise_logits, const qs_moe_load *load,
                                float balance_coef, float z_coef, const qs_moe_router *r);
void qs_cuda_moe_dispatch_forward(float *xe, const float *x, const int *slot, int N, int K, int C);
void qs_cuda_moe_dispatch_backward(float *dx, const float *dxe, const int *slot, int N, int K, int C);
void qs_cuda_moe_combine_forward(float *y, const float *ye, const float *gate, const int *slot, int N, int K, int C);
void qs_cuda_moe_combine_backward(float *dye, float *dgate, const float *dy, const float *ye, const float *gate,
                                  const int *slot, int N, int K, int C);

/* quadconv.cu */
void qs_cuda_quadconv_forward(float *y, float *fa, float *fb, const float *x, const float *w, const float *bias,
                              const qs_conv_shape *s);
void qs_cuda_quadconv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w,
                               const float *fa, const float *fb, const qs_conv_shape *s);

/* spatial.cu */
void qs_cuda_space_to_depth_forward(float *out, const float *inp, int B, int H, int W, int C, int p);
void qs_cuda_space_to_depth_backward(float *dinp, const float *dout, int B, int H, int W, int C, int p);
void qs_cuda_avgpool_forward(float *out, const float *inp, int B, int N, int C);
void qs_cuda_avgpool_backward(float *dinp, const float *dout, int B, int N, int C);

/* residual.cu */
void qs_cuda_layer_scale_forward(float *out, const float *resid, const float *inp, const float *gamma, float p,
                                 uint64_t seed, uint64_t stream, uint64_t sample0, int B, int N, int C);
void qs_cuda_layer_scale_backward(float *dinp, float *dgamma, const float *dout, const float *inp,
                                  const float *gamma, float p, uint64_t seed, uint64_t stream, uint64_t sample0,
                                  int B, int N, int C);

/* optim.cu */
double qs_cuda_sumsq(const float *g, size_t n);
void qs_cuda_adamw_update(float *p, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                          float beta2, float eps, float wd, int t, float grad_scale);

#endif

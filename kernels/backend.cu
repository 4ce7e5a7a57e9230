/* The CUDA backend: device memory, error checks, op scratch, the cuBLAS handle and the
 * op table. One device (the current one, 0 unless a launcher chose another) and the
 * legacy default stream (see cuda_ops.h). */
#include <stdio.h>
#include <stdlib.h>

#include "cuda_ops.h"

void qs_cuda_check(cudaError_t err, const char *call, const char *file, int line) {
    if (err == cudaSuccess) return;
    qs_error("%s failed: %s (%s:%d)", call, cudaGetErrorString(err), file, line);
    fprintf(stderr, "quasar: %s\n", qs_error_last());
    abort();
}

void qs_cublas_check(cublasStatus_t st, const char *call, const char *file, int line) {
    if (st == CUBLAS_STATUS_SUCCESS) return;
    qs_error("%s failed: %s (%s:%d)", call, cublasGetStatusString(st), file, line);
    fprintf(stderr, "quasar: %s\n", qs_error_last());
    abort();
}

int qs_cuda_failed(cudaError_t err, const char *call) {
    if (err == cudaSuccess) return 0;
    cudaGetLastError(); /* a failed allocation is not sticky: clear it, or the next launch check reports it */
    return qs_error("%s failed: %s", call, cudaGetErrorString(err));
}

/* ---- memory ---- */

static void *cuda_alloc(size_t bytes) {
    void *p = NULL;
    /* cudaMalloc(0) returns NULL, which callers would read as failure, hence the 1 */
    if (qs_cuda_failed(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc")) {
        qs_error("out of GPU memory allocating %zu bytes (%s)", bytes, qs_error_last());
        return NULL;
    }
    if (qs_cuda_failed(cudaMemset(p, 0, bytes), "cudaMemset")) {
        cudaFree(p);
        return NULL;
    }
    return p;
}

static void cuda_free(void *p) { QS_CUDA(cudaFree(p)); }

static void cuda_zero(void *p, size_t bytes) { QS_CUDA(cudaMemsetAsync(p, 0, bytes, 0)); }

void qs_cuda_upload(void *dst, const void *host_src, size_t bytes) {
    QS_CUDA(cudaMemcpy(dst, host_src, bytes, cudaMemcpyHostToDevice));
}

void qs_cuda_download(void *host_dst, const void *src, size_t bytes) {
    QS_CUDA(cudaMemcpy(host_dst, src, bytes, cudaMemcpyDeviceToHost));
}

static void cuda_copy(void *dst, const void *src, size_t bytes) {
    QS_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
}

/* ---- timing and the device's description ---- */

static cudaEvent_t timing_events[2]; /* made at init */

static double cuda_time_ms(void (*run)(void *arg), void *arg) {
    QS_CUDA(cudaEventRecord(timing_events[0], 0));
    run(arg);
    QS_CUDA(cudaEventRecord(timing_events[1], 0));
    QS_CUDA(cudaEventSynchronize(timing_events[1]));
    float ms = 0.0f;
    QS_CUDA(cudaEventElapsedTime(&ms, timing_events[0], timing_events[1]));
    return ms;
}

static void cuda_describe(qs_device_info *info) {
    int dev = 0;
    cudaDeviceProp prop;
    QS_CUDA(cudaGetDevice(&dev));
    QS_CUDA(cudaGetDeviceProperties(&prop, dev));
    snprintf(info->name, sizeof info->name, "%s", prop.name);
    info->cache_bytes = (size_t)prop.l2CacheSize;
}

/* ---- op scratch ---- */

static void *scratch;
static size_t scratch_cap;

/* Grows the scratch to at least `bytes` (`to` when that is more); -1 with qs_error when
 * the device is out of memory. cudaFree waits for the device, so no queued kernel still
 * reads the old buffer. */
static int grow_scratch(size_t bytes, size_t to) {
    if (bytes <= scratch_cap) return 0;
    QS_CUDA(cudaFree(scratch));
    scratch = NULL;
    scratch_cap = 0;
    if (to < bytes) to = bytes;
    if (qs_cuda_failed(cudaMalloc(&scratch, to), "cudaMalloc"))
        return qs_error("out of GPU memory reserving %zu bytes of op scratch (%s)", to, qs_error_last());
    scratch_cap = to;
    return 0;
}

void *qs_cuda_scratch(size_t bytes) {
    /* after a reserve this never grows in training; doubling keeps any other growth rare */
    if (grow_scratch(bytes, 2 * scratch_cap)) {
        fprintf(stderr, "quasar: %s\n", qs_error_last());
        abort();
    }
    return scratch;
}

void *qs_cuda_host_scratch(size_t bytes) {
    static void *buf;
    static size_t cap;
    if (bytes > cap) {
        free(buf);
        cap = bytes > 2 * cap ? bytes : 2 * cap;
        buf = malloc(cap);
        if (!buf) {
            fprintf(stderr, "quasar: out of memory allocating %zu bytes of CUDA op host scratch\n", cap);
            abort();
        }
    }
    return buf;
}

/* ---- cuBLAS ---- */

static cublasHandle_t blas;
static cublasLtHandle_t blas_lt;
/* cuBLAS's workspace, given to it up front so that it allocates none of its own (and to
 * cuBLASLt, call by call):
 * NVIDIA's recommended size, 32 MiB on Hopper and 4 MiB before (set at init) */
static void *blas_workspace;
static size_t blas_workspace_bytes;

cublasHandle_t qs_cuda_blas(void) { return blas; }
cublasLtHandle_t qs_cuda_blas_lt(void) { return blas_lt; }

static int sm_count;
int qs_cuda_sm_count(void) { return sm_count; }

void *qs_cuda_blas_workspace(size_t *bytes) {
    *bytes = blas_workspace ? blas_workspace_bytes : 0;
    return blas_workspace;
}

/* ---- the memory plan's hooks ---- */

static int cuda_mem_info(size_t *free_bytes, size_t *total_bytes) {
    return qs_cuda_failed(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo");
}

static size_t larger(size_t a, size_t b) { return a > b ? a : b; }

/* The most any op takes at once: ops take the scratch one at a time. Only the bf16
 * attention stages its inputs. */
template <qs_precision P> static size_t scratch_need(const qs_op_sizes *s) {
    const size_t moe =
        s->experts > 0 ? larger(qs_cuda_moe_scratch(s->rows, s->experts), qs_cuda_grouped_scratch(s->experts)) : 0;
    const size_t attention = P == QS_PRECISION_BF16 ? qs_cuda_attention_bf16_scratch(s) : 0;
    return larger(larger(larger(qs_cuda_sumsq_scratch(), qs_cuda_embed_scratch(s->rows)), moe), attention);
}

template <qs_precision P> static size_t cuda_workspace_bytes(const qs_op_sizes *s) {
    return blas_workspace_bytes + scratch_need<P>(s);
}

template <qs_precision P> static int cuda_reserve(const qs_op_sizes *s) {
    if (!blas_workspace) {
        if (qs_cuda_failed(cudaMalloc(&blas_workspace, blas_workspace_bytes), "cudaMalloc"))
            return qs_error("out of GPU memory reserving cuBLAS's %zu-byte workspace (%s)", blas_workspace_bytes,
                            qs_error_last());
        cublasStatus_t st = cublasSetWorkspace(blas, blas_workspace, blas_workspace_bytes);
        if (st != CUBLAS_STATUS_SUCCESS) return qs_error("cublasSetWorkspace failed: %s", cublasGetStatusString(st));
    }
    return grow_scratch(scratch_need<P>(s), 0);
}

/* ---- the backend ---- */

static const qs_ops cuda_ops = {
    .embed_forward = qs_cuda_embed_forward,
    .embed_backward = qs_cuda_embed_backward,
    .layernorm_forward = qs_cuda_layernorm_forward,
    .layernorm_backward = qs_cuda_layernorm_backward,
    .residual_layernorm_forward = qs_cuda_residual_layernorm_forward,
    .matmul_forward = NULL, /* these nine per precision, by qs_cuda_set_matmul_ops */
    .matmul_backward = NULL,
    .matmul_grouped_forward = NULL,
    .matmul_grouped_backward = NULL,
    .matmul_gelu_forward = NULL,
    .matmul_backward_dgelu = NULL,
    .matmul_acc = NULL,
    .matmul_pack_bf16 = NULL,
    .matmul_forward_bf16 = NULL,
    .attention_block_forward = qs_cuda_attention_block_forward,
    .attention_merge = qs_cuda_attention_merge,
    .attention_delta = qs_cuda_attention_delta,
    .attention_block_backward = qs_cuda_attention_block_backward,
    .kv_pack_forward = qs_cuda_kv_pack_forward,
    .kv_pack_backward = qs_cuda_kv_pack_backward,
    .kv_cache_fill = qs_cuda_kv_cache_fill,
    .attention_decode = qs_cuda_attention_decode,
    .gelu_forward = qs_cuda_gelu_forward,
    .gelu_backward = qs_cuda_gelu_backward,
    .relu_forward = qs_cuda_relu_forward,
    .relu_backward = qs_cuda_relu_backward,
    .dropout_forward = qs_cuda_dropout_forward,
    .dropout_backward = qs_cuda_dropout_backward,
    .xent_forward = qs_cuda_xent_forward,
    .xent_backward = qs_cuda_xent_backward,
    .moe_route_forward = qs_cuda_moe_route_forward,
    .moe_route_backward = qs_cuda_moe_route_backward,
    .moe_dispatch_forward = qs_cuda_moe_dispatch_forward,
    .moe_dispatch_backward = qs_cuda_moe_dispatch_backward,
    .moe_combine_forward = qs_cuda_moe_combine_forward,
    .moe_combine_backward = qs_cuda_moe_combine_backward,
    .quadconv_forward = qs_cuda_quadconv_forward,
    .quadconv_backward = qs_cuda_quadconv_backward,
    .space_to_depth_forward = qs_cuda_space_to_depth_forward,
    .space_to_depth_backward = qs_cuda_space_to_depth_backward,
    .avgpool_forward = qs_cuda_avgpool_forward,
    .avgpool_backward = qs_cuda_avgpool_backward,
    .layer_scale_forward = qs_cuda_layer_scale_forward,
    .layer_scale_backward = qs_cuda_layer_scale_backward,
    .sumsq = qs_cuda_sumsq,
    .adamw_update = qs_cuda_adamw_update,
};

static qs_ops ops_by_precision[2];          /* [qs_precision] */
static qs_backend backend_by_precision[2];
static const char *const backend_names[2] = {"cuda", "cuda-bf16"};

/* The device context and the cuBLAS handle; -1 with qs_error set when there is no
 * usable device. */
static int init(void) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0) {
        cudaGetLastError();
        return qs_error("no CUDA device is visible (cudaGetDeviceCount: %s)",
                        err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    }
    int dev = 0, major = 0;
    if (qs_cuda_failed(cudaFree(0), "creating the CUDA context (cudaFree(0))") ||
        qs_cuda_failed(cudaGetDevice(&dev), "cudaGetDevice") ||
        qs_cuda_failed(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute") ||
        qs_cuda_failed(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute"))
        return -1;
    blas_workspace_bytes = (size_t)(major >= 9 ? 32 : 4) << 20;
    for (int i = 0; i < 2; i++)
        if (qs_cuda_failed(cudaEventCreate(&timing_events[i]), "cudaEventCreate")) return -1;
    cublasStatus_t st = cublasCreate(&blas);
    if (st != CUBLAS_STATUS_SUCCESS) return qs_error("cublasCreate failed: %s", cublasGetStatusString(st));
    /* plain fp32 FMA: no TF32 tensor-core rounding, so GEMMs match the CPU to fp32 rounding */
    st = cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH);
    if (st != CUBLAS_STATUS_SUCCESS) return qs_error("cublasSetMathMode failed: %s", cublasGetStatusString(st));
    st = cublasLtCreate(&blas_lt);
    if (st != CUBLAS_STATUS_SUCCESS) return qs_error("cublasLtCreate failed: %s", cublasGetStatusString(st));
    for (int p = 0; p < 2; p++) {
        ops_by_precision[p] = cuda_ops;
        qs_cuda_set_matmul_ops(&ops_by_precision[p], (qs_precision)p);
        if (p == QS_PRECISION_BF16) {
            ops_by_precision[p].attention_block_forward = qs_cuda_attention_block_forward_bf16;
            ops_by_precision[p].attention_block_backward = qs_cuda_attention_block_backward_bf16;
        }
        backend_by_precision[p] = qs_backend{
            .name = backend_names[p],
            .alloc = cuda_alloc,
            .free = cuda_free,
            .zero = cuda_zero,
            .upload = qs_cuda_upload,
            .download = qs_cuda_download,
            .copy = cuda_copy,
            .mem_info = cuda_mem_info,
            .workspace_bytes = p == QS_PRECISION_BF16 ? cuda_workspace_bytes<QS_PRECISION_BF16>
                                                      : cuda_workspace_bytes<QS_PRECISION_FP32>,
            .reserve = p == QS_PRECISION_BF16 ? cuda_reserve<QS_PRECISION_BF16> : cuda_reserve<QS_PRECISION_FP32>,
            .time_ms = cuda_time_ms,
            .describe = cuda_describe,
            .ops = &ops_by_precision[p],
            .max_head_size = 256, /* attention_block.cu's widest tile */
        };
    }
    return 0;
}

extern "C" const qs_backend *qs_backend_cuda(qs_precision precision) {
    static int state; /* 0 not tried, 1 ready, -1 failed (why) */
    static char why[512];
    if (state == 0) {
        state = init() ? -1 : 1;
        if (state < 0) snprintf(why, sizeof why, "%s", qs_error_last());
    }
    if (state < 0) {
        qs_error("%s", why);
        return NULL;
    }
    return &backend_by_precision[precision == QS_PRECISION_BF16];
}

/* A backend = where memory lives + the op table that computes on it. */
#ifndef QUASAR_BACKEND_H
#define QUASAR_BACKEND_H

#include <stddef.h>

#include "quasar/config.h"
#include "quasar/ops.h"

/* The sizes a model's ops run at, for the scratch a backend reserves up front. */
typedef struct qs_op_sizes {
    int rows;    /* token rows of one forward (micro-batch x sequence) */
    int experts; /* MoE experts; 0: dense */
    int heads, kv_heads, head_size; /* attention's (query heads 0: no attention) */
} qs_op_sizes;

/* What a backend computes on, for benchmark records. */
typedef struct qs_device_info {
    char name[256];     /* "cpu-<n>core (<model name>; OpenBLAS <kernels>)", or the GPU's own name */
    size_t cache_bytes; /* the last-level cache (a CPU's L3, a GPU's L2); 0: unknown */
} qs_device_info;

typedef struct qs_backend {
    const char *name; /* "cpu", "cuda" */
    /* Zero-filled allocation; NULL (with qs_error set) on failure. */
    void *(*alloc)(size_t bytes);
    void (*free)(void *p);
    void (*zero)(void *p, size_t bytes);
    /* Host <-> backend copies. */
    void (*upload)(void *dst, const void *host_src, size_t bytes);
    void (*download)(void *host_dst, const void *src, size_t bytes);
    /* Within backend memory. */
    void (*copy)(void *dst, const void *src, size_t bytes);
    /* Free and total bytes of the memory it allocates from; -1 when it cannot tell. */
    int (*mem_info)(size_t *free_bytes, size_t *total_bytes);
    /* The scratch its ops take at these sizes (0: they take none), and reserving it
     * now, so that no op allocates inside the step loop. */
    size_t (*workspace_bytes)(const qs_op_sizes *s);
    int (*reserve)(const qs_op_sizes *s);
    /* Milliseconds the work that run(arg) issues takes: the wall clock on the CPU, events
     * around it on the device (which count any time the device waits for the host). */
    double (*time_ms)(void (*run)(void *arg), void *arg);
    void (*describe)(qs_device_info *info);
    const qs_ops *ops;
    int max_head_size; /* the largest attention head size its attention ops take; 0: any */
} qs_backend;

/* The fp32 CPU reference backend (always present). */
const qs_backend *qs_backend_cpu(void);
/* Called first in main, before any thread or MPI starts: when OpenBLAS loaded kernels
 * older than the CPU's instruction set (its generic ones for a CPU model it does not
 * know) and OPENBLAS_CORETYPE is unset, re-executes the program with OPENBLAS_CORETYPE
 * naming the widest kernels the CPU runs (csrc/cpu/blas.c). Returns when none is needed,
 * or when the re-exec failed (then with a one-line warning). */
void qs_backend_cpu_pick_blas(char **argv);
/* The CUDA backend (kernels/) on the current device, its matrix products in `precision`
 * (QS_PRECISION_BF16: cuBLAS may round both operands to bf16 for the tensor cores and
 * accumulates in fp32; everything else is the same fp32 code); NULL with a one-line
 * qs_error when this build has no CUDA or no device is visible. */
const qs_backend *qs_backend_cuda(qs_precision precision);
/* How many linear-layer products the CUDA backend has done unfused because cuBLASLt had
 * no algorithm for their epilogue (0 without CUDA): tests check that fusion happens. */
long qs_backend_cuda_unfused(void);
/* Whose kernel runs the CUDA backend's grouped products (MoE experts) in `precision`:
 * "quasar" (kernels/grouped_gemm.cu, QS_CUDA_GROUPED=quasar with bf16 products) or
 * "cublas". */
const char *qs_backend_cuda_grouped_gemm(qs_precision precision);

#endif

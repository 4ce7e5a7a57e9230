/* The CPU backend: host memory and the op table. */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cpu_ops.h"
#include "quasar/backend.h"
#include "quasar/clock.h"
#include "quasar/error.h"

/* 64-byte alignment: whole cache lines and any SIMD width. calloc rather than memset:
 * a large block comes as fresh zero pages that become resident only when written, so
 * memory planned for the largest shape costs what a run touches (a short prompt's rows
 * of the activations). calloc's own pointer is kept just below the aligned one. */
#define CPU_ALIGN 64

static void *cpu_alloc(size_t bytes) {
    char *base = bytes <= SIZE_MAX - CPU_ALIGN ? calloc(1, bytes + CPU_ALIGN) : NULL;
    if (!base) {
        qs_error("out of memory allocating %zu bytes", bytes);
        return NULL;
    }
    /* calloc aligns to at least 16 bytes, so the gap below p holds a pointer */
    char *p = (char *)(((uintptr_t)base + CPU_ALIGN) & ~(uintptr_t)(CPU_ALIGN - 1));
    ((void **)p)[-1] = base;
    return p;
}

static void cpu_free(void *p) {
    if (p) free(((void **)p)[-1]);
}

static void cpu_zero(void *p, size_t bytes) { memset(p, 0, bytes); }

/* Large copies are split over the threads: one core cannot saturate the memory bus. */
static void cpu_copy(void *dst, const void *src, size_t bytes) {
    const int nt = bytes >= ((size_t)1 << 20) ? omp_get_max_threads() : 1;
    const size_t chunk = (bytes + (size_t)nt - 1) / (size_t)nt;
#pragma omp parallel for schedule(static) if (nt > 1)
    for (int t = 0; t < nt; t++) {
        const size_t s = (size_t)t * chunk;
        if (s < bytes) memcpy((char *)dst + s, (const char *)src + s, bytes - s < chunk ? bytes - s : chunk);
    }
}

/* What the kernel could hand out without swapping (MemAvailable), of MemTotal. */
static int cpu_mem_info(size_t *free_bytes, size_t *total_bytes) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[128];
    unsigned long long kib, avail = 0, total = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) avail = kib;
        else if (sscanf(line, "MemTotal: %llu kB", &kib) == 1) total = kib;
    }
    fclose(f);
    if (!avail || !total) return -1;
    *free_bytes = (size_t)(avail * 1024);
    *total_bytes = (size_t)(total * 1024);
    return 0;
}

static double cpu_time_ms(void (*run)(void *arg), void *arg) {
    const double t0 = qs_clock_now();
    run(arg);
    return (qs_clock_now() - t0) * 1e3;
}

static void cpu_describe(qs_device_info *info) {
    char model[128] = "unknown CPU", line[256];
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f)) {
        const char *colon = strchr(line, ':');
        if (colon && !strncmp(line, "model name", 10)) {
            snprintf(model, sizeof model, "%s", colon + 2);
            model[strcspn(model, "\n")] = 0;
            break;
        }
    }
    if (f) fclose(f);
    snprintf(info->name, sizeof info->name, "cpu-%ldcore (%s; OpenBLAS %s)", sysconf(_SC_NPROCESSORS_ONLN), model,
             qs_cpu_blas_core());
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    info->cache_bytes = l3 > 0 ? (size_t)l3 : 0;
}

/* CPU ops take their temporaries per call (qs_cpu_scratch): nothing to reserve. */
static size_t cpu_workspace_bytes(const qs_op_sizes *s) {
    (void)s;
    return 0;
}

static int cpu_reserve(const qs_op_sizes *s) {
    (void)s;
    return 0;
}

void *qs_cpu_scratch(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "quasar: out of memory allocating %zu bytes of CPU op scratch\n", bytes);
        abort();
    }
    return p;
}

static const qs_ops cpu_ops = {
    .embed_forward = qs_cpu_embed_forward,
    .embed_backward = qs_cpu_embed_backward,
    .layernorm_forward = qs_cpu_layernorm_forward,
    .layernorm_backward = qs_cpu_layernorm_backward,
    .residual_layernorm_forward = qs_cpu_residual_layernorm_forward,
    .matmul_forward = qs_cpu_matmul_forward,
    .matmul_backward = qs_cpu_matmul_backward,
    .matmul_acc = qs_cpu_matmul_acc,
    .matmul_pack_bf16 = qs_cpu_matmul_pack_bf16,
    .matmul_forward_bf16 = qs_cpu_matmul_forward_bf16,
    .matmul_gelu_forward = qs_cpu_matmul_gelu_forward,
    .matmul_backward_dgelu = qs_cpu_matmul_backward_dgelu,
    .matmul_grouped_forward = qs_cpu_matmul_grouped_forward,
    .matmul_grouped_backward = qs_cpu_matmul_grouped_backward,
    .attention_block_forward = qs_cpu_attention_block_forward,
    .attention_merge = qs_cpu_attention_merge,
    .attention_delta = qs_cpu_attention_delta,
    .attention_block_backward = qs_cpu_attention_block_backward,
    .kv_pack_forward = qs_cpu_kv_pack_forward,
    .kv_pack_backward = qs_cpu_kv_pack_backward,
    .kv_cache_fill = qs_cpu_kv_cache_fill,
    .attention_decode = qs_cpu_attention_decode,
    .gelu_forward = qs_cpu_gelu_forward,
    .gelu_backward = qs_cpu_gelu_backward,
    .relu_forward = qs_cpu_relu_forward,
    .relu_backward = qs_cpu_relu_backward,
    .dropout_forward = qs_cpu_dropout_forward,
    .dropout_backward = qs_cpu_dropout_backward,
    .xent_forward = qs_cpu_xent_forward,
    .xent_backward = qs_cpu_xent_backward,
    .moe_route_forward = qs_cpu_moe_route_forward,
    .moe_route_backward = qs_cpu_moe_route_backward,
    .moe_dispatch_forward = qs_cpu_moe_dispatch_forward,
    .moe_dispatch_backward = qs_cpu_moe_dispatch_backward,
    .moe_combine_forward = qs_cpu_moe_combine_forward,
    .moe_combine_backward = qs_cpu_moe_combine_backward,
    .quadconv_forward = qs_cpu_quadconv_forward,
    .quadconv_backward = qs_cpu_quadconv_backward,
    .space_to_depth_forward = qs_cpu_space_to_depth_forward,
    .space_to_depth_backward = qs_cpu_space_to_depth_backward,
    .avgpool_forward = qs_cpu_avgpool_forward,
    .avgpool_backward = qs_cpu_avgpool_backward,
    .layer_scale_forward = qs_cpu_layer_scale_forward,
    .layer_scale_backward = qs_cpu_layer_scale_backward,
    .sumsq = qs_cpu_sumsq,
    .adamw_update = qs_cpu_adamw_update,
};

static const qs_backend cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .zero = cpu_zero,
    .upload = cpu_copy,
    .download = cpu_copy,
    .copy = cpu_copy,
    .mem_info = cpu_mem_info,
    .workspace_bytes = cpu_workspace_bytes,
    .reserve = cpu_reserve,
    .time_ms = cpu_time_ms,
    .describe = cpu_describe,
    .ops = &cpu_ops,
};

const qs_backend *qs_backend_cpu(void) {
    static int blas_ready;
    if (!blas_ready) {
        qs_cpu_blas_init();
        blas_ready = 1;
    }
    return &cpu_backend;
}

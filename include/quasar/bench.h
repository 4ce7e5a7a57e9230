/* `quasar bench`: throughput of the training step, of each core op and of generation,
 * against ceilings measured on the same machine at start (csrc/bench.c,
 * csrc/bench_kernels.c). docs/ARCHITECTURE.md has the FLOP formulas and the output. */
#ifndef QUASAR_BENCH_H
#define QUASAR_BENCH_H

#include <stddef.h>

#include "quasar/backend.h"
#include "quasar/config.h"

/* What a backend can do at best, measured: a large square GEMM through its own
 * matmul_forward (the CPU's OpenBLAS split over the OpenMP threads; cuBLAS on CUDA, in
 * the backend's precision) and a large copy within its memory. */
typedef struct qs_bench_ceilings {
    int gemm_n;             /* the GEMM is gemm_n x gemm_n x gemm_n */
    double gemm_flop_s;     /* best of several runs */
    size_t copy_bytes;      /* per buffer; 0 when not measured */
    double copy_byte_s;     /* bytes read + bytes written per second, best run */
    const char *backend;    /* the backend's name */
} qs_bench_ceilings;

/* Measures be's GEMM ceiling at gemm_n and, when copy_bytes > 0, its copy ceiling over
 * two buffers of that size. */
int qs_bench_ceilings_measure(qs_bench_ceilings *c, const qs_backend *be, int gemm_n, size_t copy_bytes);
/* The ceiling GEMM's size on be: 2048 on the CPU, 8192 on a GPU (big enough for its
 * tensor cores to reach their sustained rate). */
int qs_bench_gemm_n(const qs_backend *be);

/* Training FLOPs of one item (a token for GPT, an image for QuadraNet): model FLOPs,
 * 3 x the forward's (docs/ARCHITECTURE.md, "Benchmarks"). The config must be resolved
 * (model.vocab_size known). */
double qs_bench_train_flops_per_item(const qs_model_config *c, bool frozen_base);

/* Order statistics of n samples (sorted in place). */
typedef struct qs_bench_stats {
    double median, p10, p90, min, max;
} qs_bench_stats;
qs_bench_stats qs_bench_stats_of(double *x, int n);

/* `quasar bench train|kernels|generate ...` (argv after "bench"); returns the exit code. */
int qs_cli_bench(int argc, char **argv);

#endif

/* What csrc/bench.c and csrc/bench_kernels.c share: random inputs and the JSON record. */
#ifndef QUASAR_BENCH_IMPL_H
#define QUASAR_BENCH_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "quasar/bench.h"

/* The ceiling GEMM's size in --quick smoke runs. */
enum { QS_BENCH_QUICK_GEMM_N = 256 };

/* n floats rounded up to whole 64-byte pieces: buffers carved from one allocation stay
 * aligned. */
static inline size_t qs_bench_round16(size_t n) { return (n + 15) & ~(size_t)15; }

/* p[0..n) in be's memory := uniform values in [-0.5, 0.5) from the counter RNG, made by
 * all threads (through host chunks off the CPU): benchmarks never run on zeros, which
 * can hide work and run faster than real data. */
int qs_bench_fill(const qs_backend *be, float *p, size_t n, uint64_t stream);

/* The share of the machine's CPU time that other processes took since the bench
 * command started (/proc/stat's busy time less this process's own): timings from a
 * shared machine mean little without it. */
double qs_bench_others_cpu(void);

/* The JSON record's head, per DESIGN.md's bench format: {"device" (be's), "date", "commit",
 * "command", "backend", "threads", "cache_mib", "load_avg_1m", "others_cpu", "ceilings"
 * (null when c is NULL);
 * the caller goes on with `, "key": value` fields and then "results". */
void qs_bench_json_head(FILE *out, const qs_backend *be, int argc, char **argv, const qs_bench_ceilings *c);
/* `, "key": v`, or null for a non-finite v (JSON has no NaN). */
void qs_bench_json_num(FILE *out, const char *key, double v);
/* One entry of "results" with no peer (peer, peer_value and ratio null); the first one
 * gets no leading comma. */
void qs_bench_json_result(FILE *out, bool first, const char *name, const char *metric, double value);
/* s as a JSON string, quotes included. */
void qs_bench_json_str(FILE *out, const char *s);

/* `quasar bench kernels`: each core op of be at a realistic shape for it (tiny shapes
 * with quick; only the ops whose names start with one of `only`'s comma-separated
 * prefixes when it is not NULL), as a table on stdout or one JSON record. */
int qs_bench_kernels(const qs_backend *be, bool json, bool quick, int repeats, const char *only, int argc,
                     char **argv);

/* `quasar bench moe`: one sparse MoE layer of this shape forward + backward (dropless,
 * GELU experts), whole and in parts, beside a dense FFN of the same active FLOPs
 * (csrc/bench_moe.c). */
typedef struct qs_bench_moe_shape {
    int N, C, F, E, K; /* tokens, width, expert hidden width, experts, experts per token */
} qs_bench_moe_shape;
int qs_bench_moe(const qs_backend *be, const qs_bench_moe_shape *s, bool json, bool quick, int repeats, int argc,
                 char **argv);

/* `quasar bench attention`: attention forward and forward + backward, causal and not,
 * at every sequence length x head size of the sweep (comma-separated lists), tokens
 * tokens in all (B = tokens / T) of width = NH x hs (csrc/bench_attention.c). */
typedef struct qs_bench_attention_sweep {
    const char *seqs, *head_sizes;
    int tokens, width;
} qs_bench_attention_sweep;
int qs_bench_attention(const qs_backend *be, const qs_bench_attention_sweep *s, bool json, bool quick, int repeats,
                       int argc, char **argv);

#endif

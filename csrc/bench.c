/* `quasar bench train` and `quasar bench generate`, the ceilings and the FLOP formula,
 * the JSON record every bench command prints, and the bench command line.
 * `bench kernels` lives in csrc/bench_kernels.c. */
#include "quasar/bench.h"

#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bench_impl.h"
#include "cli.h"
#include "quasar/bf16.h"
#include "quasar/checkpoint.h"
#include "quasar/clock.h"
#include "quasar/error.h"
#include "quasar/model.h"
#include "quasar/optim.h"
#include "quasar/rng.h"
#include "quasar/sample.h"
#include "quasar/task.h"

enum { CEILING_RUNS = 5, STREAM_BENCH = 0xbe };

/* ---- the FLOP formula ---- */

/* Model FLOPs of training on one item, the numerator of MFU. A multiply-add is 2 FLOPs
 * and training is 3 forwards (the backward does twice the forward's multiply-adds), so
 * this is 6 x the forward's multiply-adds in the layers that do them; over a frozen base
 * (LoRA) 4 x those of the weights (no weight gradients: forward and input gradient) and
 * still 6 x attention's (the adapters' own products are left out); embedding lookups,
 * biases, norms, activations and the softmaxes are left out (PaLM's appendix B,
 * nanoGPT's estimate_mfu).
 * GPT, per token (T = model.seq_len, C = n_embd, F = ffn_mult C, V = vocab_size):
 *   6 N + 12 L T C (attention layers) + 18 L k C (quadconv-mixer layers), where N, the
 *   matrix weights a token passes through, is per layer c_attn 3C^2 (attention only),
 *   c_proj C^2, the feed-forward 2CF (top_k of them for MoE, plus the router CE, and
 *   the noise projection CE when noisy), plus the LM head VC. Attention counts QK^T
 *   and AV over the whole T x T (causal masking's saving is not credited, as in PaLM);
 *   a quadconv mixer does 3 k C multiply-adds per token (three k-tap filters).
 * QuadraNet, per image (n_s = ((S / p) >> s)^2 positions in stage s, F_s = ffn_mult C_s):
 *   6 [n_0 p^2 c_in C_0 (stem) + sum_s (n_s 4 C_{s-1} C_s (downsampling, s > 0)
 *      + depth_s n_s (3 k^2 C_s (quadconv) + 2 C_s F_s (fc1, fc2))) + C_3 classes]. */
double qs_bench_train_flops_per_item(const qs_model_config *c, bool frozen_base) {
    double macs = 0.0, attention = 0.0; /* multiply-adds with weights; attention's */
    if (c->type == QS_MODEL_QUADRANET) {
        const qs_quadra_config *q = &c->quadra;
        const double k2 = (double)q->kernel_size * q->kernel_size, p2 = (double)q->stem_patch * q->stem_patch;
        const int side0 = q->image_size / q->stem_patch;
        macs = (double)side0 * side0 * p2 * q->in_channels * q->widths[0];
        for (int s = 0; s < QS_QUADRA_STAGES; s++) {
            const double side = side0 >> s, n = side * side, C = q->widths[s], F = (double)c->ffn_mult * C;
            if (s > 0) macs += n * 4.0 * q->widths[s - 1] * C;
            macs += q->depths[s] * n * (3.0 * k2 * C + 2.0 * C * F);
        }
        macs += (double)q->widths[QS_QUADRA_STAGES - 1] * q->num_classes;
    } else {
        const double C = c->n_embd, T = c->seq_len, F = (double)c->ffn_mult * C, E = c->moe.n_experts;
        double layer = C * C + (E > 0 ? c->moe.top_k : 1) * 2.0 * C * F;
        if (E > 0) layer += C * E * (c->moe.gating == QS_GATING_NOISY_TOPK ? 2 : 1);
        if (c->mixer == QS_MIXER_QUADCONV) {
            layer += 3.0 * c->quadra.kernel_size * C;
        } else {
            layer += C * (C + 2.0 * C / c->n_head * qs_config_kv_heads(c)); /* q, and grouped K/V */
            attention = c->n_layer * 2.0 * T * C;
        }
        macs = c->n_layer * layer + (double)c->vocab_size * C;
    }
    return (frozen_base ? 4.0 : 6.0) * macs + 6.0 * attention;
}

/* ---- timing, statistics, inputs ---- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

qs_bench_stats qs_bench_stats_of(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    /* nearest-rank percentiles */
    return (qs_bench_stats){.median = n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]),
                            .p10 = x[(int)(0.1 * (n - 1) + 0.5)],
                            .p90 = x[(int)(0.9 * (n - 1) + 0.5)],
                            .min = x[0],
                            .max = x[n - 1]};
}

/* Uniform in [-0.5, 0.5), as values bf16 holds exactly: a buffer read as bf16 pairs
 * (bench kernels' packed weights) then holds sane numbers too. */
static void fill_range(float *p, size_t first, size_t n, uint64_t stream) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        p[i] = qs_bf16_to_float(qs_bf16_from_float(qs_rng_uniform(0x5eed, stream, first + i) - 0.5f));
}

int qs_bench_fill(const qs_backend *be, float *p, size_t n, uint64_t stream) {
    if (be == qs_backend_cpu()) {
        fill_range(p, 0, n, stream);
        return 0;
    }
    enum { CHUNK = 1 << 22 }; /* floats per upload: 16 MiB of host memory at a time */
    float *host = malloc((n < CHUNK ? n : CHUNK) * sizeof *host);
    if (!host) return qs_error("out of memory");
    for (size_t i = 0; i < n; i += CHUNK) {
        const size_t len = n - i < CHUNK ? n - i : CHUNK;
        fill_range(host, i, len, stream);
        be->upload(p + i, host, len * sizeof *host);
    }
    free(host);
    return 0;
}

/* ---- ceilings ---- */

typedef struct gemm_call {
    const qs_ops *ops;
    float *out;
    const float *a, *b;
    int n;
} gemm_call;

static void run_gemm(void *arg) {
    const gemm_call *g = arg;
    g->ops->matmul_forward(g->out, g->a, g->b, NULL, g->n, g->n, g->n, QS_W_IN_OUT);
}

typedef struct copy_call {
    const qs_backend *be;
    void *dst;
    const void *src;
    size_t bytes;
} copy_call;

static void run_copy(void *arg) {
    const copy_call *c = arg;
    c->be->copy(c->dst, c->src, c->bytes);
}

/* The fastest of CEILING_RUNS timed runs after one warm-up (which also pages the buffers in). */
static double best_ms(const qs_backend *be, void (*run)(void *), void *arg) {
    double best = INFINITY;
    for (int r = 0; r <= CEILING_RUNS; r++) {
        const double ms = be->time_ms(run, arg);
        if (r > 0 && ms < best) best = ms;
    }
    return best;
}

int qs_bench_gemm_n(const qs_backend *be) { return be == qs_backend_cpu() ? 2048 : 8192; }

int qs_bench_ceilings_measure(qs_bench_ceilings *c, const qs_backend *be, int gemm_n, size_t copy_bytes) {
    const size_t nn = (size_t)gemm_n * gemm_n;
    *c = (qs_bench_ceilings){.gemm_n = gemm_n, .copy_bytes = copy_bytes, .backend = be->name};
    float *a = be->alloc(nn * sizeof *a), *b = a ? be->alloc(nn * sizeof *b) : NULL;
    float *out = b ? be->alloc(nn * sizeof *out) : NULL;
    int rc = out ? 0 : qs_error("out of memory measuring the GEMM ceiling (%s)", qs_error_last());
    if (!rc) rc = qs_bench_fill(be, a, nn, 1) || qs_bench_fill(be, b, nn, 2);
    if (!rc) {
        gemm_call g = {be->ops, out, a, b, gemm_n};
        c->gemm_flop_s = 2.0 * (double)nn * gemm_n / (best_ms(be, run_gemm, &g) / 1e3);
    }
    be->free(a);
    be->free(b);
    be->free(out);
    if (rc || !copy_bytes) return rc;
    char *src = be->alloc(copy_bytes), *dst = src ? be->alloc(copy_bytes) : NULL;
    rc = dst ? 0 : qs_error("out of memory measuring the copy ceiling (%s)", qs_error_last());
    if (!rc) rc = qs_bench_fill(be, (float *)src, copy_bytes / sizeof(float), 3);
    if (!rc) {
        copy_call k = {be, dst, src, copy_bytes};
        c->copy_byte_s = 2.0 * (double)copy_bytes / (best_ms(be, run_copy, &k) / 1e3);
    }
    be->free(src);
    be->free(dst);
    return rc;
}

/* ---- the JSON record ---- */

void qs_bench_json_str(FILE *out, const char *s) {
    fputc('"', out);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(out, "\\%c", ch);
        else if (ch < 0x20) fprintf(out, "\\u%04x", ch);
        else fputc(ch, out);
    }
    fputc('"', out);
}

void qs_bench_json_num(FILE *out, const char *key, double v) {
    fprintf(out, ", \"%s\": ", key);
    if (isfinite(v)) fprintf(out, "%.6g", v);
    else fputs("null", out);
}

void qs_bench_json_result(FILE *out, bool first, const char *name, const char *metric, double value) {
    fprintf(out, "%s\n    {\"name\": ", first ? "" : ",");
    qs_bench_json_str(out, name);
    fputs(", \"metric\": ", out);
    qs_bench_json_str(out, metric);
    qs_bench_json_num(out, "quasar", value);
    fputs(", \"peer\": null, \"peer_value\": null, \"ratio\": null}", out);
}

/* ---- how busy the rest of the machine was ---- */

/* CPU time since boot from /proc/stat's first line: busy (user, nice, system, irq,
 * softirq, steal) and in all, in clock ticks; and this process's own, in ticks too. */
typedef struct cpu_ticks {
    double busy, total, self;
} cpu_ticks;

static cpu_ticks cpu_now(void) {
    cpu_ticks t = {NAN, NAN, NAN};
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (f && fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                    &v[6], &v[7]) == 8) {
        t.busy = (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]);
        t.total = t.busy + (double)(v[3] + v[4]);
    }
    if (f) fclose(f);
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    t.self = ((double)u.ru_utime.tv_sec + (double)u.ru_stime.tv_sec +
              1e-6 * (double)(u.ru_utime.tv_usec + u.ru_stime.tv_usec)) * (double)sysconf(_SC_CLK_TCK);
    return t;
}

static cpu_ticks bench_start;

double qs_bench_others_cpu(void) {
    cpu_ticks t = cpu_now();
    double others = (t.busy - bench_start.busy - (t.self - bench_start.self)) / (t.total - bench_start.total);
    return others < 0 ? 0 : others; /* tick rounding */
}

/* The first line of `cmd`'s output without its newline, or "" . */
static void first_line_of(const char *cmd, char *buf, size_t cap) {
    buf[0] = 0;
    FILE *p = popen(cmd, "r");
    if (!p) return;
    if (!fgets(buf, (int)cap, p)) buf[0] = 0;
    buf[strcspn(buf, "\n")] = 0;
    pclose(p);
}

void qs_bench_json_head(FILE *out, const qs_backend *be, int argc, char **argv, const qs_bench_ceilings *c) {
    char commit[64], date[16];
    qs_device_info dev = {.cache_bytes = 0};
    be->describe(&dev);
    /* the checkout the command runs in; benchmarks are run from the source tree */
    first_line_of("git describe --always --dirty 2>/dev/null", commit, sizeof commit);
    time_t now = time(NULL);
    struct tm tm;
    strftime(date, sizeof date, "%Y-%m-%d", gmtime_r(&now, &tm));
    fputs("{\"device\": ", out);
    qs_bench_json_str(out, dev.name);
    fprintf(out, ", \"date\": \"%s\", \"commit\": ", date);
    if (commit[0]) qs_bench_json_str(out, commit);
    else fputs("null", out);
    char *cmd = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&cmd, &len);
    if (m) {
        fputs("quasar bench", m);
        for (int i = 0; i < argc; i++) fprintf(m, " %s", argv[i]);
        fclose(m);
    }
    fputs(", \"command\": ", out);
    qs_bench_json_str(out, cmd ? cmd : "quasar bench");
    free(cmd);
    /* timings on a shared machine mean little without how busy it was */
    double load = NAN;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &load) != 1) load = NAN;
        fclose(f);
    }
    fputs(", \"backend\": ", out);
    qs_bench_json_str(out, be->name);
    fprintf(out, ", \"threads\": %d", omp_get_max_threads());
    if (dev.cache_bytes) fprintf(out, ", \"cache_mib\": %zu", dev.cache_bytes >> 20);
    qs_bench_json_num(out, "load_avg_1m", load);
    qs_bench_json_num(out, "others_cpu", qs_bench_others_cpu());
    fputs(", \"ceilings\": ", out);
    if (!c) {
        fputs("null", out);
        return;
    }
    fprintf(out, "{\"gemm\": \"%d^3 matmul_forward on %s, best of %d\"", c->gemm_n, c->backend, CEILING_RUNS);
    qs_bench_json_num(out, "gemm_gflop_per_s", c->gemm_flop_s / 1e9);
    if (c->copy_bytes) {
        fprintf(out, ", \"copy\": \"copy of %zu MiB on %s, bytes read + written, best of %d\"", c->copy_bytes >> 20,
                c->backend, CEILING_RUNS);
        qs_bench_json_num(out, "copy_gb_per_s", c->copy_byte_s / 1e9);
    }
    fputc('}', out);
}

/* ---- the command line ---- */

typedef struct bench_args {
    const char *config, *ckpt, *device, *precision, *only, *shape, *grouped, *weights;
    const char *sets[64];
    int n_sets;
    int steps, warmup, repeats, prompt_tokens, new_tokens, batch;
    qs_sample_params sampling; /* bench generate's picks (default greedy) */
    qs_bench_moe_shape moe; /* 0: the --shape's default */
    qs_bench_attention_sweep att; /* NULL, 0: the device's default */
    bool json, quick, lora;
    int argc; /* the arguments after "bench", for the record's "command" */
    char **argv;
} bench_args;

typedef enum { ARG_STR, ARG_INT, ARG_FLOAT, ARG_FLAG, ARG_SET } arg_kind;

typedef struct arg_spec {
    const char *flag;
    arg_kind kind;
    void *dst; /* const char **, int *, float *, bool *; ARG_SET: the bench_args */
    double lo, hi;
} arg_spec;

/* Reads argv into the specs' destinations. Returns -1 to go on, else the exit code
 * (0 after --help). */
static int parse_args(int argc, char **argv, const arg_spec *spec, int n_spec, const char *help) {
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(help, stdout);
            return 0;
        }
        const arg_spec *o = NULL;
        for (int j = 0; j < n_spec && !o; j++)
            if (!strcmp(argv[i], spec[j].flag)) o = &spec[j];
        if (!o) return qs_cli_usage_error("unknown option '%s'", argv[i]);
        if (o->kind == ARG_FLAG) {
            *(bool *)o->dst = true;
            continue;
        }
        if (i + 1 >= argc) return qs_cli_usage_error("%s needs a value", argv[i]);
        const char *v = argv[++i];
        if (o->kind == ARG_STR) {
            *(const char **)o->dst = v;
        } else if (o->kind == ARG_SET) {
            bench_args *a = o->dst;
            if (a->n_sets == 64) return qs_cli_usage_error("too many %s options", o->flag);
            a->sets[a->n_sets++] = v;
        } else {
            char *end;
            const bool integer = o->kind == ARG_INT;
            const double x = integer ? (double)strtol(v, &end, 10) : strtod(v, &end);
            if (end == v || *end || !(x >= o->lo && x <= o->hi)) {
                fprintf(stderr, "error: %s: invalid value '%s' (expected %s in [%g, %g])\n", o->flag, v,
                        integer ? "an integer" : "a number", o->lo, o->hi);
                return QS_EXIT_USAGE;
            }
            if (integer) *(int *)o->dst = (int)x;
            else *(float *)o->dst = (float)x;
        }
    }
    return -1;
}

static int build_config(qs_config *cfg, const bench_args *a) {
    qs_config_defaults(cfg);
    if (qs_config_load_file(cfg, a->config)) return -1;
    for (int i = 0; i < a->n_sets; i++)
        if (qs_config_set(cfg, a->sets[i])) return -1;
    return qs_config_validate(cfg);
}

/* ---- bench train ---- */

/* Starts the peak-RSS count afresh (Linux: "5" into /proc/self/clear_refs), so that the
 * ceiling's buffers, freed by then, do not count as the model's memory. */
static bool reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return false;
    bool ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

static double peak_rss_mib(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_maxrss / 1024.0; /* KiB on Linux */
}

/* MiB in use in be's memory, or -1 when it cannot tell. */
static double used_mib(const qs_backend *be) {
    size_t free_bytes, total_bytes;
    return be->mem_info(&free_bytes, &total_bytes) ? -1.0 : (double)(total_bytes - free_bytes) / (1 << 20);
}

/* Peak memory: the process's RSS on the CPU; on a device, what it holds at the end less
 * what it held before the model was built (the engine allocates nothing in the step
 * loop, and a KV cache once, so that is its peak; the CUDA context is left out, as
 * torch.cuda.max_memory_allocated leaves it out). */
typedef struct peak_mem {
    bool device, reset; /* reset: the count excludes what ran before (a ceiling's buffers) */
    double used0, mib;
} peak_mem;

/* Starts the count, just before the model is built on be. */
static peak_mem peak_mem_start(const qs_backend *be) {
    peak_mem m = {.device = be != qs_backend_cpu()};
    m.reset = m.device || reset_peak_rss();
    m.used0 = m.device ? used_mib(be) : 0.0;
    return m;
}

static void peak_mem_stop(peak_mem *m, const qs_backend *be) {
    const double used1 = m->device ? used_mib(be) : 0.0;
    m->mib = !m->device ? peak_rss_mib() : m->used0 < 0 || used1 < 0 ? NAN : used1 - m->used0;
}

/* The figure as a result named <prefix>_peak_gpu_mem_mib or <prefix>_peak_rss_mib. */
static void peak_mem_result(FILE *out, const char *prefix, const peak_mem *m) {
    char name[64];
    snprintf(name, sizeof name, "%s_peak_%s_mib", prefix, m->device ? "gpu_mem" : "rss");
    qs_bench_json_result(out, false, name,
                         m->device ? "device memory the run holds, MiB (cudaMemGetInfo at the end less before the "
                                     "model was built: the CUDA context left out)"
                                   : "peak resident memory, MiB (getrusage max RSS)",
                         m->mib);
}

/* One optimizer step of one process as the training loop takes it (csrc/train.c): zero
 * the gradients, forward + backward over the micro-batches, the global norm, AdamW.
 * Returns the loss. */
static double train_step(qs_task *t, qs_adamw *opt, const qs_train_config *tc, int step) {
    const int B = t->micro_B, accum = tc->batch_size / B;
    const uint64_t first = (uint64_t)step * tc->batch_size, rng_seed = qs_rng_u64(tc->seed, STREAM_BENCH, (uint64_t)step);
    const float share = (float)B / (float)tc->batch_size;
    qs_params_zero_grad(t->params);
    if (t->step_begin) t->step_begin(t->self);
    double loss = 0.0;
    for (int i = 0; i < accum; i++) {
        double l = 0.0;
        t->train_micro(t->self, first + (uint64_t)i * B, rng_seed, share, &l); /* fails only in a collective */
        loss += l * share;
    }
    qs_adamw_apply(opt, t->params, tc, qs_lr_at(tc, step), qs_adamw_grad_norm(t->params));
    return loss;
}

typedef struct step_call {
    qs_task *task;
    qs_adamw *opt;
    const qs_train_config *tc;
    int step;
    double loss;
} step_call;

static void run_step(void *arg) {
    step_call *s = arg;
    s->loss = train_step(s->task, s->opt, s->tc, s->step);
}

/* model.recompute_layers as the run took it ("auto" resolved): true, false or a count. */
static void recompute_layers_text(char *buf, size_t cap, const qs_model_config *m) {
    if (m->recompute_layers == QS_RECOMPUTE_ALL || m->recompute_layers == 0)
        snprintf(buf, cap, "%s", m->recompute_layers ? "true" : "false");
    else
        snprintf(buf, cap, "%d", m->recompute_layers);
}

static void print_train(FILE *out, const bench_args *a, const qs_config *cfg, const qs_task *t,
                        const qs_bench_ceilings *c, const qs_bench_stats *ms, double flops_item, const peak_mem *mem,
                        double loss0, double loss1) {
    const qs_train_config *tc = &cfg->train;
    const bool lm = t->items_per_sample > 1;
    const double items = (double)tc->batch_size * t->items_per_sample, flops_step = flops_item * items;
    const double per_s = items / (ms->median / 1e3), flop_s = flops_step / (ms->median / 1e3);
    const char *unit = lm ? "tokens" : "images";
    char metric[256], name[64], layers[16];
    recompute_layers_text(layers, sizeof layers, &cfg->model);
    if (!a->json) {
        fprintf(out, "quasar bench train: %s (%s, %zu %sparameters) on %s, %d threads\n", a->config,
                cfg->model.type == QS_MODEL_QUADRANET ? "quadranet" : "gpt", t->params->n,
                a->lora ? "trainable LoRA " : "", t->params->be->name, omp_get_max_threads());
        if (a->lora)
            fprintf(out, "  lora        r %d, targets %s, over a frozen base of random weights\n", cfg->lora.r,
                    cfg->lora.targets);
        char batch[64];
        if (lm) snprintf(batch, sizeof batch, "%d x %d tokens", tc->batch_size, t->items_per_sample);
        else snprintf(batch, sizeof batch, "%d images", tc->batch_size);
        fprintf(out, "  batch       %s per step (micro-batches of %d); %d timed steps after %d warm-up\n", batch,
                t->micro_B, a->steps, a->warmup);
        fprintf(out, "  recompute   ffn %s, layers %s\n", cfg->model.recompute_ffn ? "true" : "false", layers);
        fprintf(out, "  step time   median %.2f ms (p10 %.2f, p90 %.2f, min %.2f, max %.2f)\n", ms->median, ms->p10,
                ms->p90, ms->min, ms->max);
        fprintf(out, "  throughput  %.1f %s/s\n", per_s, unit);
        fprintf(out, "  compute     %.4g MFLOP per %s, %.2f GFLOP/s: MFU %.3f of the %d^3 GEMM ceiling (%.1f GFLOP/s)\n",
                flops_item / 1e6, lm ? "token" : "image", flop_s / 1e9, flop_s / c->gemm_flop_s, c->gemm_n,
                c->gemm_flop_s / 1e9);
        if (mem->device)
            fprintf(out, "  memory      %.1f MiB of device memory\n", mem->mib);
        else
            fprintf(out, "  memory      peak RSS %.1f MiB%s\n", mem->mib,
                    mem->reset ? "" : " (the ceiling's buffers included)");
        fprintf(out, "  loss        %.4f at the first warm-up step, %.4f at the last step\n", loss0, loss1);
        fprintf(out, "  machine     other processes took %.0f%% of the CPU time meanwhile\n", 100 * qs_bench_others_cpu());
        return;
    }
    qs_bench_json_head(out, t->params->be, a->argc, a->argv, c);
    fprintf(out, ", \"model\": {\"type\": \"%s\", \"params\": %zu, \"batch_size\": %d, \"micro_batch_size\": %d, "
                 "\"items_per_sample\": %d, \"recompute_ffn\": %s, \"recompute_layers\": %s}",
            cfg->model.type == QS_MODEL_QUADRANET ? "quadranet" : "gpt", t->params->n, tc->batch_size, t->micro_B,
            t->items_per_sample, cfg->model.recompute_ffn ? "true" : "false", layers);
    if (a->lora)
        fprintf(out, ", \"lora\": {\"r\": %d, \"alpha\": %g, \"targets\": \"%s\", \"rslora\": %s}", cfg->lora.r,
                cfg->lora.alpha, cfg->lora.targets, cfg->lora.rslora ? "true" : "false");
    else
        fputs(", \"lora\": null", out);
    fprintf(out, ", \"steps\": %d, \"warmup\": %d, \"flops_per_item\": %.0f, \"flops_per_step\": %.0f", a->steps,
            a->warmup, flops_item, flops_step);
    fprintf(out, ", \"step_ms\": {\"median\": %.4f, \"p10\": %.4f, \"p90\": %.4f, \"min\": %.4f, \"max\": %.4f}",
            ms->median, ms->p10, ms->p90, ms->min, ms->max);
    qs_bench_json_num(out, "loss_first", loss0);
    qs_bench_json_num(out, "loss_last", loss1);
    fprintf(out, ", \"peak_mem_excludes_ceiling\": %s, \"results\": [", mem->reset ? "true" : "false");
    snprintf(name, sizeof name, "train_%s_per_s", unit);
    snprintf(metric, sizeof metric, "training %s/s at the median step time (batch %d)", unit, tc->batch_size);
    qs_bench_json_result(out, true, name, metric, per_s);
    snprintf(metric, sizeof metric, "ms per optimizer step, median of %d (p10 %.2f, p90 %.2f, min %.2f, max %.2f)",
             a->steps, ms->p10, ms->p90, ms->min, ms->max);
    qs_bench_json_result(out, false, "train_ms_per_step", metric, ms->median);
    snprintf(metric, sizeof metric, "model GFLOP/s (%.6g FLOP per %s, docs/ARCHITECTURE.md)", flops_item,
             lm ? "token" : "image");
    qs_bench_json_result(out, false, "train_gflop_per_s", metric, flop_s / 1e9);
    snprintf(metric, sizeof metric, "MFU: model FLOP/s over the measured %d^3 GEMM ceiling on %s (%.1f GFLOP/s)",
             c->gemm_n, c->backend, c->gemm_flop_s / 1e9);
    qs_bench_json_result(out, false, "train_mfu", metric, flop_s / c->gemm_flop_s);
    peak_mem_result(out, "train", mem);
    fputs("\n  ]}\n", out);
}

static int bench_train(const bench_args *a) {
    qs_config cfg;
    qs_bench_ceilings c;
    if (!a->config) return qs_cli_usage_error("%s", "bench train needs --config FILE");
    if (build_config(&cfg, a)) return qs_cli_fail();
    const qs_backend *be = qs_cli_backend(a->device, cfg.train.precision);
    if (!be || qs_bench_ceilings_measure(&c, be, a->quick ? QS_BENCH_QUICK_GEMM_N : qs_bench_gemm_n(be), 0))
        return qs_cli_fail();
    peak_mem mem = peak_mem_start(be);
    const qs_train_config *tc = &cfg.train;
    const int B = tc->micro_batch_size > 0 ? tc->micro_batch_size : tc->batch_size;
    qs_task task;
    qs_adamw opt = {0};
    double *step_ms = malloc((size_t)a->steps * sizeof *step_ms), loss0 = NAN, loss1 = NAN;
    const qs_task_place place = {.micro_B = B, .be = be, .optim_shards = 1};
    if (a->lora ? qs_task_open_lora(&task, &cfg, NULL, NULL, "bench train --lora", NULL, &place)
                : qs_task_open(&task, &cfg, NULL, &place)) {
        free(step_ms);
        return qs_cli_fail();
    }
    int rc = !step_ms ? qs_error("out of memory") : 0;
    if (!rc) rc = task.init(task.self, tc->seed);
    if (!rc) rc = qs_adamw_create(&opt, be, task.params->n);
    for (int s = 0; !rc && s < a->warmup + a->steps; s++) {
        step_call call = {&task, &opt, tc, s, NAN};
        const double ms = be->time_ms(run_step, &call);
        if (s == 0) loss0 = call.loss;
        loss1 = call.loss;
        if (s >= a->warmup) step_ms[s - a->warmup] = ms;
    }
    if (!rc) {
        qs_bench_stats ms = qs_bench_stats_of(step_ms, a->steps);
        peak_mem_stop(&mem, be);
        /* the config as the task resolved it (model.vocab_size from the data) */
        print_train(stdout, a, &cfg, &task, &c, &ms, qs_bench_train_flops_per_item(&cfg.model, a->lora), &mem, loss0,
                    loss1);
    }
    free(step_ms);
    qs_adamw_free(&opt);
    qs_task_free(&task);
    return rc ? qs_cli_fail() : 0;
}

/* ---- bench generate ---- */

/* The time each new token reaches the caller. */
/* When each step of a batched generation ended: the step's last prompt's token. */
typedef struct token_clock {
    double *t;
    int n, last;
} token_clock;

static void stamp(int prompt, int token, void *user) {
    (void)token;
    token_clock *c = user;
    if (prompt == c->last) c->t[c->n++] = qs_clock_now();
}

/* The model to generate with, its linear layers from --weights: a checkpoint's, or a new
 * one of the config's shape with random weights (vocabulary from the data when
 * model.vocab_size is 0, as training resolves it); the memory count starts before it is
 * built. */
static int open_generator(qs_gpt **m, qs_config *cfg, const bench_args *a, peak_mem *mem) {
    const qs_backend *be = NULL;
    const char *what = a->config;
    char step_dir[QS_PATH_MAX + 64];
    if (a->ckpt) {
        qs_st_file f = {0};
        char *chars = NULL;
        int rc = qs_checkpoint_find(a->ckpt, step_dir, sizeof step_dir) ||
                 qs_checkpoint_open_model(&f, step_dir, cfg, &chars);
        what = step_dir;
        if (!rc && cfg->model.type != QS_MODEL_GPT) rc = qs_error("%s: not a language model (model.type is not gpt)", what);
        if (!rc && !(be = qs_cli_backend(a->device, cfg->train.precision))) rc = -1;
        if (!rc) *mem = peak_mem_start(be);
        if (!rc)
            rc = qs_gpt_create_for(m, &cfg->model, be, a->batch, cfg->model.seq_len, qs_cli_weights_use(a->weights));
        if (!rc) rc = qs_checkpoint_load_weights(qs_gpt_params(*m), &f, step_dir);
        qs_st_free(&f);
        free(chars);
        return rc ? -1 : 0;
    }
    if (build_config(cfg, a)) return -1;
    if (cfg->model.type != QS_MODEL_GPT) return qs_error("%s: not a language model (model.type is not gpt)", what);
    if (cfg->model.vocab_size == 0) {
        qs_task t;
        if (qs_task_open(&t, cfg, NULL, &(qs_task_place){.micro_B = 1, .be = qs_backend_cpu()})) return -1;
        qs_task_free(&t);
    }
    if (!(be = qs_cli_backend(a->device, cfg->train.precision))) return -1;
    *mem = peak_mem_start(be);
    if (qs_gpt_create_for(m, &cfg->model, be, a->batch, cfg->model.seq_len, qs_cli_weights_use(a->weights)))
        return -1;
    return qs_gpt_init(*m, cfg->train.seed);
}

/* Runs qs_generate_batch (the KV-cache path `quasar generate` takes) over a->batch
 * random prompts 1 + repeats times, the first as warm-up; fills the prefill times (to
 * the end of the first step, every prompt run once) [repeats] and the later steps' times,
 * one decode step of every prompt each [repeats * (new - 1)], in seconds. */
static int time_generation(qs_gpt *m, const bench_args *a, int V, double *prefill, double *gaps) {
    const int P = a->prompt_tokens, n_new = a->new_tokens, B = a->batch;
    int *all = malloc((size_t)B * (P + n_new + 1) * sizeof *all), **ctx = malloc((size_t)B * sizeof *ctx);
    double *t = malloc((size_t)n_new * sizeof *t);
    if (!all || !ctx || !t) {
        free(all), free(ctx), free(t);
        return qs_error("out of memory");
    }
    int *n0 = all + (size_t)B * (P + n_new);
    for (int b = 0; b < B; b++) ctx[b] = all + (size_t)b * (P + n_new), n0[b] = P;
    int rc = 0;
    for (int r = 0; !rc && r <= a->repeats; r++) {
        for (int b = 0; b < B; b++)
            for (int i = 0; i < P; i++)
                ctx[b][i] = (int)qs_rng_below(0x5eed, STREAM_BENCH, (uint64_t)b * P + i, (uint64_t)V);
        token_clock clock = {t, 0, B - 1};
        double t0 = qs_clock_now();
        int made = qs_generate_batch(m, ctx, n0, B, n_new, &a->sampling, NULL, stamp, &clock);
        if (made != B * n_new) rc = made < 0 ? -1 : qs_error("generation stopped after %d of %d tokens", made, B * n_new);
        if (rc || r == 0) continue;
        prefill[r - 1] = t[0] - t0;
        for (int k = 1; k < n_new; k++) gaps[(size_t)(r - 1) * (n_new - 1) + k - 1] = t[k] - t[k - 1];
    }
    free(all), free(ctx), free(t);
    return rc;
}

static int bench_generate(bench_args *a) {
    if (!a->ckpt == !a->config) return qs_cli_usage_error("%s", "bench generate needs one of --ckpt DIR or --config FILE");
    if (a->ckpt && a->n_sets) return qs_cli_usage_error("%s", "--set applies to --config only");
    int rc = qs_cli_weights_check(a->weights);
    if (rc) return rc;
    qs_config cfg;
    qs_gpt *m = NULL;
    peak_mem mem = {0};
    if (open_generator(&m, &cfg, a, &mem)) {
        qs_gpt_free(m);
        return qs_cli_fail();
    }
    const int T = cfg.model.seq_len, V = cfg.model.vocab_size;
    if (!a->prompt_tokens) a->prompt_tokens = T / 2 > 0 ? T / 2 : 1;
    if (!a->new_tokens) a->new_tokens = T - a->prompt_tokens;
    rc = a->new_tokens < 2 || a->prompt_tokens + a->new_tokens > T
                 ? qs_error("--prompt-tokens (%d) + --new-tokens (%d) must fit model.seq_len (%d) with at least 2 "
                            "new tokens: past the window every token re-runs it, and bench generate measures the "
                            "KV-cache path", a->prompt_tokens, a->new_tokens, T)
                 : 0;
    const size_t n_gaps = (size_t)a->repeats * (a->new_tokens - 1);
    double *prefill = malloc((size_t)a->repeats * sizeof *prefill), *gaps = malloc(n_gaps * sizeof *gaps);
    if (!rc && (!prefill || !gaps)) rc = qs_error("out of memory");
    if (!rc) rc = time_generation(m, a, V, prefill, gaps);
    if (!rc) peak_mem_stop(&mem, qs_gpt_backend(m));
    if (!rc) {
        qs_bench_stats pre = qs_bench_stats_of(prefill, a->repeats), dec = qs_bench_stats_of(gaps, (int)n_gaps);
        const int B = a->batch;
        const double prefill_tok_s = (double)B * a->prompt_tokens / pre.median, decode_tok_s = B / dec.median;
        char metric[256];
        if (!a->json) {
            printf("quasar bench generate: %s (%zu parameters, seq_len %d, vocab %d) on %s, %d sequence%s\n",
                   a->ckpt ? a->ckpt : a->config, qs_gpt_params(m)->n, T, V, qs_gpt_params(m)->be->name, B,
                   B > 1 ? "s decoding together" : "");
            const qs_sample_params *sp = &a->sampling;
            printf("  prompt %d tokens, %d new tokens (", a->prompt_tokens, a->new_tokens);
            if (sp->temperature > 0) printf("temperature %g, top-k %d, top-p %g", sp->temperature, sp->top_k, sp->top_p);
            else printf("greedy");
            printf("), %s weights, median of %d runs after 1 warm-up\n", a->weights, a->repeats);
            printf("  prefill   %.1f tokens/s (%.3f ms for the prompts and their first tokens)\n", prefill_tok_s,
                   pre.median * 1e3);
            printf("  decode    %.1f tokens/s; latency per token median %.3f ms (p10 %.3f, p90 %.3f)\n", decode_tok_s,
                   dec.median * 1e3, dec.p10 * 1e3, dec.p90 * 1e3);
            if (mem.device) printf("  memory    %.1f MiB of device memory\n", mem.mib);
            else printf("  memory    peak RSS %.1f MiB\n", mem.mib);
            printf("  machine   other processes took %.0f%% of the CPU time meanwhile\n", 100 * qs_bench_others_cpu());
        } else {
            qs_bench_json_head(stdout, qs_gpt_params(m)->be, a->argc, a->argv, NULL);
            printf(", \"model\": {\"params\": %zu, \"seq_len\": %d, \"vocab_size\": %d}, \"prompt_tokens\": %d, "
                   "\"new_tokens\": %d, \"batch\": %d, \"runs\": %d, \"sampling\": {\"temperature\": %g, \"top_k\": %d, "
                   "\"top_p\": %g}, \"weights\": \"%s\"",
                   qs_gpt_params(m)->n, T, V, a->prompt_tokens, a->new_tokens, B, a->repeats, a->sampling.temperature,
                   a->sampling.top_k, a->sampling.top_p, a->weights);
            printf(", \"decode_ms\": {\"median\": %.5f, \"p10\": %.5f, \"p90\": %.5f, \"min\": %.5f, \"max\": %.5f}",
                   dec.median * 1e3, dec.p10 * 1e3, dec.p90 * 1e3, dec.min * 1e3, dec.max * 1e3);
            fputs(", \"results\": [", stdout);
            snprintf(metric, sizeof metric, "prefill tokens/s: %d prompt(s) of %d tokens and their first new tokens, "
                     "median of %d", B, a->prompt_tokens, a->repeats);
            qs_bench_json_result(stdout, true, "generate_prefill_tokens_per_s", metric, prefill_tok_s);
            snprintf(metric, sizeof metric, "decode tokens/s, %d sequence(s) decoding together, KV cache: %d / the "
                     "median gap between steps (%zu gaps)", B, B, n_gaps);
            qs_bench_json_result(stdout, false, "generate_decode_tokens_per_s", metric, decode_tok_s);
            snprintf(metric, sizeof metric, "ms per new token of a sequence (a decode step), median (p10 %.4f, p90 "
                     "%.4f)", dec.p10 * 1e3, dec.p90 * 1e3);
            qs_bench_json_result(stdout, false, "generate_decode_ms_per_token", metric, dec.median * 1e3);
            peak_mem_result(stdout, "generate", &mem);
            fputs("\n  ]}\n", stdout);
        }
    }
    free(prefill);
    free(gaps);
    qs_gpt_free(m);
    return rc ? qs_cli_fail() : 0;
}

/* ---- bench moe ---- */

/* The backend of --device with --precision's products (NULL with qs_error set when it
 * cannot be had). Returns -1 to go on, else the exit code of a bad --precision. */
static int precision_backend(const bench_args *a, const qs_backend **be) {
    if (strcmp(a->precision, "fp32") && strcmp(a->precision, "bf16"))
        return qs_cli_usage_error("--precision: expected fp32 or bf16, got '%s'", a->precision);
    *be = qs_cli_backend(a->device, strcmp(a->precision, "bf16") ? QS_PRECISION_FP32 : QS_PRECISION_BF16);
    return -1;
}

static int bench_moe(const bench_args *a) {
    const bool fine = a->shape && !strcmp(a->shape, "b");
    if (a->shape && !fine && strcmp(a->shape, "a"))
        return qs_cli_usage_error("--shape: expected a or b, got '%s'", a->shape);
    const qs_backend *be = NULL;
    int rc = precision_backend(a, &be);
    if (rc >= 0) return rc;
    if (!be) return qs_cli_fail();
    const bool cpu = be == qs_backend_cpu();
    qs_bench_moe_shape s = a->moe;
    if (!s.N) s.N = a->quick ? 64 : cpu ? 2048 : 16384;
    if (!s.C) s.C = a->quick ? 32 : cpu ? 384 : 768;
    if (!s.E) s.E = fine ? 64 : 8;
    if (!s.K) s.K = fine ? 8 : 2;
    if (!s.F) s.F = fine ? s.C : 4 * s.C;
    if (s.K > s.E) return qs_cli_usage_error("%s", "--top-k must be <= --experts");
    if (a->grouped && strcmp(a->grouped, "cublas") && strcmp(a->grouped, "quasar"))
        return qs_cli_usage_error("--grouped: expected cublas or quasar, got '%s'", a->grouped);
    const bool own = a->grouped && !strcmp(a->grouped, "quasar");
    if (own && (cpu || strcmp(a->precision, "bf16")))
        return qs_cli_usage_error("%s", "--grouped quasar is a bf16 kernel: it needs --device cuda --precision bf16");
    if (a->grouped) setenv("QS_CUDA_GROUPED", a->grouped, 1); /* matmul.cu reads it at each grouped product */
    if ((double)s.N * s.K * (s.F > s.C ? s.F : s.C) > (double)(1u << 31) - 1)
        return qs_cli_usage_error("%s", "bench moe: tokens x top-k x width must stay under 2^31 elements");
    return qs_bench_moe(be, &s, a->json, a->quick, a->repeats, a->argc, a->argv) ? qs_cli_fail() : 0;
}

/* Issue 5's sweep on a GPU (T = 1k, 4k, 16k at 16k tokens of width 2048, heads of 64 and
 * 128); a shorter one on the CPU, a tiny one with --quick. */
static int bench_attention(const bench_args *a) {
    const qs_backend *be = NULL;
    int rc = precision_backend(a, &be);
    if (rc >= 0) return rc;
    if (!be) return qs_cli_fail();
    const bool cpu = be == qs_backend_cpu();
    qs_bench_attention_sweep s = a->att;
    if (!s.seqs) s.seqs = a->quick ? "1,70" : cpu ? "256,1024" : "1024,4096,16384";
    if (!s.head_sizes) s.head_sizes = a->quick ? "16,64" : "64,128";
    if (!s.tokens) s.tokens = a->quick ? 140 : cpu ? 2048 : 16384;
    if (!s.width) s.width = a->quick ? 128 : cpu ? 512 : 2048;
    return qs_bench_attention(be, &s, a->json, a->quick, a->repeats, a->argc, a->argv) ? qs_cli_fail() : 0;
}

/* ---- dispatch ---- */

static const char *BENCH_HELP =
    "usage: quasar bench train|kernels|attention|moe|generate [options] [--json]   (quasar bench CMD --help)\n"
    "  train      time the training step of a config: tokens/s (images/s), ms/step, MFU, peak memory\n"
    "  kernels    time each core op of a backend: FLOP/s and bytes/s against measured ceilings\n"
    "  attention  time fused attention forward and forward + backward over lengths and head sizes\n"
    "  moe        time a sparse MoE layer forward + backward, in parts, beside a dense FFN\n"
    "  generate   prefill and decode tokens/s, latency per token and memory through the KV cache\n"
    "  --device cpu|cuda  where to run (default cpu)\n"
    "  --json prints one record in bench/results' format (DESIGN.md) instead of a table.\n";

static const char *TRAIN_HELP =
    "usage: quasar bench train --config FILE [--set key=value]... [--steps N] [--warmup N]\n"
    "                          [--device cpu|cuda] [--lora] [--quick] [--json]\n"
    "  Runs --warmup untimed, then --steps timed optimizer steps (forward + backward over the\n"
    "  micro-batches, global norm, AdamW) of the config's model on its data; nothing is written.\n"
    "  MFU = model FLOP/s (formula: docs/ARCHITECTURE.md) / a square GEMM measured at start on\n"
    "  the same backend (2048^3 on the CPU, 8192^3 on a GPU; train.precision picks fp32 or\n"
    "  bf16 products on cuda). Memory: peak RSS on the CPU, the device memory the run holds\n"
    "  on a GPU.\n"
    "  --steps N    timed steps (default 20)     --warmup N   untimed steps first (default 3)\n"
    "  --lora       LoRA fine-tuning instead (the config's lora section over a frozen base of\n"
    "               random weights): the same records, to set beside the full run's. Its FLOP\n"
    "               figures stay the full step's formula, the work that LoRA stands in for.\n"
    "  --quick      a 256^3 ceiling: a smoke run, not a measurement\n";

static const char *KERNELS_HELP =
    "usage: quasar bench kernels [--device cpu|cuda] [--precision fp32|bf16] [--only NAMES]\n"
    "                            [--repeats N] [--quick] [--json]\n"
    "  Times each core op of the backend at a realistic shape for it (attention, MoE routing\n"
    "  and dispatch, MoE experts, quadratic conv, layernorm, softmax cross-entropy, GEMM, a\n"
    "  decode step's product from fp32 and from bf16 weights; a GPU's shapes are GPT-2\n"
    "  124M's and the issues' own): median of --repeats calls, timed\n"
    "  with events on a GPU, over input sets rotated past the last-level cache, as FLOP/s and\n"
    "  bytes/s and as fractions of the GEMM and copy ceilings measured at start.\n"
    "  --precision P  the GEMMs' products on cuda: fp32 (default) or bf16 tensor cores\n"
    "  --only NAMES   the ops whose names start with one of these, comma-separated\n"
    "                 (e.g. quadconv,gemm_fwd)\n"
    "  --repeats N    timed calls per op (default 30)\n"
    "  --quick        tiny shapes, small ceilings, no rotation: a smoke run, not a measurement\n";

static const char *ATTENTION_HELP =
    "usage: quasar bench attention [--seq T,...] [--head-size HS,...] [--tokens N] [--width C]\n"
    "                              [--device cpu|cuda] [--precision fp32|bf16] [--repeats N]\n"
    "                              [--quick] [--json]\n"
    "  Times the fused attention kernels, causal and not, forward and forward + backward, at\n"
    "  every sequence length x head size: N tokens in all (B = N / T sequences, at least 1) of\n"
    "  C / HS heads, so batch x heads fills the device at every length. TFLOP/s by\n"
    "  FlashAttention's count (forward 4 B NH T^2 HS, half when causal; forward + backward\n"
    "  3.5x), and as a fraction of the GEMM ceiling measured at start. bench/compare.sh sets\n"
    "  it beside PyTorch's SDPA (bench/peers/attention_torch.py).\n"
    "  Defaults: on a GPU --seq 1024,4096,16384 --head-size 64,128 --tokens 16384 --width 2048;\n"
    "  on the CPU --seq 256,1024 --tokens 2048 --width 512.\n"
    "  --precision P  fp32 (default) or bf16: the tensor-core kernels on cuda\n"
    "  --repeats N    timed calls per point and pass (default 10)\n"
    "  --quick        tiny shapes and ceiling: a smoke run, not a measurement\n";

static const char *MOE_HELP =
    "usage: quasar bench moe [--shape a|b] [--tokens N] [--embd C] [--ffn F] [--experts E]\n"
    "                        [--top-k K] [--device cpu|cuda] [--precision fp32|bf16]\n"
    "                        [--grouped cublas|quasar] [--repeats N] [--quick] [--json]\n"
    "  Times one sparse MoE layer forward + backward as the model runs it (router GEMM, top-k\n"
    "  routing, dispatch, the experts' grouped Linear-GELU-Linear, combine; dropless, no\n"
    "  noise) on random inputs: whole, split into routing, permutation, expert GEMMs and\n"
    "  combine, and beside a dense FFN with the same active FLOPs (hidden K F).\n"
    "  --shape a    E=8 experts, top-2, F=4C (issue 6's shape A; the default)\n"
    "  --shape b    E=64, top-8, F=C (shape B: fine-grained, shape A's active FLOPs)\n"
    "  N and C: 16384 x 768 on a GPU, 2048 x 384 on the CPU, 64 x 32 with --quick;\n"
    "  --tokens, --embd, --ffn, --experts, --top-k override the shape's values.\n"
    "  --grouped G  the experts' grouped products on cuda bf16: cuBLAS's\n"
    "               grouped GEMM (cublas, the default) or Quasar's kernel (quasar); the\n"
    "               environment's QS_CUDA_GROUPED=quasar chooses the same in training\n"
    "  --repeats N  timed layers (default 20)\n"
    "  --quick      tiny shapes and ceiling: a smoke run, not a measurement\n";

static const char *GENERATE_HELP =
    "usage: quasar bench generate --ckpt DIR | --config FILE [--set key=value]...\n"
    "                             [--prompt-tokens N] [--new-tokens N] [--batch B] [--repeats N]\n"
    "                             [--temperature T] [--top-k K] [--top-p P] [--device cpu|cuda]\n"
    "                             [--weights fp32|bf16] [--json]\n"
    "  Generates through the KV cache (what quasar generate runs): prefill\n"
    "  tokens/s, decode tokens/s, the latency per new token and peak memory (RSS on the CPU,\n"
    "  the device memory the run holds on a GPU). With --config the weights are random.\n"
    "  Prompt + new tokens must fit model.seq_len (default: half and half).\n"
    "  --batch B    B random prompts decoding together, each in its KV-cache slot (default 1);\n"
    "               tokens/s count all of them, the latency is a step's\n"
    "  --repeats N  timed generations after one warm-up (default 5)\n"
    "  --temperature T, --top-k K, --top-p P  how each token is picked, as for quasar generate\n"
    "               (default greedy: temperature 0)\n"
    "  --weights W  fp32 (default) or bf16 linear-layer weights, as for quasar generate\n";

int qs_cli_bench(int argc, char **argv) {
    if (argc < 1) return qs_cli_usage_error("%s", "bench needs train, kernels, attention, moe or generate");
    const char *what = argv[0];
    if (!strcmp(what, "--help") || !strcmp(what, "-h")) {
        fputs(BENCH_HELP, stdout);
        return 0;
    }
    bench_start = cpu_now();
    bench_args a = {.device = "cpu", .precision = "fp32", .weights = "fp32", .steps = 20, .warmup = 3, .repeats = 30,
                    .batch = 1, .sampling = {.temperature = 0.0f, .top_p = 1.0f, .seed = 1337}, .argc = argc,
                    .argv = argv};
    if (!strcmp(what, "train")) {
        const arg_spec spec[] = {{"--config", ARG_STR, &a.config, 0, 0}, {"--set", ARG_SET, &a, 0, 0},
                                 {"--steps", ARG_INT, &a.steps, 1, 1000000}, {"--warmup", ARG_INT, &a.warmup, 0, 1000000},
                                 {"--device", ARG_STR, &a.device, 0, 0}, {"--quick", ARG_FLAG, &a.quick, 0, 0},
                                 {"--lora", ARG_FLAG, &a.lora, 0, 0},    {"--json", ARG_FLAG, &a.json, 0, 0}};
        int rc = parse_args(argc - 1, argv + 1, spec, sizeof spec / sizeof *spec, TRAIN_HELP);
        return rc >= 0 ? rc : bench_train(&a);
    }
    if (!strcmp(what, "kernels")) {
        const arg_spec spec[] = {{"--repeats", ARG_INT, &a.repeats, 1, 100000},
                                 {"--quick", ARG_FLAG, &a.quick, 0, 0},
                                 {"--device", ARG_STR, &a.device, 0, 0},
                                 {"--precision", ARG_STR, &a.precision, 0, 0},
                                 {"--only", ARG_STR, &a.only, 0, 0},
                                 {"--json", ARG_FLAG, &a.json, 0, 0}};
        int rc = parse_args(argc - 1, argv + 1, spec, sizeof spec / sizeof *spec, KERNELS_HELP);
        if (rc >= 0) return rc;
        const qs_backend *be = NULL;
        if ((rc = precision_backend(&a, &be)) >= 0) return rc;
        return !be || qs_bench_kernels(be, a.json, a.quick, a.repeats, a.only, argc, argv) ? qs_cli_fail() : 0;
    }
    if (!strcmp(what, "attention")) {
        a.repeats = 10;
        const arg_spec spec[] = {{"--seq", ARG_STR, &a.att.seqs, 0, 0},
                                 {"--head-size", ARG_STR, &a.att.head_sizes, 0, 0},
                                 {"--tokens", ARG_INT, &a.att.tokens, 1, 1 << 24},
                                 {"--width", ARG_INT, &a.att.width, 1, 1 << 16},
                                 {"--repeats", ARG_INT, &a.repeats, 1, 100000},
                                 {"--quick", ARG_FLAG, &a.quick, 0, 0},
                                 {"--device", ARG_STR, &a.device, 0, 0},
                                 {"--precision", ARG_STR, &a.precision, 0, 0},
                                 {"--json", ARG_FLAG, &a.json, 0, 0}};
        int rc = parse_args(argc - 1, argv + 1, spec, sizeof spec / sizeof *spec, ATTENTION_HELP);
        return rc >= 0 ? rc : bench_attention(&a);
    }
    if (!strcmp(what, "moe")) {
        a.repeats = 20;
        qs_bench_moe_shape *m = &a.moe;
        const arg_spec spec[] = {{"--shape", ARG_STR, &a.shape, 0, 0},
                                 {"--tokens", ARG_INT, &m->N, 1, 1 << 24},
                                 {"--embd", ARG_INT, &m->C, 1, 1 << 16},
                                 {"--ffn", ARG_INT, &m->F, 1, 1 << 18},
                                 {"--experts", ARG_INT, &m->E, 1, 1 << 12},
                                 {"--top-k", ARG_INT, &m->K, 1, 1 << 12},
                                 {"--grouped", ARG_STR, &a.grouped, 0, 0},
                                 {"--repeats", ARG_INT, &a.repeats, 1, 100000},
                                 {"--quick", ARG_FLAG, &a.quick, 0, 0},
                                 {"--device", ARG_STR, &a.device, 0, 0},
                                 {"--precision", ARG_STR, &a.precision, 0, 0},
                                 {"--json", ARG_FLAG, &a.json, 0, 0}};
        int rc = parse_args(argc - 1, argv + 1, spec, sizeof spec / sizeof *spec, MOE_HELP);
        return rc >= 0 ? rc : bench_moe(&a);
    }
    if (!strcmp(what, "generate")) {
        a.repeats = 5;
        const arg_spec spec[] = {{"--ckpt", ARG_STR, &a.ckpt, 0, 0},
                                 {"--config", ARG_STR, &a.config, 0, 0},
                                 {"--set", ARG_SET, &a, 0, 0},
                                 {"--prompt-tokens", ARG_INT, &a.prompt_tokens, 1, 1 << 20},
                                 {"--new-tokens", ARG_INT, &a.new_tokens, 1, 1 << 20},
                                 {"--batch", ARG_INT, &a.batch, 1, 4096},
                                 {"--temperature", ARG_FLOAT, &a.sampling.temperature, 0, 100},
                                 {"--top-k", ARG_INT, &a.sampling.top_k, 0, INT_MAX},
                                 {"--top-p", ARG_FLOAT, &a.sampling.top_p, 1e-6, 1},
                                 {"--repeats", ARG_INT, &a.repeats, 1, 10000},
                                 {"--device", ARG_STR, &a.device, 0, 0},
                                 {"--weights", ARG_STR, &a.weights, 0, 0},
                                 {"--json", ARG_FLAG, &a.json, 0, 0}};
        int rc = parse_args(argc - 1, argv + 1, spec, sizeof spec / sizeof *spec, GENERATE_HELP);
        return rc >= 0 ? rc : bench_generate(&a);
    }
    return qs_cli_usage_error("bench: unknown benchmark '%s' (train, kernels, attention, moe or generate)", what);
}

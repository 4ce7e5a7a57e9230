#include "quasar/train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quasar/checkpoint.h"
#include "quasar/clock.h"
#include "quasar/data_parallel.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/lora.h"
#include "quasar/optim.h"
#include "quasar/rng.h"
#include "quasar/task.h"

enum { STREAM_FORWARD = 0xf0 };

/* Samples per forward pass: train.micro_batch_size, or else a data-parallel rank's
 * whole share of the batch. */
static int micro_size(const qs_train_config *t, int dp_size) {
    if (t->micro_batch_size > 0) return t->micro_batch_size;
    return t->batch_size / dp_size > 0 ? t->batch_size / dp_size : 1;
}

/* Keeps the lines of metrics.jsonl up to `step`, so a resumed run's log reads as if it
 * had never stopped. */
static int trim_metrics(const char *path, int step) {
    char *text;
    size_t n;
    if (access(path, F_OK) != 0) return 0;
    if (qs_file_read(path, &text, &n)) return -1;
    char *out = malloc(n + 1), *o = out;
    if (!out) {
        free(text);
        return qs_error("out of memory");
    }
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) + 1 : strlen(line);
        const char *s = strstr(line, "\"step\":");
        if (nl && s && s < nl && atoi(s + 7) <= step) {
            memcpy(o, line, len);
            o += len;
        }
        line += len;
    }
    int rc = qs_file_write_atomic(path, out, (size_t)(o - out));
    free(out);
    free(text);
    return rc;
}

static void fmt_duration(char *buf, size_t cap, double s) {
    if (!isfinite(s) || s < 0) s = 0;
    int t = (int)(s + 0.5);
    if (t >= 3600) snprintf(buf, cap, "%dh%02dm", t / 3600, t / 60 % 60);
    else snprintf(buf, cap, "%dm%02ds", t / 60, t % 60);
}

static void log_train_line(FILE *mf, int step, double loss, float lr, double norm, double items_s,
                           qs_task *task, const qs_guard *g, qs_step_verdict verdict) {
    fprintf(mf, "{\"step\": %d", step);
    qs_metrics_num(mf, "train_loss", loss, "%.6f");
    qs_metrics_num(mf, "lr", lr, "%.6g");
    qs_metrics_num(mf, "grad_norm", norm, "%.6g");
    /* tokens_per_s is the field tools read; for a classifier an image is its token */
    qs_metrics_num(mf, "tokens_per_s", items_s, "%.1f");
    if (task->items_per_sample == 1) qs_metrics_num(mf, "images_per_s", items_s, "%.1f");
    if (task->log_fields) task->log_fields(task->self, mf);
    if (verdict != QS_STEP_OK) fprintf(mf, ", \"skipped\": \"%s\"", verdict == QS_STEP_NONFINITE ? "nonfinite" : "outlier");
    if (g->skipped_nonfinite || g->skipped_outlier)
        fprintf(mf, ", \"skipped_nonfinite\": %lld, \"skipped_outlier\": %lld", (long long)g->skipped_nonfinite,
                (long long)g->skipped_outlier);
    fprintf(mf, "}\n");
    fflush(mf);
}

/* The ranks' verdict on a step that may fail on some of them: -1 everywhere if it failed
 * anywhere, so that no rank waits forever in a collective the others left. */
static int agree(qs_comm *world, int rc) {
    if (!world || qs_comm_size(world) == 1) return rc;
    int64_t failed = rc != 0;
    if (qs_comm_allreduce_i64(world, &failed, 1, QS_MAX)) return -1;
    if (failed && !rc) qs_error("stopping: another rank failed (its error is above)");
    return failed ? -1 : 0;
}

static void free_groups(qs_comm *dp, qs_comm *sp) {
    qs_comm_free(sp);
    qs_comm_free(dp);
}

/* Rank 0 writes the checkpoint; a ZeRO-1 shard's optimizer state is gathered first. */
static int save_checkpoint(qs_dp *dp, bool writer, const char *run, const qs_config *cfg, qs_task *task,
                           const qs_adamw *optim, const qs_train_state *st) {
    qs_adamw full;
    bool owned;
    int rc = qs_dp_gather_optim(dp, optim, &full, &owned);
    if (!rc && writer)
        rc = task->weights ? qs_checkpoint_save_files(run, cfg, task->weights, &full, st)
                           : qs_checkpoint_save(run, cfg, task->codec, task->params, &full, st);
    if (owned) qs_adamw_free(&full);
    return rc;
}

/* A dry run's steps: the first ones pay for warm-up (page faults, a GPU's lazy loading
 * and cuBLAS's first choices), so the estimate comes from the last of a few. */
#define DRY_RUN_STEPS 3

static void print_dry_run(int first, int done, int end, double last_step_s) {
    char eta[32];
    fmt_duration(eta, sizeof eta, last_step_s * (end - first));
    fprintf(stderr,
            "quasar: dry run: %d step(s) from step %d, the last in %.3f s; the %d steps to step %d would take "
            "about %s (evaluations and checkpoints not counted); nothing was written\n",
            done - first, first, last_step_s, end - first, end, eta);
}

/* What model.recompute_layers "auto" chose (the plan printed is the chosen one's). */
static void print_recompute_choice(const qs_model_config *m) {
    const int n = m->recompute_layers, L = m->n_layer;
    fputs("quasar: model.recompute_layers auto: ", stderr);
    if (n == 0) fputs("no block checkpointed (everything fits)\n", stderr);
    else if (n == QS_RECOMPUTE_ALL || n >= L) fputs("every block checkpointed\n", stderr);
    else fprintf(stderr, "the last %d of %d blocks checkpointed\n", n, L);
}

int qs_train(qs_config *cfg, const qs_train_options *opt) {
    const qs_backend *be = opt->be ? opt->be : qs_backend_cpu();
    qs_train_config *tc = &cfg->train;
    const char *run = opt->out_dir;
    char path[QS_PATH_MAX + 64], step_dir[QS_PATH_MAX + 64];
    char *chars_json = NULL;
    qs_st_file mf_st = {0};
    int rc = -1;

    qs_comm *world = opt->world, *dp_group = NULL, *sp_group = NULL;
    const int world_size = world ? qs_comm_size(world) : 1, sp = cfg->parallel.sp;
    const bool writer = !world || qs_comm_rank(world) == 0; /* rank 0 writes the run folder */
    const bool writes = writer && !opt->dry_run;            /* ... unless this is a dry run */
    if (world_size % sp)
        return qs_error("parallel.sp %d does not divide the %d rank(s) of this run", sp, world_size);
    /* data-parallel x sequence-parallel: the sp ranks of a group share each sequence */
    const int dp_size = world_size / sp;
    const int B = micro_size(tc, dp_size);
    if (tc->batch_size % (dp_size * B))
        return qs_error("train.batch_size %d must be a multiple of the %d data-parallel rank(s) x "
                        "train.micro_batch_size %d", tc->batch_size, dp_size, B);
    const int accum = tc->batch_size / (dp_size * B); /* micro-batches per rank and step */

    if (opt->resume && opt->base) {
        qs_config stored = *cfg;
        if (qs_checkpoint_find_file(run, QS_LORA_WEIGHTS, step_dir, sizeof step_dir) ||
            qs_lora_read_config(step_dir, &stored.lora))
            return -1;
        if (!qs_config_same(&stored, cfg, "lora"))
            return qs_error("--resume: the lora section differs from the checkpoint's in '%s'", step_dir);
    } else if (opt->resume) {
        qs_config stored;
        if (qs_checkpoint_find(run, step_dir, sizeof step_dir) ||
            qs_checkpoint_open_model(&mf_st, step_dir, &stored, &chars_json))
            return -1;
        /* The architecture is the checkpoint's; training settings may change on resume. */
        if (cfg->model.vocab_size == 0) cfg->model.vocab_size = stored.model.vocab_size;
        if (!qs_config_same_architecture(&stored.model, &cfg->model)) {
            qs_st_free(&mf_st);
            free(chars_json);
            return qs_error("--resume: the model section differs from the checkpoint's in '%s' (only "
                            "model.recompute_ffn and model.recompute_layers may change)", step_dir);
        }
    } else {
        /* a new run never writes over a saved one (its metrics, then its checkpoints) */
        snprintf(path, sizeof path, "%s/ckpt/latest", run);
        if (!access(path, F_OK))
            return qs_error("'%s' already holds a run; continue it with --resume %s, or give --out a new folder",
                            run, run);
    }
    int dp_rank = world ? qs_comm_rank(world) : 0;
    if (sp > 1) {
        if (qs_comm_mesh(world, sp, &dp_group, &sp_group)) {
            qs_st_free(&mf_st);
            free(chars_json);
            return -1;
        }
        dp_rank = qs_comm_rank(dp_group);
    }
    qs_task task;
    const bool auto_recompute = cfg->model.recompute_layers == QS_RECOMPUTE_AUTO;
    const qs_task_place place = {
        .micro_B = B, .sp = sp_group, .be = be, .optim_shards = cfg->parallel.zero == 1 ? dp_size : 1};
    int trc = opt->base ? qs_task_open_lora(&task, cfg, opt->base_chars, opt->base, opt->base_dir,
                                            opt->resume ? step_dir : NULL, &place)
                        : qs_task_open(&task, cfg, chars_json, &place);
    free(chars_json);
    if (trc) {
        qs_st_free(&mf_st);
        free_groups(dp_group, sp_group);
        return -1;
    }
    qs_params *ps = task.params;
    qs_dp dp;
    qs_dp_init(&dp, world, cfg->parallel.zero, ps->n, (size_t)(cfg->parallel.bucket_mb * (1 << 20) / sizeof(float)));
    qs_adamw optim = {0};
    FILE *mf = NULL;
    if (writes) {
        char *cfg_json = qs_config_to_json(cfg);
        snprintf(path, sizeof path, "%s/config.json", run);
        rc = qs_mkdirs(run) ? -1
             : cfg_json     ? qs_file_write_atomic(path, cfg_json, strlen(cfg_json))
                            : qs_error("out of memory");
        free(cfg_json);
    } else {
        rc = 0;
    }
    if (agree(world, rc)) goto fail;
    rc = -1;

    qs_train_state st = {.step = 0, .seed = tc->seed};
    qs_guard_init(&st.guard, tc->outlier_zscore, tc->max_bad_steps);
    int src = qs_dp_create_optim(&dp, be, &optim);
    if (!src && opt->resume) {
        /* a LoRA task loaded its adapter from step_dir when it opened */
        src = (!task.weights && qs_checkpoint_load_weights(ps, &mf_st, step_dir)) ||
              qs_checkpoint_load_optim(step_dir, &optim, &st);
        if (!src && st.seed != tc->seed)
            src = qs_error("--resume: train.seed %llu differs from the checkpoint's %llu",
                           (unsigned long long)tc->seed, (unsigned long long)st.seed);
    } else if (!src) {
        src = task.init(task.self, tc->seed);
    }
    qs_st_free(&mf_st);
    if (!src && writes) {
        snprintf(path, sizeof path, "%s/metrics.jsonl", run);
        if (!(src = trim_metrics(path, st.step)) && !(mf = fopen(path, "a")))
            src = qs_error("cannot open '%s' for writing", path);
    }
    if (agree(world, src)) goto fail;

    const int T = task.items_per_sample;
    int until = opt->until_step > 0 && opt->until_step < tc->max_steps ? opt->until_step : tc->max_steps;
    const int end = until; /* where the run would stop */
    if (opt->dry_run && until > st.step + DRY_RUN_STEPS) until = st.step + DRY_RUN_STEPS;
    if (writer) {
        fprintf(stderr, "quasar: memory plan%s ",
                dp.zero && dp_size > 1 ? " per rank (ZeRO-1)" : world_size > 1 ? " per rank" : "");
        qs_mem_plan_print(stderr, &task.plan, be);
        fprintf(stderr, "\nquasar: %zu parameters; ", ps->n);
        if (task.codec) fprintf(stderr, "vocab %d; %d x %d tokens", cfg->model.vocab_size, tc->batch_size, T);
        else fprintf(stderr, "%d images", tc->batch_size);
        fprintf(stderr, " per step (%d data-parallel rank(s)", dp_size);
        if (sp > 1) fprintf(stderr, " x %d sequence-parallel of %d tokens", sp, T / sp);
        if (world_size > 1) fprintf(stderr, ", over %s", qs_comm_name(world));
        fprintf(stderr, "; %d micro-batch(es) of %d) on %s%s\n", accum, B, be->name, opt->resume ? " -- resuming" : "");
        if (opt->resume) fprintf(stderr, "quasar: resumed from %s at step %d\n", step_dir, st.step);
        if (auto_recompute) print_recompute_choice(&cfg->model);
    }

    int tty = writer && isatty(STDERR_FILENO), start_step = st.step;
    double t_start = qs_clock_now(), last_step_s = 0.0;
    while (st.step < until) {
        double t0 = qs_clock_now();
        float lr = qs_lr_at(tc, st.step);
        /* this rank's slice of the global batch: samples keyed by their global index and
         * randomness by step, so the run is the same on any number of ranks */
        const uint64_t first = (uint64_t)st.step * tc->batch_size + (uint64_t)dp_rank * accum * B;
        const uint64_t rng_seed = qs_rng_u64(tc->seed, STREAM_FORWARD, (uint64_t)st.step);
        /* a micro-batch's part of the global mean; an sp rank's loss covers 1/sp of its rows */
        const float share = (float)B / (float)tc->batch_size / (float)sp;
        qs_params_zero_grad(ps);
        if (task.step_begin) task.step_begin(task.self);
        double loss = 0.0, norm;
        for (int a = 0; a < accum; a++) {
            double l;
            if (a == accum - 1) qs_dp_watch_backward(&dp, ps);
            if (task.train_micro(task.self, first + (uint64_t)a * B, rng_seed, share, &l)) goto fail;
            loss += l * share;
        }
        /* every rank's gradients are partial sums of the global mean: summed over all */
        if (qs_dp_reduce_grads(&dp, ps) || qs_dp_grad_norm(&dp, ps, &norm) ||
            (world && qs_comm_allreduce_f64(dp.comm, &loss, 1, QS_SUM)) ||
            (task.reduce_stats && task.reduce_stats(task.self, dp.comm)))
            goto fail;
        qs_step_verdict verdict = qs_guard_check(&st.guard, loss, norm);
        if (verdict == QS_STEP_OK) {
            qs_adamw_apply(&optim, ps, tc, lr, norm);
            if (qs_dp_gather_params(&dp, ps)) goto fail;
        }
        st.step++;
        st.tokens_seen += (int64_t)tc->batch_size * T;
        double dt = qs_clock_now() - t0, items_s = tc->batch_size * T / dt;
        last_step_s = dt;
        if (mf) log_train_line(mf, st.step, loss, lr, norm, items_s, &task, &st.guard, verdict);
        if (writer && world_size > 1 && st.step == start_step + 1)
            fprintf(stderr, "quasar: gradients reduced in %d call(s) a step, %d of them during the backward pass\n",
                    dp.calls, dp.overlapped);
        if (qs_guard_should_stop(&st.guard)) {
            char latest[QS_PATH_MAX + 64];
            qs_error("%d steps in a row skipped for a non-finite or outlier loss/gradient norm (step %d); "
                     "stopping with the last checkpoint kept (%s)", st.guard.bad_in_row, st.step,
                     qs_checkpoint_find(run, latest, sizeof latest) ? "none written yet" : latest);
            goto fail;
        }
        if (writer && (tty || st.step % tc->log_interval == 0 || st.step == until)) {
            double elapsed = qs_clock_now() - t_start;
            char eta[32];
            fmt_duration(eta, sizeof eta, elapsed / (st.step - start_step) * (until - st.step));
            fprintf(stderr, "%sstep %d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f %s/s | ETA %s%s",
                    tty ? "\r\033[K" : "", st.step, tc->max_steps, loss, lr, norm, items_s, task.item, eta,
                    tty ? "" : "\n");
        }
        int last = st.step == until;
        if ((tc->eval_interval > 0 && st.step % tc->eval_interval == 0) || st.step == tc->max_steps) {
            double vl, acc;
            if (agree(world, qs_task_evaluate(&task, tc->eval_iters, world, dp_rank, dp_size, &vl, &acc))) goto fail;
            if (mf) {
                fprintf(mf, "{\"step\": %d", st.step);
                qs_metrics_num(mf, "val_loss", vl, "%.6f");
                if (!isnan(acc)) qs_metrics_num(mf, "val_acc", acc, "%.6f");
                fprintf(mf, "}\n");
                fflush(mf);
                fprintf(stderr, "%sstep %d: val loss %.4f", tty ? "\r\033[K" : "", st.step, vl);
                if (!isnan(acc)) fprintf(stderr, " | val acc %.4f", acc);
                fputc('\n', stderr);
            }
        }
        if (!opt->dry_run && ((tc->checkpoint_interval > 0 && st.step % tc->checkpoint_interval == 0) || last)) {
            if (agree(world, save_checkpoint(&dp, writer, run, cfg, &task, &optim, &st))) goto fail;
        }
    }
    if (tty) fputc('\n', stderr);
    if (agree(world, st.step == tc->max_steps && writes && task.finish ? task.finish(task.self, run) : 0)) goto fail;
    if (writer && opt->dry_run) print_dry_run(start_step, st.step, end, last_step_s);
    else if (writer) fprintf(stderr, "quasar: done in %.1f s; run folder %s\n", qs_clock_now() - t_start, run);
    rc = 0;
fail:
    qs_st_free(&mf_st);
    if (mf) fclose(mf);
    qs_adamw_free(&optim);
    qs_task_free(&task);
    free_groups(dp_group, sp_group);
    return rc;
}

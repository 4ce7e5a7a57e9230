#include "quasar/train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "quasar/checkpoint.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/lora.h"
#include "quasar/optim.h"
#include "quasar/rng.h"
#include "quasar/task.h"

enum { STREAM_FORWARD = 0xf0 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int micro_size(const qs_train_config *t) {
    return t->micro_batch_size > 0 ? t->micro_batch_size : t->batch_size;
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

int qs_train(qs_config *cfg, const qs_train_options *opt) {
    const qs_backend *be = qs_backend_cpu();
    qs_train_config *tc = &cfg->train;
    const char *run = opt->out_dir;
    char path[QS_PATH_MAX + 64], step_dir[QS_PATH_MAX + 64];
    char *chars_json = NULL;
    qs_st_file mf_st = {0};
    int rc = -1;

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
        if (!qs_config_same(&stored, cfg, "model")) {
            qs_st_free(&mf_st);
            free(chars_json);
            return qs_error("--resume: the model section differs from the checkpoint's in '%s'", step_dir);
        }
    }
    int B = micro_size(tc), accum = tc->batch_size / B;
    qs_task task;
    int trc = opt->base ? qs_task_open_lora(&task, cfg, opt->base_chars, opt->base, opt->base_dir,
                                            opt->resume ? step_dir : NULL, B)
                        : qs_task_open(&task, cfg, chars_json, B);
    free(chars_json);
    if (trc) {
        qs_st_free(&mf_st);
        return -1;
    }
    qs_params *ps = task.params;
    qs_adamw optim = {0};
    FILE *mf = NULL;
    if (qs_mkdirs(run)) goto out;
    char *cfg_json = qs_config_to_json(cfg);
    snprintf(path, sizeof path, "%s/config.json", run);
    rc = cfg_json ? qs_file_write_atomic(path, cfg_json, strlen(cfg_json)) : qs_error("out of memory");
    free(cfg_json);
    if (rc) goto out;
    rc = -1;

    if (qs_adamw_create(&optim, be, ps->n)) goto out;
    qs_train_state st = {.step = 0, .seed = tc->seed};
    qs_guard_init(&st.guard, tc->outlier_zscore, tc->max_bad_steps);
    if (opt->resume) {
        /* a LoRA task loaded its adapter from step_dir when it opened */
        if ((!task.weights && qs_checkpoint_load_weights(ps, &mf_st, step_dir)) ||
            qs_checkpoint_load_optim(step_dir, &optim, &st))
            goto out;
        if (st.seed != tc->seed) {
            qs_error("--resume: train.seed %llu differs from the checkpoint's %llu", (unsigned long long)tc->seed,
                     (unsigned long long)st.seed);
            goto out;
        }
        qs_st_free(&mf_st);
    } else if (task.init(task.self, tc->seed)) {
        goto out;
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    if (trim_metrics(path, st.step)) goto out;
    if (!(mf = fopen(path, "a"))) {
        qs_error("cannot open '%s' for writing", path);
        goto out;
    }

    const int T = task.items_per_sample;
    int until = opt->until_step > 0 && opt->until_step < tc->max_steps ? opt->until_step : tc->max_steps;
    fprintf(stderr, "quasar: %zu parameters (%.1f MiB), activations %.1f MiB, optimizer %.1f MiB; ", ps->n,
            ps->n * 4 / 1048576.0, task.activation_bytes / 1048576.0, ps->n * 8 / 1048576.0);
    if (task.codec) fprintf(stderr, "vocab %d; %d x %d tokens", cfg->model.vocab_size, tc->batch_size, T);
    else fprintf(stderr, "%d images", tc->batch_size);
    fprintf(stderr, " per step (%d micro-batches of %d)%s\n", accum, B, opt->resume ? " -- resuming" : "");
    if (opt->resume) fprintf(stderr, "quasar: resumed from %s at step %d\n", step_dir, st.step);

    int tty = isatty(STDERR_FILENO), start_step = st.step;
    double t_start = now_s();
    while (st.step < until) {
        double t0 = now_s();
        float lr = qs_lr_at(tc, st.step);
        qs_params_zero_grad(ps);
        if (task.step_begin) task.step_begin(task.self);
        double loss = 0.0;
        for (int a = 0; a < accum; a++) {
            uint64_t micro = (uint64_t)st.step * accum + (uint64_t)a;
            loss += task.train_micro(task.self, micro, qs_rng_u64(tc->seed, STREAM_FORWARD, micro), 1.0f / (float)accum) /
                    accum;
        }
        double norm = qs_adamw_grad_norm(&optim, ps);
        qs_step_verdict verdict = qs_guard_check(&st.guard, loss, norm);
        if (verdict == QS_STEP_OK) qs_adamw_apply(&optim, ps, tc, lr, norm);
        st.step++;
        st.tokens_seen += (int64_t)tc->batch_size * T;
        double dt = now_s() - t0, items_s = tc->batch_size * T / dt;
        log_train_line(mf, st.step, loss, lr, norm, items_s, &task, &st.guard, verdict);
        if (qs_guard_should_stop(&st.guard)) {
            char latest[QS_PATH_MAX + 64];
            qs_error("%d steps in a row skipped for a non-finite or outlier loss/gradient norm (step %d); "
                     "stopping with the last checkpoint kept (%s)", st.guard.bad_in_row, st.step,
                     qs_checkpoint_find(run, latest, sizeof latest) ? "none written yet" : latest);
            goto out;
        }
        if (tty || st.step % tc->log_interval == 0 || st.step == until) {
            double elapsed = now_s() - t_start;
            char eta[32];
            fmt_duration(eta, sizeof eta, elapsed / (st.step - start_step) * (until - st.step));
            fprintf(stderr, "%sstep %d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f %s/s | ETA %s%s",
                    tty ? "\r\033[K" : "", st.step, tc->max_steps, loss, lr, norm, items_s, task.item, eta,
                    tty ? "" : "\n");
        }
        int last = st.step == until;
        if ((tc->eval_interval > 0 && st.step % tc->eval_interval == 0) || st.step == tc->max_steps) {
            double vl, acc;
            if (task.evaluate(task.self, tc->eval_iters, &vl, &acc)) goto out;
            fprintf(mf, "{\"step\": %d", st.step);
            qs_metrics_num(mf, "val_loss", vl, "%.6f");
            if (!isnan(acc)) qs_metrics_num(mf, "val_acc", acc, "%.6f");
            fprintf(mf, "}\n");
            fflush(mf);
            fprintf(stderr, "%sstep %d: val loss %.4f", tty ? "\r\033[K" : "", st.step, vl);
            if (!isnan(acc)) fprintf(stderr, " | val acc %.4f", acc);
            fputc('\n', stderr);
        }
        if ((tc->checkpoint_interval > 0 && st.step % tc->checkpoint_interval == 0) || last) {
            if (task.weights ? qs_checkpoint_save_files(run, cfg, task.weights, &optim, &st)
                             : qs_checkpoint_save(run, cfg, task.codec, ps, &optim, &st))
                goto out;
        }
    }
    if (tty) fputc('\n', stderr);
    if (st.step == tc->max_steps && task.finish && task.finish(task.self, run)) goto out;
    fprintf(stderr, "quasar: done in %.1f s; run folder %s\n", now_s() - t_start, run);
    rc = 0;
out:
    if (mf) fclose(mf);
    qs_adamw_free(&optim);
    qs_task_free(&task);
    qs_st_free(&mf_st);
    return rc;
}

#include "quasar/train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "quasar/checkpoint.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/optim.h"
#include "quasar/rng.h"
#include "quasar/sample.h"

enum { STREAM_FORWARD = 0xf0 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int micro_size(const qs_train_config *t) {
    return t->micro_batch_size > 0 ? t->micro_batch_size : t->batch_size;
}

double qs_evaluate(qs_gpt *m, const qs_dataset *d, const qs_config *cfg, int iters) {
    int B = micro_size(&cfg->train), T = cfg->model.seq_len;
    int *x = malloc((size_t)B * T * sizeof(int)), *y = malloc((size_t)B * T * sizeof(int));
    if (!x || !y) {
        free(x);
        free(y);
        return NAN;
    }
    qs_forward_mode mode = {.train = false};
    double sum = 0.0;
    for (int i = 0; i < iters; i++) {
        qs_dataset_batch(d, QS_SPLIT_VAL, cfg->train.seed, (uint64_t)i * B, B, T, x, y);
        sum += qs_gpt_forward(m, x, y, B, T, &mode);
    }
    free(x);
    free(y);
    return sum / iters;
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

typedef struct sample_sink {
    const qs_codec *codec;
    FILE *fp;
} sample_sink;

static void emit_token(int token, void *user) {
    sample_sink *s = user;
    qs_codec_put(s->codec, token, s->fp);
}

static int write_samples(qs_gpt *m, const qs_config *cfg, const qs_codec *codec, const char *run_dir) {
    int n_new = cfg->train.sample_tokens;
    int *ctx = malloc(((size_t)n_new + 1) * sizeof(int));
    char *buf = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&buf, &len);
    if (!ctx || !mem) {
        free(ctx);
        if (mem) fclose(mem);
        return qs_error("out of memory sampling");
    }
    ctx[0] = qs_codec_start_token(codec);
    qs_sample_params sp = {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = cfg->train.seed};
    sample_sink sink = {codec, mem};
    int rc = qs_generate(m, ctx, 1, n_new, &sp, emit_token, &sink) < 0 ? -1 : 0;
    fputc('\n', mem);
    fclose(mem);
    char path[QS_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/samples.txt", run_dir);
    if (!rc) rc = qs_file_write_atomic(path, buf, len);
    free(buf);
    free(ctx);
    return rc;
}

/* JSON has no NaN or infinity: a non-finite value is logged as null. */
static void json_num(FILE *f, const char *key, double v, const char *fmt) {
    fprintf(f, ", \"%s\": ", key);
    if (isfinite(v)) fprintf(f, fmt, v);
    else fputs("null", f);
}

static void log_train_line(FILE *mf, int step, double loss, float lr, double norm, double tok_s,
                           const qs_gpt *m, const qs_guard *g, qs_step_verdict verdict) {
    fprintf(mf, "{\"step\": %d", step);
    json_num(mf, "train_loss", loss, "%.6f");
    json_num(mf, "lr", lr, "%.6g");
    json_num(mf, "grad_norm", norm, "%.6g");
    json_num(mf, "tokens_per_s", tok_s, "%.1f");
    const qs_model_config *c = qs_gpt_config(m);
    if (c->moe.n_experts > 0) {
        const qs_moe_stats *s = qs_gpt_moe_stats(m);
        json_num(mf, "aux_loss", s->balance, "%.6g");
        json_num(mf, "z_loss", s->z, "%.6g");
        fprintf(mf, ", \"expert_tokens\": [");
        for (int e = 0; e < c->moe.n_experts; e++)
            fprintf(mf, "%s%lld", e ? ", " : "", (long long)s->expert_tokens[e]);
        int64_t total = s->kept + s->dropped;
        fprintf(mf, "], \"dropped_frac\": %.6g", total ? (double)s->dropped / total : 0.0);
    }
    if (verdict != QS_STEP_OK) fprintf(mf, ", \"skipped\": \"%s\"", verdict == QS_STEP_NONFINITE ? "nonfinite" : "outlier");
    if (g->skipped_nonfinite || g->skipped_outlier)
        fprintf(mf, ", \"skipped_nonfinite\": %lld, \"skipped_outlier\": %lld", (long long)g->skipped_nonfinite,
                (long long)g->skipped_outlier);
    fprintf(mf, "}\n");
    fflush(mf);
}

static bool same_model(const qs_config *a, const qs_config *b) {
    char *ja = qs_config_to_json(a), *jb = qs_config_to_json(b);
    cJSON *pa = cJSON_Parse(ja), *pb = cJSON_Parse(jb);
    bool same = pa && pb &&
                cJSON_Compare(cJSON_GetObjectItem(pa, "model"), cJSON_GetObjectItem(pb, "model"), true);
    cJSON_Delete(pa);
    cJSON_Delete(pb);
    free(ja);
    free(jb);
    return same;
}

int qs_dataset_open(qs_dataset *d, qs_config *cfg, qs_codec *codec) {
    int rc = codec->bpe ? qs_dataset_load_shards(d, &cfg->data, cfg->model.seq_len,
                                                 cfg->model.vocab_size ? cfg->model.vocab_size : qs_codec_vocab_size(codec))
                        : qs_dataset_load(d, &codec->chars, &cfg->data, cfg->model.seq_len);
    if (rc) return -1;
    int v = qs_codec_vocab_size(codec);
    if (cfg->model.vocab_size == 0) cfg->model.vocab_size = v;
    if (cfg->model.vocab_size < v) {
        qs_dataset_free(d);
        return qs_error("model.vocab_size %d is smaller than the vocabulary (%d)", cfg->model.vocab_size, v);
    }
    return 0;
}

int qs_train(qs_config *cfg, const qs_train_options *opt) {
    const qs_backend *be = qs_backend_cpu();
    qs_train_config *tc = &cfg->train;
    const char *run = opt->out_dir;
    char path[QS_PATH_MAX + 64], step_dir[QS_PATH_MAX + 64];
    qs_codec codec = {0};
    char *chars_json = NULL;
    qs_st_file mf_st = {0};
    int rc = -1;

    if (opt->resume) {
        qs_config stored;
        if (qs_checkpoint_find(run, step_dir, sizeof step_dir) ||
            qs_checkpoint_open_model(&mf_st, step_dir, &stored, &chars_json))
            return -1;
        /* The architecture is the checkpoint's; training settings may change on resume. */
        if (cfg->model.vocab_size == 0) cfg->model.vocab_size = stored.model.vocab_size;
        if (!same_model(&stored, cfg)) {
            qs_st_free(&mf_st);
            free(chars_json);
            return qs_error("--resume: the model section differs from the checkpoint's in '%s'", step_dir);
        }
    }
    qs_dataset data = {0};
    int drc = qs_codec_open(&codec, &cfg->data, chars_json) || qs_dataset_open(&data, cfg, &codec);
    free(chars_json);
    if (drc) {
        qs_st_free(&mf_st);
        qs_codec_free(&codec);
        return -1;
    }
    if (qs_mkdirs(run)) goto out_data;
    char *cfg_json = qs_config_to_json(cfg);
    snprintf(path, sizeof path, "%s/config.json", run);
    rc = cfg_json ? qs_file_write_atomic(path, cfg_json, strlen(cfg_json)) : qs_error("out of memory");
    free(cfg_json);
    if (rc) goto out_data;
    rc = -1;

    int B = micro_size(tc), T = cfg->model.seq_len, accum = tc->batch_size / B;
    qs_gpt *m;
    if (qs_gpt_create(&m, &cfg->model, be, B, T)) goto out_data;
    qs_adamw optim = {0};
    qs_params *ps = qs_gpt_params(m);
    if (qs_adamw_create(&optim, be, ps->n)) goto out_model;
    qs_train_state st = {.step = 0, .seed = tc->seed};
    qs_guard_init(&st.guard, tc->outlier_zscore, tc->max_bad_steps);
    if (opt->resume) {
        if (qs_checkpoint_load_weights(ps, &mf_st, step_dir) || qs_checkpoint_load_optim(step_dir, &optim, &st))
            goto out_optim;
        if (st.seed != tc->seed) {
            qs_error("--resume: train.seed %llu differs from the checkpoint's %llu", (unsigned long long)tc->seed,
                     (unsigned long long)st.seed);
            goto out_optim;
        }
        qs_st_free(&mf_st);
    } else if (qs_gpt_init(m, tc->seed)) {
        goto out_optim;
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    if (trim_metrics(path, st.step)) goto out_optim;
    FILE *mf = fopen(path, "a");
    if (!mf) {
        qs_error("cannot open '%s' for writing", path);
        goto out_optim;
    }

    int until = opt->until_step > 0 && opt->until_step < tc->max_steps ? opt->until_step : tc->max_steps;
    size_t np = ps->n;
    fprintf(stderr, "quasar: %zu parameters (%.1f MiB), activations %.1f MiB, optimizer %.1f MiB; "
                    "vocab %d; %d x %d tokens per step (%d micro-batches of %d)%s\n",
            np, np * 4 / 1048576.0, qs_gpt_activation_bytes(m) / 1048576.0, np * 8 / 1048576.0,
            cfg->model.vocab_size, tc->batch_size, T, accum, B,
            opt->resume ? " -- resuming" : "");
    if (opt->resume) fprintf(stderr, "quasar: resumed from %s at step %d\n", step_dir, st.step);

    int *x = malloc((size_t)B * T * sizeof(int)), *y = malloc((size_t)B * T * sizeof(int));
    if (!x || !y) {
        qs_error("out of memory");
        goto out_buffers;
    }
    int tty = isatty(STDERR_FILENO), start_step = st.step;
    double t_start = now_s();
    while (st.step < until) {
        double t0 = now_s();
        float lr = qs_lr_at(tc, st.step);
        qs_params_zero_grad(ps);
        qs_gpt_moe_stats_reset(m);
        double loss = 0.0;
        for (int a = 0; a < accum; a++) {
            uint64_t micro = (uint64_t)st.step * accum + (uint64_t)a;
            qs_dataset_batch(&data, QS_SPLIT_TRAIN, tc->seed, micro * B, B, T, x, y);
            qs_forward_mode mode = {.train = true, .rng_seed = qs_rng_u64(tc->seed, STREAM_FORWARD, micro)};
            loss += qs_gpt_forward(m, x, y, B, T, &mode) / accum;
            qs_gpt_backward(m, 1.0f / (float)accum);
        }
        double norm = qs_adamw_grad_norm(&optim, ps);
        qs_step_verdict verdict = qs_guard_check(&st.guard, loss, norm);
        if (verdict == QS_STEP_OK) qs_adamw_apply(&optim, ps, tc, lr, norm);
        st.step++;
        st.tokens_seen += (int64_t)tc->batch_size * T;
        double dt = now_s() - t0, tok_s = tc->batch_size * T / dt;
        log_train_line(mf, st.step, loss, lr, norm, tok_s, m, &st.guard, verdict);
        if (qs_guard_should_stop(&st.guard)) {
            char latest[QS_PATH_MAX + 64];
            qs_error("%d steps in a row skipped for a non-finite or outlier loss/gradient norm (step %d); "
                     "stopping with the last checkpoint kept (%s)", st.guard.bad_in_row, st.step,
                     qs_checkpoint_find(run, latest, sizeof latest) ? "none written yet" : latest);
            goto out_buffers;
        }
        if (tty || st.step % tc->log_interval == 0 || st.step == until) {
            double elapsed = now_s() - t_start;
            char eta[32];
            fmt_duration(eta, sizeof eta, elapsed / (st.step - start_step) * (until - st.step));
            fprintf(stderr, "%sstep %d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f tok/s | ETA %s%s",
                    tty ? "\r\033[K" : "", st.step, tc->max_steps, loss, lr, norm, tok_s, eta, tty ? "" : "\n");
        }
        int last = st.step == until;
        if ((tc->eval_interval > 0 && st.step % tc->eval_interval == 0) || st.step == tc->max_steps) {
            double vl = qs_evaluate(m, &data, cfg, tc->eval_iters);
            fprintf(mf, "{\"step\": %d", st.step);
            json_num(mf, "val_loss", vl, "%.6f");
            fprintf(mf, "}\n");
            fflush(mf);
            fprintf(stderr, "%sstep %d: val loss %.4f\n", tty ? "\r\033[K" : "", st.step, vl);
        }
        if ((tc->checkpoint_interval > 0 && st.step % tc->checkpoint_interval == 0) || last) {
            if (qs_checkpoint_save(run, cfg, &codec, ps, &optim, &st)) goto out_buffers;
        }
    }
    if (tty) fputc('\n', stderr);
    if (st.step == tc->max_steps && tc->sample_tokens > 0 && write_samples(m, cfg, &codec, run)) goto out_buffers;
    fprintf(stderr, "quasar: done in %.1f s; run folder %s\n", now_s() - t_start, run);
    rc = 0;
out_buffers:
    free(x);
    free(y);
    fclose(mf);
out_optim:
    qs_adamw_free(&optim);
out_model:
    qs_gpt_free(m);
out_data:
    qs_dataset_free(&data);
    qs_codec_free(&codec);
    qs_st_free(&mf_st);
    return rc;
}

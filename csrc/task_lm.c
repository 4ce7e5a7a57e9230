/* The language-model task: a GPT over char-level text or GPT-2 token shards; or, for
 * LoRA fine-tuning, adapters over a frozen GPT (the adapters are what it trains). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/lora.h"
#include "quasar/model.h"
#include "quasar/ring_attention.h"
#include "quasar/sample.h"
#include "quasar/task.h"

typedef struct lm_task {
    qs_config cfg;
    qs_codec codec;
    qs_dataset data;
    qs_gpt *m;
    int B, T;    /* micro-batch; local rows per sequence (model.seq_len / sp) */
    int *x, *y;  /* the model's rows of each window */
    int *xf, *yf; /* sequence parallel: the whole windows, whose rows this rank gathers */
    qs_comm *sp;
    qs_lora *lora;         /* LoRA: the adapters on m, whose own weights are frozen */
    char base_dir[QS_PATH_MAX + 64];
    qs_ckpt_files files;   /* LoRA: checkpoints hold the adapter's files */
    /* MoE step statistics over all ranks: tokens per expert, kept, dropped; and the last
     * forward's balance and z losses, averaged over the ranks */
    int64_t *counts;
    double losses[2];
} lm_task;

static int lm_init(void *self, uint64_t seed) { return qs_gpt_init(((lm_task *)self)->m, seed); }
static int lora_init(void *self, uint64_t seed) { return qs_lora_init(((lm_task *)self)->lora, seed); }

static int write_adapter(const void *self, const char *dir) {
    const lm_task *t = self;
    return qs_lora_write(t->lora, dir, t->base_dir);
}

/* Windows first .. first + b - 1 of a split into the model's rows (B of them: under
 * sequence parallelism the ring needs a full micro-batch, so rows past b repeat window
 * 0 with their targets ignored). */
static void load_windows(lm_task *t, qs_split split, uint64_t first, int b) {
    if (!t->sp) {
        qs_dataset_batch(&t->data, split, t->cfg.train.seed, first, b, t->T, t->x, t->y);
        return;
    }
    const int T = t->cfg.model.seq_len, sp = qs_comm_size(t->sp), rank = qs_comm_rank(t->sp);
    qs_dataset_batch(&t->data, split, t->cfg.train.seed, first, b, T, t->xf, t->yf);
    for (int r = b; r < t->B; r++) {
        memcpy(t->xf + (size_t)r * T, t->xf, (size_t)T * sizeof(int));
        for (int i = 0; i < T; i++) t->yf[(size_t)r * T + i] = -1;
    }
    qs_ring_attention_gather(t->x, t->xf, sizeof(int), sp, rank, t->B, T);
    qs_ring_attention_gather(t->y, t->yf, sizeof(int), sp, rank, t->B, T);
}

static int lm_train_micro(void *self, uint64_t sample0, uint64_t rng_seed, float grad_scale, double *loss) {
    lm_task *t = self;
    load_windows(t, QS_SPLIT_TRAIN, sample0, t->B);
    qs_forward_mode mode = {.train = true, .rng_seed = rng_seed, .sample0 = sample0, .grad_scale = grad_scale};
    *loss = qs_gpt_forward(t->m, t->x, t->y, t->B, t->T, &mode);
    return qs_gpt_backward(t->m) || qs_gpt_failed(t->m) ? -1 : 0;
}

/* The same validation windows every call, on any number of ranks: iters batches of
 * train.micro_batch_size (or train.batch_size) windows, each part a contiguous share
 * of them in passes of up to B. */
static int lm_evaluate(void *self, int iters, int part, int parts, double sums[3]) {
    lm_task *t = self;
    const qs_train_config *tc = &t->cfg.train;
    const uint64_t total = (uint64_t)iters * (uint64_t)(tc->micro_batch_size > 0 ? tc->micro_batch_size : tc->batch_size);
    const uint64_t end = total * (uint64_t)(part + 1) / (uint64_t)parts;
    qs_forward_mode mode = {.train = false};
    for (uint64_t s = total * (uint64_t)part / (uint64_t)parts; s < end; s += (uint64_t)t->B) {
        const int b = end - s < (uint64_t)t->B ? (int)(end - s) : t->B;
        load_windows(t, QS_SPLIT_VAL, s, b);
        sums[0] += qs_gpt_forward(t->m, t->x, t->y, t->sp ? t->B : b, t->T, &mode) * b;
        sums[2] += b;
        if (qs_gpt_failed(t->m)) return -1;
    }
    return 0;
}

static int lm_use_bf16_weights(void *self) { return qs_gpt_use_bf16_weights(((lm_task *)self)->m); }

static void lm_step_begin(void *self) { qs_gpt_moe_stats_reset(((lm_task *)self)->m); }

static int lm_reduce_stats(void *self, qs_comm *dp) {
    lm_task *t = self;
    const int E = t->cfg.model.moe.n_experts;
    if (E == 0) return 0;
    const qs_moe_stats *s = qs_gpt_moe_stats(t->m);
    memcpy(t->counts, s->expert_tokens, (size_t)E * sizeof(int64_t));
    t->counts[E] = s->kept;
    t->counts[E + 1] = s->dropped;
    t->losses[0] = s->balance;
    t->losses[1] = s->z;
    if (!dp) return 0;
    if (qs_comm_allreduce_i64(dp, t->counts, (size_t)E + 2, QS_SUM) || qs_comm_allreduce_f64(dp, t->losses, 2, QS_SUM))
        return -1;
    for (int i = 0; i < 2; i++) t->losses[i] /= qs_comm_size(dp);
    return 0;
}

static void lm_log_fields(void *self, FILE *mf) {
    lm_task *t = self;
    const int E = t->cfg.model.moe.n_experts;
    if (E == 0) return;
    qs_metrics_num(mf, "aux_loss", t->losses[0], "%.6g");
    qs_metrics_num(mf, "z_loss", t->losses[1], "%.6g");
    fprintf(mf, ", \"expert_tokens\": [");
    for (int e = 0; e < E; e++) fprintf(mf, "%s%lld", e ? ", " : "", (long long)t->counts[e]);
    int64_t total = t->counts[E] + t->counts[E + 1];
    fprintf(mf, "], \"dropped_frac\": %.6g", total ? (double)t->counts[E + 1] / total : 0.0);
}

typedef struct sample_sink {
    const qs_codec *codec;
    FILE *fp;
} sample_sink;

static void emit_token(int token, void *user) {
    sample_sink *s = user;
    qs_codec_put(s->codec, token, s->fp);
}

/* samples.txt: train.sample_tokens sampled from the start token. */
static int lm_finish(void *self, const char *run_dir) {
    lm_task *t = self;
    int n_new = t->cfg.train.sample_tokens;
    if (n_new <= 0) return 0;
    int *ctx = malloc(((size_t)n_new + 1) * sizeof(int));
    char *buf = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&buf, &len);
    if (!ctx || !mem) {
        free(ctx);
        if (mem) fclose(mem);
        return qs_error("out of memory sampling");
    }
    ctx[0] = qs_codec_start_token(&t->codec);
    qs_sample_params sp = {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = t->cfg.train.seed};
    sample_sink sink = {&t->codec, mem};
    /* a sequence-parallel model holds part of each sequence: sample from a whole copy */
    qs_gpt *whole = NULL;
    int rc = t->sp ? qs_gpt_create_for(&whole, &t->cfg.model, qs_gpt_backend(t->m), 1, t->cfg.model.seq_len,
                                       QS_GPT_INFER)
                   : 0;
    if (whole) qs_params_copy(qs_gpt_params(whole), qs_gpt_params(t->m));
    if (!rc) rc = qs_generate(whole ? whole : t->m, ctx, 1, n_new, &sp, emit_token, &sink) < 0 ? -1 : 0;
    qs_gpt_free(whole);
    fputc('\n', mem);
    fclose(mem);
    char path[QS_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/samples.txt", run_dir);
    if (!rc) rc = qs_file_write_atomic(path, buf, len);
    free(buf);
    free(ctx);
    return rc;
}

static void lm_free(void *self) {
    lm_task *t = self;
    if (!t) return;
    qs_gpt_free(t->m);
    qs_lora_free(t->lora);
    qs_dataset_free(&t->data);
    qs_codec_free(&t->codec);
    free(t->x);
    free(t->y);
    free(t->xf);
    free(t->yf);
    free(t->counts);
    free(t);
}

/* What plan_lm plans for: micro-batches of B x T tokens, the model's use, adapters
 * under LoRA. */
typedef struct lm_shape {
    int B, T;
    qs_gpt_use use;
    bool lora;
} lm_shape;

/* The model with its ring-attention buffers, and the adapters (qs_task_plan_fn). */
static int plan_lm(qs_mem_plan *plan, const qs_config *cfg, const qs_task_place *place, const void *ctx) {
    const lm_shape *s = ctx;
    const int sp = place->sp ? qs_comm_size(place->sp) : 1;
    if (qs_gpt_plan(&cfg->model, place->be, s->B, s->T, s->use, sp, plan)) return -1;
    if (s->lora) {
        qs_mem_plan adapters;
        if (qs_lora_plan(&cfg->lora, &cfg->model, place->be, s->B * s->T, &adapters)) return -1;
        qs_mem_plan_add(plan, &adapters);
    }
    return 0;
}

/* lora: the model is a frozen base that adapters (cfg->lora) will train. Without an
 * optimizer nothing trains: forward passes only (evaluation). */
static int open_lm(qs_task *task, qs_config *cfg, const char *chars_json, const qs_task_place *place, bool lora) {
    const qs_gpt_use use = place->optim_shards > 0 ? (lora ? QS_GPT_FROZEN : QS_GPT_TRAIN)
                           : place->bf16_weights && !lora ? QS_GPT_INFER_BF16
                                                          : QS_GPT_INFER;
    lm_task *t = calloc(1, sizeof *t);
    if (!t) return qs_error("out of memory");
    int rc = qs_codec_open(&t->codec, &cfg->data, chars_json);
    if (!rc) {
        int v = 0;
        rc = t->codec.bpe ? qs_dataset_load_shards(&t->data, &cfg->data, cfg->model.seq_len,
                                                   cfg->model.vocab_size ? cfg->model.vocab_size
                                                                         : qs_codec_vocab_size(&t->codec))
                          : qs_dataset_load(&t->data, &t->codec.chars, &cfg->data, cfg->model.seq_len);
        if (!rc) v = qs_codec_vocab_size(&t->codec);
        if (!rc && cfg->model.vocab_size == 0) cfg->model.vocab_size = v;
        if (!rc && cfg->model.vocab_size < v)
            rc = qs_error("model.vocab_size %d is smaller than the vocabulary (%d)", cfg->model.vocab_size, v);
    }
    t->B = place->micro_B;
    t->sp = place->sp && qs_comm_size(place->sp) > 1 ? place->sp : NULL;
    t->T = cfg->model.seq_len / (t->sp ? qs_comm_size(t->sp) : 1);
    qs_mem_plan plan = {0};
    if (!rc) rc = qs_task_plan(&plan, cfg, place, plan_lm, &(lm_shape){t->B, t->T, use, lora});
    t->cfg = *cfg; /* as planned: recompute_layers "auto" now a count */
    if (!rc) rc = qs_gpt_create_for(&t->m, &cfg->model, place->be, t->B, t->T, use);
    if (!rc && t->sp) rc = qs_gpt_set_sequence_parallel(t->m, t->sp);
    if (!rc && t->sp) {
        t->xf = malloc((size_t)t->B * cfg->model.seq_len * sizeof(int));
        t->yf = malloc((size_t)t->B * cfg->model.seq_len * sizeof(int));
        if (!t->xf || !t->yf) rc = qs_error("out of memory");
    }
    if (!rc) {
        t->x = malloc((size_t)t->B * t->T * sizeof(int));
        t->y = malloc((size_t)t->B * t->T * sizeof(int));
        t->counts = malloc(((size_t)cfg->model.moe.n_experts + 2) * sizeof(int64_t));
        if (!t->x || !t->y || !t->counts) rc = qs_error("out of memory");
    }
    if (rc) {
        lm_free(t);
        return -1;
    }
    *task = (qs_task){.self = t,
                      .params = qs_gpt_params(t->m),
                      .codec = &t->codec,
                      .micro_B = t->B,
                      .items_per_sample = cfg->model.seq_len,
                      .item = "tok",
                      .plan = plan,
                      .init = lm_init,
                      .train_micro = lm_train_micro,
                      .evaluate = lm_evaluate,
                      .use_bf16_weights = lm_use_bf16_weights,
                      .step_begin = lm_step_begin,
                      .reduce_stats = lm_reduce_stats,
                      .log_fields = lm_log_fields,
                      .finish = lm_finish,
                      .free = lm_free};
    return 0;
}

int qs_task_open_lm(qs_task *task, qs_config *cfg, const char *chars_json, const qs_task_place *place) {
    return open_lm(task, cfg, chars_json, place, false);
}

int qs_task_open_lora(qs_task *task, qs_config *cfg, const char *chars_json, const qs_st_file *base,
                      const char *base_dir, const char *adapter_dir, const qs_task_place *place) {
    if (cfg->model.type != QS_MODEL_GPT) return qs_error("%s: LoRA fine-tunes GPT models only", base_dir);
    if (adapter_dir && qs_lora_read_config(adapter_dir, &cfg->lora)) return -1;
    if (place->sp && qs_comm_size(place->sp) > 1)
        return qs_error("parallel.sp %d: LoRA fine-tuning does not split sequences; use parallel.sp 1",
                        qs_comm_size(place->sp));
    if (open_lm(task, cfg, chars_json, place, true)) return -1;
    lm_task *t = task->self;
    snprintf(t->base_dir, sizeof t->base_dir, "%s", base_dir);
    int rc = base ? qs_checkpoint_load_weights(qs_gpt_params(t->m), base, base_dir)
                  : qs_gpt_init(t->m, cfg->train.seed);
    if (!rc) rc = qs_lora_create(&t->lora, &cfg->lora, t->m);
    if (!rc && adapter_dir) rc = qs_lora_load(t->lora, adapter_dir);
    if (rc) {
        qs_task_free(task);
        return -1;
    }
    qs_gpt_set_lora(t->m, t->lora);
    t->files = (qs_ckpt_files){.names = {QS_LORA_WEIGHTS, QS_LORA_CONFIG}, .n = 2, .write = write_adapter, .self = t};
    task->params = qs_lora_params(t->lora);
    task->init = lora_init;
    task->weights = &t->files;
    return 0;
}

/* What the training loop trains: a model family together with its data. The loop
 * (csrc/train.c), `quasar eval` and checkpoints work through this interface, so a
 * language model and an image classifier share one loop, one optimizer path and one
 * checkpoint format. */
#ifndef QUASAR_TASK_H
#define QUASAR_TASK_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "quasar/checkpoint.h"
#include "quasar/comm.h"
#include "quasar/codec.h"
#include "quasar/config.h"
#include "quasar/memplan.h"
#include "quasar/params.h"

typedef struct qs_task {
    void *self;
    qs_params *params;          /* what the optimizer updates and checkpoints hold */
    const qs_codec *codec;      /* saved with checkpoints; NULL for classifiers */
    int micro_B;                /* samples per forward pass */
    int items_per_sample;       /* tokens per sequence; 1 per image */
    const char *item;           /* "tok" | "img", for the progress line */
    qs_mem_plan plan;           /* the run's memory on the backend, optimizer included */
    const qs_ckpt_files *weights; /* what checkpoints hold for params; NULL: model.safetensors */

    bool has_accuracy;          /* classifiers: evaluation counts correct answers */

    int (*init)(void *self, uint64_t seed);
    /* Forward and backward of the training stream's samples sample0 .. sample0 +
     * micro_B - 1 with this step's rng_seed, gradients accumulated with grad_scale;
     * *loss = their mean loss (over this rank's rows under sequence parallelism).
     * Fails only when a collective does. */
    int (*train_micro)(void *self, uint64_t sample0, uint64_t rng_seed, float grad_scale, double *loss);
    /* Adds part `part` of `parts` of the validation set to sums: {loss, correct, weight},
     * loss weighted (so the mean is sums[0] / sums[2]). The set is eval_iters
     * micro-batches (LMs) or the whole test split (classifiers). */
    int (*evaluate)(void *self, int iters, int part, int parts, double sums[3]);
    /* Evaluation from bf16 panels packed beside the loaded weights (qs_gpt_use_bf16_weights;
     * a task opened without an optimizer, as a LoRA base: else qs_task_place.bf16_weights);
     * NULL where the family has none. */
    int (*use_bf16_weights)(void *self);
    void (*step_begin)(void *self);                 /* may be NULL */
    /* Sums the step's statistics for log_fields over the data-parallel group; may be NULL. */
    int (*reduce_stats)(void *self, qs_comm *dp);
    void (*log_fields)(void *self, FILE *metrics);  /* extra metrics.jsonl fields; may be NULL */
    int (*finish)(void *self, const char *run_dir); /* after the last step; may be NULL */
    void (*free)(void *self);
} qs_task;

/* Where a task runs: samples per forward pass, the sequence-parallel group this rank
 * shares every sequence with (GPT only; NULL or a group of one: whole sequences), the
 * backend its model lives on, and over how many ranks the caller will shard AdamW's
 * state (qs_dp_create_optim: 1 unsharded, n with ZeRO-1 over n ranks; 0: no optimizer),
 * for the memory plan. 0 also means nothing trains: a language model is then frozen
 * (no gradient buffer). */
typedef struct qs_task_place {
    int micro_B;
    qs_comm *sp;
    const qs_backend *be;
    int optim_shards;
    bool bf16_weights; /* no optimizer and no LoRA: a language model with bf16 panels alone */
} qs_task_place;

/* Builds cfg's model (model.type) as placed and loads its data; chars_json is a
 * checkpoint's char vocabulary (NULL when new). May fill in model.vocab_size from the
 * data. The memory plan is checked against the backend's free memory (memplan.h)
 * before the model takes any. */
int qs_task_open(qs_task *t, qs_config *cfg, const char *chars_json, const qs_task_place *place);
void qs_task_free(qs_task *t);

/* Validation loss and accuracy (NAN without has_accuracy) over `iters` micro-batches or
 * the test split: this rank evaluates part `part` of `parts` (its data-parallel share)
 * and the sums are added over `ranks` (all of them, so sequence-parallel ranks average
 * their rows; NULL: this process alone). */
int qs_task_evaluate(qs_task *t, int iters, qs_comm *ranks, int part, int parts, double *loss, double *acc);

/* Writes `, "key": value` to a metrics line; JSON has no NaN or infinity, so a
 * non-finite value is written as null. */
void qs_metrics_num(FILE *f, const char *key, double v, const char *fmt);

/* For the families: a family's memory plan of cfg's run as cfg now stands (the model
 * and anything beside it; ctx is the family's). */
typedef int (*qs_task_plan_fn)(qs_mem_plan *plan, const qs_config *cfg, const qs_task_place *place,
                               const void *ctx);
/* The run's plan by fn, plus AdamW's state for its gradients as place shards it,
 * checked against the backend's free memory. model.recompute_layers "auto" becomes the
 * fewest checkpointed blocks whose plan fits: a GPT's 0, 2, 3, ..., n_layer (one alone
 * saves nothing), a QuadraNet's none or all; when none fits, the error says so. */
int qs_task_plan(qs_mem_plan *plan, qs_config *cfg, const qs_task_place *place, qs_task_plan_fn fn,
                 const void *ctx);

/* The two families (csrc/task_lm.c, csrc/task_image.c). */
int qs_task_open_lm(qs_task *t, qs_config *cfg, const char *chars_json, const qs_task_place *place);
int qs_task_open_image(qs_task *t, qs_config *cfg, const qs_task_place *place);
/* LoRA: the GPT of cfg->model with the tensors of base (the opened model.safetensors of
 * the checkpoint base_dir) frozen, and adapters per cfg->lora as task.params: new ones,
 * or with adapter_dir those of that adapter checkpoint (whose lora settings then replace
 * cfg->lora). base NULL: a base of random weights (train.seed), for `bench train --lora`. */
int qs_task_open_lora(qs_task *t, qs_config *cfg, const char *chars_json, const qs_st_file *base,
                      const char *base_dir, const char *adapter_dir, const qs_task_place *place);

#endif

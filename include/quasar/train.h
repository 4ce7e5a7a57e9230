/* The training loop over a qs_task (any model family): accumulation, AdamW, guards,
 * evaluation, logging, checkpoints. */
#ifndef QUASAR_TRAIN_H
#define QUASAR_TRAIN_H

#include <stdbool.h>

#include "quasar/backend.h"
#include "quasar/comm.h"
#include "quasar/config.h"
#include "quasar/safetensors.h"

typedef struct qs_train_options {
    const char *out_dir;    /* the run folder */
    bool resume;            /* continue from out_dir/ckpt/latest */
    int until_step;         /* stop (with a checkpoint) after this step; 0 = train.max_steps */
    bool dry_run;           /* everything but writing: a few steps timed, no run folder */
    /* LoRA fine-tuning (quasar finetune): the frozen base, its checkpoint folder, opened
     * model.safetensors and char vocabulary (NULL for GPT-2 tokens); NULL base: train all */
    const char *base_dir;
    const qs_st_file *base;
    const char *base_chars;
    qs_comm *world;         /* the ranks of this run (train.batch_size is over all of them);
                             * NULL: this process alone */
    const qs_backend *be;   /* where the model lives; NULL: the CPU */
} qs_train_options;

int qs_train(qs_config *cfg, const qs_train_options *opt);

#endif

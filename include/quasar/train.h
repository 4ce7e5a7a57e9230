/* The training loop: batches, accumulation, AdamW, evaluation, logging, checkpoints. */
#ifndef QUASAR_TRAIN_H
#define QUASAR_TRAIN_H

#include "quasar/codec.h"
#include "quasar/config.h"
#include "quasar/data.h"
#include "quasar/model.h"

typedef struct qs_train_options {
    const char *out_dir;    /* the run folder */
    bool resume;            /* continue from out_dir/ckpt/latest */
    int until_step;         /* stop (with a checkpoint) after this step; 0 = train.max_steps */
} qs_train_options;

int qs_train(qs_config *cfg, const qs_train_options *opt);

/* Loads the run's data through its codec: text with the char vocabulary (built from the
 * corpus while still empty), or GPT-2 token shards. Sets model.vocab_size when 0 and
 * checks that it covers the vocabulary. */
int qs_dataset_open(qs_dataset *d, qs_config *cfg, qs_codec *codec);

/* Mean validation loss over `iters` micro-batches; the same batches every call. */
double qs_evaluate(qs_gpt *m, const qs_dataset *d, const qs_config *cfg, int iters);

#endif

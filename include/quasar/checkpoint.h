/* Checkpoints: <run>/ckpt/step_NNNNNNNN/{model.safetensors, optim.safetensors, state.json}
 * and <run>/ckpt/latest naming the newest complete one. A checkpoint is written into a
 * temporary folder, fsynced and renamed into place; `latest` moves last, atomically. */
#ifndef QUASAR_CHECKPOINT_H
#define QUASAR_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "quasar/config.h"
#include "quasar/codec.h"
#include "quasar/data.h"
#include "quasar/guard.h"
#include "quasar/params.h"
#include "quasar/optim.h"
#include "quasar/safetensors.h"

typedef struct qs_train_state {
    int step;            /* optimizer steps completed */
    uint64_t seed;
    int64_t tokens_seen;
    qs_guard guard;      /* its window and counters travel in state.json */
} qs_train_state;

/* codec is NULL for models without a vocabulary (classifiers). */
int qs_checkpoint_save(const char *run_dir, const qs_config *cfg, const qs_codec *codec, const qs_params *ps,
                       const qs_adamw *opt, const qs_train_state *st);

/* A checkpoint whose weights are other files than model.safetensors (a LoRA run's
 * adapter): write() puts names[0..n) into the temporary folder dir; optim.safetensors,
 * state.json and checksums.json (covering every file) follow as for any checkpoint. */
#define QS_CKPT_MAX_WEIGHT_FILES 4
typedef struct qs_ckpt_files {
    const char *names[QS_CKPT_MAX_WEIGHT_FILES];
    int n;
    int (*write)(const void *self, const char *dir);
    const void *self;
} qs_ckpt_files;
int qs_checkpoint_save_files(const char *run_dir, const qs_config *cfg, const qs_ckpt_files *w, const qs_adamw *opt,
                             const qs_train_state *st);

/* dir may be a step folder (holds model.safetensors), a ckpt folder (holds latest) or a
 * run folder (holds ckpt/latest); writes the step folder's path. */
int qs_checkpoint_find(const char *dir, char *step_dir, size_t cap);
/* The same for checkpoints whose weights file is `marker` (adapter_model.safetensors). */
int qs_checkpoint_find_file(const char *dir, const char *marker, char *step_dir, size_t cap);
/* Reads <dir>/<name> (malloc'd, NUL-terminated) after checking it against the folder's
 * checksums.json; a missing, truncated or corrupted file is an error. */
int qs_checkpoint_read(const char *dir, const char *name, char **data, size_t *size);

/* Opens <step_dir>/model.safetensors and reads the config stored in its metadata, and
 * for char-level models the vocabulary as JSON (*chars_json, malloc'd; NULL for gpt2),
 * for qs_codec_open. The caller creates the model from cfg->model, then loads the
 * weights. */
int qs_checkpoint_open_model(qs_st_file *f, const char *step_dir, qs_config *cfg, char **chars_json);
/* Every model tensor must be present with dtype F32 and its exact shape; nothing else. */
int qs_checkpoint_load_weights(qs_params *ps, const qs_st_file *f, const char *what);
/* The state of step_dir into opt (all of it, or a ZeRO-1 shard's spans) and st. */
int qs_checkpoint_load_optim(const char *step_dir, qs_adamw *opt, qs_train_state *st);
/* Parses state.json text (len bytes, need not be NUL-terminated); `what` names it in errors. */
int qs_state_parse(const char *json, size_t len, qs_train_state *st, const char *what);

#endif

/* A model's named parameter tensors in one flat backend buffer (and, when trainable,
 * a gradient buffer of the same layout), so that one call moves, saves or updates all
 * of them. Every model family (GPT, QuadraNet, LoRA adapters) builds one of these;
 * the optimizer, checkpoints and the training loop work on it alone. */
#ifndef QUASAR_PARAMS_H
#define QUASAR_PARAMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "quasar/backend.h"
#include "quasar/config.h"

#define QS_PARAM_NAME_MAX 96
#define QS_PARAM_MAX_DIM 4

/* What a tensor is, for init and weight decay (only WEIGHT and EMBEDDING decay). SCALE:
 * a per-channel multiplier such as QuadraNet's layer scale. */
typedef enum { QS_ROLE_WEIGHT, QS_ROLE_BIAS, QS_ROLE_NORM_WEIGHT, QS_ROLE_NORM_BIAS,
               QS_ROLE_EMBEDDING, QS_ROLE_SCALE } qs_param_role;

typedef struct qs_param_info {
    char name[QS_PARAM_NAME_MAX];
    int ndim;
    int64_t shape[QS_PARAM_MAX_DIM];
    size_t offset; /* in floats, into the flat buffers */
    size_t numel;
    qs_param_role role;
    int fan_in, fan_out; /* for weight init */
    bool residual_proj;  /* output projection into the residual stream */
    /* Set before qs_params_hold: held elsewhere, a tensor has no room in data and its
     * values reach only the table's on_load; observed, on_load sees them as they load. */
    bool held_elsewhere, observed;
} qs_param_info;

typedef struct qs_params {
    const qs_backend *be;
    qs_param_info *info;
    int n_tensors, cap;
    size_t n;            /* floats in all tensors */
    bool broken;         /* an add ran out of memory; alloc then refuses the table */
    float *data, *grad;  /* backend memory; grad is NULL for a frozen set */
    /* Told, during a backward pass, that grad[begin, n) is final: tensors are laid out in
     * model order and the backward pass finishes them from the end, so the finished part
     * is always a tail. Data parallelism reduces it while the rest is computed. NULL: off. */
    void (*on_grads_ready)(void *ctx, size_t begin);
    void *grads_ready_ctx;
    /* Given each observed tensor's values as they are loaded (qs_params_store): n floats
     * of tensor i from element j0, in order. A model that keeps tensors in another form
     * (bf16 panels) takes them here. */
    int (*on_load)(void *ctx, int i, size_t j0, size_t n, const float *host);
    void *on_load_ctx;
} qs_params;

/* Appends a tensor to the table (before qs_params_alloc); returns its index, or -1
 * (qs_error set) when out of memory, which also makes qs_params_alloc fail, so builders
 * need not check each add. */
int qs_params_add(qs_params *ps, const char *name, int ndim, const int64_t *shape,
                  qs_param_role role, int fan_in, int fan_out, bool residual_proj);
/* Allocates the zeroed data (and, if trainable, gradient) buffers on be. */
int qs_params_alloc(qs_params *ps, const qs_backend *be, bool trainable);
void qs_params_free(qs_params *ps);

/* Lays the table out again, before qs_params_alloc, once its tensors' held_elsewhere
 * flags are set: data holds the others only, and the held tensors' values pointers are
 * NULL. */
void qs_params_hold(qs_params *ps);
/* Whether every tensor has room in data: what checkpoints, adapters and optimizers need. */
bool qs_params_whole(const qs_params *ps);
/* n values of tensor i from element j0 (host memory) into data where it has room, and
 * to on_load where it is observed (whose error it returns). How initialisation and
 * checkpoints load. */
int qs_params_store(qs_params *ps, int i, size_t j0, size_t n, const float *host);

/* Index of the tensor called name, or -1. */
int qs_params_find(const qs_params *ps, const char *name);
/* Backend pointers to tensor i's values / gradient; NULL for i < 0, no gradients or a
 * tensor held elsewhere. */
float *qs_params_value(const qs_params *ps, int i);
float *qs_params_grad(const qs_params *ps, int i);

/* Initial values: WEIGHT and EMBEDDING tensors draw N(0, value(p)^2) from the counter
 * RNG (stream = tensor index), SCALE tensors are value(p), norm weights 1, biases 0. */
typedef float (*qs_init_value_fn)(const qs_param_info *p, const void *ctx);
int qs_params_init(qs_params *ps, uint64_t seed, qs_init_value_fn value, const void *ctx);
/* The std of a weight under model.init: normal_std, Kaiming sqrt(2/fan_in) or Xavier
 * sqrt(2/(fan_in+fan_out)). Models add their own exceptions around it. */
float qs_params_init_std(qs_init scheme, float normal_std, const qs_param_info *p);

void qs_params_zero_grad(qs_params *ps);
/* A model's backward pass: gradients from tensor i's to the end are final (i = 0: all). */
void qs_params_grads_ready(qs_params *ps, int i);
/* dst's values = src's (tables of the same layout; backend to backend). */
void qs_params_copy(qs_params *dst, const qs_params *src);
/* Copies all values between the backend and host[n]. */
void qs_params_download(const qs_params *ps, float *host);
void qs_params_upload(qs_params *ps, const float *host);

#endif

/* AdamW over a flat parameter table, global-norm clipping, LR schedule. */
#ifndef QUASAR_OPTIM_H
#define QUASAR_OPTIM_H

#include <stddef.h>

#include "quasar/config.h"
#include "quasar/params.h"

/* Elements [begin, end) of the flat parameter buffer. */
typedef struct qs_span {
    size_t begin, end;
} qs_span;

typedef struct qs_adamw {
    const qs_backend *be;
    float *m, *v;   /* moments of the owned spans, back to back (backend memory) */
    size_t n;       /* floats in m and in v */
    qs_span own[2]; /* the parameters this optimizer updates: all, or a ZeRO-1 shard */
    int n_own;
    size_t total;   /* parameters in the whole table */
    int t;          /* updates taken */
} qs_adamw;

/* State for all n parameters. */
int qs_adamw_create(qs_adamw *o, const qs_backend *be, size_t n);
/* State for the n_own (<= 2) disjoint spans own of a table of total parameters (a
 * ZeRO-1 shard). */
int qs_adamw_create_spans(qs_adamw *o, const qs_backend *be, size_t total, const qs_span *own, int n_own);
void qs_adamw_free(qs_adamw *o);

/* Whether weight decay applies to a tensor: weights and embeddings, not biases (also
 * stacked expert biases), norms or scales, unless train.decay_all. */
int qs_adamw_decays(const qs_train_config *tc, const qs_param_info *p);

/* Global L2 norm of the table's gradients. */
double qs_adamw_grad_norm(const qs_params *ps);
/* One update of the owned parameters, from their gradients clipped to train.grad_clip
 * given the norm of all of them. */
void qs_adamw_apply(qs_adamw *o, qs_params *ps, const qs_train_config *tc, float lr, double norm);

/* Learning rate at step (0-based): linear warmup, then train.lr_schedule's decay to
 * min_lr (cosine, linear, wsd) or constant. */
float qs_lr_at(const qs_train_config *tc, int step);

#endif

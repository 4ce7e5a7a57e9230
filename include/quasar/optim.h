/* AdamW over a flat parameter table, global-norm clipping, LR schedule. */
#ifndef QUASAR_OPTIM_H
#define QUASAR_OPTIM_H

#include <stddef.h>

#include "quasar/config.h"
#include "quasar/params.h"

typedef struct qs_adamw {
    const qs_backend *be;
    float *m, *v; /* flat moments, backend memory, same layout as the parameters */
    size_t n;
    int t;        /* updates taken */
} qs_adamw;

int qs_adamw_create(qs_adamw *o, const qs_backend *be, size_t n);
void qs_adamw_free(qs_adamw *o);

/* Whether weight decay applies to a tensor: weights and embeddings, not biases (also
 * stacked expert biases), norms or scales, unless train.decay_all. */
int qs_adamw_decays(const qs_train_config *tc, const qs_param_info *p);

/* Global L2 norm of the table's gradients. */
double qs_adamw_grad_norm(const qs_adamw *o, const qs_params *ps);
/* One update with the gradients clipped to train.grad_clip, given their norm. */
void qs_adamw_apply(qs_adamw *o, qs_params *ps, const qs_train_config *tc, float lr, double norm);

/* Learning rate at step (0-based): linear warmup, then cosine to min_lr or constant. */
float qs_lr_at(const qs_train_config *tc, int step);

#endif

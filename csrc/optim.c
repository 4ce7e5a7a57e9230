#include "quasar/optim.h"

#include <math.h>

#include "quasar/error.h"

int qs_adamw_create(qs_adamw *o, const qs_backend *be, size_t n) {
    o->be = be;
    o->n = n;
    o->t = 0;
    o->m = be->alloc(n * sizeof(float));
    o->v = be->alloc(n * sizeof(float));
    if (!o->m || !o->v) {
        qs_adamw_free(o);
        return qs_error("cannot allocate optimizer state (%.1f MiB)", 2.0 * n * sizeof(float) / 1048576.0);
    }
    return 0;
}

void qs_adamw_free(qs_adamw *o) {
    if (!o->be) return;
    o->be->free(o->m);
    o->be->free(o->v);
    o->m = o->v = NULL;
}

int qs_adamw_decays(const qs_train_config *tc, const qs_param_info *p) {
    return tc->decay_all || p->role == QS_ROLE_WEIGHT || p->role == QS_ROLE_EMBEDDING;
}

double qs_adamw_grad_norm(const qs_adamw *o, const qs_params *ps) {
    return sqrt(o->be->ops->sumsq(ps->grad, o->n));
}

void qs_adamw_apply(qs_adamw *o, qs_params *ps, const qs_train_config *tc, float lr, double norm) {
    const qs_ops *ops = o->be->ops;
    float scale = 1.0f;
    if (tc->grad_clip > 0.0f && norm > tc->grad_clip) scale = (float)(tc->grad_clip / norm);
    o->t++;
    for (int i = 0; i < ps->n_tensors; i++) {
        const qs_param_info *p = &ps->info[i];
        float wd = qs_adamw_decays(tc, p) ? tc->weight_decay : 0.0f;
        ops->adamw_update(ps->data + p->offset, ps->grad + p->offset, o->m + p->offset, o->v + p->offset,
                          p->numel, lr, tc->beta1, tc->beta2, tc->eps, wd, o->t, scale);
    }
}

float qs_lr_at(const qs_train_config *tc, int step) {
    if (step < tc->warmup_steps) return tc->lr * (float)(step + 1) / (float)tc->warmup_steps;
    if (tc->lr_schedule == QS_LR_CONSTANT) return tc->lr;
    int span = tc->max_steps - tc->warmup_steps;
    double progress = span > 0 ? (double)(step - tc->warmup_steps) / span : 1.0;
    if (progress > 1.0) progress = 1.0;
    return (float)(tc->min_lr + 0.5 * (1.0 + cos(3.14159265358979323846 * progress)) * (tc->lr - tc->min_lr));
}

#include "quasar/optim.h"

#include <math.h>

#include "quasar/error.h"

int qs_adamw_create_spans(qs_adamw *o, const qs_backend *be, size_t total, const qs_span *own, int n_own) {
    *o = (qs_adamw){.be = be, .n_own = n_own, .total = total};
    for (int i = 0; i < n_own; i++) {
        o->own[i] = own[i];
        o->n += own[i].end - own[i].begin;
    }
    /* at least one float each, so an empty shard is still a valid allocation */
    o->m = be->alloc((o->n ? o->n : 1) * sizeof(float));
    o->v = be->alloc((o->n ? o->n : 1) * sizeof(float));
    if (!o->m || !o->v) {
        qs_adamw_free(o);
        return qs_error("cannot allocate optimizer state (%.1f MiB)", 2.0 * o->n * sizeof(float) / 1048576.0);
    }
    return 0;
}

int qs_adamw_create(qs_adamw *o, const qs_backend *be, size_t n) {
    qs_span all = {0, n};
    return qs_adamw_create_spans(o, be, n, &all, 1);
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

double qs_adamw_grad_norm(const qs_params *ps) { return sqrt(ps->be->ops->sumsq(ps->grad, ps->n)); }

void qs_adamw_apply(qs_adamw *o, qs_params *ps, const qs_train_config *tc, float lr, double norm) {
    const qs_ops *ops = o->be->ops;
    float scale = 1.0f;
    if (tc->grad_clip > 0.0f && norm > tc->grad_clip) scale = (float)(tc->grad_clip / norm);
    o->t++;
    size_t state = 0; /* where span s's moments start */
    for (int s = 0; s < o->n_own; s++) {
        const qs_span sp = o->own[s];
        for (int i = 0; i < ps->n_tensors; i++) {
            const qs_param_info *p = &ps->info[i];
            size_t a = p->offset > sp.begin ? p->offset : sp.begin;
            size_t b = p->offset + p->numel < sp.end ? p->offset + p->numel : sp.end;
            if (a >= b) continue;
            float wd = qs_adamw_decays(tc, p) ? tc->weight_decay : 0.0f;
            size_t k = state + (a - sp.begin);
            ops->adamw_update(ps->data + a, ps->grad + a, o->m + k, o->v + k, b - a, lr, tc->beta1, tc->beta2, tc->eps,
                              wd, o->t, scale);
        }
        state += sp.end - sp.begin;
    }
}

float qs_lr_at(const qs_train_config *tc, int step) {
    if (step < tc->warmup_steps) return tc->lr * (float)(step + 1) / (float)tc->warmup_steps;
    if (tc->lr_schedule == QS_LR_CONSTANT) return tc->lr;
    /* the decay: over every step after warmup, or wsd's last decay_steps (by default
     * the last fifth, as long a cooldown as matches cosine in Haegele et al. 2024) */
    int span = tc->max_steps - tc->warmup_steps, start = tc->warmup_steps;
    if (tc->lr_schedule == QS_LR_WSD) {
        const int d = tc->decay_steps ? tc->decay_steps : span / 5;
        start = tc->max_steps - d;
        span = d;
    }
    double progress = span > 0 ? (double)(step - start) / span : step < start ? -1.0 : 1.0;
    if (progress < 0.0) return tc->lr; /* wsd's stable phase */
    if (progress > 1.0) progress = 1.0;
    const double keep = tc->lr_schedule == QS_LR_COSINE ? 0.5 * (1.0 + cos(3.14159265358979323846 * progress))
                                                        : 1.0 - progress;
    return (float)(tc->min_lr + keep * (tc->lr - tc->min_lr));
}

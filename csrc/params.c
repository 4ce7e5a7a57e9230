#include "quasar/params.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"
#include "quasar/rng.h"

int qs_params_add(qs_params *ps, const char *name, int ndim, const int64_t *shape,
                  qs_param_role role, int fan_in, int fan_out, bool residual_proj) {
    if (ps->n_tensors == ps->cap) {
        int cap = ps->cap ? 2 * ps->cap : 32;
        qs_param_info *info = realloc(ps->info, (size_t)cap * sizeof *info);
        if (!info) {
            ps->broken = true;
            return qs_error("out of memory building the parameter table");
        }
        ps->info = info;
        ps->cap = cap;
    }
    qs_param_info *p = &ps->info[ps->n_tensors];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    p->numel = 1;
    for (int i = 0; i < ndim; i++) {
        p->shape[i] = shape[i];
        p->numel *= (size_t)shape[i];
    }
    p->offset = ps->n;
    p->role = role;
    p->fan_in = fan_in;
    p->fan_out = fan_out;
    p->residual_proj = residual_proj;
    ps->n += p->numel;
    return ps->n_tensors++;
}

int qs_params_alloc(qs_params *ps, const qs_backend *be, bool trainable) {
    if (ps->broken) return qs_error("out of memory building the parameter table");
    ps->be = be;
    ps->data = be->alloc(ps->n * sizeof(float));
    if (trainable) ps->grad = be->alloc(ps->n * sizeof(float));
    if (!ps->data || (trainable && !ps->grad))
        return qs_error("cannot allocate %zu parameters%s (%.1f MiB)", ps->n, trainable ? " and gradients" : "",
                        (trainable ? 2.0 : 1.0) * ps->n * sizeof(float) / 1048576.0);
    return 0;
}

void qs_params_free(qs_params *ps) {
    if (ps->be) {
        ps->be->free(ps->data);
        ps->be->free(ps->grad);
    }
    free(ps->info);
    memset(ps, 0, sizeof *ps);
}

void qs_params_hold(qs_params *ps) {
    ps->n = 0;
    for (int i = 0; i < ps->n_tensors; i++) {
        qs_param_info *p = &ps->info[i];
        p->offset = p->held_elsewhere ? SIZE_MAX : ps->n;
        ps->n += p->held_elsewhere ? 0 : p->numel;
    }
}

bool qs_params_whole(const qs_params *ps) {
    for (int i = 0; i < ps->n_tensors; i++)
        if (ps->info[i].held_elsewhere) return false;
    return true;
}

int qs_params_store(qs_params *ps, int i, size_t j0, size_t n, const float *host) {
    const qs_param_info *p = &ps->info[i];
    if (!p->held_elsewhere) ps->be->upload(ps->data + p->offset + j0, host, n * sizeof(float));
    return p->observed && ps->on_load ? ps->on_load(ps->on_load_ctx, i, j0, n, host) : 0;
}

int qs_params_find(const qs_params *ps, const char *name) {
    for (int i = 0; i < ps->n_tensors; i++)
        if (!strcmp(ps->info[i].name, name)) return i;
    return -1;
}

float *qs_params_value(const qs_params *ps, int i) {
    return i < 0 || ps->info[i].held_elsewhere ? NULL : ps->data + ps->info[i].offset;
}
float *qs_params_grad(const qs_params *ps, int i) {
    return i < 0 || !ps->grad ? NULL : ps->grad + ps->info[i].offset;
}

void qs_params_zero_grad(qs_params *ps) {
    if (ps->grad) ps->be->zero(ps->grad, ps->n * sizeof(float));
}
void qs_params_grads_ready(qs_params *ps, int i) {
    if (ps->on_grads_ready) ps->on_grads_ready(ps->grads_ready_ctx, ps->info[i].offset);
}
void qs_params_download(const qs_params *ps, float *host) { ps->be->download(host, ps->data, ps->n * sizeof(float)); }
void qs_params_upload(qs_params *ps, const float *host) { ps->be->upload(ps->data, host, ps->n * sizeof(float)); }

int qs_params_init(qs_params *ps, uint64_t seed, qs_init_value_fn value, const void *ctx) {
    /* staged through a bounded host buffer, not a copy of the whole table: on the CPU that
     * copy would double the parameters' memory at the run's start */
    enum { STAGE = 1 << 22 };
    float *host = malloc(STAGE * sizeof(float));
    if (!host) return qs_error("out of memory initialising %zu parameters", ps->n);
    int rc = 0;
    for (int i = 0; i < ps->n_tensors && !rc; i++) {
        const qs_param_info *p = &ps->info[i];
        const bool random = p->role == QS_ROLE_WEIGHT || p->role == QS_ROLE_EMBEDDING;
        /* a random tensor's std, a scale's value; norm weights 1, biases 0 */
        float v = p->role == QS_ROLE_NORM_WEIGHT ? 1.0f : 0.0f;
        if (random || p->role == QS_ROLE_SCALE) v = value(p, ctx);
        for (size_t j0 = 0; j0 < p->numel && !rc; j0 += STAGE) {
            const size_t n = p->numel - j0 < STAGE ? p->numel - j0 : STAGE;
            for (size_t j = 0; j < n; j++) host[j] = random ? v * qs_rng_normal(seed, (uint64_t)i, j0 + j) : v;
            rc = qs_params_store(ps, i, j0, n, host);
        }
    }
    free(host);
    return rc;
}

float qs_params_init_std(qs_init scheme, float normal_std, const qs_param_info *p) {
    switch (scheme) {
    case QS_INIT_KAIMING: return sqrtf(2.0f / (float)p->fan_in);
    case QS_INIT_XAVIER: return sqrtf(2.0f / (float)(p->fan_in + p->fan_out));
    case QS_INIT_NORMAL: break;
    }
    return normal_std;
}

void qs_params_copy(qs_params *dst, const qs_params *src) {
    dst->be->copy(dst->data, src->data, src->n * sizeof(float));
}

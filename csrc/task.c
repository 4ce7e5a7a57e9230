#include "quasar/task.h"

#include <math.h>
#include <string.h>

#include "quasar/error.h"

int qs_task_open(qs_task *t, qs_config *cfg, const char *chars_json, const qs_task_place *place) {
    memset(t, 0, sizeof *t);
    if (cfg->model.type != QS_MODEL_QUADRANET) return qs_task_open_lm(t, cfg, chars_json, place);
    if (place->sp && qs_comm_size(place->sp) > 1)
        return qs_error("parallel.sp %d: only language models split sequences", qs_comm_size(place->sp));
    return qs_task_open_image(t, cfg, place);
}

/* AdamW's state beside the plan, as place shards it; then the check. */
static int fits(qs_mem_plan *plan, const qs_task_place *place, const char *lower) {
    if (place->optim_shards > 0)
        plan->optimizer = qs_mem_plan_optimizer(plan->grads / sizeof(float), place->optim_shards);
    return lower ? qs_mem_plan_check_advising(plan, place->be, lower) : qs_mem_plan_check(plan, place->be);
}

int qs_task_plan(qs_mem_plan *plan, qs_config *cfg, const qs_task_place *place, qs_task_plan_fn fn,
                 const void *ctx) {
    qs_model_config *m = &cfg->model;
    if (m->recompute_layers != QS_RECOMPUTE_AUTO) return fn(plan, cfg, place, ctx) ? -1 : fits(plan, place, NULL);
    const bool gpt = m->type == QS_MODEL_GPT;
    const int tries = gpt ? (m->n_layer > 1 ? m->n_layer : 1) : 2;
    for (int i = 0; i < tries; i++) {
        const bool last = i == tries - 1;
        m->recompute_layers = i == 0 ? 0 : gpt ? i + 1 : QS_RECOMPUTE_ALL;
        if (fn(plan, cfg, place, ctx)) return -1;
        if (!fits(plan, place, last ? "model.recompute_layers auto already checkpoints every block; lower "
                                      "train.micro_batch_size, model.seq_len or the model's size" : NULL))
            return 0;
    }
    return -1;
}

void qs_task_free(qs_task *t) {
    if (t->free) t->free(t->self);
    memset(t, 0, sizeof *t);
}

int qs_task_evaluate(qs_task *t, int iters, qs_comm *ranks, int part, int parts, double *loss, double *acc) {
    double sums[3] = {0.0, 0.0, 0.0};
    if (t->evaluate(t->self, iters, part, parts, sums) || (ranks && qs_comm_allreduce_f64(ranks, sums, 3, QS_SUM)))
        return -1;
    *loss = sums[0] / sums[2];
    *acc = t->has_accuracy ? sums[1] / sums[2] : NAN;
    return 0;
}

void qs_metrics_num(FILE *f, const char *key, double v, const char *fmt) {
    fprintf(f, ", \"%s\": ", key);
    if (isfinite(v)) fprintf(f, fmt, v);
    else fputs("null", f);
}

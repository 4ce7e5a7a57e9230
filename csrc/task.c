#include "quasar/task.h"

#include <math.h>
#include <string.h>

int qs_task_open(qs_task *t, qs_config *cfg, const char *chars_json, int micro_B) {
    memset(t, 0, sizeof *t);
    return cfg->model.type == QS_MODEL_QUADRANET ? qs_task_open_image(t, cfg, micro_B)
                                                  : qs_task_open_lm(t, cfg, chars_json, micro_B);
}

void qs_task_free(qs_task *t) {
    if (t->free) t->free(t->self);
    memset(t, 0, sizeof *t);
}

void qs_metrics_num(FILE *f, const char *key, double v, const char *fmt) {
    fprintf(f, ", \"%s\": ", key);
    if (isfinite(v)) fprintf(f, fmt, v);
    else fputs("null", f);
}

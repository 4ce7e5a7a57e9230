#include "quasar/guard.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "quasar/error.h"

void qs_guard_init(qs_guard *g, float zscore, int max_bad) {
    memset(g, 0, sizeof *g);
    g->zscore = zscore;
    g->max_bad = max_bad;
}

static void push(qs_guard *g, double loss, double norm) {
    g->loss[g->head] = loss;
    g->norm[g->head] = norm;
    g->head = (g->head + 1) % QS_GUARD_WINDOW;
    if (g->n < QS_GUARD_WINDOW) g->n++;
}

/* Only spikes count: a loss or norm far below the recent ones is good news. */
static bool spike(const double *xs, int n, double x, float z) {
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++) mean += xs[i];
    mean /= n;
    for (int i = 0; i < n; i++) var += (xs[i] - mean) * (xs[i] - mean);
    double sd = sqrt(var / (n - 1));
    return sd > 0 && (x - mean) / sd > z;
}

qs_step_verdict qs_guard_check(qs_guard *g, double loss, double norm) {
    qs_step_verdict v = QS_STEP_OK;
    if (!isfinite(loss) || !isfinite(norm)) v = QS_STEP_NONFINITE;
    else if (g->zscore > 0 && g->n >= QS_GUARD_MIN &&
             (spike(g->loss, g->n, loss, g->zscore) || spike(g->norm, g->n, norm, g->zscore)))
        v = QS_STEP_OUTLIER;
    if (v == QS_STEP_OK) {
        g->bad_in_row = 0;
        push(g, loss, norm);
    } else {
        g->bad_in_row++;
        if (v == QS_STEP_NONFINITE) g->skipped_nonfinite++;
        else g->skipped_outlier++;
    }
    return v;
}

bool qs_guard_should_stop(const qs_guard *g) { return g->max_bad > 0 && g->bad_in_row >= g->max_bad; }

/* Window values oldest first; %.17g round-trips doubles exactly. */
char *qs_guard_to_json(const qs_guard *g) {
    size_t cap = 256 + (size_t)g->n * 2 * 28;
    char *s = malloc(cap);
    if (!s) return NULL;
    int len = snprintf(s, cap, "{\"bad_in_row\": %d, \"skipped_nonfinite\": %lld, \"skipped_outlier\": %lld",
                       g->bad_in_row, (long long)g->skipped_nonfinite, (long long)g->skipped_outlier);
    const double *series[2] = {g->loss, g->norm};
    const char *names[2] = {"loss", "norm"};
    for (int k = 0; k < 2; k++) {
        len += snprintf(s + len, cap - (size_t)len, ", \"%s\": [", names[k]);
        for (int i = 0; i < g->n; i++) {
            int at = (g->head - g->n + i + QS_GUARD_WINDOW) % QS_GUARD_WINDOW;
            len += snprintf(s + len, cap - (size_t)len, "%s%.17g", i ? ", " : "", series[k][at]);
        }
        len += snprintf(s + len, cap - (size_t)len, "]");
    }
    snprintf(s + len, cap - (size_t)len, "}");
    return s;
}

/* A non-negative integer small enough to convert exactly (JSON numbers are doubles). */
static int count_of(const cJSON *o, const char *key, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= 9007199254740992.0) ||
        v->valuedouble != floor(v->valuedouble))
        return -1;
    *out = v->valuedouble;
    return 0;
}

int qs_guard_from_json(qs_guard *g, const char *json, const char *what) {
    cJSON *o = cJSON_Parse(json);
    const cJSON *loss = cJSON_GetObjectItemCaseSensitive(o, "loss"), *norm = cJSON_GetObjectItemCaseSensitive(o, "norm");
    double bad, nonfinite, outlier;
    int n = cJSON_GetArraySize(loss);
    int rc = count_of(o, "bad_in_row", &bad) || count_of(o, "skipped_nonfinite", &nonfinite) ||
             count_of(o, "skipped_outlier", &outlier) || !cJSON_IsArray(loss) || !cJSON_IsArray(norm) ||
             n != cJSON_GetArraySize(norm) || n > QS_GUARD_WINDOW || bad > 1e9;
    if (!rc) {
        g->n = g->head = 0;
        g->bad_in_row = (int)bad;
        g->skipped_nonfinite = (int64_t)nonfinite;
        g->skipped_outlier = (int64_t)outlier;
        for (int i = 0; i < n && !rc; i++) {
            const cJSON *a = cJSON_GetArrayItem(loss, i), *b = cJSON_GetArrayItem(norm, i);
            rc = !cJSON_IsNumber(a) || !cJSON_IsNumber(b);
            if (!rc) push(g, a->valuedouble, b->valuedouble);
        }
    }
    cJSON_Delete(o);
    return rc ? qs_error("%s: 'guard' must hold bad_in_row, skipped_* counts and equal-length loss/norm "
                         "arrays of at most %d numbers", what, QS_GUARD_WINDOW)
              : 0;
}

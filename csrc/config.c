#include "quasar/config.h"

#include "quasar/error.h"
#include "quasar/fileio.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* T_LAYERS: a count of blocks as an int, or JSON true (QS_RECOMPUTE_ALL) / false (0) /
 * "auto" (QS_RECOMPUTE_AUTO). */
typedef enum { T_INT, T_FLOAT, T_BOOL, T_STRING, T_ENUM, T_U64, T_INTS, T_LAYERS } field_type;

/* One key. Its JSON path is the member's path in qs_config ("model.moe.top_k"), so the
 * sections are the struct's nesting and a new key is one struct field plus one row. */
typedef struct field {
    const char *path;
    size_t offset, size;
    field_type type;
    double lo, hi; /* allowed values (STRING: lengths); the type's own limits also apply */
    bool lo_open, hi_open;
    const char *const *names; /* ENUM: value names by index; STRING: allowed values (NULL = any) */
    double def;               /* default; ENUM: the index, BOOL: 0 or 1 */
    const char *def_str;      /* STRING default */
    const int *def_ints;      /* INTS default (an int array member; its length is fixed) */
} field;

static const char *const activation_names[] = {"gelu", "relu", NULL};
static const char *const init_names[] = {"normal", "kaiming", "xavier", NULL};
static const char *const gating_names[] = {"topk", "noisy_topk", NULL};
static const char *const lr_schedule_names[] = {"cosine", "constant", "linear", "wsd", NULL};
static const char *const tokenizer_names[] = {"char", "gpt2", NULL};
static const char *const model_type_names[] = {"gpt", "quadranet", NULL};
static const char *const mixer_names[] = {"attention", "quadconv", NULL};
static const char *const precision_names[] = {"fp32", "bf16", NULL};
static const int quadra_widths[QS_QUADRA_STAGES] = {32, 64, 128, 256};
static const int quadra_depths[QS_QUADRA_STAGES] = {1, 1, 2, 1};

#define AT(m) #m, offsetof(qs_config, m), sizeof(((qs_config *)0)->m)
/* Ranges: GE [a, inf)  GT (a, inf)  IN [a, b]  CO [a, b)  OO (a, b) */
#define GE(a) .lo = (a), .hi = INFINITY
#define GT(a) .lo = (a), .lo_open = true, .hi = INFINITY
#define IN(a, b) .lo = (a), .hi = (b)
#define CO(a, b) .lo = (a), .hi = (b), .hi_open = true
#define OO(a, b) .lo = (a), .lo_open = true, .hi = (b), .hi_open = true

#define INT(m, range, d) {AT(m), T_INT, range, .def = (d)}
#define FLOAT(m, range, d) {AT(m), T_FLOAT, range, .def = (d)}
#define U64(m, range, d) {AT(m), T_U64, range, .def = (d)}
#define BOOL(m, d) {AT(m), T_BOOL, .def = (d)}
#define LAYERS(m, range, d) {AT(m), T_LAYERS, range, .def = (d)}
#define INTS(m, range, d) {AT(m), T_INTS, range, .def_ints = (d)}
#define STRING(m, range, names_, d) {AT(m), T_STRING, range, .names = (names_), .def_str = (d)}
/* Enums are accessed as int; the array size turns any other width into a compile error. */
#define ENUM(m, names_, d)                                                                         \
    {AT(m), T_ENUM, .names = (names_),                                                             \
     .def = (d) + 0 * sizeof(char[sizeof(((qs_config *)0)->m) == sizeof(int) ? 1 : -1])}

#define MAX_DIM (1 << 16) /* keeps products such as ffn_mult * n_embd far from INT_MAX */
#define MAX_SEED 9007199254740992.0 /* 2^53: larger integers do not survive JSON doubles */

static const field fields[] = {
    ENUM(model.type, model_type_names, QS_MODEL_GPT),
    ENUM(model.mixer, mixer_names, QS_MIXER_ATTENTION),
    INT(model.vocab_size, IN(0, 1 << 24), 0),
    INT(model.seq_len, IN(1, 1 << 20), 64),
    INT(model.n_layer, IN(1, 1 << 12), 4),
    INT(model.n_head, IN(1, MAX_DIM), 4),
    INT(model.n_kv_head, IN(0, MAX_DIM), 0),
    INT(model.n_embd, IN(1, MAX_DIM), 128),
    INT(model.ffn_mult, IN(1, 64), 4),
    ENUM(model.activation, activation_names, QS_ACT_GELU),
    FLOAT(model.dropout, CO(0, 1), 0),
    BOOL(model.bias, true),
    BOOL(model.tie_embeddings, true),
    BOOL(model.recompute_ffn, true),
    LAYERS(model.recompute_layers, IN(0, 1 << 12), 0),
    ENUM(model.init, init_names, QS_INIT_NORMAL),
    FLOAT(model.init_std, GT(0), 0.02),
    INT(model.moe.n_experts, IN(0, 1 << 12), 0),
    INT(model.moe.top_k, IN(1, 1 << 12), 2),
    ENUM(model.moe.gating, gating_names, QS_GATING_TOPK),
    FLOAT(model.moe.capacity_factor, GE(0), 0),
    FLOAT(model.moe.aux_loss_coef, GE(0), 0.01),
    FLOAT(model.moe.z_loss_coef, GE(0), 0),
    INT(model.quadra.in_channels, IN(1, 4096), 1),
    INT(model.quadra.image_size, IN(1, 1 << 14), 32),
    INT(model.quadra.num_classes, IN(2, 1 << 20), 10),
    INT(model.quadra.stem_patch, IN(1, 64), 2),
    INTS(model.quadra.widths, IN(1, MAX_DIM), quadra_widths),
    INTS(model.quadra.depths, IN(0, 1 << 10), quadra_depths),
    INT(model.quadra.kernel_size, IN(1, 63), 7),
    FLOAT(model.quadra.layer_scale_init, GT(0), 1e-6),
    FLOAT(model.quadra.drop_path, CO(0, 1), 0),
    INT(train.max_steps, GE(0), 1000),
    INT(train.batch_size, IN(1, 1 << 20), 32),
    INT(train.micro_batch_size, IN(0, 1 << 20), 0),
    FLOAT(train.lr, GT(0), 1e-3),
    FLOAT(train.min_lr, GE(0), 1e-4),
    ENUM(train.lr_schedule, lr_schedule_names, QS_LR_COSINE),
    INT(train.warmup_steps, GE(0), 100),
    INT(train.decay_steps, GE(0), 0),
    FLOAT(train.weight_decay, GE(0), 0.1),
    BOOL(train.decay_all, false),
    FLOAT(train.beta1, CO(0, 1), 0.9),
    FLOAT(train.beta2, CO(0, 1), 0.99),
    FLOAT(train.eps, GT(0), 1e-8),
    FLOAT(train.grad_clip, GE(0), 1.0),
    ENUM(train.precision, precision_names, QS_PRECISION_FP32),
    U64(train.seed, IN(0, MAX_SEED), 1337),
    INT(train.eval_interval, GE(0), 250),
    INT(train.eval_iters, GE(1), 20),
    INT(train.checkpoint_interval, GE(0), 0),
    INT(train.keep_checkpoints, GE(0), 0),
    INT(train.log_interval, GE(1), 10),
    INT(train.sample_tokens, GE(0), 500),
    INT(train.max_bad_steps, GE(0), 20),
    FLOAT(train.outlier_zscore, GE(0), 0),
    STRING(data.path, GE(1), NULL, "data/shakespeare_char/input.txt"),
    STRING(data.tokenizer, GE(0), tokenizer_names, "char"),
    FLOAT(data.val_fraction, OO(0, 1), 0.1),
    STRING(data.train_shards, GE(0), NULL, ""),
    STRING(data.val_shards, GE(0), NULL, ""),
    STRING(data.vocab_dir, GE(0), NULL, "../shared/data/gpt2"),
    INT(data.augment_shift, IN(0, 64), 0),
    BOOL(data.augment_flip, false),
    INT(lora.r, IN(1, 4096), 8),
    FLOAT(lora.alpha, GT(0), 16),
    FLOAT(lora.dropout, CO(0, 1), 0),
    STRING(lora.targets, GE(1), NULL, "q,v"),
    BOOL(lora.rslora, false),
    INT(parallel.sp, IN(1, 1 << 12), 1),
    INT(parallel.zero, IN(0, 1), 0),
    FLOAT(parallel.bucket_mb, IN(0, 1 << 20), 25),
};
#define N_FIELDS (sizeof fields / sizeof fields[0])
#define MAX_PATH_LEN 128 /* longer keys cannot name a field */

/* Reads go through the same pointer; callers holding a const config only read. */
static char *member(const qs_config *c, const field *f) { return (char *)c + f->offset; }

static const field *find_field(const char *path) {
    for (size_t i = 0; i < N_FIELDS; i++)
        if (strcmp(fields[i].path, path) == 0)
            return &fields[i];
    return NULL;
}

/* A section is any proper prefix of a field path ("model", "model.moe"). */
static bool is_section(const char *path) {
    size_t n = strlen(path);
    for (size_t i = 0; i < N_FIELDS; i++)
        if (strncmp(fields[i].path, path, n) == 0 && fields[i].path[n] == '.')
            return true;
    return false;
}

static int count_names(const char *const *names) {
    int n = 0;
    while (names[n])
        n++;
    return n;
}

static int name_index(const char *const *names, const char *s) {
    for (int i = 0; names[i]; i++)
        if (strcmp(names[i], s) == 0)
            return i;
    return -1;
}

/* Shortest text that reads back as v (as a float when is_float): 0.1f prints "0.1";
 * integral values print in full (3000000000, not 3e+09). */
static void format_number(char *buf, size_t n, double v, bool is_float) {
    if (v == floor(v) && fabs(v) < 1e17) {
        snprintf(buf, n, "%.0f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        double back = strtod(buf, NULL);
        if (is_float ? (float)back == (float)v : back == v)
            return;
    }
}

/* Text of a numeric field's value, exactly as it must appear in JSON. */
static void format_value(const qs_config *c, const field *f, char *buf, size_t n) {
    const char *p = member(c, f);
    if (f->type == T_INT || f->type == T_LAYERS)
        snprintf(buf, n, "%d", *(const int *)p);
    else if (f->type == T_U64)
        snprintf(buf, n, "%" PRIu64, *(const uint64_t *)p);
    else
        format_number(buf, n, *(const float *)p, true);
}

static const char *json_kind(const cJSON *v) {
    return cJSON_IsString(v) ? "a string"
           : cJSON_IsNumber(v) ? "a number"
           : cJSON_IsBool(v) ? "a boolean"
           : cJSON_IsNull(v) ? "null"
           : cJSON_IsArray(v) ? "an array"
                              : "an object";
}

/* "model.activation: expected one of gelu, relu, got 'tanh'". */
static int expect_error(const field *f, const char *got) {
    static const char *const kinds[] = {[T_INT] = "an integer", [T_FLOAT] = "a number",
                                        [T_BOOL] = "true or false", [T_STRING] = "a string",
                                        [T_U64] = "an integer",
                                        [T_LAYERS] = "true, false, \"auto\" or a number of blocks"};
    char want[256];
    if (!f->names)
        return qs_error("%s: expected %s, got %s", f->path, kinds[f->type], got);
    size_t len = (size_t)snprintf(want, sizeof want, "one of");
    for (int i = 0; f->names[i] && len < sizeof want; i++)
        len += (size_t)snprintf(want + len, sizeof want - len, "%s %s", i ? "," : "", f->names[i]);
    return qs_error("%s: expected %s, got %s", f->path, want, got);
}

/* The type's own limits, so stored values are always representable. */
static void type_limits(const field *f, double *lo, double *hi) {
    switch (f->type) {
    case T_INT:
    case T_LAYERS:
    case T_INTS: *lo = INT_MIN, *hi = INT_MAX; break;
    case T_FLOAT: *lo = -FLT_MAX, *hi = FLT_MAX; break;
    case T_STRING: *lo = 0, *hi = (double)(f->size - 1); break;
    default: *lo = 0, *hi = 18446744073709551615.0; break;
    }
}

/* Checks x (for strings, the length) against the field's range narrowed by its type's
 * limits; got is x as the user wrote it. */
static int check_range(const field *f, double x, const char *got) {
    double tlo, thi;
    type_limits(f, &tlo, &thi);
    double lo = fmax(f->lo, tlo), hi = fmin(f->hi, thi);
    bool lo_open = f->lo_open && f->lo >= tlo, hi_open = f->hi_open && f->hi <= thi;
    bool lo_ok = lo_open ? x > lo : x >= lo;
    bool hi_ok = hi_open ? x < hi : x <= hi;
    if (lo_ok && hi_ok)
        return 0;
    const char *subject = f->type == T_STRING ? "length " : "";
    char a[32], b[32];
    format_number(a, sizeof a, lo, false);
    format_number(b, sizeof b, hi, false);
    if (!lo_ok && isinf(f->hi)) /* no upper bound of its own: "must be > 0" */
        return qs_error("%s: %smust be %s %s, got %s", f->path, subject, lo_open ? ">" : ">=", a, got);
    return qs_error("%s: %smust be in %c%s, %s%c, got %s", f->path, subject, lo_open ? '(' : '[', a, b,
                    hi_open ? ')' : ']', got);
}

/* Stores a JSON value into the field, checking type and range first. */
static int set_field(qs_config *c, const field *f, const cJSON *v) {
    char *p = member(c, f);
    char got[96];
    if (f->type == T_INTS) {
        int n = (int)(f->size / sizeof(int));
        if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != n)
            return qs_error("%s: expected an array of %d integers, got %s", f->path, n,
                            cJSON_IsArray(v) ? "an array of another length" : json_kind(v));
        int k = 0;
        for (const cJSON *it = v->child; it; it = it->next, k++) {
            if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble))
                return qs_error("%s[%d]: expected an integer, got %s", f->path, k, json_kind(it));
            format_number(got, sizeof got, it->valuedouble, false);
            if (check_range(f, it->valuedouble, got) != 0)
                return -1;
            ((int *)p)[k] = (int)it->valuedouble;
        }
        return 0;
    }
    if (f->type == T_BOOL) {
        if (!cJSON_IsBool(v))
            return expect_error(f, json_kind(v));
        *(bool *)p = cJSON_IsTrue(v);
        return 0;
    }
    if (f->type == T_LAYERS && cJSON_IsBool(v)) {
        *(int *)p = cJSON_IsTrue(v) ? QS_RECOMPUTE_ALL : 0;
        return 0;
    }
    if (f->type == T_LAYERS && cJSON_IsString(v)) {
        snprintf(got, sizeof got, "'%.64s'", v->valuestring);
        if (strcmp(v->valuestring, "auto"))
            return expect_error(f, got);
        *(int *)p = QS_RECOMPUTE_AUTO;
        return 0;
    }
    if (f->type == T_ENUM || f->type == T_STRING) {
        if (!cJSON_IsString(v))
            return expect_error(f, json_kind(v));
        const char *s = v->valuestring;
        snprintf(got, sizeof got, "'%.64s'", s);
        int idx = f->names ? name_index(f->names, s) : 0;
        if (idx < 0)
            return expect_error(f, got);
        if (f->type == T_ENUM) {
            *(int *)p = idx;
            return 0;
        }
        size_t len = strlen(s);
        snprintf(got, sizeof got, "%zu", len);
        if (check_range(f, (double)len, got) != 0)
            return -1;
        memcpy(p, s, len + 1);
        return 0;
    }
    if (!cJSON_IsNumber(v))
        return expect_error(f, json_kind(v));
    double x = v->valuedouble;
    format_number(got, sizeof got, x, false);
    if (f->type != T_FLOAT && x != floor(x))
        return expect_error(f, got);
    /* Floats are checked as stored: 0.99999999999 rounds to 1.0f, 1e39 to inf (IEEE
     * conversion, defined under Annex F). */
    if (check_range(f, f->type == T_FLOAT ? (float)x : x, got) != 0)
        return -1;
    if (f->type == T_INT || f->type == T_LAYERS)
        *(int *)p = (int)x;
    else if (f->type == T_FLOAT)
        *(float *)p = (float)x;
    else
        *(uint64_t *)p = (uint64_t)x;
    return 0;
}

/* Applies v at path: a field, or a section whose members are applied in turn. */
static int apply(qs_config *c, const char *path, const cJSON *v);

static int apply_members(qs_config *c, const char *section, const cJSON *obj) {
    for (const cJSON *it = obj->child; it; it = it->next) {
        char path[MAX_PATH_LEN];
        const char *dot = *section ? "." : "";
        int n = snprintf(path, sizeof path, "%s%s%s", section, dot, it->string);
        if (n < 0 || (size_t)n >= sizeof path)
            return qs_error("unknown key '%s%s%.64s...'", section, dot, it->string);
        if (apply(c, path, it) != 0)
            return -1;
    }
    return 0;
}

static int apply(qs_config *c, const char *path, const cJSON *v) {
    const field *f = find_field(path);
    if (f)
        return set_field(c, f, v);
    if (!is_section(path))
        return qs_error("unknown key '%s'", path);
    if (!cJSON_IsObject(v))
        return qs_error("%s: expected an object, got %s", path, json_kind(v));
    return apply_members(c, path, v);
}

/* Prepends "<what>: " to the message just recorded. */
static int prefix_error(const char *what) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", qs_error_last());
    return qs_error("%s: %s", what, msg);
}

void qs_config_defaults(qs_config *c) {
    memset(c, 0, sizeof *c);
    for (size_t i = 0; i < N_FIELDS; i++) {
        const field *f = &fields[i];
        char *p = member(c, f);
        switch (f->type) {
        case T_INT:
        case T_LAYERS: *(int *)p = (int)f->def; break;
        case T_FLOAT: *(float *)p = (float)f->def; break;
        case T_U64: *(uint64_t *)p = (uint64_t)f->def; break;
        case T_BOOL: *(bool *)p = f->def != 0; break;
        case T_ENUM: *(int *)p = (int)f->def; break;
        case T_STRING: snprintf(p, f->size, "%s", f->def_str); break;
        case T_INTS: memcpy(p, f->def_ints, f->size); break;
        }
    }
}

int qs_config_load_string(qs_config *c, const char *json, const char *what) {
    const char *end = json;
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root) {
        int line = 1;
        for (const char *p = json; p < end && *p; p++)
            line += *p == '\n';
        return qs_error("%s: malformed JSON near line %d", what, line);
    }
    qs_config tmp = *c; /* all or nothing */
    int rc = cJSON_IsObject(root) ? apply_members(&tmp, "", root)
                                  : qs_error("expected a JSON object, got %s", json_kind(root));
    cJSON_Delete(root);
    if (rc != 0)
        return prefix_error(what);
    *c = tmp;
    return 0;
}

int qs_config_load_file(qs_config *c, const char *path) {
    char *data;
    size_t size;
    if (qs_file_read(path, &data, &size) != 0)
        return -1;
    int rc = memchr(data, '\0', size) ? qs_error("%s: contains a NUL byte", path)
                                      : qs_config_load_string(c, data, path);
    free(data);
    return rc;
}

int qs_config_set(qs_config *c, const char *assignment) {
    const char *eq = strchr(assignment, '=');
    if (!eq)
        return qs_error("--set: expected key=value, got '%s'", assignment);
    size_t klen = (size_t)(eq - assignment);
    if (klen == 0)
        return qs_error("--set: empty key in '%s'", assignment);
    char key[MAX_PATH_LEN];
    if (klen >= sizeof key)
        return qs_error("--set: unknown key '%.*s'", (int)klen, assignment);
    memcpy(key, assignment, klen);
    key[klen] = '\0';
    /* JSON when the whole value parses (3, 1e-3, true, "x"), else the bare text (relu). */
    cJSON *v = cJSON_ParseWithOpts(eq + 1, NULL, 1);
    if (!v)
        v = cJSON_CreateString(eq + 1);
    if (!v)
        return qs_error("--set: out of memory");
    qs_config tmp = *c;
    int rc = apply(&tmp, key, v);
    cJSON_Delete(v);
    if (rc != 0)
        return prefix_error("--set");
    *c = tmp;
    return 0;
}

/* Range and membership checks for one field's current value. */
static int check_field(const qs_config *c, const field *f) {
    const char *p = member(c, f);
    char got[96];
    switch (f->type) {
    case T_BOOL:
        return 0;
    case T_INTS:
        for (size_t k = 0; k < f->size / sizeof(int); k++) {
            snprintf(got, sizeof got, "%d", ((const int *)p)[k]);
            if (check_range(f, ((const int *)p)[k], got) != 0)
                return -1;
        }
        return 0;
    case T_ENUM: {
        int v = *(const int *)p;
        snprintf(got, sizeof got, "%d", v);
        return v >= 0 && v < count_names(f->names) ? 0 : expect_error(f, got);
    }
    case T_STRING: {
        size_t len = strnlen(p, f->size);
        snprintf(got, sizeof got, "'%.*s'", (int)(len < 64 ? len : 64), p);
        if (f->names && (len == f->size || name_index(f->names, p) < 0))
            return expect_error(f, got);
        snprintf(got, sizeof got, "%zu", len);
        return check_range(f, (double)len, got);
    }
    default: {
        double x;
        if (f->type == T_LAYERS && (*(const int *)p == QS_RECOMPUTE_ALL || *(const int *)p == QS_RECOMPUTE_AUTO))
            return 0;
        if (f->type == T_INT || f->type == T_LAYERS)
            x = *(const int *)p;
        else if (f->type == T_FLOAT)
            x = *(const float *)p;
        else { /* beyond 2^53 doubles are inexact; every such seed is out of range anyway */
            uint64_t u = *(const uint64_t *)p;
            x = u <= (uint64_t)MAX_SEED ? (double)u : INFINITY;
        }
        format_value(c, f, got, sizeof got);
        return check_range(f, x, got);
    }
    }
}

int qs_config_validate(const qs_config *c) {
    for (size_t i = 0; i < N_FIELDS; i++)
        if (check_field(c, &fields[i]) != 0)
            return -1;
    const qs_model_config *m = &c->model;
    const qs_train_config *t = &c->train;
    if (m->n_embd % m->n_head != 0)
        return qs_error("model.n_embd (%d) must be divisible by model.n_head (%d)", m->n_embd, m->n_head);
    if (m->n_kv_head && m->n_head % m->n_kv_head != 0)
        return qs_error("model.n_head (%d) must be divisible by model.n_kv_head (%d)", m->n_head, m->n_kv_head);
    if (m->moe.n_experts > 0 && m->moe.top_k > m->moe.n_experts)
        return qs_error("model.moe.top_k (%d) must be <= model.moe.n_experts (%d)", m->moe.top_k,
                        m->moe.n_experts);
    if (t->micro_batch_size > 0 && t->batch_size % t->micro_batch_size != 0)
        return qs_error("train.batch_size (%d) must be divisible by train.micro_batch_size (%d)",
                        t->batch_size, t->micro_batch_size);
    if (m->type == QS_MODEL_QUADRANET) {
        const qs_quadra_config *q = &m->quadra;
        int down = q->stem_patch << (QS_QUADRA_STAGES - 1);
        if (q->image_size % down != 0)
            return qs_error("model.quadra.image_size (%d) must be divisible by %d (stem_patch %d times the "
                            "three 2x downsamplings)", q->image_size, down, q->stem_patch);
        if (q->kernel_size % 2 == 0)
            return qs_error("model.quadra.kernel_size (%d) must be odd for the 2D 'same' convolution", q->kernel_size);
        if (m->mixer != QS_MIXER_ATTENTION)
            return qs_error("model.mixer applies to GPT models, not to model.type quadranet");
        if (m->recompute_layers > 0)
            return qs_error("model.recompute_layers: a QuadraNet checkpoints every block or none (true, false or "
                            "\"auto\"), got %d", m->recompute_layers);
    } else if (m->recompute_layers > m->n_layer) {
        return qs_error("model.recompute_layers (%d) must be <= model.n_layer (%d); true checkpoints every block",
                        m->recompute_layers, m->n_layer);
    }
    if (!strcmp(c->data.tokenizer, "gpt2") && (!c->data.train_shards[0] || !c->data.val_shards[0]))
        return qs_error("data.train_shards and data.val_shards must name token shards when data.tokenizer is gpt2");
    unsigned targets;
    if (qs_config_lora_targets(&c->lora, &targets)) return -1;
    if (t->decay_steps && t->lr_schedule != QS_LR_WSD)
        return qs_error("train.decay_steps applies to train.lr_schedule wsd");
    if (t->lr_schedule == QS_LR_WSD && t->decay_steps > t->max_steps - t->warmup_steps)
        return qs_error("train.decay_steps (%d) must be <= train.max_steps - train.warmup_steps (%d)", t->decay_steps,
                        t->max_steps - t->warmup_steps);
    if (t->min_lr > t->lr) {
        char a[32], b[32];
        format_number(a, sizeof a, t->min_lr, true);
        format_number(b, sizeof b, t->lr, true);
        return qs_error("train.min_lr (%s) must be <= train.lr (%s)", a, b);
    }
    return 0;
}

int qs_config_lora_targets(const qs_lora_config *l, unsigned *mask) {
    static const char *const names[] = {"q", "k", "v", "proj", "fc", "fc_proj", "experts", NULL};
    *mask = 0;
    for (const char *p = l->targets; *p;) {
        size_t n = strcspn(p, ",");
        int i = 0;
        while (names[i] && (strlen(names[i]) != n || strncmp(names[i], p, n))) i++;
        if (!names[i])
            return qs_error("lora.targets: unknown target '%.*s' (expected a comma-separated list of q, k, v, "
                            "proj, fc, fc_proj, experts)", (int)(n < 64 ? n : 64), p);
        *mask |= 1u << i;
        p += n + (p[n] == ',');
    }
    if (!*mask) return qs_error("lora.targets: names no target");
    return 0;
}

static cJSON *field_to_json(const qs_config *c, const field *f) {
    const char *p = member(c, f);
    char num[32];
    switch (f->type) {
    case T_BOOL:
        return cJSON_CreateBool(*(const bool *)p);
    case T_LAYERS: { /* true, false and "auto" as words, other counts as numbers */
        const int n = *(const int *)p;
        if (n == QS_RECOMPUTE_AUTO)
            return cJSON_CreateString("auto");
        if (n == QS_RECOMPUTE_ALL || n == 0)
            return cJSON_CreateBool(n != 0);
        return cJSON_CreateNumber(n);
    }
    case T_INTS:
        return cJSON_CreateIntArray((const int *)p, (int)(f->size / sizeof(int)));
    case T_ENUM: { /* an invalid index is written as a number, which loading rejects */
        int v = *(const int *)p;
        return v >= 0 && v < count_names(f->names) ? cJSON_CreateString(f->names[v]) : cJSON_CreateNumber(v);
    }
    case T_STRING: {
        char *s = strndup(p, f->size);
        cJSON *j = s ? cJSON_CreateString(s) : NULL;
        free(s);
        return j;
    }
    default:
        if (f->type == T_FLOAT && !isfinite(*(const float *)p))
            return cJSON_CreateNull(); /* JSON has no inf/nan; loading rejects null */
        format_value(c, f, num, sizeof num);
        return cJSON_CreateRaw(num); /* exact digits, not cJSON's double formatting */
    }
}

bool qs_config_same(const qs_config *a, const qs_config *b, const char *section) {
    char *ja = qs_config_to_json(a), *jb = qs_config_to_json(b);
    cJSON *pa = cJSON_Parse(ja), *pb = cJSON_Parse(jb);
    bool same = pa && pb &&
                cJSON_Compare(cJSON_GetObjectItem(pa, section), cJSON_GetObjectItem(pb, section), true);
    cJSON_Delete(pa);
    cJSON_Delete(pb);
    free(ja);
    free(jb);
    return same;
}

bool qs_config_same_architecture(const qs_model_config *a, const qs_model_config *b) {
    qs_config x, y;
    qs_config_defaults(&x);
    y = x;
    x.model = *a;
    y.model = *b;
    x.model.recompute_ffn = y.model.recompute_ffn;
    x.model.recompute_layers = y.model.recompute_layers;
    return qs_config_same(&x, &y, "model");
}

char *qs_config_to_json(const qs_config *c) {
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
    for (size_t i = 0; i < N_FIELDS && ok; i++) {
        char path[MAX_PATH_LEN];
        snprintf(path, sizeof path, "%s", fields[i].path);
        /* Walk (creating as needed) the section objects, then add the leaf. */
        cJSON *parent = root;
        char *key = path;
        for (char *dot; ok && (dot = strchr(key, '.')); key = dot + 1) {
            *dot = '\0';
            cJSON *section = cJSON_GetObjectItemCaseSensitive(parent, key);
            parent = section ? section : cJSON_AddObjectToObject(parent, key);
            ok = parent != NULL;
        }
        ok = ok && cJSON_AddItemToObject(parent, key, field_to_json(c, &fields[i]));
    }
    char *json = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!json)
        qs_error("out of memory");
    return json;
}

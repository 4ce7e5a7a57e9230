/* LoRA adapters: the table, the two-GEMM forward/backward the model calls around its
 * linear layers, merging into base weights, and the PEFT-style files. */
#include "quasar/lora.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "quasar/checkpoint.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/rng.h"

#define PEFT_PREFIX "base_model.model.transformer."
/* Dropout streams of the adapters, clear of the model's (layer * sites + site). */
#define LORA_STREAM ((uint64_t)1 << 40)

typedef struct lora_module {
    int a, b;          /* parameter indices; a < 0: no adapter here */
    int in, out;       /* the base layer's widths */
    int stack;         /* experts stacked in A and B; 0 for a plain layer */
    unsigned keep;     /* c_attn: which of the q, k, v column blocks of B train (bits 0..2) */
    float *u;          /* saved s * drop(x) A^T, [rows, r] (MoE: packed rows) */
    char base[QS_PARAM_NAME_MAX]; /* the base weight it updates, for merging */
} lora_module;

struct qs_lora {
    qs_lora_config cfg;
    const qs_backend *be;
    float scale;
    int L, E, C;
    lora_module *mods; /* [L][QS_LORA_N_SITES] */
    qs_params ps;
    float *act;        /* every module's u, then the scratch below */
    float *ds, *xd, *dxd; /* [rows, r]; dropped input and its gradient [rows, max in] */
};

static lora_module *module(const qs_lora *lo, int layer, qs_lora_site site) {
    lora_module *md = &lo->mods[layer * QS_LORA_N_SITES + site];
    return md->a >= 0 ? md : NULL;
}

/* Adds lora_A [stack?, r, in] and lora_B [stack?, out, r] for module `path` of layer l. */
static int add_module(qs_lora *lo, int l, qs_lora_site site, const char *path, int in, int out, int stack,
                      unsigned keep) {
    lora_module *md = &lo->mods[l * QS_LORA_N_SITES + site];
    const int r = lo->cfg.r, nd = stack ? 3 : 2;
    char name[QS_PARAM_NAME_MAX];
    int64_t sa[3], sb[3];
    int d = 0;
    if (stack) sa[d] = sb[d] = stack, d++;
    sa[d] = r, sa[d + 1] = in;
    sb[d] = out, sb[d + 1] = r;
    snprintf(name, sizeof name, PEFT_PREFIX "h.%d.%s.lora_A.weight", l, path);
    md->a = qs_params_add(&lo->ps, name, nd, sa, QS_ROLE_WEIGHT, in, r, false);
    snprintf(name, sizeof name, PEFT_PREFIX "h.%d.%s.lora_B.weight", l, path);
    md->b = qs_params_add(&lo->ps, name, nd, sb, QS_ROLE_WEIGHT, r, out, false);
    snprintf(md->base, sizeof md->base, "h.%d.%s.weight", l, path);
    md->in = in, md->out = out, md->stack = stack, md->keep = keep;
    return md->a < 0 || md->b < 0 ? -1 : 0;
}

/* Which modules the targets name in this architecture, or an error naming lora.*. */
static int check_targets(const qs_lora_config *lc, const qs_model_config *mc, unsigned t) {
    const unsigned qkv = QS_LORA_Q | QS_LORA_K | QS_LORA_V;
    if ((t & qkv) && mc->mixer == QS_MIXER_QUADCONV)
        return qs_error("lora.targets: q, k and v adapt attn.c_attn, which a model.mixer quadconv model does not have "
                        "(its token mixer is a convolution); use proj, fc, fc_proj or experts");
    if ((t & (QS_LORA_FC | QS_LORA_FC_PROJ)) && mc->moe.n_experts > 0)
        return qs_error("lora.targets: fc and fc_proj adapt a dense feed-forward, but this model's is MoE; use experts");
    if ((t & QS_LORA_EXPERTS) && mc->moe.n_experts == 0)
        return qs_error("lora.targets: experts needs an MoE model (model.moe.n_experts > 0)");
    if (lc->r > mc->n_embd)
        return qs_error("lora.r (%d) must be <= model.n_embd (%d): a rank above the layer widths adds nothing", lc->r,
                        mc->n_embd);
    return 0;
}

int qs_lora_create(qs_lora **out, const qs_lora_config *lc, const qs_gpt *m) {
    *out = NULL;
    const qs_model_config *mc = qs_gpt_config(m);
    unsigned t;
    if (qs_config_lora_targets(lc, &t) || check_targets(lc, mc, t)) return -1;
    qs_lora *lo = calloc(1, sizeof *lo);
    if (!lo) return qs_error("out of memory");
    lo->cfg = *lc;
    lo->be = qs_backend_cpu();
    lo->scale = lc->rslora ? lc->alpha / sqrtf((float)lc->r) : lc->alpha / (float)lc->r;
    lo->L = mc->n_layer, lo->E = mc->moe.n_experts, lo->C = mc->n_embd;
    const int C = mc->n_embd, F = mc->ffn_mult * mc->n_embd, E = lo->E;
    lo->mods = calloc((size_t)lo->L * QS_LORA_N_SITES, sizeof *lo->mods);
    if (!lo->mods) goto oom;
    for (int i = 0; i < lo->L * QS_LORA_N_SITES; i++) lo->mods[i].a = lo->mods[i].b = -1;
    int rc = 0;
    for (int l = 0; l < lo->L && !rc; l++) {
        if (t & (QS_LORA_Q | QS_LORA_K | QS_LORA_V))
            rc = add_module(lo, l, QS_LORA_SITE_QKV, "attn.c_attn", C, 3 * C, 0, t & 7u);
        if (!rc && (t & QS_LORA_PROJ)) rc = add_module(lo, l, QS_LORA_SITE_PROJ, "attn.c_proj", C, C, 0, 0);
        if (!rc && (t & QS_LORA_FC)) rc = add_module(lo, l, QS_LORA_SITE_FC, "mlp.c_fc", C, F, 0, 0);
        if (!rc && (t & QS_LORA_FC_PROJ)) rc = add_module(lo, l, QS_LORA_SITE_FC_PROJ, "mlp.c_proj", F, C, 0, 0);
        if (!rc && (t & QS_LORA_EXPERTS)) {
            rc = add_module(lo, l, QS_LORA_SITE_FC, "mlp.experts.c_fc", C, F, E, 0);
            if (!rc) rc = add_module(lo, l, QS_LORA_SITE_FC_PROJ, "mlp.experts.c_proj", F, C, E, 0);
        }
    }
    if (rc) goto oom;
    /* Activations: u per module for every row it can see (MoE: N * top_k packed rows). */
    const size_t N = (size_t)qs_gpt_max_tokens(m), rows = E > 0 ? N * (size_t)mc->moe.top_k : N;
    const size_t r = (size_t)lc->r, max_in = (t & (QS_LORA_FC_PROJ | QS_LORA_EXPERTS)) ? (size_t)F : (size_t)C;
    size_t total = rows * r + (lc->dropout > 0.0f ? 2 * rows * max_in : 0);
    for (int i = 0; i < lo->L * QS_LORA_N_SITES; i++)
        if (lo->mods[i].a >= 0) total += (lo->mods[i].stack ? rows : N) * r;
    if (qs_params_alloc(&lo->ps, lo->be, true) || !(lo->act = lo->be->alloc(total * sizeof(float)))) {
        qs_lora_free(lo);
        return qs_error("cannot allocate LoRA adapters: %.1f MiB of activations", total * sizeof(float) / 1048576.0);
    }
    float *p = lo->act;
    for (int i = 0; i < lo->L * QS_LORA_N_SITES; i++)
        if (lo->mods[i].a >= 0) {
            lo->mods[i].u = p;
            p += (lo->mods[i].stack ? rows : N) * r;
        }
    lo->ds = p;
    p += rows * r;
    if (lc->dropout > 0.0f) {
        lo->xd = p;
        lo->dxd = p + rows * max_in;
    }
    *out = lo;
    return 0;
oom:
    qs_lora_free(lo);
    return qs_error("out of memory building LoRA adapters");
}

void qs_lora_free(qs_lora *lo) {
    if (!lo) return;
    if (lo->act) lo->be->free(lo->act);
    qs_params_free(&lo->ps);
    free(lo->mods);
    free(lo);
}

qs_params *qs_lora_params(qs_lora *lo) { return &lo->ps; }
const qs_lora_config *qs_lora_config_of(const qs_lora *lo) { return &lo->cfg; }

int qs_lora_init(qs_lora *lo, uint64_t seed) {
    float *host = calloc(lo->ps.n ? lo->ps.n : 1, sizeof(float));
    if (!host) return qs_error("out of memory initialising LoRA adapters");
    for (int i = 0; i < lo->L * QS_LORA_N_SITES; i++) {
        const lora_module *md = &lo->mods[i];
        if (md->a < 0) continue;
        const qs_param_info *pa = &lo->ps.info[md->a];
        const float bound = 1.0f / sqrtf((float)md->in);
        for (size_t j = 0; j < pa->numel; j++)
            host[pa->offset + j] = bound * (2.0f * qs_rng_uniform(seed, (uint64_t)md->a, j) - 1.0f);
    } /* B stays zero */
    qs_params_upload(&lo->ps, host);
    free(host);
    return 0;
}

/* ---- forward / backward ---- */

static bool dropout_on(const qs_lora *lo, const qs_forward_mode *mode) {
    return mode->train && lo->cfg.dropout > 0.0f;
}

static uint64_t stream_of(const qs_lora *lo, int layer, qs_lora_site site, int e) {
    return LORA_STREAM + ((uint64_t)layer * QS_LORA_N_SITES + (uint64_t)site) * (uint64_t)(lo->E + 1) + (uint64_t)e;
}

/* The adapter's input: x itself, or its dropped copy in the xd scratch (the same mask
 * in forward and backward, drawn by counter). */
static const float *adapter_input(const qs_lora *lo, const lora_module *md, int layer, qs_lora_site site, int e,
                                  int n, const float *x, const int64_t *row_ids, const qs_forward_mode *mode) {
    if (!dropout_on(lo, mode)) return x;
    lo->be->ops->dropout_forward(lo->xd, x, lo->cfg.dropout, mode->rng_seed, stream_of(lo, layer, site, e), row_ids,
                                 (size_t)n, (size_t)md->in);
    return lo->xd;
}

/* Expert e's matrix of a stacked tensor (e = 0 for plain ones). */
static float *slice(float *base, int e, size_t numel_per) { return base ? base + (size_t)e * numel_per : NULL; }

void qs_lora_forward(qs_lora *lo, int layer, qs_lora_site site, int e, int row0, int n, float *y, const float *x,
                     const int64_t *row_ids, const qs_forward_mode *mode) {
    const lora_module *md = module(lo, layer, site);
    if (!md || n <= 0) return;
    const qs_ops *ops = lo->be->ops;
    const int r = lo->cfg.r;
    const float *A = slice(qs_params_value(&lo->ps, md->a), e, (size_t)r * md->in);
    const float *B = slice(qs_params_value(&lo->ps, md->b), e, (size_t)md->out * r);
    float *u = md->u + (size_t)row0 * r;
    const float *xin = adapter_input(lo, md, layer, site, e, n, x, row_ids, mode);
    lo->be->zero(u, (size_t)n * r * sizeof(float));
    ops->matmul_acc(u, xin, A, lo->scale, n, md->in, r, QS_W_OUT_IN); /* u = s x A^T */
    ops->matmul_acc(y, u, B, 1.0f, n, r, md->out, QS_W_OUT_IN);        /* y += u B^T */
}

void qs_lora_backward(qs_lora *lo, int layer, qs_lora_site site, int e, int row0, int n, float *dx, const float *dy,
                      const float *x, const int64_t *row_ids, const qs_forward_mode *mode) {
    const lora_module *md = module(lo, layer, site);
    if (!md || n <= 0) return;
    const qs_ops *ops = lo->be->ops;
    const int r = lo->cfg.r;
    const size_t na = (size_t)r * md->in, nb = (size_t)md->out * r;
    const float *A = slice(qs_params_value(&lo->ps, md->a), e, na), *B = slice(qs_params_value(&lo->ps, md->b), e, nb);
    float *dA = slice(qs_params_grad(&lo->ps, md->a), e, na), *dB = slice(qs_params_grad(&lo->ps, md->b), e, nb);
    const float *u = md->u + (size_t)row0 * r;
    /* dB += dy^T u; ds = s dy B is the gradient at x A^T */
    ops->matmul_backward(NULL, dB, NULL, dy, u, B, n, r, md->out, QS_W_OUT_IN);
    for (int blk = 0; md->keep && blk < 3; blk++) /* c_attn blocks not targeted stay zero */
        if (!(md->keep & (1u << blk))) lo->be->zero(dB + (size_t)blk * lo->C * r, (size_t)lo->C * r * sizeof(float));
    lo->be->zero(lo->ds, (size_t)n * r * sizeof(float));
    ops->matmul_acc(lo->ds, dy, B, lo->scale, n, md->out, r, QS_W_IN_OUT);
    /* dA += ds^T drop(x); dx += drop'(ds A) */
    const float *xin = adapter_input(lo, md, layer, site, e, n, x, row_ids, mode);
    if (!dropout_on(lo, mode)) {
        ops->matmul_backward(dx, dA, NULL, lo->ds, xin, A, n, md->in, r, QS_W_OUT_IN);
        return;
    }
    const size_t nx = (size_t)n * md->in;
    lo->be->zero(lo->dxd, nx * sizeof(float));
    ops->matmul_backward(lo->dxd, dA, NULL, lo->ds, xin, A, n, md->in, r, QS_W_OUT_IN);
    ops->dropout_backward(dx, lo->dxd, lo->cfg.dropout, mode->rng_seed, stream_of(lo, layer, site, e), row_ids,
                          (size_t)n, (size_t)md->in);
}

/* ---- merging ---- */

int qs_lora_merge(const qs_lora *lo, qs_params *base, int sign) {
    float *w = malloc(base->n * sizeof(float)), *ad = malloc((lo->ps.n ? lo->ps.n : 1) * sizeof(float));
    if (!w || !ad) {
        free(w);
        free(ad);
        return qs_error("out of memory merging the adapter");
    }
    qs_params_download(base, w);
    qs_params_download(&lo->ps, ad);
    const int r = lo->cfg.r;
    int rc = 0;
    for (int i = 0; i < lo->L * QS_LORA_N_SITES && !rc; i++) {
        const lora_module *md = &lo->mods[i];
        if (md->a < 0) continue;
        int bi = qs_params_find(base, md->base);
        if (bi < 0) {
            rc = qs_error("the base model has no '%s' for the adapter", md->base);
            break;
        }
        const size_t in = (size_t)md->in, outw = (size_t)md->out;
        for (int e = 0; e < (md->stack ? md->stack : 1); e++) {
            const float *A = ad + lo->ps.info[md->a].offset + (size_t)e * r * in;
            const float *B = ad + lo->ps.info[md->b].offset + (size_t)e * outw * r;
            float *W = w + base->info[bi].offset + (size_t)e * in * outw; /* [in, out] */
            for (size_t a = 0; a < in; a++)
                for (size_t o = 0; o < outw; o++) {
                    double d = 0.0;
                    for (int k = 0; k < r; k++) d += (double)B[o * r + (size_t)k] * A[(size_t)k * in + a];
                    W[a * outw + o] += (float)(sign * lo->scale * d);
                }
        }
    }
    if (!rc) qs_params_upload(base, w);
    free(w);
    free(ad);
    return rc;
}

/* ---- files ---- */

int qs_lora_write(const qs_lora *lo, const char *dir, const char *base_path) {
    char path[QS_PATH_MAX + 64];
    float *host = malloc((lo->ps.n ? lo->ps.n : 1) * sizeof(float));
    qs_st_entry *e = calloc((size_t)lo->ps.n_tensors, sizeof *e);
    int rc = -1;
    if (!host || !e) {
        qs_error("out of memory writing the adapter");
        goto done;
    }
    qs_params_download(&lo->ps, host);
    for (int i = 0; i < lo->ps.n_tensors; i++) {
        const qs_param_info *p = &lo->ps.info[i];
        e[i] = (qs_st_entry){.name = p->name, .dtype = QS_DT_F32, .ndim = p->ndim, .data = host + p->offset};
        for (int d = 0; d < p->ndim; d++) e[i].shape[d] = p->shape[d];
    }
    qs_st_meta meta[1] = {{"format", "pt"}};
    snprintf(path, sizeof path, "%s/" QS_LORA_WEIGHTS, dir);
    if (qs_st_write(path, e, lo->ps.n_tensors, meta, 1)) goto done;

    /* PEFT matches target_modules by module-name suffix, so "attn.c_proj" does not also
     * catch mlp.c_proj. */
    static const char *const modules[QS_LORA_N_SITES][2] = {
        {"attn.c_attn", "attn.c_attn"}, {"attn.c_proj", "attn.c_proj"},
        {"mlp.c_fc", "mlp.experts.c_fc"}, {"mlp.c_proj", "mlp.experts.c_proj"}};
    cJSON *root = cJSON_CreateObject(), *tm = cJSON_AddArrayToObject(root, "target_modules");
    for (int s = 0; s < QS_LORA_N_SITES; s++)
        if (lo->L > 0 && module(lo, 0, (qs_lora_site)s))
            cJSON_AddItemToArray(tm, cJSON_CreateString(modules[s][lo->E > 0]));
    cJSON_AddStringToObject(root, "peft_type", "LORA");
    cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM");
    cJSON_AddStringToObject(root, "base_model_name_or_path", base_path);
    cJSON_AddNumberToObject(root, "r", lo->cfg.r);
    cJSON_AddNumberToObject(root, "lora_alpha", lo->cfg.alpha);
    cJSON_AddNumberToObject(root, "lora_dropout", lo->cfg.dropout);
    cJSON_AddBoolToObject(root, "use_rslora", lo->cfg.rslora);
    cJSON_AddBoolToObject(root, "fan_in_fan_out", true); /* GPT-2's Conv1D: W is [in, out] */
    cJSON_AddStringToObject(root, "bias", "none");
    cJSON_AddBoolToObject(root, "inference_mode", true);
    cJSON_AddStringToObject(root, "quasar_targets", lo->cfg.targets);
    char *json = cJSON_Print(root);
    cJSON_Delete(root);
    if (!json) {
        qs_error("out of memory writing the adapter");
        goto done;
    }
    snprintf(path, sizeof path, "%s/" QS_LORA_CONFIG, dir);
    rc = qs_file_write_atomic(path, json, strlen(json));
    free(json);
done:
    free(host);
    free(e);
    return rc;
}

/* Sets lora.<key> from the adapter config's JSON value, through the schema's checks. */
static int set_from(qs_config *c, const cJSON *root, const char *json_key, const char *key, const char *path) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, json_key);
    if (!v) return qs_error("%s: missing '%s'", path, json_key);
    char *text = cJSON_PrintUnformatted(v), a[256];
    if (!text) return qs_error("out of memory");
    snprintf(a, sizeof a, "lora.%s=%s", key, text);
    free(text);
    /* JSON strings go in quoted, so "q,v" stays one string */
    if (qs_config_set(c, a)) return qs_error("%s: '%s': %s", path, json_key, qs_error_last());
    return 0;
}

int qs_lora_read_config(const char *step_dir, qs_lora_config *lc) {
    char path[QS_PATH_MAX + 64], *text;
    size_t n;
    snprintf(path, sizeof path, "%s/" QS_LORA_CONFIG, step_dir);
    if (qs_checkpoint_read(step_dir, QS_LORA_CONFIG, &text, &n)) return -1;
    cJSON *root = cJSON_ParseWithLength(text, n);
    free(text);
    qs_config c;
    qs_config_defaults(&c);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
    int rc = !cJSON_IsObject(root) ? qs_error("%s: not a JSON object", path)
             : !cJSON_IsString(type) || strcmp(type->valuestring, "LORA")
                 ? qs_error("%s: 'peft_type' must be \"LORA\"", path)
             : set_from(&c, root, "r", "r", path) || set_from(&c, root, "lora_alpha", "alpha", path) ||
                     set_from(&c, root, "lora_dropout", "dropout", path) ||
                     set_from(&c, root, "use_rslora", "rslora", path) ||
                     set_from(&c, root, "quasar_targets", "targets", path)
                 ? -1
                 : 0;
    cJSON_Delete(root);
    unsigned t;
    if (!rc && qs_config_lora_targets(&c.lora, &t)) rc = qs_error("%s: %s", path, qs_error_last());
    if (!rc) *lc = c.lora;
    return rc;
}

int qs_lora_load(qs_lora *lo, const char *step_dir) {
    char path[QS_PATH_MAX + 64], *data;
    size_t n;
    snprintf(path, sizeof path, "%s/" QS_LORA_WEIGHTS, step_dir);
    if (qs_checkpoint_read(step_dir, QS_LORA_WEIGHTS, &data, &n)) return -1;
    qs_st_file f;
    int rc = qs_st_parse(&f, data, n, path);
    free(data);
    if (rc) return -1;
    rc = qs_checkpoint_load_weights(&lo->ps, &f, path);
    qs_st_free(&f);
    if (rc) return qs_error("the adapter does not fit this base model: %s", qs_error_last());
    return 0;
}

int qs_lora_open(qs_lora **out, const char *dir, const qs_gpt *m, char *step_dir, size_t cap) {
    qs_lora_config lc;
    *out = NULL;
    if (qs_checkpoint_find_file(dir, QS_LORA_WEIGHTS, step_dir, cap) || qs_lora_read_config(step_dir, &lc))
        return qs_error("--adapter: %s", qs_error_last());
    if (qs_lora_create(out, &lc, m) || qs_lora_load(*out, step_dir)) {
        qs_lora_free(*out);
        *out = NULL;
        return qs_error("--adapter %s: %s", step_dir, qs_error_last());
    }
    return 0;
}

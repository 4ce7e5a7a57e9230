/* LoRA adapters: the table, the two-GEMM forward/backward the model calls around its
 * linear layers, merging into base weights, the PEFT-style files and the import of
 * adapters that Hugging Face peft wrote. */
#include "quasar/lora.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "quasar/checkpoint.h"
#include "quasar/checksum.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/rng.h"

#define PEFT_PREFIX "base_model.model.transformer."
/* Dropout streams of the adapters, clear of the model's (layer * sites + site). */
#define LORA_STREAM ((uint64_t)1 << 40)

/* Each site's module in a block, as PEFT names it: [0] dense models (GPT-2's names), [1]
 * MoE models (the stacked expert linears). */
static const char *const SITE_MODULE[2][QS_LORA_N_SITES] = {
    {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    {"attn.c_attn", "attn.c_proj", "mlp.experts.c_fc", "mlp.experts.c_proj"}};

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
    int L, E, C, Ckv; /* Ckv: the k (and v) rows of c_attn's B (grouped-query attention: fewer than C) */
    lora_module *mods; /* [L][QS_LORA_N_SITES] */
    qs_params ps;
    size_t rows, max_in; /* rows a module may see (MoE: token rows x top_k); widest input */
    size_t act_floats;
    qs_mem_plan plan;  /* the adapters' memory (no optimizer) */
    float *act;        /* every module's u, then the scratch below */
    float *ds, *xd, *dxd; /* [rows, r]; dropped input and its gradient [rows, max in] */
    char base_sha256[65]; /* the base's weights when the table was made (see base_fingerprint) */
};

static lora_module *module(const qs_lora *lo, int layer, qs_lora_site site) {
    lora_module *md = &lo->mods[layer * QS_LORA_N_SITES + site];
    return md->a >= 0 ? md : NULL;
}

/* Adds lora_A [stack?, r, in] and lora_B [stack?, out, r] for the module of `site` in
 * layer l (stack > 0: an MoE layer's experts). */
static int add_module(qs_lora *lo, int l, qs_lora_site site, int in, int out, int stack, unsigned keep) {
    lora_module *md = &lo->mods[l * QS_LORA_N_SITES + site];
    const int r = lo->cfg.r, nd = stack ? 3 : 2;
    const char *path = SITE_MODULE[stack > 0][site];
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

/* SHA-256 of the base's weights as F32 in table order, which is the data section of its
 * Quasar model.safetensors; read back in slices, so backend memory needs no host copy. */
static void base_fingerprint(const qs_params *ps, char hex[65]) {
    float slice[4096];
    qs_sha256 s;
    qs_sha256_init(&s);
    for (size_t i = 0; i < ps->n; i += 4096) {
        const size_t k = ps->n - i < 4096 ? ps->n - i : 4096;
        ps->be->download(slice, ps->data + i, k * sizeof(float));
        qs_sha256_update(&s, slice, k * sizeof(float));
    }
    qs_sha256_hex(&s, hex);
}

/* The adapters' table and activation count for a model of mc on be with N token rows
 * a forward, and lo->plan; no backend memory yet. */
static int layout(qs_lora **out, const qs_lora_config *lc, const qs_model_config *mc, const qs_backend *be,
                  size_t N) {
    *out = NULL;
    unsigned t;
    if (qs_config_lora_targets(lc, &t) || check_targets(lc, mc, t)) return -1;
    qs_lora *lo = calloc(1, sizeof *lo);
    if (!lo) return qs_error("out of memory");
    lo->cfg = *lc;
    lo->be = be;
    lo->scale = lc->rslora ? lc->alpha / sqrtf((float)lc->r) : lc->alpha / (float)lc->r;
    lo->L = mc->n_layer, lo->E = mc->moe.n_experts, lo->C = mc->n_embd;
    lo->Ckv = mc->n_embd / mc->n_head * qs_config_kv_heads(mc);
    const int C = mc->n_embd, F = mc->ffn_mult * mc->n_embd, E = lo->E;
    lo->mods = calloc((size_t)lo->L * QS_LORA_N_SITES, sizeof *lo->mods);
    if (!lo->mods) goto oom;
    for (int i = 0; i < lo->L * QS_LORA_N_SITES; i++) lo->mods[i].a = lo->mods[i].b = -1;
    int rc = 0;
    for (int l = 0; l < lo->L && !rc; l++) {
        if (t & (QS_LORA_Q | QS_LORA_K | QS_LORA_V))
            rc = add_module(lo, l, QS_LORA_SITE_QKV, C, C + 2 * lo->Ckv, 0, t & 7u);
        if (!rc && (t & QS_LORA_PROJ)) rc = add_module(lo, l, QS_LORA_SITE_PROJ, C, C, 0, 0);
        if (!rc && (t & QS_LORA_FC)) rc = add_module(lo, l, QS_LORA_SITE_FC, C, F, 0, 0);
        if (!rc && (t & QS_LORA_FC_PROJ)) rc = add_module(lo, l, QS_LORA_SITE_FC_PROJ, F, C, 0, 0);
        if (!rc && (t & QS_LORA_EXPERTS)) {
            rc = add_module(lo, l, QS_LORA_SITE_FC, C, F, E, 0);
            if (!rc) rc = add_module(lo, l, QS_LORA_SITE_FC_PROJ, F, C, E, 0);
        }
    }
    if (rc || lo->ps.broken) goto oom;
    /* Activations: u per module for every row it can see (MoE: N * top_k packed rows). */
    lo->rows = E > 0 ? N * (size_t)mc->moe.top_k : N;
    lo->max_in = (t & (QS_LORA_FC_PROJ | QS_LORA_EXPERTS)) ? (size_t)F : (size_t)C;
    const size_t r = (size_t)lc->r;
    lo->act_floats = lo->rows * r + (lc->dropout > 0.0f ? 2 * lo->rows * lo->max_in : 0);
    for (int i = 0; i < lo->L * QS_LORA_N_SITES; i++)
        if (lo->mods[i].a >= 0) lo->act_floats += (lo->mods[i].stack ? lo->rows : N) * r;
    lo->plan = (qs_mem_plan){.params = lo->ps.n * sizeof(float),
                             .grads = lo->ps.n * sizeof(float),
                             .activations = lo->act_floats * sizeof(float)};
    *out = lo;
    return 0;
oom:
    qs_lora_free(lo);
    return qs_error("out of memory building LoRA adapters");
}

int qs_lora_plan(const qs_lora_config *lc, const qs_model_config *mc, const qs_backend *be, int max_tokens,
                 qs_mem_plan *plan) {
    qs_lora *lo;
    if (layout(&lo, lc, mc, be, (size_t)max_tokens)) return -1;
    *plan = lo->plan;
    qs_lora_free(lo);
    return 0;
}

int qs_lora_create(qs_lora **out, const qs_lora_config *lc, qs_gpt *m) {
    *out = NULL;
    /* the base fingerprint and a merge read every fp32 weight */
    if (!qs_params_whole(qs_gpt_params(m)))
        return qs_error("LoRA adapters need the base's fp32 weights: its linear layers are held as bf16 only");
    qs_lora *lo;
    /* the adapters read and write the model's activations, on its backend */
    if (layout(&lo, lc, qs_gpt_config(m), qs_gpt_backend(m), (size_t)qs_gpt_max_tokens(m))) return -1;
    if (qs_mem_plan_check(&lo->plan, lo->be)) {
        qs_lora_free(lo);
        return -1;
    }
    if (qs_params_alloc(&lo->ps, lo->be, true) || !(lo->act = lo->be->alloc(lo->act_floats * sizeof(float)))) {
        char why[256];
        snprintf(why, sizeof why, "%s", qs_error_last());
        qs_lora_free(lo);
        return qs_error("cannot allocate LoRA adapters (%s)", why);
    }
    const size_t N = (size_t)qs_gpt_max_tokens(m), rows = lo->rows, r = (size_t)lc->r;
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
        lo->dxd = p + rows * lo->max_in;
    }
    base_fingerprint(qs_gpt_params(m), lo->base_sha256);
    *out = lo;
    return 0;
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

bool qs_lora_adapts(const qs_lora *lo, int layer, qs_lora_site site) { return module(lo, layer, site) != NULL; }

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
        if (!(md->keep & (1u << blk))) {
            /* B's rows: q [0, C), k [C, C + Ckv), v [C + Ckv, C + 2 Ckv) */
            const size_t row0 = blk ? (size_t)lo->C + (size_t)(blk - 1) * lo->Ckv : 0, rows = blk ? lo->Ckv : lo->C;
            lo->be->zero(dB + row0 * r, rows * r * sizeof(float));
        }
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

#define BASE_SHA_KEY "quasar_base_sha256"

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
    cJSON *root = cJSON_CreateObject(), *tm = cJSON_AddArrayToObject(root, "target_modules");
    for (int s = 0; s < QS_LORA_N_SITES; s++)
        if (lo->L > 0 && module(lo, 0, (qs_lora_site)s))
            cJSON_AddItemToArray(tm, cJSON_CreateString(SITE_MODULE[lo->E > 0][s]));
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
    cJSON_AddStringToObject(root, BASE_SHA_KEY, lo->base_sha256);
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

/* A file of an adapter folder: checked against checksums.json in Quasar's checkpoints;
 * a folder without one (as peft writes it) is read as it is. */
static int read_adapter_file(const char *dir, const char *name, char **data, size_t *n) {
    char path[QS_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/checksums.json", dir);
    if (!access(path, F_OK)) return qs_checkpoint_read(dir, name, data, n);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return qs_file_read(path, data, n);
}

static int open_weights(const char *dir, qs_st_file *f, char *path, size_t cap) {
    char *data;
    size_t n;
    snprintf(path, cap, "%s/" QS_LORA_WEIGHTS, dir);
    if (read_adapter_file(dir, QS_LORA_WEIGHTS, &data, &n)) return -1;
    int rc = qs_st_parse(f, data, n, path);
    free(data);
    return rc;
}

/* Layer, site and A (0) or B (1) of a tensor named as peft names the LoRA weights of a
 * GPT-2 linear layer, base_model.model.transformer.h.<l>.<module>.lora_<A|B>.weight;
 * -1 for any other name. */
static int peft_name(const char *name, int *layer, int *site, int *is_b) {
    const size_t np = strlen(PEFT_PREFIX "h.");
    if (strncmp(name, PEFT_PREFIX "h.", np) || !isdigit((unsigned char)name[np])) return -1;
    char *end;
    const long l = strtol(name + np, &end, 10);
    if (*end != '.' || l > 1000000 || (name[np] == '0' && end - (name + np) > 1)) return -1;
    for (int s = 0; s < QS_LORA_N_SITES; s++) {
        const size_t k = strlen(SITE_MODULE[0][s]);
        const char *tail = end + 1 + k;
        if (strncmp(end + 1, SITE_MODULE[0][s], k) || (strcmp(tail, ".lora_A.weight") && strcmp(tail, ".lora_B.weight")))
            continue;
        *layer = (int)l, *site = s, *is_b = tail[6] == 'B';
        return 0;
    }
    return -1;
}

static int unexpected_tensor(const char *path, const char *name) {
    return qs_error("%s: unexpected tensor '%s' (Quasar imports the lora_A / lora_B weights of "
                    PEFT_PREFIX "h.N.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj})", path, name);
}

/* ---- adapter_config.json ---- */

typedef struct adapter_cfg {
    cJSON *root;
    bool foreign; /* written by peft: no quasar_targets, tensors in any float dtype */
    char path[QS_PATH_MAX + 64];
} adapter_cfg;

static const cJSON *item(const adapter_cfg *ac, const char *key) { return cJSON_GetObjectItemCaseSensitive(ac->root, key); }

/* null, false, "", [] or {}: how peft writes a feature that is not in use */
static bool is_off(const cJSON *v) {
    return !v || cJSON_IsNull(v) || cJSON_IsFalse(v) || ((cJSON_IsArray(v) || cJSON_IsObject(v)) && !v->child) ||
           (cJSON_IsString(v) && !*v->valuestring);
}

static bool in_list(const char *s, const char *const *list) {
    while (*list && strcmp(s, *list)) list++;
    return *list != NULL;
}

/* rank_pattern / alpha_pattern: accepted while every module keeps the global value. */
static bool uniform_pattern(const cJSON *pattern, const cJSON *global) {
    if (!cJSON_IsObject(pattern) || !cJSON_IsNumber(global)) return false;
    for (const cJSON *e = pattern->child; e; e = e->next)
        if (!cJSON_IsNumber(e) || e->valuedouble != global->valuedouble) return false;
    return true;
}

/* layers_to_transform: a layer index or a list of them */
static bool layer_spec(const cJSON *v) {
    if (cJSON_IsNumber(v)) return v->valuedouble >= 0 && v->valuedouble == (double)(int)v->valuedouble;
    if (!cJSON_IsArray(v)) return false;
    for (const cJSON *e = v->child; e; e = e->next)
        if (!layer_spec(e) || cJSON_IsArray(e)) return false;
    return true;
}

static bool selects_layer(const cJSON *layers, int l) {
    if (cJSON_IsNumber(layers)) return layers->valueint == l;
    for (const cJSON *e = layers->child; e; e = e->next)
        if (e->valueint == l) return true;
    return false;
}

/* layers_pattern: GPT-2's blocks are transformer.h.N */
static bool pattern_is_h(const cJSON *v) {
    if (cJSON_IsString(v)) return !strcmp(v->valuestring, "h");
    for (const cJSON *e = cJSON_IsArray(v) ? v->child : NULL; e; e = e->next)
        if (cJSON_IsString(e) && !strcmp(e->valuestring, "h")) return true;
    return false;
}

/* Keys that leave a loaded adapter's computation plain LoRA: read elsewhere, bookkeeping,
 * or settings of the initialisation only. Other keys must be off (null, false, empty). */
static const char *const PLAIN_KEYS[] = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules",
    "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config", "quasar_targets",
    BASE_SHA_KEY, NULL};
/* Initialisations that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ rewrite them). */
static const char *const PLAIN_INITS[] = {"gaussian", "eva", "orthogonal", NULL};

/* Every setting the file makes that Quasar's LoRA cannot reproduce is refused by name. */
static int check_options(const adapter_cfg *ac) {
    for (const cJSON *it = ac->root->child; it; it = it->next) {
        const char *k = it->string, *why;
        bool ok;
        if (!strcmp(k, "bias")) {
            ok = cJSON_IsString(it) && !strcmp(it->valuestring, "none");
            why = "only \"none\": Quasar trains and imports no biases";
        } else if (!strcmp(k, "init_lora_weights")) {
            ok = cJSON_IsBool(it) || (cJSON_IsString(it) && in_list(it->valuestring, PLAIN_INITS));
            why = "this initialisation rewrites the base weights; save the adapter converted to plain LoRA";
        } else if (!strcmp(k, "rank_pattern") || !strcmp(k, "alpha_pattern")) {
            ok = is_off(it) || uniform_pattern(it, item(ac, k[0] == 'r' ? "r" : "lora_alpha"));
            why = "Quasar gives every module the one r and lora_alpha";
        } else if (!strcmp(k, "layers_to_transform")) {
            ok = is_off(it) || layer_spec(it);
            why = "expected a layer index or a list of them";
        } else if (!strcmp(k, "layers_pattern")) {
            ok = is_off(it) || pattern_is_h(it);
            why = "GPT-2's layers are transformer.h.N";
        } else if (!strcmp(k, "fan_in_fan_out")) {
            /* GPT-2's linears are Conv1D, for which peft always sets it; lora_A is [r, in]
             * and lora_B [out, r] either way. */
            ok = cJSON_IsBool(it);
            why = "expected true or false";
        } else {
            ok = in_list(k, PLAIN_KEYS) || is_off(it);
            why = !strcmp(k, "use_dora") ? "DoRA: Quasar imports plain LoRA adapters only"
                                         : "Quasar imports plain LoRA adapters only";
        }
        if (ok) continue;
        char *v = cJSON_PrintUnformatted(it);
        qs_error("%s: '%s' = %.60s%s is not supported (%s)", ac->path, k, v ? v : "?", v && strlen(v) > 60 ? "..." : "",
                 why);
        free(v);
        return -1;
    }
    return 0;
}

static int open_config(adapter_cfg *ac, const char *dir) {
    char *text;
    size_t n;
    snprintf(ac->path, sizeof ac->path, "%s/" QS_LORA_CONFIG, dir);
    ac->root = NULL;
    if (read_adapter_file(dir, QS_LORA_CONFIG, &text, &n)) return -1;
    ac->root = cJSON_ParseWithLength(text, n);
    free(text);
    const cJSON *type = item(ac, "peft_type");
    int rc = !cJSON_IsObject(ac->root) ? qs_error("%s: not a JSON object", ac->path)
             : !cJSON_IsString(type)   ? qs_error("%s: 'peft_type' must be \"LORA\"", ac->path)
             : strcmp(type->valuestring, "LORA")
                 ? qs_error("%s: 'peft_type' is \"%.40s\": only LORA adapters are supported", ac->path, type->valuestring)
                 : check_options(ac);
    if (rc) {
        cJSON_Delete(ac->root);
        return -1;
    }
    ac->foreign = !item(ac, "quasar_targets");
    return 0;
}

/* Sets lora.<key> from the adapter config's value, through the schema's checks; an
 * optional key left out keeps the default, which is peft's too (dropout 0, no rslora). */
static int set_from(qs_config *c, const adapter_cfg *ac, const char *json_key, const char *key, bool required) {
    const cJSON *v = item(ac, json_key);
    if (!v) return required ? qs_error("%s: missing '%s'", ac->path, json_key) : 0;
    char *text = cJSON_PrintUnformatted(v), a[256];
    if (!text) return qs_error("out of memory");
    snprintf(a, sizeof a, "lora.%s=%s", key, text);
    free(text);
    /* JSON strings go in quoted, so "q,v" stays one string */
    if (qs_config_set(c, a)) return qs_error("%s: '%s': %s", ac->path, json_key, qs_error_last());
    return 0;
}

/* lora.targets of a peft adapter: the sites its tensors cover (attn.c_attn: q, k and v). */
static int foreign_targets(const char *dir, char *targets, size_t cap) {
    static const char *const names[QS_LORA_N_SITES] = {"q,k,v", "proj", "fc", "fc_proj"};
    char path[QS_PATH_MAX + 64];
    qs_st_file f;
    if (open_weights(dir, &f, path, sizeof path)) return -1;
    unsigned sites = 0;
    int rc = 0, l, s, b;
    for (int i = 0; i < f.n_tensors && !rc; i++) {
        if (peft_name(f.tensors[i].name, &l, &s, &b)) rc = unexpected_tensor(path, f.tensors[i].name);
        else sites |= 1u << s;
    }
    qs_st_free(&f);
    if (!rc && !sites) rc = qs_error("%s: holds no LoRA weights", path);
    size_t k = 0;
    for (s = 0; s < QS_LORA_N_SITES && !rc; s++)
        if (sites & (1u << s)) k += (size_t)snprintf(targets + k, cap - k, "%s%s", k ? "," : "", names[s]);
    return rc;
}

int qs_lora_read_config(const char *step_dir, qs_lora_config *lc) {
    adapter_cfg ac;
    if (open_config(&ac, step_dir)) return -1;
    qs_config c;
    qs_config_defaults(&c);
    int rc = set_from(&c, &ac, "r", "r", true) || set_from(&c, &ac, "lora_alpha", "alpha", true) ||
                     set_from(&c, &ac, "lora_dropout", "dropout", false) ||
                     set_from(&c, &ac, "use_rslora", "rslora", false)
                 ? -1
                 : 0;
    if (!rc) /* peft's files name modules, Quasar's also its targets (q, k, v separately) */
        rc = ac.foreign ? foreign_targets(step_dir, c.lora.targets, sizeof c.lora.targets)
                        : set_from(&c, &ac, "quasar_targets", "targets", true);
    unsigned t;
    if (!rc && qs_config_lora_targets(&c.lora, &t)) rc = qs_error("%s: %s", ac.path, qs_error_last());
    cJSON_Delete(ac.root);
    if (!rc) *lc = c.lora;
    return rc;
}

/* ---- which modules a peft adapter covers ---- */

/* target_modules / exclude_modules as peft reads them (check_target_module_exists): a
 * string is a regular expression the whole module name must match ("all-linear": every
 * linear layer but the output head), a list names modules exactly or by dotted suffix. */
typedef struct module_spec {
    const cJSON *list;
    pcre2_code *re;
    pcre2_match_data *md;
    bool all_linear;
} module_spec;

static int spec_open(module_spec *sp, const adapter_cfg *ac, const char *key) {
    const cJSON *v = item(ac, key);
    *sp = (module_spec){0};
    if (is_off(v)) return 0;
    if (cJSON_IsArray(v)) {
        for (const cJSON *e = v->child; e; e = e->next)
            if (!cJSON_IsString(e)) return qs_error("%s: '%s' must be a string or a list of strings", ac->path, key);
        sp->list = v;
        return 0;
    }
    if (!cJSON_IsString(v)) return qs_error("%s: '%s' must be a string or a list of strings", ac->path, key);
    if (!strcmp(key, "target_modules") && !strcasecmp(v->valuestring, "all-linear")) {
        sp->all_linear = true;
        return 0;
    }
    int err;
    PCRE2_SIZE at;
    sp->re = pcre2_compile((PCRE2_SPTR)v->valuestring, PCRE2_ZERO_TERMINATED, PCRE2_ANCHORED | PCRE2_ENDANCHORED, &err,
                           &at, NULL);
    if (!sp->re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof msg);
        return qs_error("%s: '%s' is not a regular expression Quasar can read: %s at offset %zu", ac->path, key,
                        (const char *)msg, (size_t)at);
    }
    if (!(sp->md = pcre2_match_data_create_from_pattern(sp->re, NULL))) return qs_error("out of memory");
    return 0;
}

static void spec_close(module_spec *sp) {
    pcre2_match_data_free(sp->md);
    pcre2_code_free(sp->re);
}

/* 0: not selected; 1: by the whole name or the expression; 2: by a dotted suffix, the one
 * case where peft applies layers_to_transform. */
static int spec_match(const module_spec *sp, const char *name) {
    if (sp->all_linear) return !strncmp(name, "transformer.h.", 14); /* the blocks' Conv1D layers */
    if (sp->re) return pcre2_match(sp->re, (PCRE2_SPTR)name, PCRE2_ZERO_TERMINATED, 0, 0, sp->md, NULL) >= 0;
    const size_t n = strlen(name);
    int how = 0;
    for (const cJSON *e = sp->list ? sp->list->child : NULL; e && how != 1; e = e->next) {
        const size_t k = strlen(e->valuestring);
        if (!strcmp(name, e->valuestring)) how = 1;
        else if (n > k && name[n - k - 1] == '.' && !strcmp(name + n - k, e->valuestring)) how = 2;
    }
    return how;
}

/* sel[l]: the sites of layer l that peft put adapters on, matching target_modules,
 * exclude_modules and layers_to_transform against GPT2LMHeadModel's module names;
 * selecting a module Quasar does not adapt (embeddings, lm_head) is an error. */
static int select_modules(const adapter_cfg *ac, int L, unsigned *sel) {
    static const char *const others[] = {"transformer.wte", "transformer.wpe", "lm_head"};
    const cJSON *layers = item(ac, "layers_to_transform");
    module_spec tm, ex = {0};
    int rc = spec_open(&tm, ac, "target_modules") || spec_open(&ex, ac, "exclude_modules") ? -1 : 0;
    if (!rc && !tm.list && !tm.re && !tm.all_linear) rc = qs_error("%s: 'target_modules' is missing", ac->path);
    char name[128];
    for (int l = 0; l < L && !rc; l++) {
        sel[l] = 0;
        for (int s = 0; s < QS_LORA_N_SITES; s++) {
            snprintf(name, sizeof name, "transformer.h.%d.%s", l, SITE_MODULE[0][s]);
            const int how = spec_match(&tm, name);
            if (how && (how == 1 || is_off(layers) || selects_layer(layers, l)) && !spec_match(&ex, name))
                sel[l] |= 1u << s;
        }
    }
    for (size_t i = 0; i < sizeof others / sizeof *others && !rc; i++) {
        const int how = spec_match(&tm, others[i]); /* they have no layer index for layers_to_transform */
        if (how && (how == 1 || is_off(layers)) && !spec_match(&ex, others[i]))
            rc = qs_error("%s: target_modules selects '%s', which Quasar does not adapt (only the blocks' attn.c_attn, "
                          "attn.c_proj, mlp.c_fc and mlp.c_proj)", ac->path, others[i]);
    }
    spec_close(&tm);
    spec_close(&ex);
    return rc;
}

/* A peft adapter's tensors: each the lora_A [r, in] or lora_B [out, r] of a module its
 * config selects, every selected module with both, F16 and BF16 widened to F32. Modules
 * of the table that the config leaves out (a layer not transformed) stay zero. */
static int load_foreign(qs_lora *lo, const adapter_cfg *ac, const qs_st_file *f, const char *path) {
    const int L = lo->L;
    unsigned *sel = calloc((size_t)L + 1, sizeof *sel), *seen = calloc((size_t)L * QS_LORA_N_SITES + 1, sizeof *seen);
    float *host = calloc(lo->ps.n + 1, sizeof *host);
    int rc = !sel || !seen || !host ? qs_error("out of memory loading the adapter") : select_modules(ac, L, sel);
    for (int i = 0; i < f->n_tensors && !rc; i++) {
        const qs_st_tensor *t = &f->tensors[i];
        const lora_module *md = NULL;
        int l, s, b;
        if (peft_name(t->name, &l, &s, &b)) {
            rc = unexpected_tensor(path, t->name);
            break;
        }
        if (l >= L || !(sel[l] & (1u << s)) || !(md = module(lo, l, s))) {
            rc = qs_error("%s: tensor '%s' is for a module that target_modules does not select in this %d-layer base",
                          path, t->name, L);
            break;
        }
        const qs_param_info *p = &lo->ps.info[b ? md->b : md->a];
        bool same = t->ndim == p->ndim;
        for (int d = 0; same && d < p->ndim; d++) same = t->shape[d] == p->shape[d];
        if (!same) {
            char got[96], want[96];
            qs_st_shape_str(got, sizeof got, t->ndim, t->shape);
            qs_st_shape_str(want, sizeof want, p->ndim, p->shape);
            rc = qs_error("%s: tensor '%s' is %s, but r = %d and this base make it %s", path, t->name, got, lo->cfg.r,
                          want);
        } else if (!(rc = qs_st_to_f32(t, host + p->offset, path))) {
            seen[l * QS_LORA_N_SITES + s] |= 1u << b;
        }
    }
    for (int i = 0; i < L * QS_LORA_N_SITES && !rc; i++)
        if ((sel[i / QS_LORA_N_SITES] & (1u << (i % QS_LORA_N_SITES))) && seen[i] != 3)
            rc = qs_error("%s: missing tensor '" PEFT_PREFIX "h.%d.%s.lora_%c.weight' (target_modules selects that module)",
                          path, i / QS_LORA_N_SITES, SITE_MODULE[0][i % QS_LORA_N_SITES], seen[i] & 1 ? 'B' : 'A');
    if (!rc) qs_params_upload(&lo->ps, host);
    free(sel);
    free(seen);
    free(host);
    return rc;
}

/* The base fingerprint an adapter records must be this table's base's. peft's adapters
 * carry none: for them the shape checks are all there is. */
static int check_base(const qs_lora *lo, const adapter_cfg *ac) {
    const cJSON *fp = item(ac, BASE_SHA_KEY), *name = item(ac, "base_model_name_or_path");
    if (!fp) return 0;
    if (!cJSON_IsString(fp) || strlen(fp->valuestring) != 64)
        return qs_error("%s: '" BASE_SHA_KEY "' must be 64 hex digits", ac->path);
    if (!strcmp(fp->valuestring, lo->base_sha256)) return 0;
    return qs_error("%s: the adapter was made for the base '%s' (weights sha256 %.16s...), not for this base "
                    "(weights sha256 %.16s...)", ac->path, cJSON_IsString(name) ? name->valuestring : "?",
                    fp->valuestring, lo->base_sha256);
}

static int load_adapter(qs_lora *lo, const char *step_dir, bool base_check) {
    char path[QS_PATH_MAX + 64];
    adapter_cfg ac;
    qs_st_file f;
    if (open_config(&ac, step_dir)) return -1;
    int rc = open_weights(step_dir, &f, path, sizeof path);
    if (!rc) {
        rc = ac.foreign ? load_foreign(lo, &ac, &f, path)
             : qs_checkpoint_load_weights(&lo->ps, &f, path)
                 ? qs_error("the adapter does not fit this base model: %s", qs_error_last())
                 : 0;
        qs_st_free(&f);
    }
    if (!rc && base_check) rc = check_base(lo, &ac);
    cJSON_Delete(ac.root);
    return rc;
}

int qs_lora_load(qs_lora *lo, const char *step_dir) { return load_adapter(lo, step_dir, true); }

int qs_lora_open(qs_lora **out, const char *dir, qs_gpt *m, bool base_check, char *step_dir, size_t cap) {
    qs_lora_config lc;
    *out = NULL;
    if (qs_checkpoint_find_file(dir, QS_LORA_WEIGHTS, step_dir, cap) || qs_lora_read_config(step_dir, &lc))
        return qs_error("--adapter: %s", qs_error_last());
    if (qs_lora_create(out, &lc, m) || load_adapter(*out, step_dir, base_check)) {
        qs_lora_free(*out);
        *out = NULL;
        return qs_error("--adapter %s: %s", step_dir, qs_error_last());
    }
    return 0;
}

#include "quasar/convert.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quasar/checkpoint.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/model.h"

#define HF_PREFIX "transformer."
#define GPT2_EOT 50256 /* <|endoftext|>: GPT-2's bos and eos */

/* ---- config.json -> qs_config ---- */

/* A number under key; def when absent (NAN: the key is required). */
static int hf_number(const cJSON *root, const char *path, const char *key, double def, double *out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!j || cJSON_IsNull(j)) {
        if (isnan(def)) return qs_error("%s: missing '%s'", path, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(j)) return qs_error("%s: '%s' must be a number", path, key);
    *out = j->valuedouble;
    return 0;
}

/* A boolean that must have the value Quasar's GPT implements; absent = HF's default. */
static int hf_require_bool(const cJSON *root, const char *path, const char *key, bool def, bool want) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, key);
    if (j && !cJSON_IsBool(j)) return qs_error("%s: '%s' must be true or false", path, key);
    bool v = j ? cJSON_IsTrue(j) : def;
    if (v != want) return qs_error("%s: '%s' = %s is not supported (Quasar needs %s)", path, key, v ? "true" : "false",
                                   want ? "true" : "false");
    return 0;
}

/* Sets model.<key> through the config schema, so its range checks apply; errors name
 * the Hugging Face key. */
static int hf_set(qs_config *c, const char *path, const char *hf_key, const char *key, double v) {
    char a[128];
    snprintf(a, sizeof a, "model.%s=%.9g", key, v);
    if (qs_config_set(c, a)) return qs_error("%s: '%s': %s", path, hf_key, qs_error_last());
    return 0;
}

static int hf_activation(const cJSON *root, const char *path, const char **act) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(root, "activation_function");
    const char *name = j ? cJSON_GetStringValue(j) : "gelu_new";
    if (!name) return qs_error("%s: 'activation_function' must be a string", path);
    /* Quasar's gelu is the tanh approximation, which is what these two HF names mean. */
    if (!strcmp(name, "gelu_new") || !strcmp(name, "gelu_pytorch_tanh")) *act = "gelu";
    else if (!strcmp(name, "relu")) *act = "relu";
    else
        return qs_error("%s: 'activation_function' '%s' is not supported (gelu_new, gelu_pytorch_tanh or relu)",
                        path, name);
    return 0;
}

static int hf_parse_config(qs_config *c, const cJSON *root, const char *path) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (type && (!cJSON_IsString(type) || strcmp(type->valuestring, "gpt2")))
        return qs_error("%s: 'model_type' must be \"gpt2\"", path);
    static const char *const sizes[][2] = {{"n_layer", "n_layer"}, {"n_head", "n_head"}, {"n_embd", "n_embd"},
                                           {"n_positions", "seq_len"}, {"vocab_size", "vocab_size"}};
    double v[5], inner = 0, eps = 0, drop = 0, init_std = 0;
    for (int i = 0; i < 5; i++)
        if (hf_number(root, path, sizes[i][0], NAN, &v[i]) || hf_set(c, path, sizes[i][0], sizes[i][1], v[i]))
            return -1;
    const char *act = NULL;
    if (hf_activation(root, path, &act) || hf_number(root, path, "layer_norm_epsilon", 1e-5, &eps) ||
        hf_number(root, path, "n_inner", 4 * v[2], &inner) || hf_number(root, path, "resid_pdrop", 0.1, &drop) ||
        hf_number(root, path, "initializer_range", 0.02, &init_std) ||
        hf_require_bool(root, path, "tie_word_embeddings", true, true) ||
        hf_require_bool(root, path, "scale_attn_weights", true, true) ||
        hf_require_bool(root, path, "scale_attn_by_inverse_layer_idx", false, false) ||
        hf_require_bool(root, path, "add_cross_attention", false, false))
        return -1;
    if (fabs(eps - 1e-5) > 1e-12)
        return qs_error("%s: 'layer_norm_epsilon' = %g is not supported (Quasar's LayerNorm uses 1e-5)", path, eps);
    if (inner <= 0 || fmod(inner, v[2]) != 0)
        return qs_error("%s: 'n_inner' = %g is not supported (it must be a multiple of n_embd, %g)", path, inner, v[2]);
    char a[32];
    snprintf(a, sizeof a, "model.activation=%s", act);
    /* resid_pdrop stands for all three of GPT-2's dropout rates: Quasar has one. */
    if (qs_config_set(c, a) || hf_set(c, path, "n_inner", "ffn_mult", inner / v[2]) ||
        hf_set(c, path, "resid_pdrop", "dropout", drop) || hf_set(c, path, "initializer_range", "init_std", init_std))
        return -1;
    c->model.bias = true;
    c->model.tie_embeddings = true;
    return 0;
}

static int hf_read_config(qs_config *c, const char *path, const char *vocab_dir) {
    char *text;
    size_t n;
    if (qs_file_read(path, &text, &n)) return -1;
    cJSON *root = cJSON_ParseWithLength(text, n);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return qs_error("%s: not a JSON object", path);
    }
    qs_config_defaults(c);
    int rc = hf_parse_config(c, root, path);
    cJSON_Delete(root);
    if (rc) return -1;
    if (strlen(vocab_dir) >= sizeof c->data.vocab_dir) return qs_error("--vocab-dir: path too long");
    snprintf(c->data.tokenizer, sizeof c->data.tokenizer, "gpt2");
    snprintf(c->data.vocab_dir, sizeof c->data.vocab_dir, "%s", vocab_dir);
    /* The checkpoint must validate, and a gpt2 run needs shard globs: placeholders that
     * `--set data.train_shards=...` replaces before training or evaluating. */
    snprintf(c->data.train_shards, sizeof c->data.train_shards, "none");
    snprintf(c->data.val_shards, sizeof c->data.val_shards, "none");
    return qs_config_validate(c);
}

/* ---- tensors ---- */

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

static int check_shape(const qs_st_tensor *t, const qs_param_info *p, const char *path) {
    bool same = t->ndim == p->ndim;
    for (int d = 0; same && d < p->ndim; d++) same = t->shape[d] == p->shape[d];
    if (same) return 0;
    char got[96], want[96];
    qs_st_shape_str(got, sizeof got, t->ndim, t->shape);
    qs_st_shape_str(want, sizeof want, p->ndim, p->shape);
    return qs_error("%s: tensor '%s' is %s, but config.json makes it %s", path, t->name, got, want);
}

/* Tensor t widened to F32 into tmp (grown to fit, host memory). */
static int widen(const qs_st_tensor *t, size_t numel, float **tmp, size_t *cap, const char *path) {
    if (numel > *cap) {
        float *grown = realloc(*tmp, numel * sizeof **tmp);
        if (!grown) return qs_error("out of memory");
        *tmp = grown;
        *cap = numel;
    }
    return qs_st_to_f32(t, *tmp, path);
}

/* Stores the HF tensors into the (CPU) parameter table, one at a time through one
 * buffer of the largest, giving each tensor's pages of the mapped file back: every
 * parameter exactly once; the causal-mask buffers are skipped; lm_head.weight must
 * repeat wte. */
static int hf_load_tensors(qs_params *ps, const qs_st_file *f, const char *path) {
    int n = ps->n_tensors, wte = qs_params_find(ps, "wte.weight");
    const qs_st_tensor *lm_head = NULL;
    bool *seen = calloc((size_t)n, sizeof *seen);
    float *tmp = NULL;
    size_t cap = 0;
    if (!seen) return qs_error("out of memory");
    int rc = 0;
    for (int k = 0; k < f->n_tensors && !rc; k++) {
        const qs_st_tensor *t = &f->tensors[k];
        const char *name = t->name + (strncmp(t->name, HF_PREFIX, strlen(HF_PREFIX)) ? 0 : strlen(HF_PREFIX));
        if (ends_with(name, ".attn.bias") || ends_with(name, ".attn.masked_bias")) continue;
        if (!strcmp(name, "lm_head.weight")) {
            lm_head = t;
            continue;
        }
        int i = qs_params_find(ps, name);
        if (i < 0) rc = qs_error("%s: unexpected tensor '%s' for a GPT-2 model", path, t->name);
        else if (seen[i]) rc = qs_error("%s: tensor '%s' appears twice", path, name);
        else if (!(rc = check_shape(t, &ps->info[i], path))) {
            seen[i] = true;
            const size_t numel = ps->info[i].numel;
            if (!(rc = widen(t, numel, &tmp, &cap, path))) rc = qs_params_store(ps, i, 0, numel, tmp);
            qs_st_release(f, t->data, t->nbytes);
        }
    }
    for (int i = 0; i < n && !rc; i++)
        if (!seen[i]) rc = qs_error("%s: missing tensor '%s'", path, ps->info[i].name);
    free(seen);
    /* Quasar ties the output head to wte; an untied head cannot be kept. */
    const qs_param_info *p = &ps->info[wte];
    if (!rc && lm_head && !(rc = check_shape(lm_head, p, path)) && !(rc = widen(lm_head, p->numel, &tmp, &cap, path)) &&
        memcmp(tmp, qs_params_value(ps, wte), p->numel * sizeof *tmp))
        rc = qs_error("%s: lm_head.weight differs from wte.weight; untied output heads are not supported", path);
    free(tmp);
    return rc;
}

int qs_convert_from_hf(const char *hf_dir, const char *out_run, const char *vocab_dir) {
    char path[QS_PATH_MAX + 32];
    qs_config cfg;
    snprintf(path, sizeof path, "%s/config.json", hf_dir);
    if (hf_read_config(&cfg, path, vocab_dir)) return -1;
    snprintf(path, sizeof path, "%s/ckpt/latest", out_run);
    if (!access(path, F_OK)) return qs_error("'%s' already holds a run; --out must name a new folder", out_run);

    qs_codec codec = {0};
    qs_gpt *m = NULL;
    qs_st_file f = {0};
    qs_adamw opt = {0};
    int rc = qs_codec_open(&codec, &cfg.data, NULL);
    if (!rc && qs_codec_vocab_size(&codec) > cfg.model.vocab_size)
        rc = qs_error("the vocabulary in '%s' (%d) is larger than vocab_size (%d)", vocab_dir,
                      qs_codec_vocab_size(&codec), cfg.model.vocab_size);
    /* No forward pass runs here, so the smallest activation plan will do. */
    if (!rc) rc = qs_gpt_create(&m, &cfg.model, qs_backend_cpu(), 1, 1);
    snprintf(path, sizeof path, "%s/model.safetensors", hf_dir);
    if (!rc) rc = qs_st_read(&f, path);
    qs_params *ps = rc ? NULL : qs_gpt_params(m);
    if (!rc) rc = hf_load_tensors(ps, &f, path);
    if (!rc) rc = qs_adamw_create(&opt, qs_backend_cpu(), ps->n); /* zero moments */
    if (!rc) {
        qs_train_state st = {.step = 0, .seed = cfg.train.seed};
        qs_guard_init(&st.guard, cfg.train.outlier_zscore, cfg.train.max_bad_steps);
        rc = qs_checkpoint_save(out_run, &cfg, &codec, ps, &opt, &st);
    }
    /* The run folder's config.json, as a trained run has, so `train --resume` finds it. */
    char *json = rc ? NULL : qs_config_to_json(&cfg);
    if (!rc && !json) rc = qs_error("out of memory");
    snprintf(path, sizeof path, "%s/config.json", out_run);
    if (!rc) rc = qs_file_write_atomic(path, json, strlen(json));
    free(json);
    qs_adamw_free(&opt);
    qs_st_free(&f);
    qs_gpt_free(m);
    qs_codec_free(&codec);
    return rc;
}

/* ---- Quasar checkpoint -> HF folder ---- */

/* A float as the short decimal it was configured with (0.1, not 0.100000001). */
static double short_float(float x) {
    char b[32];
    snprintf(b, sizeof b, "%g", x);
    return strtod(b, NULL);
}

static char *hf_config_json(const qs_config *c) {
    const qs_model_config *mc = &c->model;
    cJSON *o = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(o, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString("GPT2LMHeadModel"));
    cJSON_AddStringToObject(o, "model_type", "gpt2");
    cJSON_AddNumberToObject(o, "vocab_size", mc->vocab_size);
    cJSON_AddNumberToObject(o, "n_positions", mc->seq_len);
    cJSON_AddNumberToObject(o, "n_embd", mc->n_embd);
    cJSON_AddNumberToObject(o, "n_layer", mc->n_layer);
    cJSON_AddNumberToObject(o, "n_head", mc->n_head);
    cJSON_AddNumberToObject(o, "n_inner", (double)mc->ffn_mult * mc->n_embd);
    cJSON_AddStringToObject(o, "activation_function", mc->activation == QS_ACT_GELU ? "gelu_new" : "relu");
    const char *drops[] = {"resid_pdrop", "embd_pdrop", "attn_pdrop"};
    for (int i = 0; i < 3; i++) cJSON_AddNumberToObject(o, drops[i], short_float(mc->dropout));
    cJSON_AddNumberToObject(o, "layer_norm_epsilon", 1e-5);
    cJSON_AddNumberToObject(o, "initializer_range", short_float(mc->init_std));
    cJSON_AddBoolToObject(o, "tie_word_embeddings", 1);
    if (!strcmp(c->data.tokenizer, "gpt2") && mc->vocab_size > GPT2_EOT) {
        cJSON_AddNumberToObject(o, "bos_token_id", GPT2_EOT);
        cJSON_AddNumberToObject(o, "eos_token_id", GPT2_EOT);
    }
    cJSON_AddStringToObject(o, "torch_dtype", "float32");
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    return s;
}

int qs_convert_to_hf(const char *ckpt_dir, const char *out_dir) {
    char step_dir[QS_PATH_MAX + 64], path[QS_PATH_MAX + 32], *chars_json;
    qs_st_file f;
    qs_config cfg;
    if (qs_checkpoint_find(ckpt_dir, step_dir, sizeof step_dir) ||
        qs_checkpoint_open_model(&f, step_dir, &cfg, &chars_json))
        return -1;
    free(chars_json);
    const qs_model_config *mc = &cfg.model;
    qs_gpt *m = NULL;
    int rc = mc->type != QS_MODEL_GPT ? qs_error("%s: only GPT models have a Hugging Face GPT-2 form", step_dir)
             : mc->mixer != QS_MIXER_ATTENTION ? qs_error("%s: a quadconv token mixer (model.mixer) has no Hugging Face "
                                                          "GPT-2 form", step_dir)
             : qs_config_kv_heads(mc) != mc->n_head
                 ? qs_error("%s: grouped-query attention (model.n_kv_head = %d of %d heads) has no Hugging Face GPT-2 "
                            "form", step_dir, mc->n_kv_head, mc->n_head)
             : mc->moe.n_experts > 0 ? qs_error("%s: a Mixture-of-Experts model (model.moe.n_experts = %d) has no "
                                              "Hugging Face GPT-2 form", step_dir, mc->moe.n_experts)
             : !mc->tie_embeddings ? qs_error("%s: model.tie_embeddings = false is not supported by the GPT-2 export", step_dir)
             : !mc->bias           ? qs_error("%s: model.bias = false has no GPT-2 form (its linear layers have biases)", step_dir)
                                   : 0;
    /* Loading into a model checks that every tensor is there with its shape; the model is
     * gone before the file's tensors are written out, so the two are never resident at once. */
    if (!rc) rc = qs_gpt_create_for(&m, mc, qs_backend_cpu(), 1, 1, QS_GPT_INFER);
    if (!rc) rc = qs_checkpoint_load_weights(qs_gpt_params(m), &f, step_dir);
    qs_gpt_free(m);
    qs_st_entry *e = rc ? NULL : calloc((size_t)f.n_tensors, sizeof *e);
    if (!rc && !e) rc = qs_error("out of memory");
    /* The checkpoint's tensors already carry GPT-2's names, layout and dtype; only the
     * metadata changes. transformers takes names without the "transformer." prefix. */
    for (int i = 0; !rc && i < f.n_tensors; i++) {
        const qs_st_tensor *t = &f.tensors[i];
        e[i] = (qs_st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim, .data = t->data};
        memcpy(e[i].shape, t->shape, sizeof t->shape);
    }
    qs_st_meta meta[1] = {{"format", "pt"}};
    snprintf(path, sizeof path, "%s/model.safetensors", out_dir);
    if (!rc) rc = qs_mkdirs(out_dir) || qs_st_write(path, e, f.n_tensors, meta, 1) ? -1 : 0;
    char *json = rc ? NULL : hf_config_json(&cfg);
    if (!rc && !json) rc = qs_error("out of memory");
    snprintf(path, sizeof path, "%s/config.json", out_dir);
    if (!rc) rc = qs_file_write_atomic(path, json, strlen(json));
    free(json);
    free(e);
    qs_st_free(&f);
    return rc;
}

#include "quasar/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "quasar/checksum.h"
#include "quasar/error.h"
#include "quasar/fileio.h"

#define META_CONFIG "quasar.config"
#define META_VOCAB "quasar.vocab"

static int is_file(const char *p) {
    struct stat s;
    return stat(p, &s) == 0 && S_ISREG(s.st_mode);
}

static int is_dir(const char *p) {
    struct stat s;
    return stat(p, &s) == 0 && S_ISDIR(s.st_mode);
}

/* Removes a folder of plain files (our checkpoint folders are flat). */
static int remove_flat_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : qs_error("cannot open '%s': %s", dir, strerror(errno));
    struct dirent *e;
    char p[QS_PATH_MAX * 2];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    if (rmdir(dir)) return qs_error("cannot remove '%s': %s", dir, strerror(errno));
    return 0;
}

/* Backend memory, fetched for a file a chunk at a time (qs_st_entry.fetch). */
typedef struct backend_bytes {
    const qs_backend *be;
    const char *src;
} backend_bytes;

static void fetch_backend(const void *ctx, size_t offset, void *dst, size_t n) {
    const backend_bytes *b = ctx;
    b->be->download(dst, b->src + offset, n);
}

static int save_model(const char *path, const qs_config *cfg, const qs_codec *codec, const qs_params *ps) {
    if (!qs_params_whole(ps)) return qs_error("%s: a model whose weights are held as bf16 cannot be saved", path);
    int n = ps->n_tensors;
    qs_st_entry *e = calloc((size_t)n, sizeof *e);
    backend_bytes *src = calloc((size_t)n, sizeof *src);
    char *cfg_json = qs_config_to_json(cfg), *vocab_json = !codec || codec->bpe ? NULL : qs_vocab_to_json(&codec->chars);
    int rc = -1;
    if (!e || !src || !cfg_json || (codec && !codec->bpe && !vocab_json)) {
        qs_error("out of memory writing '%s'", path);
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const qs_param_info *p = &ps->info[i];
        e[i].name = p->name;
        e[i].dtype = QS_DT_F32;
        e[i].ndim = p->ndim;
        for (int d = 0; d < p->ndim; d++) e[i].shape[d] = p->shape[d];
        src[i] = (backend_bytes){ps->be, (const char *)(ps->data + p->offset)};
        e[i].fetch = fetch_backend;
        e[i].ctx = &src[i];
    }
    /* GPT-2 models name their vocabulary through data.vocab_dir in the config. */
    qs_st_meta meta[3] = {{"format", "pt"}, {META_CONFIG, cfg_json}, {META_VOCAB, vocab_json}};
    rc = qs_st_write(path, e, n, meta, vocab_json ? 3 : 2);
done:
    free(e);
    free(src);
    free(cfg_json);
    free(vocab_json);
    return rc;
}

/* A whole table's state (a ZeRO-1 shard is gathered into one first). */
static int save_optim(const char *path, const qs_adamw *o) {
    char t[32];
    snprintf(t, sizeof t, "%d", o->t);
    const backend_bytes m = {o->be, (const char *)o->m}, v = {o->be, (const char *)o->v};
    qs_st_entry e[2] = {{.name = "exp_avg", .dtype = QS_DT_F32, .ndim = 1, .shape = {(int64_t)o->n},
                         .fetch = fetch_backend, .ctx = &m},
                        {.name = "exp_avg_sq", .dtype = QS_DT_F32, .ndim = 1, .shape = {(int64_t)o->n},
                         .fetch = fetch_backend, .ctx = &v}};
    qs_st_meta meta[1] = {{"adamw.t", t}};
    return qs_st_write(path, e, 2, meta, 1);
}

static int save_state(const char *path, const qs_train_state *st) {
    char *guard = qs_guard_to_json(&st->guard);
    if (!guard) return qs_error("out of memory writing '%s'", path);
    char *buf = malloc(strlen(guard) + 256);
    if (!buf) {
        free(guard);
        return qs_error("out of memory writing '%s'", path);
    }
    int n = sprintf(buf,
                    "{\n  \"step\": %d,\n  \"seed\": %llu,\n  \"tokens_seen\": %lld,\n"
                    "  \"rng\": \"counter\",\n  \"sampler\": \"random_window\",\n  \"guard\": %s\n}\n",
                    st->step, (unsigned long long)st->seed, (long long)st->tokens_seen, guard);
    int rc = qs_file_write_atomic(path, buf, (size_t)n);
    free(buf);
    free(guard);
    return rc;
}

/* checksums.json: size and CRC-32C of every file of the checkpoint, written last, so
 * a truncated, bit-flipped or half-written file is refused when loaded. */
#define MAX_CKPT_FILES (QS_CKPT_MAX_WEIGHT_FILES + 2)

static int write_manifest(const char *dir, const char *const *files, int n_files) {
    char path[QS_PATH_MAX + 96], buf[2048];
    int len = snprintf(buf, sizeof buf, "{");
    for (int i = 0; i < n_files; i++) {
        uint32_t crc;
        size_t n;
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (qs_crc32c_file(path, &crc, &n)) return -1; /* read back: checks what reached the disk */
        len += snprintf(buf + len, sizeof buf - (size_t)len, "%s\n  \"%s\": {\"bytes\": %zu, \"crc32c\": \"%08x\"}",
                        i ? "," : "", files[i], n, crc);
    }
    len += snprintf(buf + len, sizeof buf - (size_t)len, "\n}\n");
    snprintf(path, sizeof path, "%s/checksums.json", dir);
    return qs_file_write_atomic(path, buf, (size_t)len);
}

/* The size and CRC-32C that <dir>/checksums.json records for <name>. */
static int manifest_entry(const char *dir, const char *name, double *want_bytes, uint32_t *want_crc) {
    char mpath[QS_PATH_MAX + 96];
    snprintf(mpath, sizeof mpath, "%s/checksums.json", dir);
    char *mtext;
    size_t mlen;
    if (qs_file_read(mpath, &mtext, &mlen))
        return qs_error("%s: no readable checksums.json: not a complete Quasar checkpoint", dir);
    cJSON *m = cJSON_Parse(mtext);
    free(mtext);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(m, name);
    const cJSON *bytes = cJSON_GetObjectItemCaseSensitive(e, "bytes"), *crc = cJSON_GetObjectItemCaseSensitive(e, "crc32c");
    unsigned long crc_value = 0;
    *want_bytes = cJSON_IsNumber(bytes) ? bytes->valuedouble : -1;
    int ok = *want_bytes >= 0 && cJSON_IsString(crc) && sscanf(crc->valuestring, "%8lx", &crc_value) == 1;
    cJSON_Delete(m);
    if (!ok) return qs_error("%s: checksums.json has no valid entry for %s", dir, name);
    *want_crc = (uint32_t)crc_value;
    return 0;
}

/* Whether a file of `size` bytes and checksum `crc` is what the manifest recorded. */
static int check_entry(const char *path, size_t size, uint32_t crc, double want_bytes, uint32_t want_crc) {
    const char *problem = (double)size != want_bytes ? "has the wrong size (truncated or overwritten)"
                          : crc != want_crc          ? "fails its checksum (corrupted)"
                                                     : NULL;
    return problem ? qs_error("%s %s: %zu bytes, checksums.json expects %.0f", path, problem, size, want_bytes) : 0;
}

/* Reads <dir>/<name> and checks it against the folder's checksums.json. */
int qs_checkpoint_read(const char *dir, const char *name, char **data, size_t *size) {
    char path[QS_PATH_MAX + 96];
    double want_bytes;
    uint32_t want_crc;
    if (manifest_entry(dir, name, &want_bytes, &want_crc)) return -1;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (qs_file_read(path, data, size)) return -1;
    if (!check_entry(path, *size, qs_crc32c(0, *data, *size), want_bytes, want_crc)) return 0;
    free(*data);
    *data = NULL;
    return -1;
}

static int by_step(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Deletes all but the newest `keep` step folders. Runs after `latest` has moved to
 * the newest, so it never touches the folder `latest` names; a folder half-deleted by
 * a crash is finished off next time. */
static int prune(const char *ckpt, int keep) {
    DIR *d = opendir(ckpt);
    if (!d) return qs_error("cannot open '%s': %s", ckpt, strerror(errno));
    int *steps = NULL, n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        int step;
        char tail;
        if (sscanf(e->d_name, "step_%d%c", &step, &tail) != 1) continue;
        if (n == cap) {
            int *grown = realloc(steps, (size_t)(cap = cap ? 2 * cap : 16) * sizeof *steps);
            if (!grown) break;
            steps = grown;
        }
        steps[n++] = step;
    }
    closedir(d);
    int rc = 0;
    if (n > keep) {
        qsort(steps, (size_t)n, sizeof *steps, by_step);
        char dir[QS_PATH_MAX + 40];
        for (int i = 0; i < n - keep && !rc; i++) {
            snprintf(dir, sizeof dir, "%s/step_%08d", ckpt, steps[i]);
            rc = remove_flat_dir(dir);
        }
    }
    free(steps);
    return rc;
}

/* The model.safetensors writer of a full checkpoint. */
typedef struct model_file {
    const qs_config *cfg;
    const qs_codec *codec;
    const qs_params *ps;
} model_file;

static int write_model_file(const void *self, const char *dir) {
    const model_file *mf = self;
    char path[QS_PATH_MAX + 96];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    return save_model(path, mf->cfg, mf->codec, mf->ps);
}

int qs_checkpoint_save(const char *run_dir, const qs_config *cfg, const qs_codec *codec, const qs_params *ps,
                       const qs_adamw *opt, const qs_train_state *st) {
    model_file mf = {cfg, codec, ps};
    qs_ckpt_files w = {.names = {"model.safetensors"}, .n = 1, .write = write_model_file, .self = &mf};
    return qs_checkpoint_save_files(run_dir, cfg, &w, opt, st);
}

int qs_checkpoint_save_files(const char *run_dir, const qs_config *cfg, const qs_ckpt_files *w, const qs_adamw *opt,
                             const qs_train_state *st) {
    char ckpt[QS_PATH_MAX + 8], name[32], tmp[QS_PATH_MAX + 64], final[QS_PATH_MAX + 64],
        old[QS_PATH_MAX + 64], path[QS_PATH_MAX + 96];
    snprintf(ckpt, sizeof ckpt, "%s/ckpt", run_dir);
    snprintf(name, sizeof name, "step_%08d", st->step);
    snprintf(tmp, sizeof tmp, "%s/.tmp-%s", ckpt, name);
    snprintf(final, sizeof final, "%s/%s", ckpt, name);
    snprintf(old, sizeof old, "%s/.old-%s", ckpt, name);
    if (qs_mkdirs(ckpt) || remove_flat_dir(tmp) || qs_mkdirs(tmp)) return -1;

    const char *files[MAX_CKPT_FILES];
    int n_files = 0;
    for (int i = 0; i < w->n; i++) files[n_files++] = w->names[i];
    files[n_files++] = "optim.safetensors";
    files[n_files++] = "state.json";
    int rc = w->write(w->self, tmp);
    if (!rc) {
        snprintf(path, sizeof path, "%s/optim.safetensors", tmp);
        rc = save_optim(path, opt);
    }
    if (!rc) {
        snprintf(path, sizeof path, "%s/state.json", tmp);
        rc = save_state(path, st);
    }
    if (!rc) rc = write_manifest(tmp, files, n_files);
    if (rc) {
        char why[1024];
        snprintf(why, sizeof why, "%s", qs_error_last());
        remove_flat_dir(tmp); /* leave no half-written folder behind */
        return qs_error("%s", why);
    }
    /* Swap the folder in; a same-step folder from an earlier run is replaced. */
    if (is_dir(final) && (remove_flat_dir(old) || rename(final, old)))
        return qs_error("cannot replace '%s': %s", final, strerror(errno));
    if (rename(tmp, final)) return qs_error("cannot rename '%s': %s", tmp, strerror(errno));
    if (qs_dir_sync(ckpt)) return -1;
    snprintf(path, sizeof path, "%s/latest", ckpt);
    char line[40];
    int len = snprintf(line, sizeof line, "%s\n", name);
    if (qs_file_write_atomic(path, line, (size_t)len) || remove_flat_dir(old)) return -1;
    return cfg->train.keep_checkpoints > 0 ? prune(ckpt, cfg->train.keep_checkpoints) : 0;
}

int qs_checkpoint_find_file(const char *dir, const char *marker, char *step_dir, size_t cap) {
    char p[QS_PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", dir, marker);
    if (is_file(p)) {
        snprintf(step_dir, cap, "%s", dir);
        return 0;
    }
    const char *ckpt_dir = dir;
    char ckpt[QS_PATH_MAX + 8];
    snprintf(p, sizeof p, "%s/latest", dir);
    if (!is_file(p)) {
        snprintf(ckpt, sizeof ckpt, "%s/ckpt", dir);
        snprintf(p, sizeof p, "%s/latest", ckpt);
        ckpt_dir = ckpt;
        if (!is_file(p)) return qs_error("no checkpoint in '%s' (no %s, latest or ckpt/latest)", dir, marker);
    }
    char *name;
    size_t n;
    if (qs_file_read(p, &name, &n)) return -1;
    while (n && (name[n - 1] == '\n' || name[n - 1] == ' ')) name[--n] = '\0';
    int bad = n == 0 || strchr(name, '/') || strchr(name, '\n');
    if (!bad) snprintf(step_dir, cap, "%s/%s", ckpt_dir, name);
    free(name);
    if (bad) return qs_error("'%s' does not name a checkpoint folder", p);
    snprintf(p, sizeof p, "%s/%s", step_dir, marker);
    if (!is_file(p)) return qs_error("'%s' names '%s', which holds no %s", ckpt_dir, step_dir, marker);
    return 0;
}

int qs_checkpoint_find(const char *dir, char *step_dir, size_t cap) {
    return qs_checkpoint_find_file(dir, "model.safetensors", step_dir, cap);
}

/* A checkpoint's safetensors file, checked against checksums.json a chunk at a time,
 * then mapped and parsed: the loaders read its tensors one by one and release each
 * (qs_st_release), so about one tensor of the file is resident at a time, not a copy of
 * the model's state. */
static int read_safetensors(qs_st_file *f, const char *dir, const char *name, char *path, size_t cap) {
    double want_bytes;
    uint32_t want_crc, crc;
    size_t n;
    snprintf(path, cap, "%s/%s", dir, name);
    if (manifest_entry(dir, name, &want_bytes, &want_crc) || qs_crc32c_file(path, &crc, &n) ||
        check_entry(path, n, crc, want_bytes, want_crc))
        return -1;
    return qs_st_read(f, path);
}

int qs_checkpoint_open_model(qs_st_file *f, const char *step_dir, qs_config *cfg, char **chars_json) {
    char path[QS_PATH_MAX + 64];
    *chars_json = NULL;
    if (read_safetensors(f, step_dir, "model.safetensors", path, sizeof path)) return -1;
    const char *cj = qs_st_meta_get(f, META_CONFIG), *vj = qs_st_meta_get(f, META_VOCAB);
    qs_config_defaults(cfg);
    const char *problem = NULL;
    if (!cj)
        problem = "lacks " META_CONFIG;
    else if (qs_config_load_string(cfg, cj, path) || qs_config_validate(cfg))
        problem = qs_error_last();
    else if (cfg->model.type == QS_MODEL_GPT && !strcmp(cfg->data.tokenizer, "char") && !vj)
        problem = "lacks " META_VOCAB; /* only char-level GPTs carry their vocabulary */
    if (problem) {
        qs_error("%s: not a usable Quasar checkpoint: %s", path, problem);
        qs_st_free(f);
        return -1;
    }
    if (vj && !(*chars_json = strdup(vj))) {
        qs_st_free(f);
        return qs_error("out of memory");
    }
    return 0;
}

/* The tensor named `name`, which must be F32 with exactly this shape. */
static const qs_st_tensor *find_f32(const qs_st_file *f, const char *what, const char *name,
                                    int ndim, const int64_t *shape) {
    const qs_st_tensor *t = qs_st_find(f, name);
    if (!t) {
        qs_error("%s: missing tensor '%s'", what, name);
        return NULL;
    }
    int same = t->dtype == QS_DT_F32 && t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
    if (!same) {
        char want[96] = "", got[96] = "";
        for (int d = 0; d < ndim; d++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", d ? "," : "", (long long)shape[d]);
        for (int d = 0; d < t->ndim; d++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "", (long long)t->shape[d]);
        qs_error("%s: tensor '%s' is %s [%s], expected F32 [%s]", what, name, qs_dtype_name(t->dtype), got, want);
        return NULL;
    }
    return t;
}

/* n bytes of a mapped file's tensor data into backend memory a chunk at a time, each
 * chunk's pages given back once uploaded: about one chunk of the file is resident. */
static void upload_releasing(const qs_backend *be, void *dst, const qs_st_file *f, const void *src, size_t n) {
    enum { CHUNK = 1 << 24 };
    for (size_t at = 0; at < n; at += CHUNK) {
        const size_t k = n - at < CHUNK ? n - at : CHUNK;
        be->upload((char *)dst + at, (const char *)src + at, k);
        qs_st_release(f, (const char *)src + at, k);
    }
}

/* Tensor i of ps from a mapped file the same way, through qs_params_store. */
static int store_releasing(qs_params *ps, int i, const qs_st_file *f, const float *src) {
    enum { CHUNK = 1 << 22 }; /* floats */
    const size_t n = ps->info[i].numel;
    int rc = 0;
    for (size_t at = 0; at < n && !rc; at += CHUNK) {
        const size_t k = n - at < CHUNK ? n - at : CHUNK;
        rc = qs_params_store(ps, i, at, k, src + at);
        qs_st_release(f, src + at, k * sizeof(float));
    }
    return rc;
}

int qs_checkpoint_load_weights(qs_params *ps, const qs_st_file *f, const char *what) {
    int n = ps->n_tensors;
    if (f->n_tensors != n) {
        for (int i = 0; i < f->n_tensors; i++) {
            if (qs_params_find(ps, f->tensors[i].name) < 0) return qs_error("%s: unexpected tensor '%s' for this model", what, f->tensors[i].name);
        }
    }
    /* every tensor checked before any is written, then each written from the file's own
     * buffer: no staging copy of the whole table */
    for (int i = 0; i < n; i++) {
        const qs_param_info *p = &ps->info[i];
        if (!find_f32(f, what, p->name, p->ndim, p->shape)) return -1;
    }
    for (int i = 0; i < n; i++) {
        const qs_param_info *p = &ps->info[i];
        if (store_releasing(ps, i, f, find_f32(f, what, p->name, p->ndim, p->shape)->data)) return -1;
    }
    return 0;
}

static int json_int(const cJSON *root, const char *key, const char *what, double max, double *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > max ||
        v->valuedouble != (double)(int64_t)v->valuedouble)
        return qs_error("%s: '%s' must be a non-negative integer", what, key);
    *out = v->valuedouble;
    return 0;
}

int qs_state_parse(const char *json, size_t len, qs_train_state *st, const char *what) {
    cJSON *root = cJSON_ParseWithLength(json, len);
    double step = 0, seed = 0, tokens = 0;
    int rc = !cJSON_IsObject(root) ? qs_error("%s: not a JSON object", what)
             : json_int(root, "step", what, 2147483647.0, &step) ||
                     json_int(root, "seed", what, 9007199254740992.0, &seed) ||
                     json_int(root, "tokens_seen", what, 9.2e18, &tokens)
                 ? -1
                 : 0;
    if (!rc) {
        char *guard = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(root, "guard"));
        rc = guard ? qs_guard_from_json(&st->guard, guard, what) : qs_error("%s: 'guard' is missing", what);
        free(guard);
    }
    cJSON_Delete(root);
    if (rc) return rc;
    st->step = (int)step;
    st->seed = (uint64_t)seed;
    st->tokens_seen = (int64_t)tokens;
    return 0;
}

int qs_checkpoint_load_optim(const char *step_dir, qs_adamw *opt, qs_train_state *st) {
    char path[QS_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/state.json", step_dir);
    char *text;
    size_t len;
    if (qs_checkpoint_read(step_dir, "state.json", &text, &len)) return -1;
    int rc = qs_state_parse(text, len, st, path);
    free(text);
    if (rc) return rc;

    qs_st_file f;
    if (read_safetensors(&f, step_dir, "optim.safetensors", path, sizeof path)) return -1;
    int64_t shape[1] = {(int64_t)opt->total};
    const qs_st_tensor *m = find_f32(&f, path, "exp_avg", 1, shape);
    const qs_st_tensor *v = m ? find_f32(&f, path, "exp_avg_sq", 1, shape) : NULL;
    const char *t = qs_st_meta_get(&f, "adamw.t");
    char *end = NULL;
    long tv = t ? strtol(t, &end, 10) : -1;
    rc = 0;
    if (!m || !v) rc = -1;
    else if (!t || *end || tv < 0 || tv > 2147483647L) rc = qs_error("%s: metadata 'adamw.t' missing or invalid", path);
    else {
        /* a ZeRO-1 shard takes its spans of the whole table's moments */
        size_t k = 0;
        for (int s = 0; s < opt->n_own; s++) {
            const qs_span sp = opt->own[s];
            const size_t bytes = (sp.end - sp.begin) * sizeof(float);
            upload_releasing(opt->be, opt->m + k, &f, (const float *)m->data + sp.begin, bytes);
            upload_releasing(opt->be, opt->v + k, &f, (const float *)v->data + sp.begin, bytes);
            k += sp.end - sp.begin;
        }
        opt->t = (int)tv;
    }
    qs_st_free(&f);
    return rc;
}

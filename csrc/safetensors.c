#include "quasar/safetensors.h"

#include "quasar/bf16.h"
#include "quasar/error.h"
#include "quasar/fileio.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADER_BYTES 100000000ull /* reject absurd lengths before allocating */
#define MAX_JSON_INT 9007199254740992.0 /* 2^53: larger integers do not survive cJSON's doubles */
#define METADATA_KEY "__metadata__"

static const struct {
    const char *name;
    size_t size;
} dtypes[] = {
    [QS_DT_F32] = {"F32", 4}, [QS_DT_F16] = {"F16", 2}, [QS_DT_BF16] = {"BF16", 2},
    [QS_DT_F64] = {"F64", 8}, [QS_DT_I64] = {"I64", 8}, [QS_DT_I32] = {"I32", 4},
    [QS_DT_I16] = {"I16", 2}, [QS_DT_I8] = {"I8", 1},   [QS_DT_U8] = {"U8", 1},
    [QS_DT_BOOL] = {"BOOL", 1},
};
#define N_DTYPES ((int)(sizeof dtypes / sizeof dtypes[0]))

size_t qs_dtype_size(qs_dtype dt) { return (unsigned)dt < N_DTYPES ? dtypes[dt].size : 0; }

const char *qs_dtype_name(qs_dtype dt) { return (unsigned)dt < N_DTYPES ? dtypes[dt].name : "?"; }

/* Offset of the first byte that is not UTF-8 JSON text (len if none). JSON allows no raw
 * control characters besides whitespace, and excluding NUL keeps cJSON's C strings whole. */
static size_t bad_text_offset(const unsigned char *s, size_t len) {
    static const uint32_t min_cp[] = {0, 0x80, 0x800, 0x10000}; /* rejects overlong forms */
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            if (c < 0x20 && c != '\t' && c != '\n' && c != '\r')
                return i;
            i++;
            continue;
        }
        size_t n = (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : (c & 0xf8) == 0xf0 ? 3 : 0;
        if (n == 0 || len - i <= n)
            return i;
        uint32_t cp = c & (0x3fu >> n);
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return i;
            cp = cp << 6 | (s[i + k] & 0x3fu);
        }
        if (cp < min_cp[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return i;
        i += n + 1;
    }
    return len;
}

static bool is_text(const char *s) { return bad_text_offset((const unsigned char *)s, strlen(s)) == strlen(s); }

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorts the pointer array and returns a name occurring twice, or NULL. */
static const char *find_duplicate(const char **names, int n) {
    if (n < 2)
        return NULL;
    qsort(names, (size_t)n, sizeof *names, cmp_str_ptr);
    for (int i = 1; i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            return names[i];
    return NULL;
}

/* ---- reading ---- */

typedef struct span {
    uint64_t begin, end;
    int index; /* position in the header, so equal spans (empty tensors) keep their order */
} span;

static int cmp_span(const void *pa, const void *pb) {
    const span *a = pa, *b = pb;
    if (a->begin != b->begin)
        return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end)
        return a->end < b->end ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

static bool json_uint(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v))
        return false;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= MAX_JSON_INT) || d != floor(d))
        return false;
    *out = (uint64_t)d;
    return true;
}

static int parse_tensor(qs_st_tensor *t, span *s, const cJSON *item, const char *what) {
    const char *name = item->string;
    size_t name_len = strlen(name);
    if (name_len >= QS_ST_MAX_NAME)
        return qs_error("%s: tensor name '%.32s...' is too long (%zu bytes, max %d)", what, name,
                        name_len, QS_ST_MAX_NAME - 1);
    memcpy(t->name, name, name_len + 1);
    if (!cJSON_IsObject(item))
        return qs_error("%s: tensor '%s': entry is not an object", what, name);

    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    if (!cJSON_IsString(dt))
        return qs_error("%s: tensor '%s': dtype is missing or not a string", what, name);
    t->dtype = (qs_dtype)N_DTYPES;
    for (int i = 0; i < N_DTYPES; i++)
        if (strcmp(dt->valuestring, dtypes[i].name) == 0)
            t->dtype = (qs_dtype)i;
    if (t->dtype == (qs_dtype)N_DTYPES)
        return qs_error("%s: tensor '%s': unknown dtype '%.32s'", what, name, dt->valuestring);

    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(item, "shape");
    if (!cJSON_IsArray(shape))
        return qs_error("%s: tensor '%s': shape is missing or not an array", what, name);
    uint64_t numel = 1;
    for (const cJSON *d = shape->child; d; d = d->next) {
        uint64_t dim;
        if (t->ndim == QS_ST_MAX_DIMS)
            return qs_error("%s: tensor '%s': shape has more than %d dims", what, name, QS_ST_MAX_DIMS);
        if (!json_uint(d, &dim))
            return qs_error("%s: tensor '%s': shape[%d] is not a non-negative integer", what, name,
                            t->ndim);
        if (dim && numel > UINT64_MAX / dim)
            return qs_error("%s: tensor '%s': shape overflows (too many elements)", what, name);
        numel *= dim;
        t->shape[t->ndim++] = (int64_t)dim;
    }
    size_t esize = dtypes[t->dtype].size;
    if (numel > UINT64_MAX / esize)
        return qs_error("%s: tensor '%s': shape overflows (too many bytes)", what, name);
    uint64_t nbytes = numel * esize;

    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !json_uint(offs->child, &s->begin) ||
        !json_uint(offs->child->next, &s->end))
        return qs_error("%s: tensor '%s': data_offsets must be two non-negative integers", what, name);
    if (s->end < s->begin)
        return qs_error("%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] end before begin",
                        what, name, s->begin, s->end);
    if (s->end - s->begin != nbytes)
        return qs_error("%s: tensor '%s': data_offsets cover %" PRIu64 " bytes but %" PRIu64
                        " %s elements need %" PRIu64 " (size mismatch)",
                        what, name, s->end - s->begin, numel, dtypes[t->dtype].name, nbytes);
    t->nbytes = (size_t)nbytes; /* fits: the layout check bounds it by the file size */
    return 0;
}

static int parse_meta(qs_st_file *f, const cJSON *item, const char *what) {
    if (f->meta)
        return qs_error("%s: duplicate %s", what, METADATA_KEY);
    if (!cJSON_IsObject(item))
        return qs_error("%s: %s is not an object", what, METADATA_KEY);
    int n = cJSON_GetArraySize(item);
    f->meta = calloc(n ? (size_t)n : 1, sizeof *f->meta);
    if (!f->meta)
        return qs_error("%s: out of memory", what);
    for (const cJSON *v = item->child; v; v = v->next) {
        if (!cJSON_IsString(v))
            return qs_error("%s: metadata value for '%s' is not a string", what, v->string);
        qs_st_meta *m = &f->meta[f->n_meta++];
        m->key = strdup(v->string);
        m->value = strdup(v->valuestring);
        if (!m->key || !m->value)
            return qs_error("%s: out of memory", what);
    }
    const char **keys = malloc((size_t)f->n_meta * sizeof *keys + 1);
    if (!keys)
        return qs_error("%s: out of memory", what);
    for (int i = 0; i < f->n_meta; i++)
        keys[i] = f->meta[i].key;
    const char *dup = find_duplicate(keys, f->n_meta);
    int rc = dup ? qs_error("%s: duplicate metadata key '%s'", what, dup) : 0;
    free(keys);
    return rc;
}

/* Checks the header entries' layout and, on success, orders f->tensors by offset and
 * points them at their data. */
static int parse_entries(qs_st_file *f, const cJSON *root, size_t data_start, const char *what) {
    int n = 0;
    for (const cJSON *it = root->child; it; it = it->next)
        n += strcmp(it->string, METADATA_KEY) != 0;
    qs_st_tensor *parsed = calloc(n ? (size_t)n : 1, sizeof *parsed);
    span *spans = calloc(n ? (size_t)n : 1, sizeof *spans);
    const char **names = calloc(n ? (size_t)n : 1, sizeof *names);
    int rc = parsed && spans && names ? 0 : qs_error("%s: out of memory", what);
    int i = 0;
    for (const cJSON *it = root->child; it && rc == 0; it = it->next) {
        if (strcmp(it->string, METADATA_KEY) == 0) {
            rc = parse_meta(f, it, what);
            continue;
        }
        spans[i].index = i;
        names[i] = parsed[i].name;
        rc = parse_tensor(&parsed[i], &spans[i], it, what);
        i++;
    }
    const char *dup;
    if (rc == 0 && (dup = find_duplicate(names, n)))
        rc = qs_error("%s: duplicate tensor name '%s'", what, dup);
    if (rc == 0) {
        qsort(spans, (size_t)n, sizeof *spans, cmp_span);
        uint64_t expect = 0, avail = f->buf_size - data_start;
        for (int k = 0; k < n && rc == 0; k++) {
            const span *s = &spans[k];
            if (s->begin != expect)
                rc = qs_error("%s: tensor '%s' data_offsets [%" PRIu64 ", %" PRIu64 "] %s (expected begin %" PRIu64 ")",
                              what, parsed[s->index].name, s->begin, s->end,
                              s->begin < expect ? "overlap the previous tensor" : "leave a gap", expect);
            expect = s->end;
        }
        if (rc == 0 && expect != avail)
            rc = qs_error("%s: tensor data ends at byte %" PRIu64 " but the file holds %" PRIu64
                          " data bytes (%s)",
                          what, expect, avail, expect > avail ? "truncated" : "trailing garbage");
    }
    if (rc == 0 && !(f->tensors = calloc(n ? (size_t)n : 1, sizeof *f->tensors)))
        rc = qs_error("%s: out of memory", what);
    if (rc == 0) {
        for (int k = 0; k < n; k++) {
            f->tensors[k] = parsed[spans[k].index];
            f->tensors[k].data = f->buf + data_start + spans[k].begin;
        }
        f->n_tensors = n;
    }
    free(parsed);
    free(spans);
    free(names);
    return rc;
}

static int parse_buffer(qs_st_file *f, const char *what) {
    const unsigned char *b = (const unsigned char *)f->buf;
    size_t size = f->buf_size;
    if (size < 8)
        return qs_error("%s: file too short (%zu bytes) for the 8-byte header length", what, size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | b[i];
    if (n > MAX_HEADER_BYTES)
        return qs_error("%s: header length %" PRIu64 " is absurd (limit %llu)", what, n, MAX_HEADER_BYTES);
    if (n > size - 8)
        return qs_error("%s: header length %" PRIu64 " exceeds the %zu bytes after it (truncated)", what,
                        n, size - 8);
    size_t bad = bad_text_offset(b + 8, (size_t)n);
    if (bad < n)
        return qs_error("%s: header is not UTF-8 JSON text (byte 0x%02x at header offset %zu)", what,
                        b[8 + bad], bad);

    char *text = malloc((size_t)n + 1); /* cJSON wants a terminated string */
    if (!text)
        return qs_error("%s: out of memory", what);
    memcpy(text, b + 8, (size_t)n);
    text[n] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 0);
    size_t end_off = end ? (size_t)(end - text) : 0;
    if (root)
        end_off += strspn(text + end_off, " \t\r\n"); /* the header may be padded */
    free(text);
    int rc = 0;
    if (!root)
        rc = qs_error("%s: header is not valid JSON (error at header offset %zu)", what, end_off);
    else if (end_off != n)
        rc = qs_error("%s: header has trailing bytes after the JSON value (header offset %zu)", what,
                      end_off);
    else if (!cJSON_IsObject(root))
        rc = qs_error("%s: header is not a JSON object", what);
    else
        rc = parse_entries(f, root, 8 + (size_t)n, what);
    cJSON_Delete(root);
    return rc;
}

/* Takes ownership of buf: a malloc'd buffer, or a mapping when mapped. */
static int parse_owned(qs_st_file *f, char *buf, size_t size, int mapped, const char *what) {
    memset(f, 0, sizeof *f);
    f->buf = buf;
    f->buf_size = size;
    f->mapped = mapped;
    if (parse_buffer(f, what) != 0) {
        qs_st_free(f);
        return -1;
    }
    return 0;
}

int qs_st_read(qs_st_file *f, const char *path) {
    const void *map;
    char *buf;
    size_t size;
    memset(f, 0, sizeof *f);
    /* what cannot be mapped (an empty file, a pipe) is read, which says what is wrong */
    if (qs_file_map(path, &map, &size) == 0 && map)
        return parse_owned(f, (char *)map, size, 1, path);
    if (qs_file_read(path, &buf, &size) != 0)
        return -1;
    return parse_owned(f, buf, size, 0, path);
}

void qs_st_release(const qs_st_file *f, const void *p, size_t n) {
    if (f->mapped)
        qs_file_release(p, n);
}

int qs_st_parse(qs_st_file *f, const void *data, size_t size, const char *what) {
    memset(f, 0, sizeof *f);
    char *buf = malloc(size ? size : 1);
    if (!buf)
        return qs_error("%s: out of memory", what);
    if (size)
        memcpy(buf, data, size);
    return parse_owned(f, buf, size, 0, what);
}

void qs_st_free(qs_st_file *f) {
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta[i].key);
        free(f->meta[i].value);
    }
    free(f->meta);
    free(f->tensors);
    if (f->mapped)
        qs_file_unmap(f->buf, f->buf_size);
    else
        free(f->buf);
    memset(f, 0, sizeof *f);
}

const qs_st_tensor *qs_st_find(const qs_st_file *f, const char *name) {
    for (int i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

const char *qs_st_meta_get(const qs_st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[i].key, key) == 0)
            return f->meta[i].value;
    return NULL;
}

/* ---- writing ---- */

/* Checks one entry and computes its byte size. */
static int check_entry(const qs_st_entry *e, uint64_t *nbytes, const char *path) {
    if (!e->name || !*e->name || strlen(e->name) >= QS_ST_MAX_NAME || !is_text(e->name) ||
        strcmp(e->name, METADATA_KEY) == 0)
        return qs_error("%s: invalid tensor name '%.64s' (need 1-%d bytes of UTF-8 text, not %s)", path,
                        e->name ? e->name : "(null)", QS_ST_MAX_NAME - 1, METADATA_KEY);
    if ((unsigned)e->dtype >= N_DTYPES)
        return qs_error("%s: tensor '%s': invalid dtype %d", path, e->name, (int)e->dtype);
    if (e->ndim < 0 || e->ndim > QS_ST_MAX_DIMS)
        return qs_error("%s: tensor '%s': ndim %d outside [0, %d]", path, e->name, e->ndim, QS_ST_MAX_DIMS);
    uint64_t numel = 1;
    for (int d = 0; d < e->ndim; d++) {
        int64_t dim = e->shape[d];
        if (dim < 0 || (double)dim > MAX_JSON_INT)
            return qs_error("%s: tensor '%s': invalid shape[%d] = %" PRId64, path, e->name, d, dim);
        if (dim && numel > UINT64_MAX / (uint64_t)dim)
            return qs_error("%s: tensor '%s': shape overflows", path, e->name);
        numel *= (uint64_t)dim;
    }
    size_t esize = dtypes[e->dtype].size;
    if (numel > SIZE_MAX / esize)
        return qs_error("%s: tensor '%s': shape overflows", path, e->name);
    *nbytes = numel * esize;
    if (*nbytes && !e->data && !e->fetch)
        return qs_error("%s: tensor '%s': data is NULL", path, e->name);
    return 0;
}

static bool add_uint(cJSON *array, uint64_t v) {
    char num[24];
    snprintf(num, sizeof num, "%" PRIu64, v); /* exact, never in exponent form */
    return cJSON_AddItemToArray(array, cJSON_CreateRaw(num));
}

/* The compact JSON header; NULL when out of memory. */
static char *build_header(const qs_st_entry *entries, const uint64_t *nbytes, int n,
                          const qs_st_meta *meta, int n_meta) {
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
    if (n_meta > 0) {
        cJSON *m = cJSON_AddObjectToObject(root, METADATA_KEY);
        ok = ok && m;
        for (int i = 0; i < n_meta && ok; i++)
            ok = cJSON_AddStringToObject(m, meta[i].key, meta[i].value) != NULL;
    }
    uint64_t offset = 0;
    for (int i = 0; i < n && ok; i++) {
        const qs_st_entry *e = &entries[i];
        cJSON *t = cJSON_AddObjectToObject(root, e->name);
        ok = t && cJSON_AddStringToObject(t, "dtype", dtypes[e->dtype].name);
        cJSON *shape = ok ? cJSON_AddArrayToObject(t, "shape") : NULL;
        ok = shape != NULL;
        for (int d = 0; d < e->ndim && ok; d++)
            ok = add_uint(shape, (uint64_t)e->shape[d]);
        cJSON *offs = ok ? cJSON_AddArrayToObject(t, "data_offsets") : NULL;
        ok = offs && add_uint(offs, offset) && add_uint(offs, offset + nbytes[i]);
        offset += nbytes[i];
    }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return json;
}

static int write_file(const char *path, const char *json, const qs_st_entry *entries,
                      const uint64_t *nbytes, int n) {
    static const char spaces[8] = "       ";
    size_t len = strlen(json);
    size_t padded = (len + 7) & ~(size_t)7; /* 8 + N stays a multiple of 8: aligned data */
    unsigned char prefix[8];
    for (int i = 0; i < 8; i++)
        prefix[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    qs_atomic_file af;
    if (qs_atomic_open(&af, path) != 0)
        return -1;
    int rc = qs_atomic_write(&af, prefix, sizeof prefix);
    if (rc == 0)
        rc = qs_atomic_write(&af, json, len);
    if (rc == 0)
        rc = qs_atomic_write(&af, spaces, padded - len);
    enum { CHUNK = 1 << 22 };
    char *chunk = NULL;
    for (int i = 0; i < n && rc == 0; i++) {
        const qs_st_entry *e = &entries[i];
        if (e->data) {
            rc = qs_atomic_write(&af, e->data, (size_t)nbytes[i]);
            continue;
        }
        if (!chunk && !(chunk = malloc(CHUNK))) {
            rc = qs_error("%s: out of memory", path);
            break;
        }
        for (size_t at = 0; at < nbytes[i] && rc == 0; at += CHUNK) {
            const size_t k = nbytes[i] - at < CHUNK ? (size_t)(nbytes[i] - at) : CHUNK;
            e->fetch(e->ctx, at, chunk, k);
            rc = qs_atomic_write(&af, chunk, k);
        }
    }
    free(chunk);
    if (rc != 0) {
        qs_atomic_abort(&af);
        return -1;
    }
    return qs_atomic_commit(&af);
}

void qs_st_shape_str(char *buf, size_t cap, int ndim, const int64_t *shape) {
    int k = snprintf(buf, cap, "[");
    for (int d = 0; d < ndim && (size_t)k < cap; d++) k += snprintf(buf + k, cap - k, "%s%lld", d ? "," : "", (long long)shape[d]);
    if ((size_t)k < cap) snprintf(buf + k, cap - k, "]");
}

/* ---- widening to F32 ---- */

static float half_to_float(uint16_t h) {
    int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float v = exp == 0    ? ldexpf((float)man, -24) /* zero and subnormals */
              : exp == 31 ? (man ? NAN : INFINITY)
                          : ldexpf((float)(man | 0x400), exp - 25);
    return h & 0x8000 ? -v : v;
}

int qs_st_to_f32(const qs_st_tensor *t, float *dst, const char *what) {
    const unsigned char *s = t->data;
    size_t n = t->nbytes / qs_dtype_size(t->dtype);
    uint16_t h;
    switch (t->dtype) {
    case QS_DT_F32: memcpy(dst, s, t->nbytes); return 0;
    case QS_DT_F16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&h, s + 2 * i, 2);
            dst[i] = half_to_float(h);
        }
        return 0;
    case QS_DT_BF16:
        for (size_t i = 0; i < n; i++) {
            memcpy(&h, s + 2 * i, 2);
            dst[i] = qs_bf16_to_float(h);
        }
        return 0;
    default:
        return qs_error("%s: tensor '%s' is %s (only F32, F16 and BF16 convert)", what, t->name,
                        qs_dtype_name(t->dtype));
    }
}

int qs_st_write(const char *path, const qs_st_entry *entries, int n_entries, const qs_st_meta *meta,
                int n_meta) {
    if (n_entries < 0 || n_meta < 0 || (n_entries && !entries) || (n_meta && !meta))
        return qs_error("%s: invalid tensor or metadata list", path);
    int n_names = n_entries > n_meta ? n_entries : n_meta;
    uint64_t *nbytes = malloc((size_t)n_entries * sizeof *nbytes + 1);
    const char **names = malloc((size_t)n_names * sizeof *names + 1);
    char *json = NULL;
    int rc = nbytes && names ? 0 : qs_error("%s: out of memory", path);
    for (int i = 0; i < n_entries && rc == 0; i++) {
        rc = check_entry(&entries[i], &nbytes[i], path);
        names[i] = entries[i].name;
    }
    const char *dup;
    if (rc == 0 && (dup = find_duplicate(names, n_entries)))
        rc = qs_error("%s: duplicate tensor name '%s'", path, dup);
    for (int i = 0; i < n_meta && rc == 0; i++) {
        if (!meta[i].key || !meta[i].value || !is_text(meta[i].key) || !is_text(meta[i].value))
            rc = qs_error("%s: metadata entry %d is not a pair of UTF-8 strings", path, i);
        names[i] = meta[i].key;
    }
    if (rc == 0 && (dup = find_duplicate(names, n_meta)))
        rc = qs_error("%s: duplicate metadata key '%s'", path, dup);
    if (rc == 0 && !(json = build_header(entries, nbytes, n_entries, meta, n_meta)))
        rc = qs_error("%s: out of memory", path);
    if (rc == 0)
        rc = write_file(path, json, entries, nbytes, n_entries);
    cJSON_free(json);
    free(nbytes);
    free(names);
    return rc;
}

#include "quasar/data.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/rng.h"
#include "quasar/shards.h"

void qs_vocab_build(qs_char_vocab *v, const unsigned char *text, size_t n) {
    int seen[256] = {0};
    for (size_t i = 0; i < n; i++) seen[text[i]] = 1;
    v->size = 0;
    for (int b = 0; b < 256; b++) {
        v->id[b] = -1;
        if (seen[b]) {
            v->id[b] = (int16_t)v->size;
            v->bytes[v->size++] = (unsigned char)b;
        }
    }
}

char *qs_vocab_to_json(const qs_char_vocab *v) {
    char *s = malloc((size_t)v->size * 4 + 3), *p = s;
    if (!s) return NULL;
    *p++ = '[';
    for (int i = 0; i < v->size; i++) p += sprintf(p, i ? ",%d" : "%d", v->bytes[i]);
    *p++ = ']';
    *p = '\0';
    return s;
}

int qs_vocab_from_json(qs_char_vocab *v, const char *json) {
    cJSON *a = cJSON_ParseWithOpts(json, NULL, 1); /* nothing may follow the array */
    int rc = 0;
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) < 1 || cJSON_GetArraySize(a) > 256) {
        rc = qs_error("vocabulary must be a JSON array of 1..256 byte values");
        goto done;
    }
    memset(v->id, -1, sizeof v->id);
    v->size = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) {
        double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (d < 0 || d > 255 || d != (int)d || v->id[(int)d] >= 0) {
            rc = qs_error("vocabulary entry %d is not a distinct byte value", v->size);
            goto done;
        }
        v->id[(int)d] = (int16_t)v->size;
        v->bytes[v->size++] = (unsigned char)d;
    }
done:
    cJSON_Delete(a);
    return rc;
}

int qs_vocab_encode(const qs_char_vocab *v, const unsigned char *text, size_t n, int *ids) {
    for (size_t i = 0; i < n; i++) {
        int id = v->id[text[i]];
        if (id < 0) return qs_error("byte 0x%02x at offset %zu is not in the vocabulary", text[i], i);
        ids[i] = id;
    }
    return 0;
}

int qs_dataset_load(qs_dataset *d, qs_char_vocab *v, const qs_data_config *dc, int seq_len) {
    memset(d, 0, sizeof *d);
    char *text;
    size_t n;
    if (qs_file_read(dc->path, &text, &n)) return -1;
    if (v->size == 0) qs_vocab_build(v, (unsigned char *)text, n);
    d->tokens = malloc((n ? n : 1) * sizeof(int));
    if (!d->tokens) {
        free(text);
        return qs_error("out of memory loading '%s'", dc->path);
    }
    int rc = qs_vocab_encode(v, (unsigned char *)text, n, d->tokens);
    free(text);
    if (rc) {
        qs_dataset_free(d);
        return qs_error("%s: %s", dc->path, qs_error_last());
    }
    d->n_tokens = n;
    d->n_train = (size_t)((double)n * (1.0 - dc->val_fraction));
    size_t need = (size_t)seq_len + 1;
    if (d->n_train < need || n - d->n_train < need) {
        qs_dataset_free(d);
        return qs_error("%s: %zu tokens is too little for model.seq_len %d with data.val_fraction "
                        "%g (each split needs %zu)", dc->path, n, seq_len, dc->val_fraction, need);
    }
    return 0;
}

int qs_dataset_load_shards(qs_dataset *d, const qs_data_config *dc, int seq_len, int vocab_size) {
    memset(d, 0, sizeof *d);
    if (qs_shards_open(&d->shards[QS_SPLIT_TRAIN], dc->train_shards) ||
        qs_shards_open(&d->shards[QS_SPLIT_VAL], dc->val_shards)) {
        qs_dataset_free(d);
        return qs_error("data: %s", qs_error_last());
    }
    d->n_train = qs_shards_tokens(&d->shards[QS_SPLIT_TRAIN]);
    d->n_tokens = d->n_train + qs_shards_tokens(&d->shards[QS_SPLIT_VAL]);
    size_t need = (size_t)seq_len + 1;
    const char *small = d->n_train < need ? dc->train_shards : d->n_tokens - d->n_train < need ? dc->val_shards : NULL;
    int rc = small ? qs_error("'%s' holds fewer than model.seq_len + 1 = %zu tokens", small, need) : 0;
    for (int s = 0; s < 2 && !rc; s++) rc = qs_shards_check_vocab(&d->shards[s], vocab_size);
    if (rc) qs_dataset_free(d);
    return rc;
}

void qs_dataset_free(qs_dataset *d) {
    free(d->tokens);
    for (int s = 0; s < 2; s++) qs_shards_close(&d->shards[s]);
    memset(d, 0, sizeof *d);
}

/* n tokens of a split from its position start. */
static void read_split(const qs_dataset *d, qs_split split, size_t start, size_t n, int *out) {
    if (d->tokens) memcpy(out, d->tokens + (split == QS_SPLIT_TRAIN ? 0 : d->n_train) + start, n * sizeof(int));
    else qs_shards_read(&d->shards[split], start, n, out);
}

void qs_dataset_batch(const qs_dataset *d, qs_split split, uint64_t seed, uint64_t counter0, int B,
                      int T, int *x, int *y) {
    size_t len = split == QS_SPLIT_TRAIN ? d->n_train : d->n_tokens - d->n_train;
    for (int b = 0; b < B; b++) {
        size_t start = qs_rng_below(seed, 0x5eed0000u + (uint64_t)split, counter0 + (uint64_t)b, len - (size_t)T);
        read_split(d, split, start, (size_t)T, x + (size_t)b * T);
        read_split(d, split, start + 1, (size_t)T, y + (size_t)b * T);
    }
}

#include "quasar/shards.h"

#include <glob.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"
#include "quasar/fileio.h"

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

int qs_shard_check(const void *data, size_t size, const char *what, size_t *count) {
    const unsigned char *p = data;
    const size_t header = QS_SHARD_HEADER_INTS * 4;
    if (size < header) return qs_error("%s: %zu bytes is shorter than a shard header (%zu)", what, size, header);
    if (le32(p) != QS_SHARD_MAGIC)
        return qs_error("%s: bad magic %u (expected %d): not a token shard", what, le32(p), QS_SHARD_MAGIC);
    if (le32(p + 4) != QS_SHARD_VERSION)
        return qs_error("%s: unsupported version %u (expected %d)", what, le32(p + 4), QS_SHARD_VERSION);
    *count = le32(p + 8);
    if (size != header + 2 * *count)
        return qs_error("%s: header says %zu tokens (%zu bytes) but the file has %zu bytes", what, *count,
                        header + 2 * *count, size);
    return 0;
}

/* Token i of a checked image. */
static int token_at(const void *data, size_t i) {
    const unsigned char *p = (const unsigned char *)data + QS_SHARD_HEADER_INTS * 4 + 2 * i;
    return p[0] | p[1] << 8;
}

int qs_shard_parse(const void *data, size_t size, const char *what, int **tokens, size_t *n) {
    size_t count;
    if (qs_shard_check(data, size, what, &count)) return -1;
    int *grown = realloc(*tokens, (*n + count + 1) * sizeof(int));
    if (!grown) return qs_error("%s: out of memory for %zu tokens", what, *n + count);
    *tokens = grown;
    for (size_t i = 0; i < count; i++) grown[*n + i] = token_at(data, i);
    *n += count;
    return 0;
}

int qs_shard_write(const char *path, const int *tokens, size_t n) {
    if (n > UINT32_MAX) return qs_error("%s: %zu tokens do not fit one shard", path, n);
    const size_t header = QS_SHARD_HEADER_INTS * 4;
    unsigned char *buf = calloc(header + 2 * n, 1);
    if (!buf) return qs_error("%s: out of memory", path);
    put_le32(buf, QS_SHARD_MAGIC);
    put_le32(buf + 4, QS_SHARD_VERSION);
    put_le32(buf + 8, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] > 65535) {
            free(buf);
            return qs_error("%s: token %d at %zu does not fit uint16", path, tokens[i], i);
        }
        buf[header + 2 * i] = (unsigned char)tokens[i];
        buf[header + 2 * i + 1] = (unsigned char)(tokens[i] >> 8);
    }
    int rc = qs_file_write_atomic(path, buf, header + 2 * n);
    free(buf);
    return rc;
}

int qs_shards_open(qs_shard_set *s, const char *pattern) {
    memset(s, 0, sizeof *s);
    glob_t g;
    if (glob(pattern, 0, NULL, &g) != 0) return qs_error("no shard matches '%s'", pattern);
    const size_t n = g.gl_pathc; /* glob sorts the names */
    s->path = calloc(n, sizeof *s->path);
    s->map = calloc(n, sizeof *s->map);
    s->map_size = calloc(n, sizeof *s->map_size);
    s->first = calloc(n + 1, sizeof *s->first);
    int rc = s->path && s->map && s->map_size && s->first ? 0 : qs_error("out of memory opening shards");
    for (size_t i = 0; i < n && !rc; i++) {
        size_t count = 0;
        if (!(s->path[i] = strdup(g.gl_pathv[i]))) rc = qs_error("out of memory opening shards");
        else if (qs_file_map(s->path[i], &s->map[i], &s->map_size[i]) ||
                 qs_shard_check(s->map[i], s->map_size[i], s->path[i], &count))
            rc = -1;
        s->n_files = (int)i + 1;
        s->first[i + 1] = s->first[i] + count;
    }
    globfree(&g);
    if (rc) qs_shards_close(s);
    return rc;
}

void qs_shards_close(qs_shard_set *s) {
    for (int i = 0; i < s->n_files; i++) {
        qs_file_unmap(s->map[i], s->map_size[i]);
        free(s->path[i]);
    }
    free(s->path);
    free(s->map);
    free(s->map_size);
    free(s->first);
    memset(s, 0, sizeof *s);
}

void qs_shards_read(const qs_shard_set *s, size_t start, size_t n, int *out) {
    /* the last file whose first token is at or before start */
    int lo = 0, hi = s->n_files - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (s->first[mid] <= start) lo = mid;
        else hi = mid - 1;
    }
    for (int f = lo; n > 0 && f < s->n_files; f++) {
        size_t i = start - s->first[f];
        for (; i < s->first[f + 1] - s->first[f] && n > 0; i++, n--, start++) *out++ = token_at(s->map[f], i);
    }
}

int qs_shards_check_vocab(const qs_shard_set *s, int vocab_size) {
    enum { CHUNK = 1 << 20 }; /* tokens */
    for (int f = 0; f < s->n_files; f++) {
        const size_t count = s->first[f + 1] - s->first[f];
        for (size_t i0 = 0; i0 < count; i0 += CHUNK) {
            const size_t i1 = count - i0 < CHUNK ? count : i0 + CHUNK;
            for (size_t i = i0; i < i1; i++)
                if (token_at(s->map[f], i) >= vocab_size)
                    return qs_error("token id %d at position %zu of '%s' is outside the vocabulary (%d)",
                                    token_at(s->map[f], i), i, s->path[f], vocab_size);
            qs_file_release((const unsigned char *)s->map[f] + QS_SHARD_HEADER_INTS * 4 + 2 * i0, 2 * (i1 - i0));
        }
    }
    return 0;
}

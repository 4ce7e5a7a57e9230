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

int qs_shard_parse(const void *data, size_t size, const char *what, int **tokens, size_t *n) {
    const unsigned char *p = data;
    const size_t header = QS_SHARD_HEADER_INTS * 4;
    if (size < header) return qs_error("%s: %zu bytes is shorter than a shard header (%zu)", what, size, header);
    if (le32(p) != QS_SHARD_MAGIC)
        return qs_error("%s: bad magic %u (expected %d): not a token shard", what, le32(p), QS_SHARD_MAGIC);
    if (le32(p + 4) != QS_SHARD_VERSION)
        return qs_error("%s: unsupported version %u (expected %d)", what, le32(p + 4), QS_SHARD_VERSION);
    size_t count = le32(p + 8);
    if (size != header + 2 * count)
        return qs_error("%s: header says %zu tokens (%zu bytes) but the file has %zu bytes", what, count,
                        header + 2 * count, size);
    int *grown = realloc(*tokens, (*n + count + 1) * sizeof(int));
    if (!grown) return qs_error("%s: out of memory for %zu tokens", what, *n + count);
    *tokens = grown;
    for (size_t i = 0; i < count; i++) grown[*n + i] = p[header + 2 * i] | p[header + 2 * i + 1] << 8;
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

int qs_shards_load(const char *pattern, int **tokens, size_t *n) {
    glob_t g;
    *tokens = NULL;
    *n = 0;
    if (glob(pattern, 0, NULL, &g) != 0) return qs_error("no shard matches '%s'", pattern);
    int rc = 0;
    for (size_t i = 0; i < g.gl_pathc && !rc; i++) { /* glob sorts the names */
        char *data;
        size_t size;
        rc = qs_file_read(g.gl_pathv[i], &data, &size);
        if (!rc) {
            rc = qs_shard_parse(data, size, g.gl_pathv[i], tokens, n);
            free(data);
        }
    }
    globfree(&g);
    if (rc) {
        free(*tokens);
        *tokens = NULL;
        *n = 0;
    }
    return rc;
}

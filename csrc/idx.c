#include "quasar/idx.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "quasar/error.h"

#define IDX_MAX_HEADER (4 + 4 * 4)

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static const char *type_name(uint8_t type) {
    switch (type) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0b: return "int16";
    case 0x0c: return "int32";
    case 0x0d: return "float32";
    case 0x0e: return "float64";
    default: return "not an IDX type";
    }
}

/* Validates the header at the start of buf (n bytes, possibly only a prefix of the file)
 * and fills the shape of *shape; *header gets the header's size in bytes. */
static int parse_header(qs_idx *shape, const uint8_t *buf, size_t n, const char *what, size_t *header) {
    if (n < 4) return qs_error("%s: %zu bytes is shorter than an IDX header", what, n);
    if (buf[0] || buf[1])
        return qs_error("%s: bad magic %02x %02x %02x %02x: not an IDX file (expected 00 00 type ndim)", what,
                        buf[0], buf[1], buf[2], buf[3]);
    if (buf[2] != 0x08)
        return qs_error("%s: unsupported element type 0x%02x (%s): only unsigned bytes (0x08) are read", what,
                        buf[2], type_name(buf[2]));
    int ndim = buf[3];
    if (ndim < 1 || ndim > 4) return qs_error("%s: %d dimensions (1 to 4 are read)", what, ndim);
    *header = 4 + 4 * (size_t)ndim;
    if (n < *header) return qs_error("%s: %zu bytes is shorter than its %zu-byte header", what, n, *header);
    memset(shape, 0, sizeof *shape);
    shape->ndim = ndim;
    size_t count = 1;
    for (int i = 0; i < ndim; i++) {
        uint32_t d = be32(buf + 4 + 4 * i);
        if (d == 0) return qs_error("%s: dimension %d is zero", what, i);
        if (d > INT32_MAX) return qs_error("%s: dimension %d is %u, over 2^31 - 1", what, i, d);
        /* Bounded so that header + count still fits a size_t. */
        if (count > (SIZE_MAX - IDX_MAX_HEADER) / d)
            return qs_error("%s: the product of the %d dimensions overflows", what, ndim);
        count *= d;
        shape->dims[i] = d;
    }
    shape->n = count;
    return 0;
}

static int size_mismatch(const char *what, size_t expected, size_t have) {
    if (have < expected)
        return qs_error("%s: shorter than its header says (%zu data bytes, the file has %zu)", what, expected, have);
    return qs_error("%s: longer than its header says (%zu data bytes)", what, expected);
}

int qs_idx_parse(qs_idx *out, const uint8_t *buf, size_t n, const char *what) {
    memset(out, 0, sizeof *out);
    qs_idx shape;
    size_t header = 0;
    if (parse_header(&shape, buf, n, what, &header)) return -1;
    if (n - header != shape.n) return size_mismatch(what, shape.n, n - header);
    shape.data = malloc(shape.n);
    if (!shape.data) return qs_error("%s: out of memory for %zu bytes", what, shape.n);
    memcpy(shape.data, buf + header, shape.n);
    *out = shape;
    return 0;
}

/* zlib's messages start with "<path>: ", except "out of memory". */
static int gz_fail(gzFile f, const char *path) {
    int errnum;
    const char *msg = gzerror(f, &errnum);
    size_t len = strlen(path);
    if (strncmp(msg, path, len) == 0 && msg[len] == ':' && msg[len + 1] == ' ') msg += len + 2;
    return qs_error("cannot read '%s': %s", path, msg);
}

int qs_idx_read(qs_idx *out, const char *path) {
    memset(out, 0, sizeof *out);
    errno = 0;
    gzFile f = gzopen(path, "rb");
    if (!f) return qs_error("cannot open '%s': %s", path, errno ? strerror(errno) : "out of memory");
    /* The header first, so that its size is known before anything big is read. */
    uint8_t head[IDX_MAX_HEADER];
    int got = gzread(f, head, sizeof head);
    uint8_t *buf = NULL;
    qs_idx shape;
    size_t header = 0, total, have = got > 0 ? (size_t)got : 0;
    int rc = -1;
    if (got < 0) {
        rc = gz_fail(f, path);
        goto done;
    }
    if (parse_header(&shape, head, have, path, &header)) goto done;
    if (shape.n > QS_IDX_MAX_BYTES - header) {
        qs_error("%s: the header promises %zu data bytes, over the %zu-byte limit", path, shape.n,
                 QS_IDX_MAX_BYTES - header);
        goto done;
    }
    total = header + shape.n;
    if (have > total) {
        size_mismatch(path, shape.n, have - header);
        goto done;
    }
    buf = malloc(total + 1); /* one byte more, to notice a file that goes on */
    if (!buf) {
        qs_error("%s: out of memory for %zu bytes", path, total);
        goto done;
    }
    memcpy(buf, head, have);
    while (have <= total) {
        int r = gzread(f, buf + have, (unsigned)(total + 1 - have)); /* <= 1 GiB + 1: fits */
        if (r <= 0) break;
        have += (size_t)r;
    }
    int errnum;
    gzerror(f, &errnum);
    if (errnum != Z_OK) { /* a damaged or truncated gzip stream */
        gz_fail(f, path);
        goto done;
    }
    if (have != total) {
        size_mismatch(path, shape.n, have - header);
        goto done;
    }
    memmove(buf, buf + header, shape.n);
    shape.data = buf;
    buf = NULL;
    *out = shape;
    rc = 0;
done:
    free(buf);
    gzclose(f);
    return rc;
}

void qs_idx_free(qs_idx *x) {
    free(x->data);
    memset(x, 0, sizeof *x);
}

/* IDX files (the MNIST container): bytes 0 and 1 zero, byte 2 the element type, byte 3
 * the number of dimensions, then each dimension as a big-endian uint32, then the data
 * in row-major order. Only unsigned-byte elements (type 0x08) are read. */
#ifndef QUASAR_IDX_H
#define QUASAR_IDX_H

#include <stddef.h>
#include <stdint.h>

/* qs_idx_read refuses a file whose header promises more than this many bytes, before
 * reading it, and stops reading one byte past what the header promises: a gzip bomb
 * costs nothing. */
#define QS_IDX_MAX_BYTES ((size_t)1 << 30)

typedef struct qs_idx {
    int ndim;         /* 1..4 */
    int64_t dims[4];  /* each in [1, INT32_MAX] */
    uint8_t *data;    /* malloc'd, n bytes, row-major */
    size_t n;         /* product of dims */
} qs_idx;

/* Parses an IDX file held in memory; the data is copied. Errors are one line starting
 * with `what`: bad magic, unsupported element type (named), a dimension count outside
 * 1..4, a zero or oversized (> INT32_MAX) dimension, a product that overflows, a file
 * shorter or longer than its header says. On error *out is zeroed. */
int qs_idx_parse(qs_idx *out, const uint8_t *buf, size_t n, const char *what);
/* Reads path, gzip'd or plain (zlib reads both), and parses it; errors name the path. */
int qs_idx_read(qs_idx *out, const char *path);
/* Frees the data and zeroes *x; safe on a zeroed or already freed qs_idx. */
void qs_idx_free(qs_idx *x);

#endif

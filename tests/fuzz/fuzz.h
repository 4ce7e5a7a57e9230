/* Shared by the fuzz targets: the libFuzzer entry point, the input as C strings, and
 * invariant checks. Targets build with clang + libFuzzer (`make fuzz`) and with gcc
 * against replay.c (`make test`), so this header is plain C11. */
#ifndef QUASAR_FUZZ_H
#define QUASAR_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The input as NUL-separated C strings: a copy with one NUL appended, so "a\0b" holds
 * the parts "a" and "b". Targets that take several strings read them in turn; a plain
 * JSON seed is simply the first part. */
typedef struct fuzz_parts {
    char *buf;
    const char *end; /* one past the appended NUL */
} fuzz_parts;

/* Returns the first part, or NULL when out of memory. Free with free(p->buf). */
static inline const char *fuzz_parts_init(fuzz_parts *p, const uint8_t *data, size_t size) {
    p->buf = malloc(size + 1);
    if (!p->buf)
        return NULL;
    if (size)
        memcpy(p->buf, data, size);
    p->buf[size] = '\0';
    p->end = p->buf + size + 1;
    return p->buf;
}

/* The part after s, or NULL when s is the last. */
static inline const char *fuzz_parts_next(const fuzz_parts *p, const char *s) {
    s += strlen(s) + 1;
    return s < p->end ? s : NULL;
}

/* An invariant the code under test must keep; a failure aborts, so libFuzzer saves the
 * input as a crash and replay reports it. */
#define FUZZ_CHECK(cond) ((cond) ? (void)0 : fuzz_fail(#cond, __FILE__, __LINE__))

static inline void fuzz_fail(const char *cond, const char *file, int line) {
    fprintf(stderr, "%s:%d: fuzz check failed: %s\n", file, line, cond);
    abort();
}

#endif

/* The TAP harness of the multi-rank tests (comm_test.c, ring_test.c): a check records
 * why it failed on this rank, report() ends it with one "ok - ..." / "not ok - ..." line
 * from rank 0 that counts every rank's verdict. A failed check never skips a collective,
 * so it cannot hang the other ranks. Included by one file per program. */
#ifndef QUASAR_TESTS_MPI_TAP_H
#define QUASAR_TESTS_MPI_TAP_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../test_seed.h"
#include "quasar/comm.h"
#include "quasar/error.h"

static qs_comm *world;
static int rank, size;
static char label[32];
static uint64_t seed;
static int bad, failed_lines; /* failed checks on this rank in the current line; lines failed */
static char why[512];

static inline void fail(const char *fmt, ...) QS_PRINTF(1, 2);
static inline void fail(const char *fmt, ...) {
    if (bad++) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
}

#define CHECK(cond, ...) \
    do {                 \
        if (!(cond)) fail(__VA_ARGS__); \
    } while (0)

/* A comm call that must succeed. */
static inline void ok_call(int rc, const char *what) {
    if (rc) fail("%s failed: %s", what, qs_error_last());
}

/* A call that must fail with one line starting with `prefix`. */
static inline void err_call(int rc, const char *what, const char *prefix) {
    const char *msg = qs_error_last();
    if (rc != -1) fail("%s: returned %d, expected -1", what, rc);
    else if (strncmp(msg, prefix, strlen(prefix)) || strchr(msg, '\n'))
        fail("%s: error '%s', expected one line starting '%s'", what, msg, prefix);
}

/* Ends a check: all ranks learn whether any failed it; rank 0 prints the line. */
static inline void report(const char *fmt, ...) QS_PRINTF(1, 2);
static inline void report(const char *fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    int64_t n = bad;
    if (qs_comm_allreduce_i64(world, &n, 1, QS_SUM)) n = 1 + bad;
    if (bad) printf("# %s rank %d: %s\n", label, rank, why);
    fflush(stdout);
    qs_comm_barrier(world); /* the reasons first, then the verdict */
    if (rank == 0) printf("%sok - %s %s\n", n ? "not " : "", label, name);
    fflush(stdout);
    failed_lines += n != 0;
    bad = 0;
}

static inline float *alloc_floats(size_t n) {
    float *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* One seed for every rank: rank 0's (QS_TEST_SEED or the clock, printed). */
static inline void share_seed(const char *program) {
    int64_t s = rank == 0 ? (int64_t)qs_test_seed(program) : 0;
    ok_call(qs_comm_allreduce_i64(world, &s, 1, QS_SUM), "sharing the seed");
    seed = (uint64_t)s;
}

#endif

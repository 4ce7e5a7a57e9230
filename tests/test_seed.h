/* Fresh random inputs every run, reproducible on demand: the seed comes from
 * QS_TEST_SEED when set, else from the clock, and is printed first. */
#ifndef QUASAR_TEST_SEED_H
#define QUASAR_TEST_SEED_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline uint64_t qs_test_seed(const char *program) {
    const char *env = getenv("QS_TEST_SEED");
    uint64_t seed;
    if (env && *env) {
        seed = strtoull(env, NULL, 10);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = (uint64_t)ts.tv_sec * 1000000007ULL + (uint64_t)ts.tv_nsec;
    }
    printf("# %s: seed %llu (QS_TEST_SEED=%llu reproduces)\n", program, (unsigned long long)seed,
           (unsigned long long)seed);
    fflush(stdout);
    return seed;
}

#endif

/* The monotonic wall clock every timing in the engine reads. */
#ifndef QUASAR_CLOCK_H
#define QUASAR_CLOCK_H

#include <time.h>

/* Seconds since an arbitrary fixed point (CLOCK_MONOTONIC): only differences mean anything. */
static inline double qs_clock_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif

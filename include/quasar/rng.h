/* Counter-based random numbers: every draw is a pure function of (seed, stream,
 * counter). Nothing carries state between steps, so runs are reproducible,
 * resumable without saving generator state, and identical on any backend. */
#ifndef QUASAR_RNG_H
#define QUASAR_RNG_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* The same functions compile into CUDA kernels (kernels/), so a GPU draws the CPU's
 * numbers. */
#include "quasar/hostdev.h"

static inline QS_HD uint64_t qs_rng_mix(uint64_t z) {
    /* splitmix64 finalizer */
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline QS_HD uint64_t qs_rng_u64(uint64_t seed, uint64_t stream, uint64_t counter) {
    return qs_rng_mix(qs_rng_mix(qs_rng_mix(seed) ^ stream) ^ counter);
}

/* The counter of element (r, c) of an [N, W] tensor whose row r is global row ids[r]
 * (NULL: r); see the randomness convention in ops.h. */
static inline QS_HD uint64_t qs_rng_counter(const int64_t *ids, size_t r, size_t W, size_t c) {
    return (uint64_t)(ids ? ids[r] : (int64_t)r) * W + c;
}

/* Uniform in [0, 1) with 24 bits. */
static inline QS_HD float qs_rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
    return (float)(qs_rng_u64(seed, stream, counter) >> 40) * (1.0f / 16777216.0f);
}

/* Standard normal (Box-Muller on two 32-bit halves of one draw). */
static inline QS_HD float qs_rng_normal(uint64_t seed, uint64_t stream, uint64_t counter) {
    uint64_t r = qs_rng_u64(seed, stream, counter);
    double u1 = ((double)(r >> 32) + 1.0) * (1.0 / 4294967297.0); /* (0, 1] */
    double u2 = (double)(r & 0xffffffffu) * (1.0 / 4294967296.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Uniform integer in [0, n). */
static inline QS_HD uint64_t qs_rng_below(uint64_t seed, uint64_t stream, uint64_t counter, uint64_t n) {
    return qs_rng_u64(seed, stream, counter) % n;
}

#endif

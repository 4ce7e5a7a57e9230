/* Activation planning shared by the models: one carving function runs twice, first
 * with NULL bases to count, then over the allocated buffers to assign. */
#ifndef QUASAR_PLAN_H
#define QUASAR_PLAN_H

#include <stddef.h>

typedef struct qs_plan {
    float *fbase;
    int *ibase;
    size_t nf, ni;
} qs_plan;

static inline float *qs_plan_f(qs_plan *p, size_t n) {
    float *r = p->fbase ? p->fbase + p->nf : NULL;
    p->nf += (n + 15) & ~(size_t)15; /* 64-byte aligned pieces */
    return r;
}

static inline int *qs_plan_i(qs_plan *p, size_t n) {
    int *r = p->ibase ? p->ibase + p->ni : NULL;
    p->ni += (n + 15) & ~(size_t)15;
    return r;
}

#endif

/* The top-k selection every backend's MoE router uses (ops.h moe_route_forward): one
 * definition, so the CPU and GPU break ties alike. */
#ifndef QUASAR_TOPK_H
#define QUASAR_TOPK_H

#include "quasar/hostdev.h"

/* id[K] = the K largest of x[E] in descending order. Insertion into a sorted list of
 * the best K so far: an expert goes after every kept one with an equal value, so ties
 * keep the lower index first. */
static inline QS_HD void qs_topk_select(int *id, const float *x, int E, int K) {
    int have = 0;
    for (int e = 0; e < E; e++) {
        int j = have;
        while (j > 0 && x[e] > x[id[j - 1]]) j--;
        if (j >= K) continue;
        if (have < K) have++;
        for (int m = have - 1; m > j; m--) id[m] = id[m - 1];
        id[j] = e;
    }
}

#endif

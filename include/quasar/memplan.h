/* A run's memory, computed from the config before anything is allocated: the models
 * plan it, the task adds the optimizer, and a start that would not fit fails with one
 * line saying what was needed and what is free, before a byte is taken. */
#ifndef QUASAR_MEMPLAN_H
#define QUASAR_MEMPLAN_H

#include <stddef.h>
#include <stdio.h>

#include "quasar/backend.h"

typedef struct qs_mem_plan {
    size_t params;      /* weights, a frozen base included */
    size_t grads;       /* gradients of the trainable ones */
    size_t optimizer;   /* AdamW's m and v for this rank's share */
    size_t activations; /* what a forward keeps for its backward, index and ring buffers */
    size_t workspace;   /* op scratch and library workspace the backend reserves */
} qs_mem_plan;

size_t qs_mem_plan_total(const qs_mem_plan *p);
/* Adds b's parts to a's. */
void qs_mem_plan_add(qs_mem_plan *a, const qs_mem_plan *b);
/* AdamW's state for `trainable` parameters whose optimizer is sharded over `shards`
 * ranks (ZeRO-1; 1: not sharded), as qs_dp_create_optim allocates it. */
size_t qs_mem_plan_optimizer(size_t trainable, int shards);
/* Fails (one line: the plan, what is free, what to lower) when the plan does not fit in
 * be's free memory; passes when the backend cannot tell. */
int qs_mem_plan_check(const qs_mem_plan *p, const qs_backend *be);
/* The same, but the line's advice is `lower`'s, not the default. */
int qs_mem_plan_check_advising(const qs_mem_plan *p, const qs_backend *be, const char *lower);
/* "X MiB = parameters A + gradients B + ...", and what the backend has left (free now)
 * when it can tell. */
void qs_mem_plan_print(FILE *f, const qs_mem_plan *p, const qs_backend *be);

#endif

/* Data parallelism over a group of ranks: every rank holds the whole model, computes
 * the gradients of its slice of each global batch, and the group sums them (each rank
 * already scaled its share by its fraction of the global batch, so the sum is the
 * global mean). With ZeRO-1 the optimizer state is sharded: gradients are
 * reduce-scattered, each rank updates its chunk of the parameters, and the chunks are
 * allgathered back. The flat buffer of n parameters is cut into size equal chunks of
 * n / size; the n % size left over (fewer than size) form a tail that every rank
 * reduces and updates alike, so the collectives need no padding. */
#ifndef QUASAR_DATA_PARALLEL_H
#define QUASAR_DATA_PARALLEL_H

#include "quasar/comm.h"
#include "quasar/optim.h"
#include "quasar/params.h"

typedef struct qs_dp {
    qs_comm *comm; /* the data-parallel group; NULL: one rank */
    int rank, size;
    int zero;      /* ZeRO stage, 0 or 1 */
    size_t n;      /* parameters */
    size_t chunk;  /* ZeRO-1: each rank's chunk, n / size */
} qs_dp;

void qs_dp_init(qs_dp *dp, qs_comm *comm, int zero, size_t n);
/* The optimizer for this rank: the whole table, or (ZeRO-1) its chunk and the tail. */
int qs_dp_create_optim(const qs_dp *dp, const qs_backend *be, qs_adamw *o);
/* Sums the ranks' gradients; with ZeRO-1 only the rank's own spans hold the sum. */
int qs_dp_reduce_grads(qs_dp *dp, qs_params *ps);
/* The global L2 norm of the summed gradients (the same on every rank). */
int qs_dp_grad_norm(qs_dp *dp, const qs_params *ps, double *norm);
/* ZeRO-1: every rank's updated chunk to every rank (no-op otherwise). */
int qs_dp_gather_params(qs_dp *dp, qs_params *ps);
/* The whole table's optimizer state in full (created here; the caller frees it), for a
 * checkpoint that any number of ranks can resume. Without ZeRO-1, o itself is whole:
 * *full is then a shallow copy that must not be freed. Collective. */
int qs_dp_gather_optim(qs_dp *dp, const qs_adamw *o, qs_adamw *full, bool *owned);

#endif

/* Data parallelism over a group of ranks: every rank holds the whole model, computes
 * the gradients of its slice of each global batch, and the group sums them (each rank
 * already scaled its share by its fraction of the global batch, so the sum is the
 * global mean). With ZeRO-1 the optimizer state is sharded: gradients are
 * reduce-scattered, each rank updates its chunk of the parameters, and the chunks are
 * allgathered back. The flat buffer of n parameters is cut into size equal chunks of
 * n / size; the n % size left over (fewer than size) form a tail that every rank
 * reduces and updates alike, so the collectives need no padding. Gradient buckets work
 * in both: a finished bucket is allreduced, or with ZeRO-1 each of its pieces is reduced
 * on the rank whose chunk holds it (the tail's piece allreduced). */
#ifndef QUASAR_DATA_PARALLEL_H
#define QUASAR_DATA_PARALLEL_H

#include "quasar/comm.h"
#include "quasar/optim.h"
#include "quasar/params.h"

#define QS_DP_MAX_BUCKETS 64

typedef struct qs_dp {
    qs_comm *comm; /* the data-parallel group; NULL: one rank */
    int rank, size;
    int zero;      /* ZeRO stage, 0 or 1 */
    size_t n;      /* parameters */
    size_t chunk;  /* ZeRO-1: each rank's chunk, n / size */
    /* Buckets: during the last backward pass of a step, each finished tail of at least
     * `bucket` floats past what is already in flight is reduced while the pass goes on. */
    size_t bucket;  /* 0: one reduction after the backward pass */
    qs_params *armed; /* the table whose backward pass is being watched, or NULL */
    size_t started;   /* grad[started, n) is reduced or in flight */
    int n_flight;     /* calls in flight (a ZeRO-1 bucket may take several) */
    qs_comm_req flight[QS_DP_MAX_BUCKETS];
    bool failed;      /* a bucket failed to start (qs_error says why) */
    int calls, overlapped; /* the last step's reductions, and how many began during the pass */
} qs_dp;

/* bucket_floats: parallel.bucket_mb in floats (0: no overlap). */
void qs_dp_init(qs_dp *dp, qs_comm *comm, int zero, size_t n, size_t bucket_floats);
/* The optimizer for this rank: the whole table, or (ZeRO-1) its chunk and the tail. */
int qs_dp_create_optim(const qs_dp *dp, const qs_backend *be, qs_adamw *o);
/* Before the step's last backward pass: reduce ps's gradients in buckets as the pass
 * finishes them (when buckets are on; otherwise nothing). */
void qs_dp_watch_backward(qs_dp *dp, qs_params *ps);
/* Sums the ranks' gradients (what a watched pass left, then waits for its buckets); with
 * ZeRO-1 only the rank's own spans hold the sum. */
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

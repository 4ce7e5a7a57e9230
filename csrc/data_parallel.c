#include "quasar/data_parallel.h"

#include <math.h>

#include "quasar/error.h"

void qs_dp_init(qs_dp *dp, qs_comm *comm, int zero, size_t n, size_t bucket_floats) {
    *dp = (qs_dp){.comm = comm, .rank = comm ? qs_comm_rank(comm) : 0, .size = comm ? qs_comm_size(comm) : 1,
                  .zero = zero, .n = n, .bucket = bucket_floats};
    dp->chunk = n / (size_t)dp->size;
}

static bool sharded(const qs_dp *dp) { return dp->zero == 1 && dp->size > 1; }

/* Where the sum of grad[b, ...) is needed: ZeRO-1 reduces the part of rank r's chunk on
 * rank r (root r) and allreduces the shared tail (root -1); otherwise every rank needs
 * all of it. The first such piece of grad[b, e). */
typedef struct {
    size_t begin, end;
    int root;
} dp_piece;

static dp_piece piece_at(const qs_dp *dp, size_t b, size_t e) {
    const size_t tail = dp->chunk * (size_t)dp->size;
    if (!sharded(dp) || b >= tail) return (dp_piece){b, e, -1};
    const size_t r = b / dp->chunk, chunk_end = (r + 1) * dp->chunk;
    return (dp_piece){b, e < chunk_end ? e : chunk_end, (int)r};
}

#define FOR_EACH_PIECE(p, dp, b, e) for (dp_piece p = piece_at(dp, b, e); p.begin < (e); p = piece_at(dp, p.end, e))

/* Sums a piece where it is needed: started into *req, or blocking when req is NULL. */
static int reduce_piece(qs_dp *dp, float *grad, dp_piece p, qs_comm_req *req) {
    float *buf = grad + p.begin;
    const size_t n = p.end - p.begin;
    if (p.root < 0)
        return req ? qs_comm_allreduce_start(dp->comm, buf, n, QS_SUM, req)
                   : qs_comm_allreduce(dp->comm, buf, n, QS_SUM);
    return req ? qs_comm_reduce_start(dp->comm, buf, n, QS_SUM, p.root, req)
               : qs_comm_reduce(dp->comm, buf, n, QS_SUM, p.root);
}

/* grad[begin, n) is final: start the part not yet in flight once it fills a bucket. Every
 * rank's pass reports the same points, so the ranks start the same pieces in order. Past
 * QS_DP_MAX_BUCKETS pieces in flight the rest waits for the end of the pass. */
static void grads_ready(void *ctx, size_t begin) {
    qs_dp *dp = ctx;
    if (begin >= dp->started || dp->started - begin < dp->bucket) return;
    int pieces = 0;
    FOR_EACH_PIECE(p, dp, begin, dp->started) pieces++;
    if (dp->n_flight + pieces > QS_DP_MAX_BUCKETS) return;
    FOR_EACH_PIECE(p, dp, begin, dp->started) {
        if (reduce_piece(dp, dp->armed->grad, p, &dp->flight[dp->n_flight])) dp->failed = true;
        else dp->n_flight++;
    }
    dp->started = begin;
}

void qs_dp_watch_backward(qs_dp *dp, qs_params *ps) {
    if (dp->size == 1 || !dp->bucket || !ps->grad) return;
    dp->armed = ps;
    dp->started = dp->n;
    ps->on_grads_ready = grads_ready;
    ps->grads_ready_ctx = dp;
}

/* This rank's chunk, then the tail every rank owns. */
static void own_spans(const qs_dp *dp, qs_span own[2]) {
    const size_t tail = dp->chunk * (size_t)dp->size;
    own[0] = (qs_span){dp->chunk * (size_t)dp->rank, dp->chunk * (size_t)(dp->rank + 1)};
    own[1] = (qs_span){tail, dp->n};
}

int qs_dp_create_optim(const qs_dp *dp, const qs_backend *be, qs_adamw *o) {
    if (!sharded(dp)) return qs_adamw_create(o, be, dp->n);
    qs_span own[2];
    own_spans(dp, own);
    return qs_adamw_create_spans(o, be, dp->n, own, 2);
}

/* All of the gradients after the pass: one allreduce, or (ZeRO-1) one reduce-scatter of
 * the chunks and an allreduce of the tail. */
static int reduce_whole(qs_dp *dp, qs_params *ps) {
    const size_t tail = dp->chunk * (size_t)dp->size;
    dp->calls = 1 + (sharded(dp) && tail < dp->n);
    if (!sharded(dp)) return qs_comm_allreduce(dp->comm, ps->grad, dp->n, QS_SUM);
    if (dp->chunk && qs_comm_reduce_scatter(dp->comm, ps->grad, ps->grad + dp->chunk * (size_t)dp->rank, dp->chunk,
                                            QS_SUM))
        return -1;
    return tail < dp->n ? qs_comm_allreduce(dp->comm, ps->grad + tail, dp->n - tail, QS_SUM) : 0;
}

/* The rest of a watched pass's gradients, then its buckets in the order they started. */
static int finish_watched(qs_dp *dp, qs_params *ps) {
    ps->on_grads_ready = NULL;
    ps->grads_ready_ctx = NULL;
    dp->armed = NULL;
    int rc = dp->failed ? -1 : 0; /* the other ranks still make the calls below */
    const int overlapped = dp->n_flight;
    if (!overlapped) { /* nothing filled a bucket */
        if (reduce_whole(dp, ps)) rc = -1;
    } else {
        dp->calls = overlapped;
        FOR_EACH_PIECE(p, dp, 0, dp->started) {
            if (reduce_piece(dp, ps->grad, p, NULL)) rc = -1;
            dp->calls++;
        }
    }
    for (int i = 0; i < dp->n_flight; i++)
        if (qs_comm_wait(&dp->flight[i])) rc = -1;
    dp->overlapped = overlapped;
    dp->n_flight = 0;
    dp->failed = false;
    return rc;
}

int qs_dp_reduce_grads(qs_dp *dp, qs_params *ps) {
    if (dp->size == 1) return 0;
    if (dp->armed == ps) return finish_watched(dp, ps);
    dp->overlapped = 0;
    return reduce_whole(dp, ps);
}

int qs_dp_grad_norm(qs_dp *dp, const qs_params *ps, double *norm) {
    if (!sharded(dp)) {
        *norm = qs_adamw_grad_norm(ps);
        return 0;
    }
    /* the chunks' squares summed over the ranks, the shared tail's counted once */
    qs_span own[2];
    own_spans(dp, own);
    const qs_ops *ops = ps->be->ops;
    double chunk_sq = ops->sumsq(ps->grad + own[0].begin, own[0].end - own[0].begin);
    if (qs_comm_allreduce_f64(dp->comm, &chunk_sq, 1, QS_SUM)) return -1;
    *norm = sqrt(chunk_sq + ops->sumsq(ps->grad + own[1].begin, own[1].end - own[1].begin));
    return 0;
}

int qs_dp_gather_params(qs_dp *dp, qs_params *ps) {
    if (!sharded(dp) || !dp->chunk) return 0;
    return qs_comm_allgather(dp->comm, ps->data + dp->chunk * (size_t)dp->rank, ps->data, dp->chunk);
}

int qs_dp_gather_optim(qs_dp *dp, const qs_adamw *o, qs_adamw *full, bool *owned) {
    *owned = false;
    if (!sharded(dp)) {
        *full = *o;
        return 0;
    }
    if (qs_adamw_create(full, o->be, dp->n)) return -1;
    *owned = true;
    full->t = o->t;
    /* the shard's moments are [chunk | tail]: chunks gathered in rank order, tail copied */
    const size_t tail = dp->chunk * (size_t)dp->size, n_tail = dp->n - tail;
    float *const parts[2][2] = {{o->m, full->m}, {o->v, full->v}};
    for (int i = 0; i < 2; i++) {
        if (dp->chunk && qs_comm_allgather(dp->comm, parts[i][0], parts[i][1], dp->chunk)) return -1;
        o->be->copy(parts[i][1] + tail, parts[i][0] + dp->chunk, n_tail * sizeof(float));
    }
    return 0;
}

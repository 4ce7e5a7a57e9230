/* The comm layer at every group size: one process when run directly, MPI ranks under
 * mpirun (tests/mpi/run.sh). Every rank can compute every rank's contribution from
 * qs_rng, so each result is checked exactly on each rank. Rank 0 prints one TAP line per
 * check ("ok - mpi np=3 allreduce sum n=7"), failed if any rank failed it; a rank that
 * failed prints why. A failed check never skips a collective, so it cannot hang the rest.
 *
 * usage: comm_test KIND   KIND: the backend QS_COMM_AUTO must pick here (single, mpi), or
 *                         nccl: that backend asked for (the emulated CUDA build's copy). */
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/rng.h"
#include "tap.h"

/* Rank r's value at index i for check `tag`: an integer in [-1000, 1000], so sums over
 * a few ranks are exact in float and any reduction order gives the same bits. */
static float val(int tag, int r, size_t i) {
    return (float)((int64_t)qs_rng_below(seed, (uint64_t)tag * 1000 + (uint64_t)r, i, 2001) - 1000);
}

static float reduce_val(int tag, qs_comm_op op, size_t i) {
    float acc = val(tag, 0, i);
    for (int r = 1; r < size; r++) {
        float v = val(tag, r, i);
        acc = op == QS_SUM ? acc + v : (v > acc ? v : acc);
    }
    return acc;
}

static const char *op_name(qs_comm_op op) { return op == QS_SUM ? "sum" : "max"; }

static void check_allreduce(int tag, qs_comm_op op, size_t n) {
    float *buf = alloc_floats(n);
    for (size_t i = 0; i < n; i++) buf[i] = val(tag, rank, i);
    ok_call(qs_comm_allreduce(world, buf, n, op), "qs_comm_allreduce");
    for (size_t i = 0; i < n && !bad; i++)
        CHECK(buf[i] == reduce_val(tag, op, i), "element %zu is %g, expected %g", i, buf[i], reduce_val(tag, op, i));
    free(buf);
    report("allreduce %s n=%zu", op_name(op), n);
}

/* Started, then local work, then waited for; the buffer must hold the sum after. */
static void check_allreduce_start(int tag, size_t n) {
    float *buf = alloc_floats(n);
    for (size_t i = 0; i < n; i++) buf[i] = val(tag, rank, i);
    qs_comm_req req;
    ok_call(qs_comm_allreduce_start(world, buf, n, QS_SUM, &req), "qs_comm_allreduce_start");
    double busy = 0; /* stands for the backward pass the collective overlaps */
    for (size_t i = 0; i < n; i++) busy += val(tag + 1, rank, i);
    CHECK(busy == busy, "busy work");
    ok_call(qs_comm_wait(&req), "qs_comm_wait");
    CHECK(req.comm == NULL, "the request is still marked in flight");
    for (size_t i = 0; i < n && !bad; i++)
        CHECK(buf[i] == reduce_val(tag, QS_SUM, i), "element %zu is %g, expected %g", i, buf[i],
              reduce_val(tag, QS_SUM, i));
    ok_call(qs_comm_wait(&req), "qs_comm_wait with nothing in flight");
    ok_call(qs_comm_allreduce_start(world, NULL, 0, QS_SUM, &req), "qs_comm_allreduce_start of 0");
    CHECK(req.comm == NULL, "a start of 0 elements left a request in flight");
    free(buf);
    report("allreduce_start + wait n=%zu", n);
}

/* Host values: fractions in double, and int64 beyond double's 53 bits. */
static void check_allreduce_host(void) {
    double d[5], dmax[5];
    for (int i = 0; i < 5; i++) d[i] = dmax[i] = 0.25 * val(10, rank, (size_t)i) + 1e-3 * rank;
    ok_call(qs_comm_allreduce_f64(world, d, 5, QS_SUM), "qs_comm_allreduce_f64");
    ok_call(qs_comm_allreduce_f64(world, dmax, 5, QS_MAX), "qs_comm_allreduce_f64 max");
    for (int i = 0; i < 5; i++) {
        double sum = 0, max = -1e300;
        for (int r = 0; r < size; r++) {
            double v = 0.25 * val(10, r, (size_t)i) + 1e-3 * r;
            sum += v;
            max = v > max ? v : max;
        }
        CHECK(d[i] > sum - 1e-9 && d[i] < sum + 1e-9, "f64 sum %d is %.17g, expected %.17g", i, d[i], sum);
        CHECK(dmax[i] == max, "f64 max %d is %.17g, expected %.17g", i, dmax[i], max);
    }
    int64_t k[3], kmax[3];
    for (int i = 0; i < 3; i++) k[i] = kmax[i] = ((int64_t)1 << 60) / 8 * (rank + 1) + i * 3 + rank;
    ok_call(qs_comm_allreduce_i64(world, k, 3, QS_SUM), "qs_comm_allreduce_i64");
    ok_call(qs_comm_allreduce_i64(world, kmax, 3, QS_MAX), "qs_comm_allreduce_i64 max");
    for (int i = 0; i < 3; i++) {
        int64_t sum = 0, max = INT64_MIN;
        for (int r = 0; r < size; r++) {
            int64_t v = ((int64_t)1 << 60) / 8 * (r + 1) + i * 3 + r;
            sum += v;
            max = v > max ? v : max;
        }
        CHECK(k[i] == sum, "i64 sum %d is %" PRId64 ", expected %" PRId64, i, k[i], sum);
        CHECK(kmax[i] == max, "i64 max %d is %" PRId64 ", expected %" PRId64, i, kmax[i], max);
    }
    report("allreduce_f64 / allreduce_i64 sum and max");
}

static void check_reduce_scatter(int tag, qs_comm_op op, size_t chunk, bool in_place) {
    size_t total = chunk * (size_t)size;
    float *send = alloc_floats(total), *own = in_place ? NULL : alloc_floats(chunk);
    for (size_t i = 0; i < total; i++) send[i] = val(tag, rank, i);
    float *recv = in_place ? send + (size_t)rank * chunk : own;
    ok_call(qs_comm_reduce_scatter(world, send, recv, chunk, op), "qs_comm_reduce_scatter");
    for (size_t j = 0; j < chunk && !bad; j++) {
        float want = reduce_val(tag, op, (size_t)rank * chunk + j);
        CHECK(recv[j] == want, "element %zu of the chunk is %g, expected %g", j, recv[j], want);
    }
    for (size_t i = 0; i < total && !in_place && !bad; i++)
        CHECK(send[i] == val(tag, rank, i), "send[%zu] changed", i);
    free(send);
    free(own);
    report("reduce_scatter %s chunk=%zu%s", op_name(op), chunk, in_place ? " in place" : "");
}

static void check_allgather(int tag, size_t chunk, bool in_place) {
    size_t total = chunk * (size_t)size;
    float *recv = alloc_floats(total), *own = in_place ? NULL : alloc_floats(chunk);
    float *send = in_place ? recv + (size_t)rank * chunk : own;
    for (size_t i = 0; i < total; i++) recv[i] = -5000; /* must all be overwritten */
    for (size_t j = 0; j < chunk; j++) send[j] = val(tag, rank, j);
    ok_call(qs_comm_allgather(world, send, recv, chunk), "qs_comm_allgather");
    for (int r = 0; r < size; r++)
        for (size_t j = 0; j < chunk && !bad; j++)
            CHECK(recv[(size_t)r * chunk + j] == val(tag, r, j), "rank %d's element %zu is %g, expected %g", r, j,
                  recv[(size_t)r * chunk + j], val(tag, r, j));
    free(recv);
    free(own);
    report("allgather chunk=%zu%s", chunk, in_place ? " in place" : "");
}

static void check_broadcast(int tag, size_t n, int root) {
    float *buf = alloc_floats(n);
    for (size_t i = 0; i < n; i++) buf[i] = val(tag, rank, i);
    ok_call(qs_comm_broadcast(world, buf, n, root), "qs_comm_broadcast");
    for (size_t i = 0; i < n && !bad; i++)
        CHECK(buf[i] == val(tag, root, i), "element %zu is %g, expected root's %g", i, buf[i], val(tag, root, i));
    free(buf);
    report("broadcast n=%zu root=%d", n, root);
}

/* Every root, blocking or started: the root holds the reduction, the others their own
 * values untouched. */
static void check_reduce(int tag, qs_comm_op op, size_t n, int root, bool started) {
    float *buf = alloc_floats(n);
    for (size_t i = 0; i < n; i++) buf[i] = val(tag, rank, i);
    qs_comm_req req;
    if (started) {
        ok_call(qs_comm_reduce_start(world, buf, n, op, root, &req), "qs_comm_reduce_start");
        ok_call(qs_comm_wait(&req), "qs_comm_wait");
        CHECK(req.comm == NULL, "the request is still marked in flight");
    } else {
        ok_call(qs_comm_reduce(world, buf, n, op, root), "qs_comm_reduce");
    }
    for (size_t i = 0; i < n && !bad; i++) {
        const float want = rank == root ? reduce_val(tag, op, i) : val(tag, rank, i);
        CHECK(buf[i] == want, "element %zu is %g, expected %g", i, buf[i], want);
    }
    free(buf);
    report("reduce%s %s n=%zu root=%d", started ? "_start + wait" : "", op_name(op), n, root);
}

/* Pairs (0,1), (2,3)...: even to odd, then odd back to even; an odd world leaves the
 * last rank out. Large enough to leave MPI's eager protocol. */
static void check_send_recv(int tag, size_t n) {
    float *buf = alloc_floats(n);
    int peer = rank ^ 1;
    if (peer < size) {
        bool even = rank % 2 == 0;
        for (size_t i = 0; i < n; i++) buf[i] = val(tag, rank, i);
        ok_call(even ? qs_comm_send(world, buf, n, peer) : qs_comm_recv(world, buf, n, peer), "first leg");
        if (!even)
            for (size_t i = 0; i < n && !bad; i++) CHECK(buf[i] == val(tag, peer, i), "first leg: element %zu", i);
        for (size_t i = 0; i < n && !even; i++) buf[i] = val(tag + 1, rank, i);
        ok_call(even ? qs_comm_recv(world, buf, n, peer) : qs_comm_send(world, buf, n, peer), "second leg");
        if (even)
            for (size_t i = 0; i < n && !bad; i++)
                CHECK(buf[i] == val(tag + 1, peer, i), "second leg: element %zu", i);
    }
    free(buf);
    report("send / recv in pairs n=%zu", n);
}

/* The ring of ring attention: send to the next rank, receive from the previous one.
 * After k steps a rank holds rank (rank - k)'s block; after size steps its own again.
 * started: double-buffered, local work on the current block while the next arrives. */
static void check_ring(int tag, size_t n, bool started) {
    float *cur = alloc_floats(n), *next = alloc_floats(n);
    for (size_t i = 0; i < n; i++) cur[i] = val(tag, rank, i);
    int to = (rank + 1) % size, from = (rank + size - 1) % size;
    for (int k = 1; k <= size; k++) {
        if (started) {
            qs_comm_req req;
            ok_call(qs_comm_sendrecv_start(world, cur, next, n, to, from, &req), "qs_comm_sendrecv_start");
            double busy = 0;
            for (size_t i = 0; i < n; i++) busy += cur[i];
            CHECK(busy == busy, "busy work");
            ok_call(qs_comm_wait(&req), "qs_comm_wait");
        } else {
            ok_call(qs_comm_sendrecv(world, cur, next, n, to, from), "qs_comm_sendrecv");
        }
        float *t = cur;
        cur = next;
        next = t;
        int owner = ((rank - k) % size + size) % size;
        for (size_t i = 0; i < n && !bad; i++)
            CHECK(cur[i] == val(tag, owner, i), "step %d: element %zu is not rank %d's", k, i, owner);
    }
    for (size_t i = 0; i < n && !bad; i++) CHECK(cur[i] == val(tag, rank, i), "not back to the original");
    free(cur);
    free(next);
    report("ring sendrecv%s n=%zu, %d steps back to the original", started ? "_start + wait" : "", n, size);
}

/* Odd and even ranks, each ordered by descending world rank. */
static void check_split(void) {
    qs_comm *sub = NULL;
    ok_call(qs_comm_split(world, rank % 2, -rank, &sub), "qs_comm_split");
    if (sub) {
        int same = (size - rank % 2 + 1) / 2, above = (size - 1 - rank) / 2;
        CHECK(qs_comm_size(sub) == same, "size %d, expected %d", qs_comm_size(sub), same);
        CHECK(qs_comm_rank(sub) == above, "rank %d, expected %d", qs_comm_rank(sub), above);
        CHECK(qs_comm_local_rank(sub) == qs_comm_local_rank(world), "local rank differs from the world's");
        int64_t sum = rank, want = 0;
        ok_call(qs_comm_allreduce_i64(sub, &sum, 1, QS_SUM), "allreduce in the sub-group");
        for (int r = rank % 2; r < size; r += 2) want += r;
        CHECK(sum == want, "sum of world ranks %" PRId64 ", expected %" PRId64, sum, want);
    }
    qs_comm_free(sub);
    report("split by parity, reversed keys");
}

static void check_mesh(int sp) {
    qs_comm *dp = NULL, *spg = NULL;
    if (size % sp) {
        char want[128];
        snprintf(want, sizeof want, "sequence parallel size %d does not divide the world size %d", sp, size);
        int rc = qs_comm_mesh(world, sp, &dp, &spg);
        CHECK(rc == -1 && !strcmp(qs_error_last(), want), "got %d '%s', expected -1 '%s'", rc, qs_error_last(), want);
        CHECK(!dp && !spg, "groups left behind");
        report("mesh sp=%d refused", sp);
        return;
    }
    ok_call(qs_comm_mesh(world, sp, &dp, &spg), "qs_comm_mesh");
    if (dp && spg) {
        int sp_rank = rank % sp, dp_rank = rank / sp;
        CHECK(qs_comm_size(spg) == sp && qs_comm_rank(spg) == sp_rank, "sp group: rank %d of %d, expected %d of %d",
              qs_comm_rank(spg), qs_comm_size(spg), sp_rank, sp);
        CHECK(qs_comm_size(dp) == size / sp && qs_comm_rank(dp) == dp_rank,
              "dp group: rank %d of %d, expected %d of %d", qs_comm_rank(dp), qs_comm_size(dp), dp_rank, size / sp);
        int64_t in_sp = rank, in_dp = rank, want_sp = 0, want_dp = 0;
        ok_call(qs_comm_allreduce_i64(spg, &in_sp, 1, QS_SUM), "allreduce over sp");
        ok_call(qs_comm_allreduce_i64(dp, &in_dp, 1, QS_SUM), "allreduce over dp");
        for (int s = 0; s < sp; s++) want_sp += dp_rank * sp + s;
        for (int d = 0; d < size / sp; d++) want_dp += d * sp + sp_rank;
        CHECK(in_sp == want_sp, "sp sum of world ranks %" PRId64 ", expected %" PRId64, in_sp, want_sp);
        CHECK(in_dp == want_dp, "dp sum of world ranks %" PRId64 ", expected %" PRId64, in_dp, want_dp);
        float mine = (float)rank, prev = -1;
        ok_call(qs_comm_sendrecv(spg, &mine, &prev, 1, (sp_rank + 1) % sp, (sp_rank + sp - 1) % sp),
                "ring in the sp group");
        int want = dp_rank * sp + (sp_rank + sp - 1) % sp;
        CHECK(prev == (float)want, "the sp ring's previous rank is world rank %g, expected %d", prev, want);
    }
    qs_comm_free(dp);
    qs_comm_free(spg);
    report("mesh sp=%d: %d dp x %d sp groups", sp, size / sp, sp);
}

/* Bad arguments are refused on every rank before anything is sent. */
static void check_errors(void) {
    float buf[64] = {0};
    err_call(qs_comm_allreduce(world, NULL, 3, QS_SUM), "NULL buffer", "qs_comm_allreduce: NULL buffer for 3 elements");
    err_call(qs_comm_allreduce(world, buf, 3, (qs_comm_op)7), "unknown op", "qs_comm_allreduce: unknown reduction 7");
    char want[128];
    snprintf(want, sizeof want, "qs_comm_broadcast: root %d is not a rank of this group of %d", size, size);
    err_call(qs_comm_broadcast(world, buf, 3, size), "root out of range", want);
    snprintf(want, sizeof want, "qs_comm_reduce: root -1 is not a rank of this group of %d", size);
    err_call(qs_comm_reduce(world, buf, 3, QS_SUM, -1), "reduce root out of range", want);
    err_call(qs_comm_reduce_start(world, buf, 3, (qs_comm_op)7, 0, &(qs_comm_req){0}), "reduce unknown op",
             "qs_comm_reduce_start: unknown reduction 7");
    err_call(qs_comm_send(world, buf, 3, rank), "send to itself", "qs_comm_send: peer");
    err_call(qs_comm_recv(world, buf, 3, -1), "recv from -1", "qs_comm_recv: peer -1 is not a rank");
    err_call(qs_comm_sendrecv(world, buf, buf + 1, 3, rank, rank), "overlapping sendrecv",
             "qs_comm_sendrecv: send and recv overlap");
    float *all = alloc_floats(7 * (size_t)size);
    err_call(qs_comm_reduce_scatter(world, all, all + (size_t)rank * 7 + 1, 7, QS_SUM), "reduce_scatter overlap",
             "qs_comm_reduce_scatter: recv overlaps send");
    err_call(qs_comm_allgather(world, all + (size_t)rank * 7 + 1, all, 7), "allgather overlap",
             "qs_comm_allgather: send overlaps recv");
    free(all);
    qs_comm *sub;
    err_call(qs_comm_split(world, -1, 0, &sub), "negative color", "qs_comm_split: color -1 is negative");
    qs_comm *dp, *spg;
    err_call(qs_comm_mesh(world, 0, &dp, &spg), "sp 0", "sequence parallel size 0 must be at least 1");
    /* Nothing to move is not an error, even without buffers. */
    ok_call(qs_comm_allreduce(world, NULL, 0, QS_SUM), "allreduce of 0");
    ok_call(qs_comm_reduce_scatter(world, NULL, NULL, 0, QS_SUM), "reduce_scatter of 0");
    ok_call(qs_comm_allgather(world, NULL, NULL, 0), "allgather of 0");
    ok_call(qs_comm_broadcast(world, NULL, 0, 0), "broadcast of 0");
    ok_call(qs_comm_reduce(world, NULL, 0, QS_SUM, 0), "reduce of 0");
    ok_call(qs_comm_sendrecv(world, NULL, NULL, 0, 0, 0), "sendrecv of 0");
    ok_call(qs_comm_barrier(world), "qs_comm_barrier");
    report("bad arguments refused with one-line errors; empty calls succeed");
}

/* A failure inside MPI itself comes back as one line naming the call: rank 1 receives
 * fewer floats than rank 0 sends. */
static void check_mpi_error(void) {
    float buf[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    if (rank == 0) ok_call(qs_comm_send(world, buf, 8, 1), "qs_comm_send");
    if (rank == 1) {
        err_call(qs_comm_recv(world, buf, 4, 0), "truncated receive", "MPI_Recv: ");
        CHECK(strstr(qs_error_last(), "TRUNCATE") != NULL, "'%s' does not say truncated", qs_error_last());
    }
    report("an MPI failure becomes one error line naming the call");
}

/* The world from the launcher, and the refusals made before it exists. */
static void init(const char *kind) {
    const char *launched = getenv("OMPI_COMM_WORLD_SIZE");
    if (launched && atoi(launched) > 1) {
        char want[128];
        snprintf(want, sizeof want, "launched as %s ranks (OMPI_COMM_WORLD_SIZE) but the single backend", launched);
        err_call(qs_comm_init(&world, QS_COMM_SINGLE), "single under a launch of several", want);
        CHECK(world == NULL, "a world was made anyway");
    }
    if (qs_comm_init(&world, strcmp(kind, "nccl") ? QS_COMM_AUTO : QS_COMM_NCCL)) {
        printf("not ok - init: %s\n", qs_error_last());
        exit(1);
    }
    rank = qs_comm_rank(world);
    size = qs_comm_size(world);
    snprintf(label, sizeof label, "%s np=%d", kind, size);
    CHECK(!strcmp(qs_comm_name(world), kind), "the world is %s, expected %s", qs_comm_name(world), kind);
    const char *lr = getenv("OMPI_COMM_WORLD_LOCAL_RANK"), *ls = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    int want_lr = lr ? atoi(lr) : 0, want_ls = ls ? atoi(ls) : 1;
    CHECK(qs_comm_local_rank(world) == want_lr && qs_comm_local_size(world) == want_ls,
          "local rank %d of %d, the launcher says %d of %d", qs_comm_local_rank(world), qs_comm_local_size(world),
          want_lr, want_ls);
    share_seed("comm_test");
    report("init: the world is %s, rank %d..%d, local ranks from the launcher", kind, 0, size - 1);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: comm_test single|mpi|nccl\n");
        return 2;
    }
    init(argv[1]);
    int tag = 100;
    for (int op = QS_SUM; op <= QS_MAX; op++) {
        check_allreduce(tag++, (qs_comm_op)op, 1);
        check_allreduce(tag++, (qs_comm_op)op, 7);
        check_allreduce(tag++, (qs_comm_op)op, 1000003);
    }
    check_allreduce_start(tag += 2, 1000003);
    check_allreduce_host();
    const size_t chunks[] = {1, 7, 250001};
    for (int op = QS_SUM; op <= QS_MAX; op++)
        for (size_t i = 0; i < 3; i++) {
            check_reduce_scatter(tag++, (qs_comm_op)op, chunks[i], false);
            check_reduce_scatter(tag++, (qs_comm_op)op, chunks[i], true);
        }
    for (size_t i = 0; i < 3; i++) {
        check_allgather(tag++, chunks[i], false);
        check_allgather(tag++, chunks[i], true);
    }
    for (int root = 0; root < size; root++) check_broadcast(tag++, 7, root);
    check_broadcast(tag++, 1000003, size - 1);
    for (int root = 0; root < size; root++) check_reduce(tag++, root % 2 ? QS_MAX : QS_SUM, 7, root, root % 2);
    check_reduce(tag++, QS_SUM, 1000003, size - 1, true);
    if (size > 1) check_send_recv(tag += 2, 1000003);
    check_ring(tag++, 1001, false);
    check_ring(tag++, 100003, true);
    check_split();
    for (int sp = 1; sp <= size + 1; sp++) check_mesh(sp);
    check_errors();
    if (size > 1 && !strcmp(qs_comm_name(world), "mpi")) check_mpi_error();
    qs_comm_free(world);
    if (qs_comm_finalize()) {
        printf("not ok - finalize: %s\n", qs_error_last());
        return 1;
    }
    return failed_lines ? 1 : 0;
}

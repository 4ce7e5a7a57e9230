/* The MPI backend: CPU ranks, host buffers. Its groups return MPI errors instead of
 * aborting, so a failed call becomes one qs_error line naming it. */
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "comm_impl.h"
#include "quasar/error.h"

_Static_assert(sizeof(MPI_Request) <= sizeof(void *), "an MPI_Request must fit a qs_comm_req handle");

typedef struct {
    qs_comm base;
    MPI_Comm comm;
} mpi_group;

/* Point-to-point messages match in call order per (group, peer), so one tag serves all. */
enum { TAG = 0 };

static bool mpi_started; /* MPI_Init was ours, and so is MPI_Finalize */

static MPI_Comm comm_of(const qs_comm *c) { return ((const mpi_group *)c)->comm; }

static int fail(const char *call, int rc, const qs_comm *c) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "error %d", rc);
    return c ? qs_error("%s: %s (rank %d of %d)", call, msg, c->rank, c->size) : qs_error("%s: %s", call, msg);
}

/* MPI counts are ints (the CPU ranks this backend serves never come near); -1 past. */
static int count_of(const char *call, size_t n) {
    return n > INT_MAX ? qs_error("%s: %zu elements exceed MPI's int count", call, n) : (int)n;
}

static MPI_Datatype type_of(qs_comm_dtype t) {
    switch (t) {
    case QS_DT_F64: return MPI_DOUBLE;
    case QS_DT_I64: return MPI_INT64_T;
    case QS_DT_U8: return MPI_BYTE;
    case QS_DT_F32: break;
    }
    return MPI_FLOAT;
}

static MPI_Op op_of(qs_comm_op op) { return op == QS_MAX ? MPI_MAX : MPI_SUM; }

/* Requests live in the caller's qs_comm_req: two slots (a receive and a send). */
static void req_store(qs_comm_req *req, MPI_Request a, MPI_Request b) {
    memcpy(&req->handle[0], &a, sizeof a);
    memcpy(&req->handle[1], &b, sizeof b);
}

static int mpi_allreduce(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, qs_comm_op op, qs_comm_req *req) {
    int rc, count = count_of("MPI_Allreduce", n);
    if (count < 0) return -1;
    if (!req) {
        rc = MPI_Allreduce(MPI_IN_PLACE, buf, count, type_of(t), op_of(op), comm_of(c));
        return rc == MPI_SUCCESS ? 0 : fail("MPI_Allreduce", rc, c);
    }
    MPI_Request r;
    rc = MPI_Iallreduce(MPI_IN_PLACE, buf, count, type_of(t), op_of(op), comm_of(c), &r);
    if (rc != MPI_SUCCESS) return fail("MPI_Iallreduce", rc, c);
    req_store(req, r, MPI_REQUEST_NULL);
    return 0;
}

static int mpi_reduce_scatter(qs_comm *c, const float *send, float *recv, size_t chunk, qs_comm_op op) {
    int rc, count = count_of("MPI_Reduce_scatter_block", chunk);
    if (count < 0) return -1;
    if (recv != send + (size_t)c->rank * chunk) {
        rc = MPI_Reduce_scatter_block(send, recv, count, MPI_FLOAT, op_of(op), comm_of(c));
        return rc == MPI_SUCCESS ? 0 : fail("MPI_Reduce_scatter_block", rc, c);
    }
    /* In place, MPI leaves the result at the start of the buffer; move it to this rank's
     * chunk, where NCCL leaves it and where the caller looks. */
    float *all = recv - (size_t)c->rank * chunk;
    rc = MPI_Reduce_scatter_block(MPI_IN_PLACE, all, count, MPI_FLOAT, op_of(op), comm_of(c));
    if (rc != MPI_SUCCESS) return fail("MPI_Reduce_scatter_block", rc, c);
    if (c->rank) memcpy(recv, all, chunk * sizeof *recv); /* disjoint: chunk floats apart */
    return 0;
}

static int mpi_allgather(qs_comm *c, const float *send, float *recv, size_t chunk) {
    int count = count_of("MPI_Allgather", chunk);
    if (count < 0) return -1;
    int rc = send == recv + (size_t)c->rank * chunk
                 ? MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, count, MPI_FLOAT, comm_of(c))
                 : MPI_Allgather(send, count, MPI_FLOAT, recv, count, MPI_FLOAT, comm_of(c));
    return rc == MPI_SUCCESS ? 0 : fail("MPI_Allgather", rc, c);
}

static int mpi_broadcast(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, int root) {
    int count = count_of("MPI_Bcast", n);
    if (count < 0) return -1;
    int rc = MPI_Bcast(buf, count, type_of(t), root, comm_of(c));
    return rc == MPI_SUCCESS ? 0 : fail("MPI_Bcast", rc, c);
}

/* In place at the root; the other ranks only send. */
static int mpi_reduce(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root, qs_comm_req *req) {
    int rc, count = count_of("MPI_Reduce", n);
    if (count < 0) return -1;
    const void *send = c->rank == root ? MPI_IN_PLACE : buf;
    if (!req) {
        rc = MPI_Reduce(send, buf, count, MPI_FLOAT, op_of(op), root, comm_of(c));
        return rc == MPI_SUCCESS ? 0 : fail("MPI_Reduce", rc, c);
    }
    MPI_Request r;
    rc = MPI_Ireduce(send, buf, count, MPI_FLOAT, op_of(op), root, comm_of(c), &r);
    if (rc != MPI_SUCCESS) return fail("MPI_Ireduce", rc, c);
    req_store(req, r, MPI_REQUEST_NULL);
    return 0;
}

static int mpi_send(qs_comm *c, const float *buf, size_t n, int peer) {
    int count = count_of("MPI_Send", n);
    if (count < 0) return -1;
    int rc = MPI_Send(buf, count, MPI_FLOAT, peer, TAG, comm_of(c));
    return rc == MPI_SUCCESS ? 0 : fail("MPI_Send", rc, c);
}

static int mpi_recv(qs_comm *c, float *buf, size_t n, int peer) {
    int count = count_of("MPI_Recv", n);
    if (count < 0) return -1;
    int rc = MPI_Recv(buf, count, MPI_FLOAT, peer, TAG, comm_of(c), MPI_STATUS_IGNORE);
    return rc == MPI_SUCCESS ? 0 : fail("MPI_Recv", rc, c);
}

static int mpi_sendrecv(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src,
                        qs_comm_req *req) {
    int rc, count = count_of("MPI_Sendrecv", n);
    if (count < 0) return -1;
    if (!req) {
        rc = MPI_Sendrecv(send, count, MPI_FLOAT, dst, TAG, recv, count, MPI_FLOAT, src, TAG, comm_of(c),
                          MPI_STATUS_IGNORE);
        return rc == MPI_SUCCESS ? 0 : fail("MPI_Sendrecv", rc, c);
    }
    MPI_Request r, s;
    rc = MPI_Irecv(recv, count, MPI_FLOAT, src, TAG, comm_of(c), &r);
    if (rc != MPI_SUCCESS) return fail("MPI_Irecv", rc, c);
    rc = MPI_Isend(send, count, MPI_FLOAT, dst, TAG, comm_of(c), &s);
    if (rc != MPI_SUCCESS) {
        fail("MPI_Isend", rc, c);
        MPI_Cancel(&r);
        MPI_Wait(&r, MPI_STATUS_IGNORE);
        return -1;
    }
    req_store(req, r, s);
    return 0;
}

static int mpi_wait(qs_comm_req *req) {
    MPI_Request r[2];
    memcpy(&r[0], &req->handle[0], sizeof r[0]);
    memcpy(&r[1], &req->handle[1], sizeof r[1]);
    int rc = MPI_Waitall(2, r, MPI_STATUSES_IGNORE);
    return rc == MPI_SUCCESS ? 0 : fail("MPI_Waitall", rc, req->comm);
}

static int mpi_barrier(qs_comm *c) {
    int rc = MPI_Barrier(comm_of(c));
    return rc == MPI_SUCCESS ? 0 : fail("MPI_Barrier", rc, c);
}

static int group_new(MPI_Comm comm, int local_rank, int local_size, qs_comm **out);

static int mpi_split(qs_comm *parent, int color, int key, qs_comm **sub) {
    MPI_Comm comm;
    int rc = MPI_Comm_split(comm_of(parent), color, key, &comm);
    if (rc != MPI_SUCCESS) return fail("MPI_Comm_split", rc, parent);
    return group_new(comm, parent->local_rank, parent->local_size, sub);
}

static void mpi_free(qs_comm *c) {
    int done = 0;
    MPI_Finalized(&done);
    if (!done) MPI_Comm_free(&((mpi_group *)c)->comm);
    free(c);
}

static const qs_comm_backend mpi_backend = {
    .name = "mpi",
    .allreduce = mpi_allreduce,
    .reduce_scatter = mpi_reduce_scatter,
    .allgather = mpi_allgather,
    .broadcast = mpi_broadcast,
    .reduce = mpi_reduce,
    .send = mpi_send,
    .recv = mpi_recv,
    .sendrecv = mpi_sendrecv,
    .wait = mpi_wait,
    .barrier = mpi_barrier,
    .split = mpi_split,
    .free = mpi_free,
};

/* Wraps comm (which it frees on failure). */
static int group_new(MPI_Comm comm, int local_rank, int local_size, qs_comm **out) {
    mpi_group *g = (mpi_group *)qs_comm_alloc(&mpi_backend, sizeof *g);
    if (!g) {
        MPI_Comm_free(&comm);
        return -1;
    }
    g->comm = comm;
    MPI_Comm_rank(comm, &g->base.rank);
    MPI_Comm_size(comm, &g->base.size);
    g->base.local_rank = local_rank;
    g->base.local_size = local_size;
    *out = &g->base;
    return 0;
}

int qs_comm_mpi_world(qs_comm **world, int launched, const char *var) {
    int rc, ready = 0;
    MPI_Initialized(&ready);
    if (!ready) {
        int provided;
        /* Funneled: only the thread that calls qs_comm talks to MPI, never OpenMP teams. */
        rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) return fail("MPI_Init_thread", rc, NULL);
        mpi_started = true;
    }
    /* A private copy of the world: our messages never meet another library's, and its
     * errors come back to us instead of aborting every rank. */
    MPI_Comm comm, node;
    rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm);
    if (rc != MPI_SUCCESS) return fail("MPI_Comm_dup", rc, NULL);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    int size, rank, local_rank, local_size;
    MPI_Comm_size(comm, &size);
    MPI_Comm_rank(comm, &rank);
    if (launched && launched != size) {
        MPI_Comm_free(&comm);
        /* e.g. srun starting an MPI without Slurm's PMI: every rank would run alone. */
        return qs_error("%s says %d ranks but MPI started %d: is MPI built for this launcher?", var, launched, size);
    }
    rc = MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    if (rc != MPI_SUCCESS) {
        MPI_Comm_free(&comm);
        return fail("MPI_Comm_split_type", rc, NULL);
    }
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_size(node, &local_size);
    MPI_Comm_free(&node);
    return group_new(comm, local_rank, local_size, world);
}

int qs_comm_mpi_finalize(void) {
    if (!mpi_started) return 0;
    mpi_started = false;
    int rc = MPI_Finalize();
    return rc == MPI_SUCCESS ? 0 : fail("MPI_Finalize", rc, NULL);
}

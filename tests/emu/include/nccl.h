/* An emulated NCCL for the emulated CUDA build (cuda_runtime_api.h here): the calls
 * csrc/comm_nccl.c makes, carried out over MPI between CPU ranks on "device" buffers,
 * which the emulation keeps in host memory. So `mpirun -np N quasar train --device cuda`
 * runs the NCCL backend's code, from the unique id's broadcast to the grouped send/recv
 * of the ring, without a GPU. Each call completes before it returns (the stream is not
 * modelled). Without MPI only one-rank communicators exist.
 *
 * Checked like the real library would fail: a unique id that did not come from rank 0's
 * ncclGetUniqueId, a rank count other than the launcher's, a communicator used after
 * ncclCommDestroy, and unbalanced ncclGroupStart / ncclGroupEnd. */
#ifndef QUASAR_EMU_NCCL_H
#define QUASAR_EMU_NCCL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef QS_HAVE_MPI
#include <mpi.h>
#endif

#include "cuda_runtime_api.h"

#define NCCL_VERSION(X, Y, Z) ((X) * 10000 + (Y) * 100 + (Z))
#define NCCL_VERSION_CODE NCCL_VERSION(2, 21, 5)

typedef enum { ncclSuccess = 0, ncclSystemError = 2, ncclInternalError = 3, ncclInvalidArgument = 4,
               ncclInvalidUsage = 5 } ncclResult_t;
typedef enum { ncclUint8 = 1, ncclInt64 = 4, ncclFloat32 = 7, ncclFloat64 = 8 } ncclDataType_t;
typedef enum { ncclSum = 0, ncclMax = 2 } ncclRedOp_t;
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct ncclConfig ncclConfig_t;

#define EMU_NCCL_MAGIC 0x6e63636c
struct emu_nccl_comm {
    int magic, rank, size;
#ifdef QS_HAVE_MPI
    MPI_Comm mpi; /* MPI_COMM_NULL for one rank */
#endif
};
typedef struct emu_nccl_comm *ncclComm_t;

static char emu_nccl_why[256]; /* ncclGetLastError's text */

static inline ncclResult_t emu_nccl_fail(ncclResult_t r, const char *why) {
    snprintf(emu_nccl_why, sizeof emu_nccl_why, "%s", why);
    return r;
}
static inline const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    }
    return "unknown result";
}
static inline const char *ncclGetLastError(ncclComm_t comm) {
    (void)comm;
    return emu_nccl_why;
}
static inline ncclResult_t emu_nccl_check(ncclComm_t c) {
    return c && c->magic == EMU_NCCL_MAGIC ? ncclSuccess
                                          : emu_nccl_fail(ncclInvalidArgument, "not a live communicator");
}

/* "emu-nccl", then what makes one id differ from another run's */
static inline ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "emu-nccl %ld %ld", (long)getpid(), (long)time(NULL));
    return ncclSuccess;
}

#ifdef QS_HAVE_MPI
static inline MPI_Datatype emu_nccl_mpi_type(ncclDataType_t t) {
    return t == ncclUint8 ? MPI_UINT8_T : t == ncclInt64 ? MPI_INT64_T : t == ncclFloat64 ? MPI_DOUBLE : MPI_FLOAT;
}
static inline ncclResult_t emu_nccl_mpi(int rc, const char *call) {
    return rc == MPI_SUCCESS ? ncclSuccess : emu_nccl_fail(ncclSystemError, call);
}
#endif
static inline size_t emu_nccl_size(ncclDataType_t t) {
    return t == ncclUint8 ? 1 : t == ncclFloat32 ? 4 : 8;
}

static inline ncclResult_t emu_nccl_new(ncclComm_t *out, int rank, int size) {
    if (!(*out = calloc(1, sizeof **out))) return emu_nccl_fail(ncclSystemError, "out of memory");
    (*out)->magic = EMU_NCCL_MAGIC;
    (*out)->rank = rank;
    (*out)->size = size;
#ifdef QS_HAVE_MPI
    (*out)->mpi = MPI_COMM_NULL;
#endif
    return ncclSuccess;
}

/* Every rank must hold rank 0's id: the comparison is the launcher world's. */
static inline ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
    *comm = NULL;
    if (strncmp(id.internal, "emu-nccl ", 9)) return emu_nccl_fail(ncclInvalidArgument, "not a unique id");
    if (nranks < 1 || rank < 0 || rank >= nranks) return emu_nccl_fail(ncclInvalidArgument, "bad rank or count");
    if (nranks == 1) return emu_nccl_new(comm, 0, 1);
#ifdef QS_HAVE_MPI
    int world_size = 0, world_rank = -1;
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    if (world_size != nranks || world_rank != rank)
        return emu_nccl_fail(ncclInvalidArgument, "ranks other than the launcher's world");
    ncclUniqueId root;
    memcpy(&root, &id, sizeof id);
    ncclResult_t r = emu_nccl_mpi(MPI_Bcast(&root, sizeof root, MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast");
    int same = !memcmp(&root, &id, sizeof id), all = 0;
    if (!r) r = emu_nccl_mpi(MPI_Allreduce(&same, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
    if (!r && !all) r = emu_nccl_fail(ncclInvalidArgument, "the ranks hold different unique ids");
    if (!r) r = emu_nccl_new(comm, rank, nranks);
    if (!r && (r = emu_nccl_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &(*comm)->mpi), "MPI_Comm_dup"))) {
        free(*comm);
        *comm = NULL;
    }
    return r;
#else
    return emu_nccl_fail(ncclInvalidArgument, "several ranks need MPI in the emulation");
#endif
}

static inline ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm,
                                         ncclConfig_t *config) {
    (void)config;
    *newcomm = NULL;
    ncclResult_t r = emu_nccl_check(comm);
    if (r) return r;
    if (comm->size == 1) return color < 0 ? ncclSuccess : emu_nccl_new(newcomm, 0, 1);
#ifdef QS_HAVE_MPI
    MPI_Comm sub;
    if ((r = emu_nccl_mpi(MPI_Comm_split(comm->mpi, color < 0 ? MPI_UNDEFINED : color, key, &sub),
                          "MPI_Comm_split")) ||
        sub == MPI_COMM_NULL)
        return r;
    int rank, size;
    MPI_Comm_rank(sub, &rank);
    MPI_Comm_size(sub, &size);
    if ((r = emu_nccl_new(newcomm, rank, size))) {
        MPI_Comm_free(&sub);
        return r;
    }
    if (size == 1) MPI_Comm_free(&sub);
    else (*newcomm)->mpi = sub;
#endif
    return r;
}

static inline ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    ncclResult_t r = emu_nccl_check(comm);
    if (r) return r;
#ifdef QS_HAVE_MPI
    if (comm->mpi != MPI_COMM_NULL) MPI_Comm_free(&comm->mpi);
#endif
    comm->magic = 0;
    free(comm);
    return ncclSuccess;
}

/* ---- collectives: one rank copies; several go through MPI on the same buffers ---- */

static inline ncclResult_t ncclAllReduce(const void *send, void *recv, size_t n, ncclDataType_t t, ncclRedOp_t op,
                                         ncclComm_t comm, cudaStream_t stream) {
    (void)op;
    ncclResult_t r = emu_nccl_check(comm);
    if (r || emu_stream_check(stream)) return r ? r : emu_nccl_fail(ncclInvalidArgument, "bad stream");
    if (comm->size == 1) {
        if (send != recv) memmove(recv, send, n * emu_nccl_size(t));
        return ncclSuccess;
    }
#ifdef QS_HAVE_MPI
    return emu_nccl_mpi(MPI_Allreduce(send == recv ? MPI_IN_PLACE : send, recv, (int)n, emu_nccl_mpi_type(t),
                                      op == ncclMax ? MPI_MAX : MPI_SUM, comm->mpi),
                        "MPI_Allreduce");
#endif
    return ncclInternalError;
}

/* In place when recv == send + rank * n: MPI's in-place form leaves the result at the
 * front of the whole buffer, so it moves to the rank's chunk. */
static inline ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t n, ncclDataType_t t,
                                             ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    (void)op;
    ncclResult_t r = emu_nccl_check(comm);
    if (r || emu_stream_check(stream)) return r ? r : emu_nccl_fail(ncclInvalidArgument, "bad stream");
    const size_t bytes = n * emu_nccl_size(t);
    const int in_place = (const char *)recv == (const char *)send + (size_t)comm->rank * bytes;
    if (comm->size == 1) {
        if (!in_place) memmove(recv, send, bytes);
        return ncclSuccess;
    }
#ifdef QS_HAVE_MPI
    MPI_Op mop = op == ncclMax ? MPI_MAX : MPI_SUM;
    if (!in_place)
        return emu_nccl_mpi(MPI_Reduce_scatter_block(send, recv, (int)n, emu_nccl_mpi_type(t), mop, comm->mpi),
                            "MPI_Reduce_scatter_block");
    r = emu_nccl_mpi(MPI_Reduce_scatter_block(MPI_IN_PLACE, (void *)send, (int)n, emu_nccl_mpi_type(t), mop,
                                              comm->mpi),
                     "MPI_Reduce_scatter_block");
    if (!r) memmove(recv, send, bytes);
    return r;
#endif
    return ncclInternalError;
}

static inline ncclResult_t ncclAllGather(const void *send, void *recv, size_t n, ncclDataType_t t, ncclComm_t comm,
                                         cudaStream_t stream) {
    ncclResult_t r = emu_nccl_check(comm);
    if (r || emu_stream_check(stream)) return r ? r : emu_nccl_fail(ncclInvalidArgument, "bad stream");
    const size_t bytes = n * emu_nccl_size(t);
    const int in_place = (const char *)send == (const char *)recv + (size_t)comm->rank * bytes;
    if (comm->size == 1) {
        if (!in_place) memmove(recv, send, bytes);
        return ncclSuccess;
    }
#ifdef QS_HAVE_MPI
    return emu_nccl_mpi(MPI_Allgather(in_place ? MPI_IN_PLACE : send, (int)n, emu_nccl_mpi_type(t), recv, (int)n,
                                      emu_nccl_mpi_type(t), comm->mpi),
                        "MPI_Allgather");
#endif
    return ncclInternalError;
}

static inline ncclResult_t ncclBroadcast(const void *send, void *recv, size_t n, ncclDataType_t t, int root,
                                         ncclComm_t comm, cudaStream_t stream) {
    ncclResult_t r = emu_nccl_check(comm);
    if (r || emu_stream_check(stream)) return r ? r : emu_nccl_fail(ncclInvalidArgument, "bad stream");
    if (root < 0 || root >= comm->size) return emu_nccl_fail(ncclInvalidArgument, "root out of range");
    if (comm->rank == root && send != recv) memmove(recv, send, n * emu_nccl_size(t));
    if (comm->size == 1) return ncclSuccess;
#ifdef QS_HAVE_MPI
    return emu_nccl_mpi(MPI_Bcast(recv, (int)n, emu_nccl_mpi_type(t), root, comm->mpi), "MPI_Bcast");
#endif
    return ncclInternalError;
}

/* recv is written on root only; in place when send == recv. */
static inline ncclResult_t ncclReduce(const void *send, void *recv, size_t n, ncclDataType_t t, ncclRedOp_t op,
                                      int root, ncclComm_t comm, cudaStream_t stream) {
    (void)op;
    ncclResult_t r = emu_nccl_check(comm);
    if (r || emu_stream_check(stream)) return r ? r : emu_nccl_fail(ncclInvalidArgument, "bad stream");
    if (root < 0 || root >= comm->size) return emu_nccl_fail(ncclInvalidArgument, "root out of range");
    if (comm->size == 1) {
        if (send != recv) memmove(recv, send, n * emu_nccl_size(t));
        return ncclSuccess;
    }
#ifdef QS_HAVE_MPI
    const int at_root = comm->rank == root;
    return emu_nccl_mpi(MPI_Reduce(at_root && send == recv ? MPI_IN_PLACE : send, at_root ? recv : NULL, (int)n,
                                   emu_nccl_mpi_type(t), op == ncclMax ? MPI_MAX : MPI_SUM, root, comm->mpi),
                        "MPI_Reduce");
#endif
    return ncclInternalError;
}

/* ---- point to point: alone, or queued between ncclGroupStart and ncclGroupEnd ---- */

#define EMU_NCCL_GROUP_MAX 16
static struct emu_nccl_p2p {
    int send;
    void *buf;
    size_t n;
    ncclDataType_t t;
    int peer;
    ncclComm_t comm;
} emu_nccl_queue[EMU_NCCL_GROUP_MAX];
static int emu_nccl_depth, emu_nccl_queued;

static inline ncclResult_t emu_nccl_p2p_now(const struct emu_nccl_p2p *ops, int count) {
    ncclResult_t r = ncclSuccess;
#ifdef QS_HAVE_MPI
    MPI_Request req[EMU_NCCL_GROUP_MAX];
    int posted = 0;
    for (int i = 0; i < count && !r; i++) {
        const struct emu_nccl_p2p *o = &ops[i];
        if (o->comm->size == 1) continue; /* to itself: the pair's copy comes below */
        int n = (int)o->n;
        r = o->send ? emu_nccl_mpi(MPI_Isend(o->buf, n, emu_nccl_mpi_type(o->t), o->peer, 0, o->comm->mpi, &req[posted]),
                                   "MPI_Isend")
                    : emu_nccl_mpi(MPI_Irecv(o->buf, n, emu_nccl_mpi_type(o->t), o->peer, 0, o->comm->mpi, &req[posted]),
                                   "MPI_Irecv");
        posted += !r;
    }
    if (posted) { /* a one-rank world may run without MPI */
        ncclResult_t w = emu_nccl_mpi(MPI_Waitall(posted, req, MPI_STATUSES_IGNORE), "MPI_Waitall");
        if (!r) r = w;
    }
#endif
    /* one rank: a send to itself meets the receive of the same group */
    for (int i = 0; i < count && !r; i++)
        if (ops[i].comm->size == 1 && ops[i].send) {
            int j = 0;
            while (j < count && (ops[j].send || ops[j].comm != ops[i].comm)) j++;
            if (j == count) return emu_nccl_fail(ncclInvalidUsage, "a send to itself without its receive");
            memmove(ops[j].buf, ops[i].buf, ops[i].n * emu_nccl_size(ops[i].t));
        }
    return r;
}

static inline ncclResult_t emu_nccl_p2p(int send, const void *buf, size_t n, ncclDataType_t t, int peer,
                                        ncclComm_t comm, cudaStream_t stream) {
    ncclResult_t r = emu_nccl_check(comm);
    if (r || emu_stream_check(stream)) return r ? r : emu_nccl_fail(ncclInvalidArgument, "bad stream");
    if (peer < 0 || peer >= comm->size) return emu_nccl_fail(ncclInvalidArgument, "peer out of range");
    struct emu_nccl_p2p op = {send, (void *)buf, n, t, peer, comm};
    if (!emu_nccl_depth) return emu_nccl_p2p_now(&op, 1);
    if (emu_nccl_queued == EMU_NCCL_GROUP_MAX) return emu_nccl_fail(ncclInternalError, "group too large");
    emu_nccl_queue[emu_nccl_queued++] = op;
    return ncclSuccess;
}
static inline ncclResult_t ncclSend(const void *buf, size_t n, ncclDataType_t t, int peer, ncclComm_t comm,
                                    cudaStream_t stream) {
    return emu_nccl_p2p(1, buf, n, t, peer, comm, stream);
}
static inline ncclResult_t ncclRecv(void *buf, size_t n, ncclDataType_t t, int peer, ncclComm_t comm,
                                    cudaStream_t stream) {
    return emu_nccl_p2p(0, buf, n, t, peer, comm, stream);
}
static inline ncclResult_t ncclGroupStart(void) {
    emu_nccl_depth++;
    return ncclSuccess;
}
static inline ncclResult_t ncclGroupEnd(void) {
    if (emu_nccl_depth == 0) return emu_nccl_fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--emu_nccl_depth) return ncclSuccess;
    const int count = emu_nccl_queued;
    emu_nccl_queued = 0;
    return emu_nccl_p2p_now(emu_nccl_queue, count);
}

#endif

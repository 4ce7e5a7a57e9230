/* The NCCL backend: GPU buffers, one CUDA stream per group. Its ranks and host-side
 * values come from a twin group over the same ranks (MPI under a launcher, else single),
 * which also carries the NCCL id from rank 0 to the others.
 *
 * Streams: each call first orders the group's stream after the work already queued on
 * the legacy default stream (where the buffers are produced); a blocking call returns
 * once its result is in memory, a started one once qs_comm_wait has seen its event. */
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "comm_impl.h"
#include "quasar/error.h"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "the NCCL backend needs NCCL 2.18 or newer (ncclCommSplit)"
#endif

typedef struct {
    qs_comm base;
    ncclComm_t nccl;
    cudaStream_t stream;
    cudaEvent_t ready; /* the producers' work this group's next call waits for */
} nccl_group;

static nccl_group *group_of(qs_comm *c) { return (nccl_group *)c; }

/* "call: message", the call's name cut from the expression that failed. */
static int fail(const char *expr, const char *msg, const char *detail) {
    int name = (int)strcspn(expr, "(");
    int line = detail ? (int)strcspn(detail, "\n") : 0; /* NCCL's detail may run over lines */
    return qs_error("%.*s: %s%s%.*s", name, expr, msg, line ? ": " : "", line, line ? detail : "");
}

#define CUDA_TRY(call)                                                                           \
    do {                                                                                         \
        cudaError_t e_ = (call);                                                                 \
        if (e_ != cudaSuccess) return fail(#call, cudaGetErrorString(e_), NULL);                 \
    } while (0)
#define NCCL_TRY(comm, call)                                                                     \
    do {                                                                                         \
        ncclResult_t r_ = (call);                                                                \
        if (r_ != ncclSuccess) return fail(#call, ncclGetErrorString(r_), ncclGetLastError(comm)); \
    } while (0)

static ncclDataType_t type_of(qs_comm_dtype t) {
    switch (t) {
    case QS_DT_F64: return ncclFloat64;
    case QS_DT_I64: return ncclInt64;
    case QS_DT_U8: return ncclUint8;
    case QS_DT_F32: break;
    }
    return ncclFloat32;
}

static ncclRedOp_t op_of(qs_comm_op op) { return op == QS_MAX ? ncclMax : ncclSum; }

static int after_producers(nccl_group *g) {
    CUDA_TRY(cudaEventRecord(g->ready, cudaStreamLegacy));
    CUDA_TRY(cudaStreamWaitEvent(g->stream, g->ready, 0));
    return 0;
}

/* Blocking: wait for the stream. Started: an event for qs_comm_wait. */
static int finish(nccl_group *g, qs_comm_req *req) {
    if (!req) {
        CUDA_TRY(cudaStreamSynchronize(g->stream));
        return 0;
    }
    cudaEvent_t done;
    CUDA_TRY(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    cudaError_t e = cudaEventRecord(done, g->stream);
    if (e != cudaSuccess) {
        cudaEventDestroy(done);
        return fail("cudaEventRecord", cudaGetErrorString(e), NULL);
    }
    req->handle[0] = done;
    return 0;
}

static int nccl_allreduce(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, qs_comm_op op, qs_comm_req *req) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    NCCL_TRY(g->nccl, ncclAllReduce(buf, buf, n, type_of(t), op_of(op), g->nccl, g->stream));
    return finish(g, req);
}

/* NCCL's in-place layouts are the ones comm.h promises. */
static int nccl_reduce_scatter(qs_comm *c, const float *send, float *recv, size_t chunk, qs_comm_op op) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    NCCL_TRY(g->nccl, ncclReduceScatter(send, recv, chunk, ncclFloat32, op_of(op), g->nccl, g->stream));
    return finish(g, NULL);
}

static int nccl_allgather(qs_comm *c, const float *send, float *recv, size_t chunk) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    NCCL_TRY(g->nccl, ncclAllGather(send, recv, chunk, ncclFloat32, g->nccl, g->stream));
    return finish(g, NULL);
}

static int nccl_broadcast(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, int root) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    NCCL_TRY(g->nccl, ncclBroadcast(buf, buf, n, type_of(t), root, g->nccl, g->stream));
    return finish(g, NULL);
}

static int nccl_reduce(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root, qs_comm_req *req) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    NCCL_TRY(g->nccl, ncclReduce(buf, buf, n, ncclFloat32, op_of(op), root, g->nccl, g->stream));
    return finish(g, req);
}

static int nccl_send(qs_comm *c, const float *buf, size_t n, int peer) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    NCCL_TRY(g->nccl, ncclSend(buf, n, ncclFloat32, peer, g->nccl, g->stream));
    return finish(g, NULL);
}

static int nccl_recv(qs_comm *c, float *buf, size_t n, int peer) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    NCCL_TRY(g->nccl, ncclRecv(buf, n, ncclFloat32, peer, g->nccl, g->stream));
    return finish(g, NULL);
}

static int nccl_sendrecv(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src,
                         qs_comm_req *req) {
    nccl_group *g = group_of(c);
    if (after_producers(g)) return -1;
    /* One group, so that every rank's send and receive progress together. */
    NCCL_TRY(g->nccl, ncclGroupStart());
    ncclResult_t rs = ncclSend(send, n, ncclFloat32, dst, g->nccl, g->stream);
    ncclResult_t rr = ncclRecv(recv, n, ncclFloat32, src, g->nccl, g->stream);
    NCCL_TRY(g->nccl, ncclGroupEnd());
    NCCL_TRY(g->nccl, rs);
    NCCL_TRY(g->nccl, rr);
    return finish(g, req);
}

static int nccl_wait(qs_comm_req *req) {
    cudaEvent_t done = req->handle[0];
    cudaError_t e = cudaEventSynchronize(done);
    cudaEventDestroy(done);
    return e == cudaSuccess ? 0 : fail("cudaEventSynchronize", cudaGetErrorString(e), NULL);
}

/* Everything queued on this group has finished on every rank. */
static int nccl_barrier(qs_comm *c) {
    CUDA_TRY(cudaStreamSynchronize(group_of(c)->stream));
    return c->host->be->barrier(c->host);
}

static void nccl_free(qs_comm *c) {
    nccl_group *g = group_of(c);
    if (g->nccl) ncclCommDestroy(g->nccl);
    if (g->ready) cudaEventDestroy(g->ready);
    if (g->stream) cudaStreamDestroy(g->stream);
    qs_comm_free(c->host);
    free(g);
}

static int group_new(qs_comm *host, ncclComm_t nccl, qs_comm **out);

static int nccl_split(qs_comm *parent, int color, int key, qs_comm **sub) {
    qs_comm *host;
    if (qs_comm_split(parent->host, color, key, &host)) return -1;
    ncclComm_t nccl;
    ncclResult_t r = ncclCommSplit(group_of(parent)->nccl, color, key, &nccl, NULL);
    if (r != ncclSuccess) {
        qs_comm_free(host);
        return fail("ncclCommSplit", ncclGetErrorString(r), ncclGetLastError(group_of(parent)->nccl));
    }
    if (group_new(host, nccl, sub)) {
        qs_comm_free(host);
        return -1;
    }
    return 0;
}

static const qs_comm_backend nccl_backend = {
    .name = "nccl",
    .allreduce = nccl_allreduce,
    .reduce_scatter = nccl_reduce_scatter,
    .allgather = nccl_allgather,
    .broadcast = nccl_broadcast,
    .reduce = nccl_reduce,
    .send = nccl_send,
    .recv = nccl_recv,
    .sendrecv = nccl_sendrecv,
    .wait = nccl_wait,
    .barrier = nccl_barrier,
    .split = nccl_split,
    .free = nccl_free,
};

/* Wraps nccl with its stream and event; takes host over on success, destroys nccl on
 * failure. */
static int group_new(qs_comm *host, ncclComm_t nccl, qs_comm **out) {
    nccl_group *g = (nccl_group *)qs_comm_alloc(&nccl_backend, sizeof *g);
    if (!g) {
        ncclCommDestroy(nccl);
        return -1;
    }
    g->nccl = nccl;
    cudaError_t e = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking);
    const char *call = "cudaStreamCreateWithFlags";
    if (e == cudaSuccess) {
        e = cudaEventCreateWithFlags(&g->ready, cudaEventDisableTiming);
        call = "cudaEventCreateWithFlags";
    }
    if (e != cudaSuccess) {
        g->base.host = NULL; /* the caller keeps host */
        nccl_free(&g->base);
        return fail(call, cudaGetErrorString(e), NULL);
    }
    g->base.rank = host->rank;
    g->base.size = host->size;
    g->base.local_rank = host->local_rank;
    g->base.local_size = host->local_size;
    g->base.host = host;
    *out = &g->base;
    return 0;
}

int qs_comm_nccl_world(qs_comm *host, qs_comm **world) {
    int devices = 0;
    cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0)
        return qs_error("no CUDA device is visible (cudaGetDeviceCount: %s)",
                        e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    /* One GPU per rank: the ranks of a node take its visible GPUs in turn. */
    CUDA_TRY(cudaSetDevice(host->local_rank % devices));
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (host->rank == 0) NCCL_TRY(NULL, ncclGetUniqueId(&id));
    if (host->be->broadcast(host, &id, sizeof id, QS_DT_U8, 0)) return -1;
    ncclComm_t nccl;
    NCCL_TRY(NULL, ncclCommInitRank(&nccl, host->size, id, host->rank));
    return group_new(host, nccl, world);
}

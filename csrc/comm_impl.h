/* Inside the comm layer: a group is a backend's table of operations plus its own state.
 * comm.c checks arguments and dispatches; the backends (single in comm.c, comm_mpi.c,
 * comm_nccl.c) see only valid calls with n > 0. */
#ifndef QUASAR_COMM_IMPL_H
#define QUASAR_COMM_IMPL_H

#include "quasar/comm.h"

typedef enum { QS_DT_F32, QS_DT_F64, QS_DT_I64, QS_DT_U8 } qs_comm_dtype;

typedef struct qs_comm_backend {
    const char *name;
    /* req NULL: blocking; otherwise started, finished by wait. */
    int (*allreduce)(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, qs_comm_op op, qs_comm_req *req);
    int (*reduce_scatter)(qs_comm *c, const float *send, float *recv, size_t chunk, qs_comm_op op);
    int (*allgather)(qs_comm *c, const float *send, float *recv, size_t chunk);
    int (*broadcast)(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, int root);
    int (*reduce)(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root, qs_comm_req *req);
    int (*send)(qs_comm *c, const float *buf, size_t n, int peer);
    int (*recv)(qs_comm *c, float *buf, size_t n, int peer);
    int (*sendrecv)(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src, qs_comm_req *req);
    int (*wait)(qs_comm_req *req);
    int (*barrier)(qs_comm *c);
    int (*split)(qs_comm *parent, int color, int key, qs_comm **sub);
    void (*free)(qs_comm *c);
} qs_comm_backend;

/* Backends allocate a larger struct that starts with this one. */
struct qs_comm {
    const qs_comm_backend *be;
    int rank, size, local_rank, local_size;
    /* The group that carries host-memory values (allreduce_f64/_i64): the group itself,
     * or for NCCL its MPI (or single) twin over the same ranks. */
    qs_comm *host;
};

/* A zeroed group of `bytes` (>= sizeof(qs_comm)) with host = itself; NULL + qs_error. */
qs_comm *qs_comm_alloc(const qs_comm_backend *be, size_t bytes);

#ifdef QS_HAVE_MPI
/* MPI_COMM_WORLD's group (MPI initialised here unless the program did it already).
 * launched: the rank count the launcher announced in `var` (0: none), checked. */
int qs_comm_mpi_world(qs_comm **world, int launched, const char *var);
int qs_comm_mpi_finalize(void);
#endif
#ifdef QS_HAVE_NCCL
/* The NCCL world over host's ranks; it takes host over on success. */
int qs_comm_nccl_world(qs_comm *host, qs_comm **world);
#endif

#endif

/* Communication between ranks: a process group (qs_comm) and the collectives that
 * multi-rank training needs, over one of three backends:
 *   single  one process, no peers; collectives are no-ops or local copies (host memory).
 *   mpi     CPU ranks over MPI (host memory); also how the parallel logic is tested.
 *   nccl    GPU ranks over NCCL (device memory, one stream per group); MPI starts the
 *           ranks and carries the NCCL id from rank 0 and the host-side values.
 * Every call is collective over its group unless it names a peer: all ranks make the
 * same calls in the same order with the same counts. Functions return 0, or -1 with a
 * one-line qs_error naming the failed call (e.g. "MPI_Allreduce: ..."). */
#ifndef QUASAR_COMM_H
#define QUASAR_COMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    QS_COMM_AUTO,   /* mpi when a launcher started this process and MPI is built in, else single */
    QS_COMM_SINGLE,
    QS_COMM_MPI,
    QS_COMM_NCCL,
} qs_comm_kind;

typedef enum { QS_SUM, QS_MAX } qs_comm_op;

typedef struct qs_comm qs_comm;

/* An operation in flight, started by a qs_comm_*_start call (which fills it in). Its
 * buffers belong to the operation until qs_comm_wait returns. */
typedef struct qs_comm_req {
    qs_comm *comm;   /* NULL when nothing is in flight */
    void *handle[2]; /* the backend's: MPI requests or a CUDA event */
} qs_comm_req;

/* The world group. Under mpirun / srun (OMPI_COMM_WORLD_SIZE, PMI_SIZE or
 * SLURM_STEP_NUM_TASKS set) rank and size come from MPI, and the local rank (this
 * process's index among the ranks on its node) from MPI's shared-memory split. A launch
 * of several ranks is refused by the single backend and by a build without MPI, so N
 * copies of one run never write the same folder. nccl puts rank r on GPU
 * local_rank % (GPUs visible). Call once per process. */
int qs_comm_init(qs_comm **world, qs_comm_kind kind);
/* Whether this build has the backend (single and auto always). */
bool qs_comm_built(qs_comm_kind kind);
/* Frees a group (sub-groups before the world they came from); NULL is fine. */
void qs_comm_free(qs_comm *c);
/* Ends MPI if qs_comm_init started it; after every group is freed. */
int qs_comm_finalize(void);

int qs_comm_rank(const qs_comm *c);
int qs_comm_size(const qs_comm *c);
/* This process's rank and rank count on its node (the same in every group). */
int qs_comm_local_rank(const qs_comm *c);
int qs_comm_local_size(const qs_comm *c);
/* "single", "mpi" or "nccl". */
const char *qs_comm_name(const qs_comm *c);

/* Splits parent into groups of the ranks that pass the same color (>= 0), ranked by key
 * (ties by parent rank). */
int qs_comm_split(qs_comm *parent, int color, int key, qs_comm **sub);
/* The data-parallel x sequence-parallel mesh: sp groups are sp consecutive world ranks,
 * so world rank = dp_rank * sp + sp_rank, and the ring's heavy per-layer K/V traffic stays
 * among neighbours (one node when sp <= GPUs per node); dp groups take one rank from
 * each sp group. The world size must be a multiple of sp. */
int qs_comm_mesh(qs_comm *world, int sp, qs_comm **dp_group, qs_comm **sp_group);

/* buf[n] (backend memory) = op over the ranks' buf[n], in place. */
int qs_comm_allreduce(qs_comm *c, float *buf, size_t n, qs_comm_op op);
/* The same on host memory in every backend, for losses, counts and counters. */
int qs_comm_allreduce_f64(qs_comm *c, double *buf, size_t n, qs_comm_op op);
int qs_comm_allreduce_i64(qs_comm *c, int64_t *buf, size_t n, qs_comm_op op);

/* send[size * chunk] holds one chunk per rank; recv[chunk] = op over the ranks of their
 * chunk number `rank`. In place when recv == send + rank * chunk (the rest of send is
 * then undefined), otherwise the buffers must not overlap. */
int qs_comm_reduce_scatter(qs_comm *c, const float *send, float *recv, size_t chunk, qs_comm_op op);
/* recv[size * chunk]: rank r's send[chunk] lands at recv + r * chunk. In place when
 * send == recv + rank * chunk, otherwise the buffers must not overlap. */
int qs_comm_allgather(qs_comm *c, const float *send, float *recv, size_t chunk);
/* buf[n] = root's buf[n]. */
int qs_comm_broadcast(qs_comm *c, float *buf, size_t n, int root);
/* root's buf[n] = op over the ranks' buf[n], in place; the other ranks' buf is unchanged.
 * ZeRO-1's gradient buckets: each piece goes to the rank that owns it. */
int qs_comm_reduce(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root);

/* Point to point with another rank of the group (matched in call order). */
int qs_comm_send(qs_comm *c, const float *buf, size_t n, int peer);
int qs_comm_recv(qs_comm *c, float *buf, size_t n, int peer);
/* Sends send[n] to dst while receiving recv[n] from src (e.g. next and previous in a
 * ring; dst = src = this rank is a copy); the buffers must not overlap. */
int qs_comm_sendrecv(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src);

/* Non-blocking forms, to overlap communication with compute (gradient buckets during
 * the backward pass, the next K/V block during ring attention): start, compute, wait. */
int qs_comm_allreduce_start(qs_comm *c, float *buf, size_t n, qs_comm_op op, qs_comm_req *req);
int qs_comm_reduce_start(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root, qs_comm_req *req);
int qs_comm_sendrecv_start(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src,
                           qs_comm_req *req);
/* Waits for req's operation; a request with nothing in flight returns at once. */
int qs_comm_wait(qs_comm_req *req);

int qs_comm_barrier(qs_comm *c);

#endif

/* The comm layer's front: argument checks, dispatch to the group's backend, the
 * single-process backend, and the mesh. */
#include "quasar/comm.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "comm_impl.h"
#include "quasar/error.h"

qs_comm *qs_comm_alloc(const qs_comm_backend *be, size_t bytes) {
    qs_comm *c = calloc(1, bytes);
    if (!c) {
        qs_error("out of memory for a process group");
        return NULL;
    }
    c->be = be;
    c->host = c;
    return c;
}

/* ---- the single backend: one rank, host memory ---- */

static int single_allreduce(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, qs_comm_op op, qs_comm_req *req) {
    (void)c, (void)buf, (void)n, (void)t, (void)op, (void)req;
    return 0;
}

static int single_reduce_scatter(qs_comm *c, const float *send, float *recv, size_t chunk, qs_comm_op op) {
    (void)c, (void)op;
    memmove(recv, send, chunk * sizeof *recv); /* nothing to do in place */
    return 0;
}

static int single_allgather(qs_comm *c, const float *send, float *recv, size_t chunk) {
    (void)c;
    memmove(recv, send, chunk * sizeof *recv);
    return 0;
}

static int single_broadcast(qs_comm *c, void *buf, size_t n, qs_comm_dtype t, int root) {
    (void)c, (void)buf, (void)n, (void)t, (void)root;
    return 0;
}

static int single_reduce(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root, qs_comm_req *req) {
    (void)c, (void)buf, (void)n, (void)op, (void)root, (void)req;
    return 0;
}

static int single_sendrecv(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src,
                           qs_comm_req *req) {
    (void)c, (void)dst, (void)src, (void)req;
    memcpy(recv, send, n * sizeof *recv); /* a ring of one: to and from itself */
    return 0;
}

static int single_wait(qs_comm_req *req) {
    (void)req;
    return 0;
}

static int single_barrier(qs_comm *c) {
    (void)c;
    return 0;
}

static int single_new(qs_comm **out);

static int single_split(qs_comm *parent, int color, int key, qs_comm **sub) {
    (void)parent, (void)color, (void)key;
    return single_new(sub);
}

static void single_free(qs_comm *c) { free(c); }

static const qs_comm_backend single_backend = {
    .name = "single",
    .allreduce = single_allreduce,
    .reduce_scatter = single_reduce_scatter,
    .allgather = single_allgather,
    .broadcast = single_broadcast,
    .reduce = single_reduce,
    /* send and recv stay NULL: their only possible peer is the rank itself, refused below. */
    .sendrecv = single_sendrecv,
    .wait = single_wait,
    .barrier = single_barrier,
    .split = single_split,
    .free = single_free,
};

static int single_new(qs_comm **out) {
    qs_comm *c = qs_comm_alloc(&single_backend, sizeof *c);
    if (!c) return -1;
    c->size = c->local_size = 1;
    *out = c;
    return 0;
}

/* ---- creation ---- */

/* The rank count a launcher announced (0: not launched by one); its variable in *var. */
static int launched_ranks(const char **var) {
    /* Open MPI's mpirun; MPICH / Intel MPI (hydra) and Slurm's PMI; srun's job step
     * (SLURM_NTASKS alone is also set in an sbatch script's own shell, not a launch). */
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
        const char *v = getenv(vars[i]);
        if (!v || !*v) continue;
        char *end;
        errno = 0;
        long n = strtol(v, &end, 10);
        if (*end || errno || n < 1 || n > INT32_MAX)
            return qs_error("%s=%s is not a rank count", vars[i], v);
        *var = vars[i];
        return (int)n;
    }
    return 0;
}

#ifdef QS_HAVE_MPI
static const bool have_mpi = true;
#else
static const bool have_mpi = false;
#endif
#ifdef QS_HAVE_NCCL
static const bool have_nccl = true;
#else
static const bool have_nccl = false;
#endif

bool qs_comm_built(qs_comm_kind kind) {
    return kind == QS_COMM_MPI ? have_mpi : kind == QS_COMM_NCCL ? have_nccl : true;
}

int qs_comm_init(qs_comm **world, qs_comm_kind kind) {
    *world = NULL;
    const char *var = "";
    int launched = launched_ranks(&var);
    if (launched < 0) return -1;
    if (kind == QS_COMM_AUTO) kind = launched && have_mpi ? QS_COMM_MPI : QS_COMM_SINGLE;
    if (kind == QS_COMM_SINGLE) {
        if (launched > 1)
            return qs_error("launched as %d ranks (%s) but %s", launched, var,
                            have_mpi ? "the single backend runs one process"
                                     : "this build has no MPI (build with mpicc on the PATH or MPI_HOME=...)");
        return single_new(world);
    }
    if (kind == QS_COMM_MPI) {
#ifdef QS_HAVE_MPI
        return qs_comm_mpi_world(world, launched, var);
#else
        return qs_error("the mpi backend is not built in (build with mpicc on the PATH or MPI_HOME=...)");
#endif
    }
    if (kind == QS_COMM_NCCL) {
#ifdef QS_HAVE_NCCL
        qs_comm *host;
        if (qs_comm_init(&host, QS_COMM_AUTO)) return -1;
        if (qs_comm_nccl_world(host, world)) {
            qs_comm_free(host);
            return -1;
        }
        return 0;
#else
        return qs_error("the nccl backend is not built in (it needs CUDA and NCCL at build time)");
#endif
    }
    return qs_error("unknown comm backend kind %d", (int)kind);
}

void qs_comm_free(qs_comm *c) {
    if (c) c->be->free(c);
}

int qs_comm_finalize(void) {
#ifdef QS_HAVE_MPI
    return qs_comm_mpi_finalize();
#else
    return 0;
#endif
}

int qs_comm_rank(const qs_comm *c) { return c->rank; }
int qs_comm_size(const qs_comm *c) { return c->size; }
int qs_comm_local_rank(const qs_comm *c) { return c->local_rank; }
int qs_comm_local_size(const qs_comm *c) { return c->local_size; }
const char *qs_comm_name(const qs_comm *c) { return c->be->name; }

int qs_comm_split(qs_comm *parent, int color, int key, qs_comm **sub) {
    *sub = NULL;
    if (color < 0) return qs_error("qs_comm_split: color %d is negative", color);
    return parent->be->split(parent, color, key, sub);
}

int qs_comm_mesh(qs_comm *world, int sp, qs_comm **dp_group, qs_comm **sp_group) {
    *dp_group = *sp_group = NULL;
    if (sp < 1) return qs_error("sequence parallel size %d must be at least 1", sp);
    if (world->size % sp)
        return qs_error("sequence parallel size %d does not divide the world size %d", sp, world->size);
    if (qs_comm_split(world, world->rank / sp, world->rank % sp, sp_group)) return -1;
    if (qs_comm_split(world, world->rank % sp, world->rank / sp, dp_group)) {
        qs_comm_free(*sp_group);
        *sp_group = NULL;
        return -1;
    }
    return 0;
}

/* ---- argument checks ---- */

static int check_buf(const char *fn, const void *p, size_t n) {
    return n && !p ? qs_error("%s: NULL buffer for %zu elements", fn, n) : 0;
}

static int check_rank(const char *fn, const char *what, const qs_comm *c, int r) {
    return r < 0 || r >= c->size ? qs_error("%s: %s %d is not a rank of this group of %d", fn, what, r, c->size) : 0;
}

static bool overlap(const float *a, size_t an, const float *b, size_t bn) {
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + bn * sizeof(float) && y < x + an * sizeof(float);
}

/* Whether the whole buffer of size * chunk floats is past size_t. */
static int check_chunks(const char *fn, const qs_comm *c, size_t chunk) {
    return chunk > SIZE_MAX / sizeof(float) / (size_t)c->size
               ? qs_error("%s: %d chunks of %zu floats overflow", fn, c->size, chunk) : 0;
}

static void req_clear(qs_comm_req *req) { memset(req, 0, sizeof *req); }

/* ---- collectives ---- */

static int allreduce(const char *fn, qs_comm *c, void *buf, size_t n, qs_comm_dtype t, qs_comm_op op,
                     qs_comm_req *req) {
    if (op != QS_SUM && op != QS_MAX) return qs_error("%s: unknown reduction %d", fn, (int)op);
    if (check_buf(fn, buf, n)) return -1;
    if (!n) return 0;
    if (c->be->allreduce(c, buf, n, t, op, req)) return -1;
    if (req) req->comm = c;
    return 0;
}

int qs_comm_allreduce(qs_comm *c, float *buf, size_t n, qs_comm_op op) {
    return allreduce("qs_comm_allreduce", c, buf, n, QS_DT_F32, op, NULL);
}

int qs_comm_allreduce_f64(qs_comm *c, double *buf, size_t n, qs_comm_op op) {
    return allreduce("qs_comm_allreduce_f64", c->host, buf, n, QS_DT_F64, op, NULL);
}

int qs_comm_allreduce_i64(qs_comm *c, int64_t *buf, size_t n, qs_comm_op op) {
    return allreduce("qs_comm_allreduce_i64", c->host, buf, n, QS_DT_I64, op, NULL);
}

int qs_comm_allreduce_start(qs_comm *c, float *buf, size_t n, qs_comm_op op, qs_comm_req *req) {
    req_clear(req);
    return allreduce("qs_comm_allreduce_start", c, buf, n, QS_DT_F32, op, req);
}

int qs_comm_reduce_scatter(qs_comm *c, const float *send, float *recv, size_t chunk, qs_comm_op op) {
    const char *fn = "qs_comm_reduce_scatter";
    if (op != QS_SUM && op != QS_MAX) return qs_error("%s: unknown reduction %d", fn, (int)op);
    if (check_chunks(fn, c, chunk)) return -1;
    size_t total = chunk * (size_t)c->size;
    if (check_buf(fn, send, total) || check_buf(fn, recv, chunk)) return -1;
    if (!chunk) return 0;
    if (recv != send + (size_t)c->rank * chunk && overlap(send, total, recv, chunk))
        return qs_error("%s: recv overlaps send without being this rank's chunk of it", fn);
    return c->be->reduce_scatter(c, send, recv, chunk, op);
}

int qs_comm_allgather(qs_comm *c, const float *send, float *recv, size_t chunk) {
    const char *fn = "qs_comm_allgather";
    if (check_chunks(fn, c, chunk)) return -1;
    size_t total = chunk * (size_t)c->size;
    if (check_buf(fn, send, chunk) || check_buf(fn, recv, total)) return -1;
    if (!chunk) return 0;
    if (send != recv + (size_t)c->rank * chunk && overlap(send, chunk, recv, total))
        return qs_error("%s: send overlaps recv without being this rank's chunk of it", fn);
    return c->be->allgather(c, send, recv, chunk);
}

int qs_comm_broadcast(qs_comm *c, float *buf, size_t n, int root) {
    const char *fn = "qs_comm_broadcast";
    if (check_rank(fn, "root", c, root) || check_buf(fn, buf, n)) return -1;
    return n ? c->be->broadcast(c, buf, n, QS_DT_F32, root) : 0;
}

static int reduce(const char *fn, qs_comm *c, float *buf, size_t n, qs_comm_op op, int root, qs_comm_req *req) {
    if (op != QS_SUM && op != QS_MAX) return qs_error("%s: unknown reduction %d", fn, (int)op);
    if (check_rank(fn, "root", c, root) || check_buf(fn, buf, n)) return -1;
    if (!n) return 0;
    if (c->be->reduce(c, buf, n, op, root, req)) return -1;
    if (req) req->comm = c;
    return 0;
}

int qs_comm_reduce(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root) {
    return reduce("qs_comm_reduce", c, buf, n, op, root, NULL);
}

int qs_comm_reduce_start(qs_comm *c, float *buf, size_t n, qs_comm_op op, int root, qs_comm_req *req) {
    req_clear(req);
    return reduce("qs_comm_reduce_start", c, buf, n, op, root, req);
}

/* A blocking send or receive with itself could never complete. */
static int check_peer(const char *fn, const qs_comm *c, int peer) {
    if (check_rank(fn, "peer", c, peer)) return -1;
    return peer == c->rank ? qs_error("%s: peer %d is this rank", fn, peer) : 0;
}

int qs_comm_send(qs_comm *c, const float *buf, size_t n, int peer) {
    const char *fn = "qs_comm_send";
    if (check_peer(fn, c, peer) || check_buf(fn, buf, n)) return -1;
    return n ? c->be->send(c, buf, n, peer) : 0;
}

int qs_comm_recv(qs_comm *c, float *buf, size_t n, int peer) {
    const char *fn = "qs_comm_recv";
    if (check_peer(fn, c, peer) || check_buf(fn, buf, n)) return -1;
    return n ? c->be->recv(c, buf, n, peer) : 0;
}

static int sendrecv(const char *fn, qs_comm *c, const float *send, float *recv, size_t n, int dst, int src,
                    qs_comm_req *req) {
    if (check_rank(fn, "dst", c, dst) || check_rank(fn, "src", c, src) || check_buf(fn, send, n) ||
        check_buf(fn, recv, n))
        return -1;
    if (!n) return 0;
    if (overlap(send, n, recv, n)) return qs_error("%s: send and recv overlap", fn);
    if (c->be->sendrecv(c, send, recv, n, dst, src, req)) return -1;
    if (req) req->comm = c;
    return 0;
}

int qs_comm_sendrecv(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src) {
    return sendrecv("qs_comm_sendrecv", c, send, recv, n, dst, src, NULL);
}

int qs_comm_sendrecv_start(qs_comm *c, const float *send, float *recv, size_t n, int dst, int src,
                           qs_comm_req *req) {
    req_clear(req);
    return sendrecv("qs_comm_sendrecv_start", c, send, recv, n, dst, src, req);
}

int qs_comm_wait(qs_comm_req *req) {
    if (!req->comm) return 0;
    int rc = req->comm->be->wait(req);
    req_clear(req);
    return rc;
}

int qs_comm_barrier(qs_comm *c) { return c->be->barrier(c); }

/* Ring attention over qs_comm and the blockwise attention ops (see ring_attention.h).
 *
 * Step k of sp: a rank holds the K/V block packed by rank src = rank - k (its own at
 * k = 0, read straight from qkv), starts sending it on to the next rank while receiving
 * the following one into the spare buffer, computes its two query chunks against the
 * block's two key chunks, and waits. Chunks are aligned, so under the causal mask a pair
 * is whole (an earlier key chunk), diagonal (the same chunk) or fully masked (a later
 * one, skipped); the mask itself is left to the ops through global positions.
 *
 * Backward: dK/dV of the own block go straight into dqkv; the accumulator for rank s's
 * block starts at rank s + 1 (zeroed at step 1), travels with the K/V it belongs to, and
 * its last hop (after step sp - 1) brings it home, where it is added into dqkv. That is
 * sp - 1 hops of dK/dV; each waits for its own step's compute, while the K/V for the
 * next step travel during it. */
#include "quasar/ring_attention.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"

struct qs_ring_attention {
    const qs_backend *be;
    qs_comm *comm;
    int sp, rank, next, prev; /* the ring: send to next, receive from prev */
    int B, Tl, Tc, C, NH, NKV, causal;
    int Ckv, W;            /* the k (and v) width NKV * C / NH; a qkv row's, C + 2 Ckv */
    float *kv[2], *dkv[2]; /* [B,Tl,2Ckv] each, double-buffered; sp > 1 only */
    float *o_blk;          /* [B,Tl,C]: one block's output before it is merged */
    float *lse_blk;        /* [B,NH,Tl]: its lse */
    float *delta;          /* [B,NH,Tl] */
    float *mem;            /* all of them, one allocation */
};

static int check_layout(int sp, int rank, int T) {
    if (sp < 1 || rank < 0 || rank >= sp)
        return qs_error("ring attention: rank %d is not in a sequence-parallel group of %d", rank, sp);
    if (T < 1 || T % (2 * sp))
        return qs_error("ring attention: sequence length %d is not a multiple of 2 x sp = %d", T, 2 * sp);
    return 0;
}

/* The global chunk number of local chunk a (0 or 1) of rank r. */
static int chunk_of(int sp, int r, int a) { return a ? 2 * sp - 1 - r : r; }

int qs_ring_attention_positions(int sp, int rank, int T, int *pos) {
    if (check_layout(sp, rank, T)) return -1;
    const int Tc = T / (2 * sp);
    for (int a = 0; a < 2; a++)
        for (int i = 0; i < Tc; i++) pos[a * Tc + i] = chunk_of(sp, rank, a) * Tc + i;
    return 0;
}

int qs_ring_attention_gather(void *local, const void *full, size_t row_bytes, int sp, int rank,
                             int B, int T) {
    if (check_layout(sp, rank, T)) return -1;
    const size_t Tc = (size_t)T / (2 * (size_t)sp), chunk = Tc * row_bytes;
    for (size_t b = 0; b < (size_t)B; b++)
        for (int a = 0; a < 2; a++)
            memcpy((char *)local + (b * 2 + (size_t)a) * chunk,
                   (const char *)full + (b * (size_t)T + (size_t)chunk_of(sp, rank, a) * Tc) * row_bytes, chunk);
    return 0;
}

void qs_ring_attention_free(qs_ring_attention *ra) {
    if (!ra) return;
    ra->be->free(ra->mem);
    free(ra);
}

/* The buffers in one allocation, carved in order; with mem NULL only counted. */
static size_t carve_buffers(qs_ring_attention *ra, float *mem) {
    const size_t rows = (size_t)ra->B * ra->Tl, kv = ra->sp > 1 ? rows * 2 * ra->Ckv : 0;
    float *at = mem;
    float **bufs[] = {&ra->o_blk, &ra->lse_blk, &ra->delta, &ra->kv[0], &ra->kv[1], &ra->dkv[0], &ra->dkv[1]};
    const size_t floats[] = {rows * ra->C, rows * ra->NH, rows * ra->NH, kv, kv, kv, kv};
    size_t total = 0;
    for (size_t i = 0; i < sizeof floats / sizeof *floats; i++) {
        *bufs[i] = mem && floats[i] ? at + total : NULL;
        total += (floats[i] + 15) & ~(size_t)15; /* 64-byte aligned pieces, as plan.h's */
    }
    return total * sizeof(float);
}

size_t qs_ring_attention_bytes(int B, int Tl, int C, int NH, int NKV, int sp) {
    qs_ring_attention ra = {.sp = sp, .B = B, .Tl = Tl, .C = C, .NH = NH, .Ckv = C / NH * NKV};
    return carve_buffers(&ra, NULL);
}

int qs_ring_attention_create(qs_ring_attention **out, const qs_backend *be, qs_comm *group, int B,
                             int Tl, int C, int NH, int NKV, int causal) {
    *out = NULL;
    if (B < 1 || Tl < 2 || Tl % 2 || C < 1 || NH < 1 || C % NH || NKV < 1 || NH % NKV)
        return qs_error("ring attention: B=%d Tl=%d C=%d NH=%d NKV=%d (Tl must be even, NH must divide C, NKV "
                        "must divide NH)", B, Tl, C, NH, NKV);
    qs_ring_attention *ra = calloc(1, sizeof *ra);
    if (!ra) return qs_error("out of memory for ring attention");
    const int sp = qs_comm_size(group), rank = qs_comm_rank(group), Ckv = C / NH * NKV;
    *ra = (qs_ring_attention){.be = be, .comm = group, .sp = sp, .rank = rank, .next = (rank + 1) % sp,
                             .prev = (rank + sp - 1) % sp, .B = B, .Tl = Tl, .Tc = Tl / 2, .C = C, .NH = NH,
                             .NKV = NKV, .Ckv = Ckv, .W = C + 2 * Ckv, .causal = causal != 0};
    if (!(ra->mem = be->alloc(carve_buffers(ra, NULL)))) {
        qs_ring_attention_free(ra);
        return -1;
    }
    carve_buffers(ra, ra->mem);
    *out = ra;
    return 0;
}

/* Floats in one K/V (or dK/dV) block, the unit that travels. */
static size_t block_floats(const qs_ring_attention *ra) { return (size_t)ra->B * ra->Tl * 2 * ra->Ckv; }

/* The K/V block held at step k: packed by rank src, row stride `stride` (W: the own
 * block, read in place from qkv; 2Ckv: a packed one). */
typedef struct {
    const float *kv;
    int stride, src;
} held_block;

static held_block held_at(const qs_ring_attention *ra, int k, const float *qkv) {
    if (k == 0) return (held_block){qkv + ra->C, ra->W, ra->rank};
    return (held_block){ra->kv[k % 2], 2 * ra->Ckv, (ra->rank - k + ra->sp) % ra->sp};
}

/* Local query chunk a against key chunk c of the held block. */
static qs_attn_block pair_block(const qs_ring_attention *ra, int a, const held_block *h, int c) {
    return (qs_attn_block){.B = ra->B, .C = ra->C, .NH = ra->NH, .NKV = ra->NKV, .Tq = ra->Tc, .Tk = ra->Tc,
                           .q_len = ra->Tl, .kv_len = ra->Tl, .q_stride = ra->W, .kv_stride = h->stride,
                           .q_pos0 = chunk_of(ra->sp, ra->rank, a) * ra->Tc,
                           .k_pos0 = chunk_of(ra->sp, h->src, c) * ra->Tc, .causal = ra->causal};
}

/* Aligned chunks: a later key chunk is masked whole. */
static bool masked(const qs_attn_block *blk) { return blk->causal && blk->k_pos0 > blk->q_pos0; }

/* Starts passing the K/V block of step k on and receiving step k + 1's into the spare
 * buffer; the own block leaves from kv[0], where it was packed. The last step's block
 * goes nowhere. */
static int pass_kv(qs_ring_attention *ra, int k, qs_comm_req *req) {
    if (k + 1 == ra->sp) return 0;
    return qs_comm_sendrecv_start(ra->comm, ra->kv[k % 2], ra->kv[(k + 1) % 2], block_floats(ra), ra->next,
                                  ra->prev, req);
}

int qs_ring_attention_forward(qs_ring_attention *ra, float *out, float *lse, const float *qkv) {
    const qs_ops *ops = ra->be->ops;
    const int Tc = ra->Tc, C = ra->C, W = ra->W;
    if (ra->sp > 1) ops->kv_pack_forward(ra->kv[0], qkv, ra->B, ra->Tl, C, ra->Ckv);
    for (int k = 0; k < ra->sp; k++) {
        qs_comm_req req = {0};
        if (pass_kv(ra, k, &req)) return -1;
        const held_block h = held_at(ra, k, qkv);
        for (int a = 0; a < 2; a++)
            /* The own chunk first: at step 0 it is the first block chunk a sees (its
             * diagonal), written in place; every later one is merged into it. */
            for (int i = 0; i < 2; i++) {
                const int c = i ? 1 - a : a;
                const qs_attn_block blk = pair_block(ra, a, &h, c);
                if (masked(&blk)) continue;
                const float *q = qkv + (size_t)a * Tc * W, *kv = h.kv + (size_t)c * Tc * h.stride;
                float *o = out + (size_t)a * Tc * C, *l = lse + (size_t)a * Tc;
                if (k == 0 && i == 0) {
                    ops->attention_block_forward(o, l, q, kv, &blk);
                } else {
                    float *ob = ra->o_blk + (size_t)a * Tc * C, *lb = ra->lse_blk + (size_t)a * Tc;
                    ops->attention_block_forward(ob, lb, q, kv, &blk);
                    ops->attention_merge(o, l, ob, lb, &blk);
                }
            }
        if (qs_comm_wait(&req)) return -1;
    }
    return 0;
}

int qs_ring_attention_backward(qs_ring_attention *ra, float *dqkv, const float *dout,
                               const float *qkv, const float *out, const float *lse) {
    const qs_ops *ops = ra->be->ops;
    const int sp = ra->sp, Tc = ra->Tc, C = ra->C, W = ra->W;
    const size_t n = block_floats(ra);
    ops->attention_delta(ra->delta, dout, out, ra->B, ra->Tl, C, ra->NH);
    if (sp > 1) ops->kv_pack_forward(ra->kv[0], qkv, ra->B, ra->Tl, C, ra->Ckv);
    for (int k = 0; k < sp; k++) {
        qs_comm_req kv_req = {0}, dkv_req = {0};
        if (pass_kv(ra, k, &kv_req)) return -1;
        const held_block h = held_at(ra, k, qkv);
        float *dkv = k ? ra->dkv[k % 2] : dqkv + C; /* the own block's: in place, stride W */
        if (k == 1) ra->be->zero(dkv, n * sizeof *dkv);
        for (int a = 0; a < 2; a++)
            for (int c = 0; c < 2; c++) {
                const qs_attn_block blk = pair_block(ra, a, &h, c);
                if (masked(&blk)) continue;
                const size_t qa = (size_t)a * Tc;
                ops->attention_block_backward(dqkv + qa * W, dkv + (size_t)c * Tc * h.stride, dout + qa * C,
                                              qkv + qa * W, h.kv + (size_t)c * Tc * h.stride, lse + qa,
                                              ra->delta + qa, &blk);
            }
        int rc = k ? qs_comm_sendrecv_start(ra->comm, dkv, ra->dkv[(k + 1) % 2], n, ra->next, ra->prev, &dkv_req) : 0;
        if (qs_comm_wait(&kv_req)) rc = -1;
        if (qs_comm_wait(&dkv_req)) rc = -1;
        if (rc) return -1;
    }
    /* After the last hop the accumulator for this rank's own block is home. */
    if (sp > 1) ops->kv_pack_backward(dqkv, ra->dkv[sp % 2], ra->B, ra->Tl, C, ra->Ckv);
    return 0;
}

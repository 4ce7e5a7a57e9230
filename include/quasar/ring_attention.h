/* Ring attention (Liu et al., 2023) over a sequence-parallel group of sp ranks: each
 * rank keeps its own query rows and the keys and values travel around the ring, one
 * block per step, merged by log-sum-exp; the backward sends the key/value gradients
 * around with them until they are home.
 *
 * Zig-zag layout: a sequence of T tokens is cut into 2 sp chunks of Tc = T / (2 sp); rank
 * r holds chunks r and 2 sp - 1 - r, concatenated, Tl = 2 Tc local rows. Under the causal
 * mask an early chunk has little to attend to and a late one much; pairing them gives
 * every rank the same work at every step.
 *
 * Tensors are backend memory in the model's layouts over the local rows: qkv [B,Tl,C+2Ckv],
 * out and dout [B,Tl,C], lse [B,NH,Tl]. Forward and backward are collective over the
 * group. Functions return 0, or -1 with a one-line qs_error. */
#ifndef QUASAR_RING_ATTENTION_H
#define QUASAR_RING_ATTENTION_H

#include <stddef.h>

#include "quasar/backend.h"
#include "quasar/comm.h"

typedef struct qs_ring_attention qs_ring_attention;

/* pos[Tl]: the global position of each local row of `rank` (for position embeddings,
 * targets and RNG counters). T must be a multiple of 2 sp. */
int qs_ring_attention_positions(int sp, int rank, int T, int *pos);
/* The local rows of a full [B,T,...] host array whose rows are row_bytes wide (tokens,
 * targets, or a tensor): local[b, i] = full[b, pos[i]], local holding B * Tl rows. */
int qs_ring_attention_gather(void *local, const void *full, size_t row_bytes, int sp, int rank,
                             int B, int T);

/* The workspace for B sequences of Tl local rows (even: T / sp), width C, NH query heads
 * and NKV key/value heads (qs_attn_block's grouped-query layout: Ckv = NKV * C / NH), over
 * `group` (not owned; its size is sp), allocated once on `be`: two K/V blocks and two
 * dK/dV blocks [B,Tl,2Ckv] (when sp > 1; fewer K/V heads make every hop smaller), one
 * block output [B,Tl,C] and its lse, and delta [B,NH,Tl]. causal: 1 masks by global
 * position, 0 lets every query see every key. */
int qs_ring_attention_create(qs_ring_attention **ra, const qs_backend *be, qs_comm *group, int B,
                             int Tl, int C, int NH, int NKV, int causal);
void qs_ring_attention_free(qs_ring_attention *ra);
/* The bytes of that workspace (for the memory plan). */
size_t qs_ring_attention_bytes(int B, int Tl, int C, int NH, int NKV, int sp);

/* out [B,Tl,C] and lse [B,NH,Tl] (keep both for the backward): attention of the local
 * queries over the keys and values of the whole sequence. */
int qs_ring_attention_forward(qs_ring_attention *ra, float *out, float *lse, const float *qkv);
/* dqkv [B,Tl,C+2Ckv] += the gradient of the local rows' q, k and v, given dout and the
 * forward's qkv, out and lse. */
int qs_ring_attention_backward(qs_ring_attention *ra, float *dqkv, const float *dout,
                               const float *qkv, const float *out, const float *lse);

#endif

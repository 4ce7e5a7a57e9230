/* GPT (dense or sparse MoE feed-forward), written once against qs_ops.
 * Parameters and gradients each live in one flat backend buffer; the table of
 * named tensors (Hugging Face GPT-2 names where one exists) indexes into it.
 * Activations are planned up front for a maximum micro-batch shape. */
#ifndef QUASAR_MODEL_H
#define QUASAR_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "quasar/backend.h"
#include "quasar/comm.h"
#include "quasar/config.h"
#include "quasar/memplan.h"
#include "quasar/params.h"

typedef struct qs_gpt qs_gpt;
typedef struct qs_lora qs_lora; /* lora.h */

/* What one forward pass does besides computing the loss. */
typedef struct qs_forward_mode {
    bool train;        /* dropout and router noise on */
    uint64_t rng_seed; /* seed of this pass's dropout masks and router noise */
    uint64_t sample0;  /* global index of the batch's first sequence: token t of sequence b
                        * draws its masks and noise as global row (sample0 + b) * seq_len + t,
                        * the same on any number of ranks or micro-batches */
    float grad_scale;  /* 0: no backward follows; else backward takes the gradient of
                        * grad_scale * the objective (see qs_gpt_backward), and a forward
                        * with targets already takes the classifier's part of it */
} qs_forward_mode;

/* What a model's memory is planned for. */
typedef enum qs_gpt_use {
    QS_GPT_TRAIN,  /* weights with gradients */
    QS_GPT_FROZEN, /* no weight gradients: a LoRA base, whose backward yields its adapters' */
    QS_GPT_INFER,  /* forward passes only (generate, eval): every block shares one block's
                    * activations, and there is no backward scratch */
    QS_GPT_INFER_BF16, /* the same with the linear layers' weights as bf16 panels only (see
                        * qs_gpt_use_bf16_weights), packed as the weights load: half their
                        * memory. It cannot be saved or take adapters. */
} qs_gpt_use;

/* Sizes activations for micro-batches of up to max_B sequences of up to max_T tokens.
 * Fails with the memory plan and the backend's free memory when it does not fit, before
 * allocating; reserves the backend's op scratch for these sizes. */
int qs_gpt_create(qs_gpt **out, const qs_model_config *cfg, const qs_backend *be, int max_B,
                  int max_T);
/* The same for another use: QS_GPT_FROZEN has no gradient buffer, and its backward
 * yields only the gradients of attached adapters; QS_GPT_INFER(_BF16) takes forwards
 * without a gradient scale, prefills and decodes, and its backward fails. */
int qs_gpt_create_for(qs_gpt **out, const qs_model_config *cfg, const qs_backend *be, int max_B, int max_T,
                      qs_gpt_use use);
void qs_gpt_free(qs_gpt *m);
/* The memory such a model takes on be (no optimizer), without creating it; with sp > 1
 * also its ring-attention buffers (qs_gpt_set_sequence_parallel). */
int qs_gpt_plan(const qs_model_config *cfg, const qs_backend *be, int max_B, int max_T, qs_gpt_use use, int sp,
                qs_mem_plan *plan);
/* Sequence parallelism: this model (created with max_T = model.seq_len / sp) holds the
 * zig-zag share of every sequence of the sp ranks of group (ring_attention.h) and
 * attends over the whole sequence with ring attention. Its forward then takes a rank's
 * local rows (qs_gpt_sequence_positions) and its loss is the mean over them; forward and
 * backward are collective over the group, and qs_gpt_failed tells whether one failed.
 * Attention-mixer models only; no KV-cache inference. The group is not owned. */
int qs_gpt_set_sequence_parallel(qs_gpt *m, qs_comm *group);
/* The global position of each of the max_T local rows (0..max_T-1 without sequence
 * parallelism). */
const int *qs_gpt_sequence_positions(const qs_gpt *m);
/* Whether a forward or backward failed (a sequence-parallel exchange); qs_error says why. */
bool qs_gpt_failed(const qs_gpt *m);
/* Attaches LoRA adapters (built for this model, see lora.h) to the linear layers; NULL
 * detaches. The model does not own them. */
void qs_gpt_set_lora(qs_gpt *m, qs_lora *lora);
int qs_gpt_init(qs_gpt *m, uint64_t seed);
/* Inference from bf16 weights: packs the linear layers' weights (attention, feed-forward
 * or experts, classifier; not the router or embeddings) as bf16 panels and computes
 * those products from them from now on, in fp32 (ops.h, matmul_forward_bf16): half the
 * bytes a decode step reads. The fp32 weights stay (an adapter's base check and merge
 * read them); a model made QS_GPT_INFER_BF16 has the panels alone. A frozen model whose
 * weights are final; errors if the backend has no such products. */
int qs_gpt_use_bf16_weights(qs_gpt *m);

const qs_model_config *qs_gpt_config(const qs_gpt *m);
/* The backend the model's memory lives on (and its adapters must use). */
const qs_backend *qs_gpt_backend(const qs_gpt *m);
/* The parameter table (values and gradients). */
qs_params *qs_gpt_params(qs_gpt *m);
/* Its memory plan (no optimizer, no ring attention). */
const qs_mem_plan *qs_gpt_mem_plan(const qs_gpt *m);
/* Tokens of the largest micro-batch (max_B * max_T). */
int qs_gpt_max_tokens(const qs_gpt *m);

/* tokens/targets are host arrays [B*T]; targets may be NULL (no loss), and a
 * negative target is ignored. Returns the mean cross-entropy over valid targets. With
 * targets the logits are made and consumed a chunk of rows at a time, never kept whole;
 * without, all B*T rows are kept (qs_gpt_logits). */
double qs_gpt_forward(qs_gpt *m, const int *tokens, const int *targets, int B, int T,
                      const qs_forward_mode *mode);
/* KV-cache inference (eval mode); the cache has max_B slots of model.seq_len positions.
 * prefill runs B prompts of T tokens (T <= max_T) into slots 0..B-1, prefill_slot one
 * prompt into slot `slot` (prompts of different lengths, a slot's window refilled);
 * both keep every layer's keys and values. decode then runs one new token per row b at
 * position pos[b] (1 <= pos < model.seq_len) against the cache of slot slots[b]
 * (distinct; host arrays), appending to it. Logits [B, V] after either: row b is the
 * next-token prediction of prompt b (its last position) or of decode row b. */
int qs_gpt_prefill(qs_gpt *m, const int *tokens, int B, int T);
int qs_gpt_prefill_slot(qs_gpt *m, const int *tokens, int T, int slot);
int qs_gpt_decode(qs_gpt *m, const int *tokens, int B, const int *slots, const int *pos);

/* Accumulates into the gradient buffer the gradient of
 *   mode.grad_scale * (mean cross-entropy + aux_loss_coef * balance + z_loss_coef * z)
 * of the last forward, which must have had targets and a grad_scale; else an error. */
int qs_gpt_backward(qs_gpt *m);
/* Logits of the last forward without targets ([B*T, V]), prefill or decode ([B, V]),
 * in backend memory; NULL after a forward with targets. */
const float *qs_gpt_logits(const qs_gpt *m);
/* Copies row `row` of those logits to host memory out[V]. */
void qs_gpt_logits_row(const qs_gpt *m, int row, float *out);

/* MoE statistics of the last forward: router losses summed over layers, and since
 * the last reset the per-expert assignments kept (summed over layers) and dropped. */
typedef struct qs_moe_stats {
    double balance, z;      /* last forward */
    int64_t *expert_tokens; /* [n_experts] */
    int64_t kept, dropped;
} qs_moe_stats;
const qs_moe_stats *qs_gpt_moe_stats(const qs_gpt *m);
void qs_gpt_moe_stats_reset(qs_gpt *m);
/* The top-k expert choices of the last forward, [n_layer][B*T*K] host ints (for tests
 * that need to know whether a perturbation changed routing). NULL for dense models. */
const int *qs_gpt_moe_routing(const qs_gpt *m);

#endif

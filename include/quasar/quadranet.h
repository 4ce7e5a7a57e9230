/* QuadraNet image classifier, written once against qs_ops:
 *   stem (p x p stride-p conv, LN) -> four stages of QuadraBlocks with LN + 2x2 stride-2
 *   conv between them -> global average pool -> LN -> linear head.
 * QuadraBlock: x += drop_path(gamma1 * quadconv(LN(x)));
 *              x += drop_path(gamma2 * fc2(GELU(fc1(LN(x))))).
 * Images are channels-last [B, S, S, in_channels]. */
#ifndef QUASAR_QUADRANET_H
#define QUASAR_QUADRANET_H

#include "quasar/backend.h"
#include "quasar/config.h"
#include "quasar/model.h"
#include "quasar/params.h"

typedef struct qs_quadranet qs_quadranet;

/* Sizes activations for micro-batches of up to max_B images; like qs_gpt_create, fails
 * with the memory plan before allocating when it does not fit. */
int qs_quadranet_create(qs_quadranet **out, const qs_model_config *cfg, const qs_backend *be, int max_B);
void qs_quadranet_free(qs_quadranet *m);
/* The memory such a model takes on be (no optimizer), without creating it. */
int qs_quadranet_plan(const qs_model_config *cfg, const qs_backend *be, int max_B, qs_mem_plan *plan);
int qs_quadranet_init(qs_quadranet *m, uint64_t seed);
qs_params *qs_quadranet_params(qs_quadranet *m);
const qs_mem_plan *qs_quadranet_mem_plan(const qs_quadranet *m);

/* images: host [B,S,S,in_channels]; labels: host [B] in [0, num_classes), or NULL.
 * Returns the mean cross-entropy (NAN without labels); *correct (if not NULL) gets the
 * number of images whose top logit is their label. */
double qs_quadranet_forward(qs_quadranet *m, const float *images, const int *labels, int B,
                            const qs_forward_mode *mode, int *correct);
/* Accumulates scale * d(mean cross-entropy) of the last forward into the gradients. */
void qs_quadranet_backward(qs_quadranet *m, float scale);
/* Logits [B, num_classes] of the last forward, backend memory; backward overwrites
 * them with their gradient. */
const float *qs_quadranet_logits(const qs_quadranet *m);

#endif

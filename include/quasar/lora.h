/* LoRA adapters for a GPT: a trainable low-rank update of chosen linear layers over a
 * frozen base. For a layer y = x W + b (W [in, out], HF Conv1D layout) the adapter adds
 *   y += s * (drop(x) A^T) B^T,   A [r, in], B [out, r],  s = alpha / r (alpha / sqrt(r) with rslora)
 * as two small GEMMs: the update B A is never formed while training.
 *
 * The adapters are their own qs_params table with PEFT's names
 * (`base_model.model.transformer.<module>.lora_A.weight`, `.lora_B.weight`), so the
 * optimizer and checkpoints see only them. Modules: attn.c_attn (targets q, k, v: one
 * adapter over the fused [C, 3C] projection, as PEFT adapts GPT-2; the column blocks of B
 * that are not targeted stay zero, their gradient masked), attn.c_proj (proj), mlp.c_fc
 * (fc), mlp.c_proj (fc_proj), and for MoE models mlp.experts.c_fc / mlp.experts.c_proj
 * (experts), stacked over experts: A [E, r, in], B [E, out, r].
 *
 * Files (a checkpoint folder of a finetune run, written with the same crash-safety):
 * adapter_model.safetensors (those tensors, F32) and adapter_config.json (PEFT's keys:
 * peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, use_rslora,
 * fan_in_fan_out true, base_model_name_or_path; plus quasar_targets, the lora.targets
 * list, and quasar_base_sha256, the SHA-256 of the base's weights as F32 in table order,
 * i.e. of the data section of the base's model.safetensors, checked on every load).
 *
 * Adapters written by Hugging Face peft for a GPT-2-shaped base (no quasar_targets, no
 * checksums.json) load too: target_modules (names, dotted suffixes, a regex string,
 * "all-linear"), exclude_modules and layers_to_transform pick the modules as peft does
 * (c_attn = q, k and v; "c_proj" = attn.c_proj and mlp.c_proj), tensors may be F32, F16
 * or BF16 and must have exactly the shapes r and the base give; settings plain LoRA
 * cannot reproduce (DoRA, bias other than "none", per-module ranks, ...) are refused by
 * name. They record no base fingerprint, so only shapes are checked. */
#ifndef QUASAR_LORA_H
#define QUASAR_LORA_H

#include <stddef.h>
#include <stdint.h>

#include "quasar/config.h"
#include "quasar/model.h"
#include "quasar/params.h"

#define QS_LORA_WEIGHTS "adapter_model.safetensors"
#define QS_LORA_CONFIG "adapter_config.json"

/* The linear layers of a block an adapter can sit on (FC / FC_PROJ are the stacked
 * expert linears in an MoE layer). */
typedef enum { QS_LORA_SITE_QKV, QS_LORA_SITE_PROJ, QS_LORA_SITE_FC, QS_LORA_SITE_FC_PROJ, QS_LORA_N_SITES } qs_lora_site;

/* Adapters per lc for model m's architecture, with activations for m's largest
 * micro-batch. Errors (naming lora.*) for targets the model lacks: q/k/v without
 * attention (model.mixer quadconv), fc/fc_proj in an MoE model, experts in a dense one,
 * or r larger than model.n_embd. Values are zero until qs_lora_init or a load. m's
 * weights must be its base's by now: their fingerprint is taken here. */
int qs_lora_create(qs_lora **out, const qs_lora_config *lc, qs_gpt *m);
void qs_lora_free(qs_lora *lo);
/* The memory such adapters take (no optimizer) for a model of mc on be whose forward
 * sees max_tokens token rows, without creating them. */
int qs_lora_plan(const qs_lora_config *lc, const qs_model_config *mc, const qs_backend *be, int max_tokens,
                 qs_mem_plan *plan);
qs_params *qs_lora_params(qs_lora *lo);
const qs_lora_config *qs_lora_config_of(const qs_lora *lo);
/* A Kaiming-uniform (bound 1/sqrt(in), PyTorch's nn.Linear default, as PEFT), B zero:
 * the adapted model starts out equal to its base. Counter RNG (seed, tensor index). */
int qs_lora_init(qs_lora *lo, uint64_t seed);

/* Whether linear layer `site` of block `layer` has an adapter. */
bool qs_lora_adapts(const qs_lora *lo, int layer, qs_lora_site site);
/* Called by the model (csrc/model.c) right after linear layer `site` of block `layer`
 * (for an MoE site: expert e, whose n packed rows start at row0; else e = row0 = 0):
 * y[n, out] += s * drop(x) A^T B^T. Dropout (lora.dropout) only when mode->train, its
 * mask keyed by the rows' global ids row_ids[n] (backend memory; see ops.h). */
void qs_lora_forward(qs_lora *lo, int layer, qs_lora_site site, int e, int row0, int n, float *y, const float *x,
                     const int64_t *row_ids, const qs_forward_mode *mode);
/* Its backward, after the base layer's: accumulates the adapter's gradients and
 * dx[n, in] += the adapter path's input gradient, given dy[n, out]. */
void qs_lora_backward(qs_lora *lo, int layer, qs_lora_site site, int e, int row0, int n, float *dx, const float *dy,
                      const float *x, const int64_t *row_ids, const qs_forward_mode *mode);

/* W += sign * s * (B A)^T for every adapted weight of base (a table with the model's
 * names): sign +1 merges, -1 unmerges (equal up to float rounding). */
int qs_lora_merge(const qs_lora *lo, qs_params *base, int sign);

/* Writes adapter_model.safetensors and adapter_config.json into dir; base_path is
 * recorded as base_model_name_or_path, the base's fingerprint as quasar_base_sha256. */
int qs_lora_write(const qs_lora *lo, const char *dir, const char *base_path);
/* Reads the lora settings of the adapter in step_dir (checked against its checksums.json
 * when it has one; values through the config schema; a peft adapter's targets are the
 * modules its tensors cover). */
int qs_lora_read_config(const char *step_dir, qs_lora_config *lc);
/* Loads the adapter tensors of step_dir; every tensor must match this table's names and
 * shapes (an adapter made for another base shape is refused), and a recorded base
 * fingerprint must be this table's base's. */
int qs_lora_load(qs_lora *lo, const char *step_dir);
/* An adapter from DIR (a finetune run folder, its ckpt/ folder, one checkpoint folder
 * or a folder peft saved) built for m and loaded; writes the adapter folder's path to
 * step_dir. base_check false skips the fingerprint (m is a merged model, whose weights
 * are by design not the adapter's base). */
int qs_lora_open(qs_lora **out, const char *dir, qs_gpt *m, bool base_check, char *step_dir, size_t cap);

#endif

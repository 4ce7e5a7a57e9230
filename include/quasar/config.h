/* Run configuration: JSON (cJSON) into typed structs with defaults.
 * One schema table (csrc/config.c) drives parsing, --set overrides, validation and
 * serialisation, so a key exists in exactly one place. Sections: model, train, data, lora. */
#ifndef QUASAR_CONFIG_H
#define QUASAR_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#define QS_PATH_MAX 1024

typedef enum { QS_ACT_GELU, QS_ACT_RELU } qs_activation;
typedef enum { QS_INIT_NORMAL, QS_INIT_KAIMING, QS_INIT_XAVIER } qs_init;
typedef enum { QS_GATING_TOPK, QS_GATING_NOISY_TOPK } qs_gating;
typedef enum { QS_LR_COSINE, QS_LR_CONSTANT, QS_LR_LINEAR, QS_LR_WSD } qs_lr_schedule;
typedef enum { QS_MODEL_GPT, QS_MODEL_QUADRANET } qs_model_type;
typedef enum { QS_MIXER_ATTENTION, QS_MIXER_QUADCONV } qs_mixer;
/* Matrix products' arithmetic on the CUDA backend; storage, accumulation, master
 * weights and optimizer state stay fp32 either way. */
typedef enum { QS_PRECISION_FP32, QS_PRECISION_BF16 } qs_precision;

#define QS_QUADRA_STAGES 4

typedef struct qs_moe_config {
    int n_experts;         /* 0 = dense feed-forward */
    int top_k;             /* experts per token */
    qs_gating gating;      /* "topk" | "noisy_topk" */
    float capacity_factor; /* capacity = ceil(cf * N * k / E); 0 = dropless */
    float aux_loss_coef;   /* Switch load-balancing loss coefficient */
    float z_loss_coef;     /* router z-loss coefficient */
} qs_moe_config;

/* QuadraNet image classifier; kernel_size is also the causal taps of a GPT's quadconv
 * mixer. */
typedef struct qs_quadra_config {
    int in_channels, image_size, num_classes;
    int stem_patch;                /* stem: a stem_patch x stem_patch stride-stem_patch conv */
    int widths[QS_QUADRA_STAGES];  /* channels per stage */
    int depths[QS_QUADRA_STAGES];  /* QuadraBlocks per stage */
    int kernel_size;               /* quadratic depthwise conv, k x k (odd) */
    float layer_scale_init;
    float drop_path;               /* stochastic depth, rising linearly to this at the last block */
} qs_quadra_config;

typedef struct qs_model_config {
    qs_model_type type;    /* "gpt" | "quadranet" */
    qs_mixer mixer;        /* GPT token mixer: "attention" | "quadconv" (causal, quadra.kernel_size taps) */
    int vocab_size;        /* 0 = taken from the data (char vocabulary) */
    int seq_len;           /* context length (block size) */
    int n_layer, n_head, n_embd;
    int n_kv_head;         /* key/value heads (grouped-query attention; divides n_head); 0 = n_head */
    int ffn_mult;          /* hidden width = ffn_mult * n_embd */
    qs_activation activation;
    float dropout;
    bool bias;             /* biases in linear layers */
    bool tie_embeddings;   /* lm head shares wte */
    bool recompute_ffn;    /* keep only the FFN activation's input; make its output again in backward */
    /* activation checkpointing: the last n blocks keep only their input and run their
     * forward again in backward; QS_RECOMPUTE_ALL (JSON true) every block, 0 (false)
     * none, QS_RECOMPUTE_AUTO ("auto") the fewest that fit, chosen when the task opens */
    int recompute_layers;
    qs_init init;          /* "normal" (std init_std) | "kaiming" | "xavier" */
    float init_std;
    qs_moe_config moe;
    qs_quadra_config quadra;
} qs_model_config;

typedef struct qs_train_config {
    int max_steps;
    int batch_size;        /* global sequences per optimizer step */
    int micro_batch_size;  /* sequences per forward pass; 0 = batch_size (no accumulation) */
    float lr, min_lr;
    /* after warmup: "cosine" or "linear" from lr to min_lr at max_steps, "constant", or
     * "wsd" (warmup-stable-decay): lr until the last decay_steps, then linear to min_lr */
    qs_lr_schedule lr_schedule;
    int warmup_steps;
    int decay_steps;       /* wsd's decay; 0 = the last fifth of the steps after warmup */
    float weight_decay;
    bool decay_all;        /* false: decay only matrices (not biases, norms, embeddings) */
    float beta1, beta2, eps;
    float grad_clip;       /* global-norm clip; 0 = off */
    qs_precision precision; /* "fp32" | "bf16" (CUDA: GEMM operands rounded to bf16) */
    uint64_t seed;
    int eval_interval;     /* 0 = only at the end */
    int eval_iters;
    int checkpoint_interval; /* 0 = only at the end */
    int keep_checkpoints;  /* newest step folders kept; 0 = all */
    int log_interval;
    int sample_tokens;     /* written to samples.txt at the end */
    int max_bad_steps;     /* stop after this many skipped steps in a row; 0 = never */
    float outlier_zscore;  /* skip steps whose loss or grad norm is this many std devs
                              above the recent ones; 0 = off */
} qs_train_config;

typedef struct qs_data_config {
    char path[QS_PATH_MAX]; /* text corpus (tokenizer "char") */
    char tokenizer[16];     /* "char" | "gpt2" */
    float val_fraction;     /* tail of the corpus held out (tokenizer "char") */
    char train_shards[QS_PATH_MAX]; /* glob of token shards (tokenizer "gpt2") */
    char val_shards[QS_PATH_MAX];
    char vocab_dir[QS_PATH_MAX];    /* encoder.json + vocab.bpe (tokenizer "gpt2") */
    int augment_shift;              /* images: random translation by up to this many pixels */
    bool augment_flip;              /* images: random horizontal flips */
} qs_data_config;

/* LoRA fine-tuning (`quasar finetune`): which linear layers get adapters and their shape. */
typedef struct qs_lora_config {
    int r;              /* rank */
    float alpha;        /* scale = alpha / r, or alpha / sqrt(r) with rslora */
    float dropout;      /* on the adapter's input only */
    char targets[128];  /* comma-separated: q, k, v, proj, fc, fc_proj, experts */
    bool rslora;
} qs_lora_config;

/* Bits of lora.targets: q/k/v are column blocks of attn.c_attn, proj attn.c_proj, fc and
 * fc_proj the dense mlp.c_fc / mlp.c_proj, experts both stacked MoE expert linears. */
enum { QS_LORA_Q = 1, QS_LORA_K = 2, QS_LORA_V = 4, QS_LORA_PROJ = 8, QS_LORA_FC = 16, QS_LORA_FC_PROJ = 32,
       QS_LORA_EXPERTS = 64 };

/* How a run spreads over ranks (world size = dp x sp; see docs/SCALING.md). */
typedef struct qs_parallel_config {
    int sp;   /* sequence-parallel degree: ranks that split each sequence */
    int zero; /* ZeRO stage: 0 = replicated optimizer state, 1 = sharded over dp ranks */
    float bucket_mb; /* gradient allreduce buckets overlapped with the backward pass; 0: one at the end */
} qs_parallel_config;

typedef struct qs_config {
    qs_model_config model;
    qs_train_config train;
    qs_data_config data;
    qs_lora_config lora;
    qs_parallel_config parallel;
} qs_config;

void qs_config_defaults(qs_config *c);
/* Applies a JSON document on top of *c. Errors name the key:
 *   "config.json: unknown key 'model.n_embed'", "model.n_embd: expected an integer". */
int qs_config_load_file(qs_config *c, const char *path);
int qs_config_load_string(qs_config *c, const char *json, const char *what);
/* "section.key=value": value is read as JSON when it parses (3, 1e-3, true, "x"),
 * else as a bare string (so model.activation=relu works). */
int qs_config_set(qs_config *c, const char *assignment);
/* Cross-field checks, e.g. "model.n_embd (100) must be divisible by model.n_head (8)". */
int qs_config_validate(const qs_config *c);
/* lora.targets as QS_LORA_* bits; an empty list or an unknown name is an error naming the key. */
int qs_config_lora_targets(const qs_lora_config *l, unsigned *mask);
/* model.recompute_layers: every block (a QuadraNet's only count besides 0), and the
 * fewest blocks whose plan fits the device (qs_task_open resolves it to a count) */
#define QS_RECOMPUTE_ALL (-1)
#define QS_RECOMPUTE_AUTO (-2)
/* Whether GPT block l of n_layer keeps only its input (model.recompute_layers; "auto"
 * not yet resolved by a task keeps every block's activations). */
static inline bool qs_config_recomputes(const qs_model_config *m, int l) {
    return m->recompute_layers == QS_RECOMPUTE_ALL || l >= m->n_layer - m->recompute_layers;
}
/* The key/value heads of a model: model.n_kv_head, or n_head where that is 0. */
static inline int qs_config_kv_heads(const qs_model_config *m) { return m->n_kv_head ? m->n_kv_head : m->n_head; }
/* Whether a and b have the same values throughout `section` ("model", "lora"). */
bool qs_config_same(const qs_config *a, const qs_config *b, const char *section);
/* Whether two model sections describe the same weights: they may differ only in how the
 * activations are kept (recompute_ffn, recompute_layers), which a resumed run or a
 * fine-tune may choose anew. */
bool qs_config_same_architecture(const qs_model_config *a, const qs_model_config *b);
/* The whole resolved config as pretty JSON (malloc'd; caller frees). */
char *qs_config_to_json(const qs_config *c);

#endif

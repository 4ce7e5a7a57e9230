/* quasar: one CLI, subcommands per DESIGN.md. Every failure prints one
 * "error: ..." line and exits non-zero. */
#include <errno.h>
#include <unistd.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "quasar/bench.h"
#include "quasar/checkpoint.h"
#include "quasar/comm.h"
#include "quasar/config.h"
#include "quasar/convert.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/lora.h"
#include "quasar/sample.h"
#include "quasar/tokenizer.h"
#include "quasar/task.h"
#include "quasar/train.h"

/* ---- option parsing: --flag VALUE pairs, each flag known per command ---- */

typedef enum { OPT_STR, OPT_INT, OPT_FLOAT, OPT_U64, OPT_LIST, OPT_FLAG } opt_kind;

typedef struct opt_spec {
    const char *flag;
    opt_kind kind;
    void *dst;     /* const char **, int *, float *, uint64_t *; OPT_LIST: str_list *; OPT_FLAG: bool * (no value) */
    double lo, hi; /* numeric range */
} opt_spec;

typedef struct str_list {
    const char *items[64];
    int n;
} str_list;

static int parse_value(const opt_spec *o, const char *v) {
    char *end;
    errno = 0;
    switch (o->kind) {
    case OPT_FLAG: *(bool *)o->dst = true; return 0;
    case OPT_STR: *(const char **)o->dst = v; return 0;
    case OPT_LIST: {
        str_list *l = o->dst;
        if (l->n == 64) return qs_cli_usage_error("too many %s options", o->flag);
        l->items[l->n++] = v;
        return 0;
    }
    case OPT_INT:
    case OPT_U64: {
        long long x = strtoll(v, &end, 10);
        if (errno || end == v || *end || x < o->lo || x > o->hi) break;
        if (o->kind == OPT_INT) *(int *)o->dst = (int)x;
        else *(uint64_t *)o->dst = (uint64_t)x;
        return 0;
    }
    case OPT_FLOAT: {
        double x = strtod(v, &end);
        if (errno || end == v || *end || !(x >= o->lo && x <= o->hi)) break;
        *(float *)o->dst = (float)x;
        return 0;
    }
    }
    fprintf(stderr, "error: %s: invalid value '%s' (expected a number in [%g, %g])\n", o->flag, v, o->lo, o->hi);
    return QS_EXIT_USAGE;
}

/* Returns 0, or an exit code; *help is set by --help/-h. */
static int parse_opts(int argc, char **argv, const opt_spec *specs, int n_specs, int *help) {
    *help = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            *help = 1;
            return 0;
        }
        const opt_spec *o = NULL;
        for (int j = 0; j < n_specs && !o; j++)
            if (!strcmp(argv[i], specs[j].flag)) o = &specs[j];
        if (!o) return qs_cli_usage_error("unknown option '%s'", argv[i]);
        if (o->kind != OPT_FLAG && i + 1 >= argc) return qs_cli_usage_error("%s needs a value", argv[i]);
        int rc = parse_value(o, o->kind == OPT_FLAG ? NULL : argv[++i]);
        if (rc) return rc;
    }
    return 0;
}

/* ---- config assembly: base file(s), then --set overrides, then validation ---- */

static int build_config(qs_config *cfg, const char *base_file, const char *config_file, const str_list *sets) {
    qs_config_defaults(cfg);
    if (base_file && qs_config_load_file(cfg, base_file)) return -1;
    if (config_file && qs_config_load_file(cfg, config_file)) return -1;
    for (int i = 0; i < sets->n; i++)
        if (qs_config_set(cfg, sets->items[i])) return -1;
    return qs_config_validate(cfg);
}

static const char *TRAIN_HELP =
    "usage: quasar train --config FILE [--set key=value]... [--out DIR] [--resume DIR]\n"
    "                    [--device cpu|cuda] [--until STEP] [--dry-run]\n"
    "  --config FILE   JSON config (sections model, train, data); optional with --resume\n"
    "  --set k=v       override a key, e.g. --set train.lr=3e-4 (repeatable)\n"
    "  --out DIR       run folder (default runs/default); a new run refuses one that holds a run\n"
    "  --resume DIR    continue the run in DIR from its latest checkpoint\n"
    "  --device D      cpu (default) or cuda (a GPU per rank, NCCL between ranks;\n"
    "                  train.precision picks fp32 or bf16 matrix products there; the CPU\n"
    "                  computes in fp32)\n"
    "  --until STEP    stop after STEP steps with a checkpoint (resume later)\n"
    "  --dry-run       everything but writing: load the data (and with --resume the\n"
    "                  checkpoint), make the model on the device, run 3 steps and print how\n"
    "                  long the run would take; the run folder is not created or touched\n";

/* qs_train over the ranks the launcher started (mpirun, srun), or this process alone.
 * GPU ranks talk over NCCL, whose world also gives each rank its GPU, so the world comes
 * first and the backend (its context and cuBLAS handle on that GPU) second. */
static int train_on_world(const char *device, qs_config *cfg, qs_train_options *opt) {
    const bool cuda = !strcmp(device, "cuda");
    const bool nccl = cuda && qs_comm_built(QS_COMM_NCCL);
    if (qs_comm_init(&opt->world, nccl ? QS_COMM_NCCL : QS_COMM_AUTO))
        return nccl ? qs_error("--device cuda: %s", qs_error_last()) : -1;
    int rc = (opt->be = qs_cli_backend(device, cfg->train.precision)) ? 0 : -1;
    if (!rc && cuda && !nccl && qs_comm_size(opt->world) > 1)
        rc = qs_error("--device cuda on %d ranks needs the nccl backend, which this build lacks "
                      "(build with nccl.h in NCCL_HOME or CUDA_HOME)", qs_comm_size(opt->world));
    if (!rc) rc = qs_train(cfg, opt);
    qs_comm_free(opt->world);
    opt->world = NULL;
    return qs_comm_finalize() || rc ? -1 : 0;
}

static int cmd_train(int argc, char **argv) {
    const char *config = NULL, *out = NULL, *resume = NULL, *device = "cpu";
    int until = 0, help;
    bool dry_run = false;
    str_list sets = {0};
    opt_spec specs[] = {
        {"--config", OPT_STR, &config, 0, 0}, {"--set", OPT_LIST, &sets, 0, 0},
        {"--out", OPT_STR, &out, 0, 0},       {"--resume", OPT_STR, &resume, 0, 0},
        {"--device", OPT_STR, &device, 0, 0}, {"--until", OPT_INT, &until, 1, INT_MAX},
        {"--dry-run", OPT_FLAG, &dry_run, 0, 0},
    };
    int rc = parse_opts(argc, argv, specs, sizeof specs / sizeof *specs, &help);
    if (rc || help) {
        if (help) fputs(TRAIN_HELP, stdout);
        return rc;
    }
    if (!config && !resume) return qs_cli_usage_error("%s", "train needs --config FILE (or --resume DIR)");
    if (resume && out && strcmp(resume, out)) return qs_cli_usage_error("%s", "--resume DIR continues in DIR; drop --out");
    char base[QS_PATH_MAX + 16];
    if (resume) snprintf(base, sizeof base, "%s/config.json", resume);
    qs_config cfg;
    if (build_config(&cfg, resume ? base : NULL, config, &sets)) return qs_cli_fail();
    qs_train_options opt = {.out_dir = resume ? resume : out ? out : "runs/default",
                            .resume = resume != NULL, .until_step = until, .dry_run = dry_run};
    return train_on_world(device, &cfg, &opt) ? qs_cli_fail() : 0;
}

static const char *FINETUNE_HELP =
    "usage: quasar finetune --config FILE --base CKPT_DIR [--set key=value]... [--out DIR]\n"
    "                       [--resume DIR] [--device cpu|cuda] [--until STEP] [--dry-run]\n"
    "  LoRA: trains low-rank adapters (config section lora: r, alpha, dropout, targets, rslora)\n"
    "  over the frozen base model; the base checkpoint is only read.\n"
    "  --config FILE   JSON config with train, data and lora sections (the model is the base's;\n"
    "                  only model.dropout may be set); optional with --resume\n"
    "  --base DIR      the base: a run folder, its ckpt/ folder or one checkpoint folder\n"
    "  --set k=v       override a key, e.g. --set lora.r=16 (repeatable)\n"
    "  --out DIR       run folder (default runs/finetune); its checkpoints hold\n"
    "                  adapter_model.safetensors + adapter_config.json (PEFT style)\n"
    "  --resume DIR    continue the finetune run in DIR (with the same --base)\n"
    "  --device D      cpu (default) or cuda, as for train (the base is frozen there too)\n"
    "  --until STEP    stop after STEP steps with a checkpoint (resume later)\n"
    "  --dry-run       as for train: 3 steps and an estimate, nothing written\n";

static int cmd_finetune(int argc, char **argv) {
    const char *config = NULL, *out = NULL, *resume = NULL, *base = NULL, *device = "cpu";
    int until = 0, help;
    bool dry_run = false;
    str_list sets = {0};
    opt_spec specs[] = {
        {"--config", OPT_STR, &config, 0, 0}, {"--set", OPT_LIST, &sets, 0, 0},
        {"--out", OPT_STR, &out, 0, 0},       {"--resume", OPT_STR, &resume, 0, 0},
        {"--base", OPT_STR, &base, 0, 0},     {"--until", OPT_INT, &until, 1, INT_MAX},
        {"--device", OPT_STR, &device, 0, 0}, {"--dry-run", OPT_FLAG, &dry_run, 0, 0},
    };
    int rc = parse_opts(argc, argv, specs, sizeof specs / sizeof *specs, &help);
    if (rc || help) {
        if (help) fputs(FINETUNE_HELP, stdout);
        return rc;
    }
    if (!base) return qs_cli_usage_error("%s", "finetune needs --base CKPT_DIR");
    if (!config && !resume) return qs_cli_usage_error("%s", "finetune needs --config FILE (or --resume DIR)");
    if (resume && out && strcmp(resume, out)) return qs_cli_usage_error("%s", "--resume DIR continues in DIR; drop --out");
    char base_step[QS_PATH_MAX + 64], run_cfg[QS_PATH_MAX + 16];
    qs_config base_cfg, cfg;
    qs_st_file f = {0};
    char *chars = NULL;
    if (qs_checkpoint_find(base, base_step, sizeof base_step) ||
        qs_checkpoint_open_model(&f, base_step, &base_cfg, &chars))
        return qs_error("--base: %s", qs_error_last()), qs_cli_fail();
    /* The architecture and tokenizer are the base's; the rest comes from the config. */
    qs_config_defaults(&cfg);
    cfg.model = base_cfg.model;
    snprintf(cfg.data.tokenizer, sizeof cfg.data.tokenizer, "%s", base_cfg.data.tokenizer);
    snprintf(cfg.data.vocab_dir, sizeof cfg.data.vocab_dir, "%s", base_cfg.data.vocab_dir);
    if (resume) snprintf(run_cfg, sizeof run_cfg, "%s/config.json", resume);
    rc = (resume && qs_config_load_file(&cfg, run_cfg)) || (config && qs_config_load_file(&cfg, config));
    for (int i = 0; !rc && i < sets.n; i++) rc = qs_config_set(&cfg, sets.items[i]);
    qs_model_config arch = base_cfg.model;
    arch.dropout = cfg.model.dropout;
    if (!rc && !qs_config_same_architecture(&arch, &cfg.model))
        rc = qs_error("model: the architecture is the base checkpoint's (%s); only model.dropout, "
                      "model.recompute_ffn and model.recompute_layers may be set", base_step);
    else if (!rc && strcmp(cfg.data.tokenizer, base_cfg.data.tokenizer))
        rc = qs_error("data.tokenizer: must be the base's (%s), got '%s'", base_cfg.data.tokenizer, cfg.data.tokenizer);
    if (!rc) rc = qs_config_validate(&cfg);
    qs_train_options opt = {.out_dir = resume ? resume : out ? out : "runs/finetune", .resume = resume != NULL,
                            .until_step = until, .dry_run = dry_run, .base_dir = base_step, .base = &f,
                            .base_chars = chars};
    if (!rc) rc = train_on_world(device, &cfg, &opt);
    qs_st_free(&f);
    free(chars);
    return rc ? qs_cli_fail() : 0;
}

/* ---- loading a trained model ---- */

static int micro_batch(const qs_config *c) {
    return c->train.micro_batch_size > 0 ? c->train.micro_batch_size : c->train.batch_size;
}

/* A checkpoint opened for use: its config with --config/--set applied to everything but
 * the architecture, its tensors, and its char vocabulary if it has one. */
typedef struct opened_ckpt {
    qs_config cfg;
    qs_st_file f;
    char *chars_json;
    int step;
    char step_dir[QS_PATH_MAX + 64];
} opened_ckpt;

static int open_checkpoint(opened_ckpt *o, const char *dir, const char *config, const str_list *sets) {
    if (qs_checkpoint_find(dir, o->step_dir, sizeof o->step_dir) ||
        qs_checkpoint_open_model(&o->f, o->step_dir, &o->cfg, &o->chars_json))
        return -1;
    qs_model_config arch = o->cfg.model;
    int rc = config ? qs_config_load_file(&o->cfg, config) : 0;
    for (int i = 0; !rc && sets && i < sets->n; i++) rc = qs_config_set(&o->cfg, sets->items[i]);
    o->cfg.model = arch;
    if (!rc) rc = qs_config_validate(&o->cfg);
    const char *base = strrchr(o->step_dir, '/');
    o->step = base && !strncmp(base + 1, "step_", 5) ? atoi(base + 6) : -1;
    return rc;
}

static void close_checkpoint(opened_ckpt *o) {
    qs_st_free(&o->f);
    free(o->chars_json);
    o->chars_json = NULL;
}

typedef struct loaded_model {
    qs_config cfg;
    qs_codec codec;
    qs_gpt *m;
    qs_lora *lora;
} loaded_model;

/* The backend of --device for a checkpoint's config. The CPU is named directly: its note
 * that bf16 products apply to cuda only is for training. */
static const qs_backend *device_backend(const char *device, const qs_config *cfg) {
    return !strcmp(device, "cpu") ? qs_backend_cpu() : qs_cli_backend(device, cfg->train.precision);
}

/* A language model from the checkpoint in dir on device, for micro-batches of max_B,
 * with the LoRA adapter in adapter_dir when that is not NULL (base_check: it must have
 * been made for these weights), its linear layers from `weights` ("fp32" or "bf16"; an
 * adapter's base keeps its fp32 copies too). Nothing trains it: no gradients. */
static int load_model(loaded_model *lm, const char *dir, const char *device, int max_B, const char *adapter_dir,
                      bool base_check, const char *weights) {
    opened_ckpt o = {0};
    int rc = open_checkpoint(&o, dir, NULL, NULL);
    lm->cfg = o.cfg;
    const qs_model_config *arch = &o.cfg.model;
    if (!rc && arch->type != QS_MODEL_GPT) rc = qs_error("%s: not a language model (model.type is not gpt)", o.step_dir);
    /* the codec after the overrides: data.vocab_dir may differ on this machine */
    if (!rc) rc = qs_codec_open(&lm->codec, &o.cfg.data, o.chars_json);
    if (!rc && qs_codec_vocab_size(&lm->codec) > arch->vocab_size)
        rc = qs_error("%s: the vocabulary (%d) is larger than model.vocab_size (%d)", o.step_dir,
                      qs_codec_vocab_size(&lm->codec), arch->vocab_size);
    const qs_backend *be = rc ? NULL : device_backend(device, &o.cfg);
    if (!rc && !be) rc = -1;
    const qs_gpt_use use = adapter_dir ? QS_GPT_INFER : qs_cli_weights_use(weights);
    if (!rc) rc = qs_gpt_create_for(&lm->m, arch, be, max_B, arch->seq_len, use);
    if (!rc) rc = qs_checkpoint_load_weights(qs_gpt_params(lm->m), &o.f, o.step_dir);
    char adapter_step[QS_PATH_MAX + 64];
    if (!rc && adapter_dir)
        rc = qs_lora_open(&lm->lora, adapter_dir, lm->m, base_check, adapter_step, sizeof adapter_step) ||
             qs_cli_weights_apply(lm->m, weights);
    if (!rc) qs_gpt_set_lora(lm->m, lm->lora);
    close_checkpoint(&o);
    return rc;
}

static void free_loaded(loaded_model *lm) {
    qs_gpt_free(lm->m);
    qs_lora_free(lm->lora);
    qs_codec_free(&lm->codec);
}

static const char *GENERATE_HELP =
    "usage: quasar generate --model CKPT_DIR [--adapter DIR] [--prompt TEXT] [--max-tokens N]\n"
    "                       [--temperature T] [--top-k K] [--top-p P] [--seed S] [--device cpu|cuda]\n"
    "                       [--weights fp32|bf16]\n"
    "  --model DIR     a run folder, its ckpt/ folder or one checkpoint folder\n"
    "  --adapter DIR   a LoRA adapter for that model (a finetune run, ckpt or checkpoint folder,\n"
    "                  or a folder Hugging Face peft saved)\n"
    "  --prompt TEXT   text to continue (default: a newline); repeat it to generate for several\n"
    "                  prompts in one batch, printed when done as JSON lines {\"prompt\", \"text\"}\n"
    "  --max-tokens N  tokens to generate (per prompt; default 500)\n"
    "  --temperature T 0 = greedy (default 1.0); --top-k K (0 = all); --top-p P (1 = all)\n"
    "  --seed S        sampling seed (default 1337)\n"
    "  --device D      cpu (default) or cuda: prefill and decode on the GPU (the checkpoint's\n"
    "                  train.precision picks its products), sampling on the host\n"
    "  --weights W     fp32 (default) or bf16: the linear layers' weights rounded to bf16 and\n"
    "                  read as such (half the memory and the traffic of a decode step; with\n"
    "                  --adapter their fp32 copies stay), sums in fp32\n";

static void emit_stdout(int prompt, int token, void *user) {
    (void)prompt;
    qs_codec_put(user, token, stdout);
    fflush(stdout);
}

/* s[0..n) as a JSON string (UTF-8 passes through; quotes, backslashes and control
 * bytes escaped). */
static void put_json_string(const char *s, size_t n, FILE *f) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

/* One JSON line per prompt: its index and the prompt's text with what followed it. */
static int print_completions(const qs_codec *codec, const str_list *prompts, int *const *ctx, const int *n_prompt,
                             const int *lens) {
    for (int b = 0; b < prompts->n; b++) {
        char *text = NULL;
        size_t len = 0;
        FILE *mem = open_memstream(&text, &len);
        if (!mem) return qs_error("out of memory");
        fputs(prompts->items[b], mem);
        for (int i = n_prompt[b]; i < lens[b]; i++) qs_codec_put(codec, ctx[b][i], mem);
        fclose(mem);
        printf("{\"prompt\": %d, \"text\": ", b);
        put_json_string(text, len, stdout);
        printf("}\n");
        free(text);
    }
    return 0;
}

static int cmd_generate(int argc, char **argv) {
    const char *model = NULL, *adapter = NULL, *device = "cpu", *weights = "fp32";
    str_list prompts = {0};
    int max_tokens = 500, help;
    qs_sample_params sp = {.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 1337};
    opt_spec specs[] = {
        {"--model", OPT_STR, &model, 0, 0},
        {"--adapter", OPT_STR, &adapter, 0, 0},
        {"--prompt", OPT_LIST, &prompts, 0, 0},
        {"--max-tokens", OPT_INT, &max_tokens, 0, 1 << 24},
        {"--temperature", OPT_FLOAT, &sp.temperature, 0, 100},
        {"--top-k", OPT_INT, &sp.top_k, 0, INT_MAX},
        {"--top-p", OPT_FLOAT, &sp.top_p, 1e-6, 1},
        {"--seed", OPT_U64, &sp.seed, 0, 9007199254740992.0},
        {"--device", OPT_STR, &device, 0, 0},
        {"--weights", OPT_STR, &weights, 0, 0},
    };
    int rc = parse_opts(argc, argv, specs, sizeof specs / sizeof *specs, &help);
    if (rc || help) {
        if (help) fputs(GENERATE_HELP, stdout);
        return rc;
    }
    if (!model) return qs_cli_usage_error("%s", "generate needs --model CKPT_DIR");
    if ((rc = qs_cli_weights_check(weights))) return rc;
    if (prompts.n == 0) prompts.items[prompts.n++] = "\n";
    for (int b = 0; b < prompts.n; b++)
        if (!*prompts.items[b]) return qs_cli_usage_error("%s", "--prompt must not be empty");
    const int B = prompts.n;
    loaded_model lm = {0};
    if (load_model(&lm, model, device, B, adapter, true, weights)) {
        free_loaded(&lm);
        return qs_cli_fail();
    }
    enum { MAX_PROMPTS = sizeof prompts.items / sizeof *prompts.items };
    int *ctx[MAX_PROMPTS] = {0}, n_prompt[MAX_PROMPTS], lens[MAX_PROMPTS];
    for (int b = 0; b < B && !rc; b++) {
        size_t n = strlen(prompts.items[b]), n_ids = 0;
        ctx[b] = malloc((n + 1 + (size_t)max_tokens) * sizeof(int));
        rc = !ctx[b] ? qs_error("out of memory")
             : qs_codec_encode(&lm.codec, prompts.items[b], n, ctx[b], &n_ids) ? qs_error("--prompt: %s", qs_error_last())
             : n_ids == 0 ? qs_error("--prompt encodes to no tokens")
                          : 0;
        n_prompt[b] = (int)n_ids;
    }
    if (!rc) {
        if (lm.codec.bpe) { /* a GPT-2 model ends its text with <|endoftext|> */
            sp.stop_at_token = true;
            sp.stop_token = qs_tokenizer_eot(lm.codec.bpe);
        }
        if (B == 1) fputs(prompts.items[0], stdout); /* one prompt streams its tokens as they come */
        rc = qs_generate_batch(lm.m, ctx, n_prompt, B, max_tokens, &sp, lens, B == 1 ? emit_stdout : NULL,
                               &lm.codec) < 0 ? -1 : 0;
        if (B == 1) fputc('\n', stdout);
        else if (!rc) rc = print_completions(&lm.codec, &prompts, ctx, n_prompt, lens);
    }
    for (int b = 0; b < B; b++) free(ctx[b]);
    free_loaded(&lm);
    return rc ? qs_cli_fail() : 0;
}

static const char *EVAL_HELP =
    "usage: quasar eval --model CKPT_DIR [--adapter DIR] [--config FILE] [--set key=value]...\n"
    "                   [--device cpu|cuda] [--weights fp32|bf16]\n"
    "  --adapter DIR   evaluate the model with this LoRA adapter\n"
    "  --device D      cpu (default) or cuda (train.precision picks the products there)\n"
    "  --weights W     fp32 (default) or bf16, as for quasar generate: the loss that\n"
    "                  generating from bf16 weights comes with (language models)\n"
    "  Prints {\"step\", \"val_loss\", \"eval_iters\", \"tokens\"} as JSON on stdout (classifiers:\n"
    "  {\"step\", \"val_loss\", \"val_acc\"} over the whole test split). The data and\n"
    "  train.eval_iters come from the checkpoint's config unless --config/--set change them.\n";

static int cmd_eval(int argc, char **argv) {
    const char *model = NULL, *config = NULL, *adapter = NULL, *device = "cpu", *weights = "fp32";
    str_list sets = {0};
    int help;
    opt_spec specs[] = {{"--model", OPT_STR, &model, 0, 0}, {"--config", OPT_STR, &config, 0, 0},
                        {"--set", OPT_LIST, &sets, 0, 0}, {"--adapter", OPT_STR, &adapter, 0, 0},
                        {"--device", OPT_STR, &device, 0, 0}, {"--weights", OPT_STR, &weights, 0, 0}};
    int rc = parse_opts(argc, argv, specs, sizeof specs / sizeof *specs, &help);
    if (rc || help) {
        if (help) fputs(EVAL_HELP, stdout);
        return rc;
    }
    if (!model) return qs_cli_usage_error("%s", "eval needs --model CKPT_DIR");
    if ((rc = qs_cli_weights_check(weights))) return rc;
    opened_ckpt o = {0};
    qs_task task = {0};
    char adapter_step[QS_PATH_MAX + 64];
    rc = open_checkpoint(&o, model, config, &sets);
    const bool bf16 = !strcmp(weights, "bf16");
    /* bf16 without an adapter: the panels alone, so the fp32 copies are never made; an
     * adapter's base keeps them */
    const qs_task_place place = {.micro_B = micro_batch(&o.cfg),
                                 .be = rc ? NULL : device_backend(device, &o.cfg),
                                 .bf16_weights = bf16 && !adapter};
    if (!rc && !place.be) rc = -1;
    if (!rc && adapter)
        rc = qs_checkpoint_find_file(adapter, QS_LORA_WEIGHTS, adapter_step, sizeof adapter_step)
                 ? qs_error("--adapter: %s", qs_error_last())
                 : qs_task_open_lora(&task, &o.cfg, o.chars_json, &o.f, o.step_dir, adapter_step, &place);
    else if (!rc)
        rc = qs_task_open(&task, &o.cfg, o.chars_json, &place);
    if (!rc && bf16 && !task.use_bf16_weights) rc = qs_error("--weights bf16: for language models (model.type gpt)");
    if (!rc && !adapter) rc = qs_checkpoint_load_weights(task.params, &o.f, o.step_dir);
    if (!rc && bf16 && adapter) rc = task.use_bf16_weights(task.self);
    double vl = NAN, acc = NAN;
    if (!rc) rc = qs_task_evaluate(&task, o.cfg.train.eval_iters, NULL, 0, 1, &vl, &acc);
    if (!rc) {
        const qs_config *c = &o.cfg;
        char loss[32] = "null"; /* JSON has no NaN */
        if (isfinite(vl)) snprintf(loss, sizeof loss, "%.6f", vl);
        if (task.codec)
            printf("{\"step\": %d, \"val_loss\": %s, \"eval_iters\": %d, \"tokens\": %lld}\n", o.step, loss,
                   c->train.eval_iters, (long long)c->train.eval_iters * micro_batch(c) * c->model.seq_len);
        else
            printf("{\"step\": %d, \"val_loss\": %s, \"val_acc\": %.6f}\n", o.step, loss, acc);
    }
    qs_task_free(&task);
    close_checkpoint(&o);
    return rc ? qs_cli_fail() : 0;
}

static const char *CONVERT_HELP =
    "usage: quasar convert --from-hf HF_DIR --out RUN_DIR [--vocab-dir DIR]\n"
    "       quasar convert --to-hf CKPT_DIR --out HF_DIR\n"
    "  --from-hf DIR   a transformers GPT2LMHeadModel folder (config.json, model.safetensors in\n"
    "                  F32, F16 or BF16) -> a new Quasar run with the checkpoint step_00000000\n"
    "  --to-hf DIR     a dense Quasar run, ckpt or checkpoint folder -> config.json and an F32\n"
    "                  model.safetensors for GPT2LMHeadModel.from_pretrained\n"
    "  --out DIR       the folder to write (for --from-hf it must not already hold a run)\n"
    "  --vocab-dir DIR GPT-2 BPE files named by the run's data.vocab_dir (default ../shared/data/gpt2)\n"
    "  A converted run's data.train_shards and data.val_shards are the placeholder \"none\":\n"
    "  give real ones with --set data.train_shards=... (and val_shards) to train or evaluate.\n";

static int cmd_convert(int argc, char **argv) {
    const char *from_hf = NULL, *to_hf = NULL, *out = NULL, *vocab_dir = NULL;
    int help;
    opt_spec specs[] = {{"--from-hf", OPT_STR, &from_hf, 0, 0}, {"--to-hf", OPT_STR, &to_hf, 0, 0},
                        {"--out", OPT_STR, &out, 0, 0}, {"--vocab-dir", OPT_STR, &vocab_dir, 0, 0}};
    int rc = parse_opts(argc, argv, specs, sizeof specs / sizeof *specs, &help);
    if (rc || help) {
        if (help) fputs(CONVERT_HELP, stdout);
        return rc;
    }
    if (!from_hf == !to_hf) return qs_cli_usage_error("%s", "convert needs one of --from-hf DIR or --to-hf DIR");
    if (!out) return qs_cli_usage_error("%s", "convert needs --out DIR");
    if (to_hf && vocab_dir) return qs_cli_usage_error("%s", "--vocab-dir applies to --from-hf only");
    rc = from_hf ? qs_convert_from_hf(from_hf, out, vocab_dir ? vocab_dir : "../shared/data/gpt2")
                 : qs_convert_to_hf(to_hf, out);
    return rc ? qs_cli_fail() : 0;
}

static const char *MERGE_HELP =
    "usage: quasar merge --model CKPT_DIR --adapter DIR --out RUN_DIR [--unmerge]\n"
    "  Folds a LoRA adapter into the weights, W += s * (B A)^T, and writes the result as a new\n"
    "  run (checkpoint step_00000000, fresh optimizer state); the model and adapter are only read.\n"
    "  --unmerge       subtract the adapter instead (undoes a merge, up to float rounding; the\n"
    "                  model is then a merged one, so the adapter's base fingerprint is not checked)\n"
    "  --out DIR       the folder to write; it must not already hold a run\n";

static int cmd_merge(int argc, char **argv) {
    const char *model = NULL, *adapter = NULL, *out = NULL;
    bool unmerge = false;
    int help;
    opt_spec specs[] = {{"--model", OPT_STR, &model, 0, 0}, {"--adapter", OPT_STR, &adapter, 0, 0},
                        {"--out", OPT_STR, &out, 0, 0}, {"--unmerge", OPT_FLAG, &unmerge, 0, 0}};
    int rc = parse_opts(argc, argv, specs, sizeof specs / sizeof *specs, &help);
    if (rc || help) {
        if (help) fputs(MERGE_HELP, stdout);
        return rc;
    }
    if (!model || !adapter || !out) return qs_cli_usage_error("%s", "merge needs --model CKPT_DIR, --adapter DIR and --out DIR");
    char path[QS_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/ckpt/latest", out);
    if (!access(path, F_OK)) return qs_error("'%s' already holds a run; --out must name a new folder", out), qs_cli_fail();
    loaded_model lm = {0};
    qs_adamw opt = {0};
    rc = load_model(&lm, model, "cpu", 1, adapter, !unmerge, "fp32"); /* a merged model is not the adapter's base */
    qs_params *ps = rc ? NULL : qs_gpt_params(lm.m);
    if (!rc) rc = qs_lora_merge(lm.lora, ps, unmerge ? -1 : 1);
    if (!rc) rc = qs_adamw_create(&opt, qs_backend_cpu(), ps->n);
    if (!rc) {
        qs_train_state st = {.step = 0, .seed = lm.cfg.train.seed};
        qs_guard_init(&st.guard, lm.cfg.train.outlier_zscore, lm.cfg.train.max_bad_steps);
        rc = qs_checkpoint_save(out, &lm.cfg, &lm.codec, ps, &opt, &st);
    }
    char *json = rc ? NULL : qs_config_to_json(&lm.cfg);
    if (!rc && !json) rc = qs_error("out of memory");
    snprintf(path, sizeof path, "%s/config.json", out);
    if (!rc) rc = qs_file_write_atomic(path, json, strlen(json));
    free(json);
    qs_adamw_free(&opt);
    free_loaded(&lm);
    return rc ? qs_cli_fail() : 0;
}

static const char *MAIN_HELP =
    "usage: quasar <command> [options]   (quasar <command> --help for details)\n"
    "  train      train a model from a JSON config\n"
    "  finetune   train LoRA adapters over a frozen checkpoint\n"
    "  merge      fold a LoRA adapter into a checkpoint's weights (or --unmerge it)\n"
    "  generate   sample text from a checkpoint\n"
    "  eval       validation loss of a checkpoint, as JSON\n"
    "  tokenize   UTF-8 text on stdin -> GPT-2 token ids on stdout\n"
    "  detokenize token ids on stdin -> the exact text on stdout\n"
    "  shard      text on stdin -> GPT-2 token shards (llm.c format) for training\n"
    "  bpe-train  text on stdin -> a new byte-level BPE vocabulary (GPT-2's files)\n"
    "  convert    Hugging Face GPT-2 folder <-> Quasar checkpoint\n"
    "  bench      time training steps, ops, attention, an MoE layer or generation\n"
    "             (train|kernels|attention|moe|generate)\n";

int main(int argc, char **argv) {
    qs_backend_cpu_pick_blas(argv);
    if (argc < 2) {
        fputs(MAIN_HELP, stderr);
        return QS_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        fputs(MAIN_HELP, stdout);
        return 0;
    }
    if (!strcmp(cmd, "train")) return cmd_train(argc - 2, argv + 2);
    if (!strcmp(cmd, "finetune")) return cmd_finetune(argc - 2, argv + 2);
    if (!strcmp(cmd, "merge")) return cmd_merge(argc - 2, argv + 2);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc - 2, argv + 2);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenize")) return qs_cli_tokenize(argc - 2, argv + 2);
    if (!strcmp(cmd, "detokenize")) return qs_cli_detokenize(argc - 2, argv + 2);
    if (!strcmp(cmd, "shard")) return qs_cli_shard(argc - 2, argv + 2);
    if (!strcmp(cmd, "bpe-train")) return qs_cli_bpe_train(argc - 2, argv + 2);
    if (!strcmp(cmd, "convert")) return cmd_convert(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return qs_cli_bench(argc - 2, argv + 2);
    return qs_cli_usage_error("unknown command '%s'", cmd);
}

/* Configuration loading, --set, validation and serialisation. Random round trips draw
 * from a seed printed at start; QS_TEST_SEED=<n> reproduces a run. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "quasar/config.h"
#include "test_seed.h"
#include "quasar/error.h"
#include "quasar/rng.h"

#include <float.h>
#include <glob.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t seed, draws;

static uint64_t rnd(void) { return qs_rng_u64(seed, 11, draws++); }
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); }

static int load(qs_config *c, const char *json) { return qs_config_load_string(c, json, "cfg"); }

/* Fails unless rc is -1 and the recorded message is exactly want. */
#define assert_error_is(rc, want)                                                                  \
    do {                                                                                           \
        assert_int_equal((rc), -1);                                                                \
        assert_string_equal(qs_error_last(), (want));                                              \
    } while (0)

/* A failed load must leave the config exactly as it was. */
static void assert_load_fails(const char *json, const char *want) {
    qs_config c, before;
    qs_config_defaults(&c);
    before = c;
    int rc = load(&c, json);
    if (rc != -1 || strcmp(qs_error_last(), want) != 0)
        fail_msg("loading %s: rc %d, error \"%s\", want \"%s\"", json, rc, qs_error_last(), want);
    assert_memory_equal(&c, &before, sizeof c);
}

static void assert_set_fails(const char *assignment, const char *want) {
    qs_config c, before;
    qs_config_defaults(&c);
    before = c;
    int rc = qs_config_set(&c, assignment);
    if (rc != -1 || strcmp(qs_error_last(), want) != 0)
        fail_msg("--set %s: rc %d, error \"%s\", want \"%s\"", assignment, rc, qs_error_last(), want);
    assert_memory_equal(&c, &before, sizeof c);
}

static void test_defaults(void **state) {
    (void)state;
    qs_config c;
    qs_config_defaults(&c);
    assert_int_equal(qs_config_validate(&c), 0);
    const qs_model_config *m = &c.model;
    assert_int_equal(m->vocab_size, 0);
    assert_int_equal(m->seq_len, 64);
    assert_int_equal(m->n_layer, 4);
    assert_int_equal(m->n_head, 4);
    assert_int_equal(m->n_kv_head, 0); /* as many key/value heads as query heads */
    assert_int_equal(m->n_embd, 128);
    assert_int_equal(m->ffn_mult, 4);
    assert_int_equal(m->activation, QS_ACT_GELU);
    assert_true(m->dropout == 0.0f);
    assert_true(m->bias);
    assert_true(m->tie_embeddings);
    assert_true(m->recompute_ffn);
    assert_int_equal(m->recompute_layers, 0);
    assert_int_equal(m->init, QS_INIT_NORMAL);
    assert_true(m->init_std == 0.02f);
    assert_int_equal(m->moe.n_experts, 0);
    assert_int_equal(m->moe.top_k, 2);
    assert_int_equal(m->moe.gating, QS_GATING_TOPK);
    assert_true(m->moe.capacity_factor == 0.0f);
    assert_true(m->moe.aux_loss_coef == 0.01f);
    assert_true(m->moe.z_loss_coef == 0.0f);
    const qs_train_config *t = &c.train;
    assert_int_equal(t->max_steps, 1000);
    assert_int_equal(t->batch_size, 32);
    assert_int_equal(t->micro_batch_size, 0);
    assert_true(t->lr == 1e-3f);
    assert_true(t->min_lr == 1e-4f);
    assert_int_equal(t->lr_schedule, QS_LR_COSINE);
    assert_int_equal(t->warmup_steps, 100);
    assert_true(t->weight_decay == 0.1f);
    assert_false(t->decay_all);
    assert_true(t->beta1 == 0.9f);
    assert_true(t->beta2 == 0.99f);
    assert_true(t->eps == 1e-8f);
    assert_true(t->grad_clip == 1.0f);
    assert_int_equal(t->seed, 1337);
    assert_int_equal(t->eval_interval, 250);
    assert_int_equal(t->eval_iters, 20);
    assert_int_equal(t->checkpoint_interval, 0);
    assert_int_equal(t->log_interval, 10);
    assert_int_equal(t->sample_tokens, 500);
    assert_string_equal(c.data.path, "data/shakespeare_char/input.txt");
    assert_string_equal(c.data.tokenizer, "char");
    assert_true(c.data.val_fraction == 0.1f);
}

static void test_load_overrides(void **state) {
    (void)state;
    qs_config c, want;
    qs_config_defaults(&c);
    qs_config_defaults(&want);
    const char *json = "{\n"
                       "  \"model\": {\"n_embd\": 64, \"activation\": \"relu\", \"dropout\": 0.25,\n"
                       "            \"bias\": false, \"init\": \"xavier\", \"init_std\": 1,\n"
                       "            \"moe\": {\"n_experts\": 8, \"gating\": \"noisy_topk\", \"capacity_factor\": 1.25}},\n"
                       "  \"train\": {\"lr\": 3e-4, \"seed\": 9007199254740992, \"lr_schedule\": \"constant\",\n"
                       "            \"decay_all\": true, \"max_steps\": 0},\n"
                       "  \"data\": {\"path\": \"corpus/ü.txt\"},\n"
                       "  \"model.moe.top_k\": 3\n"
                       "}\n";
    assert_int_equal(load(&c, json), 0);
    want.model.n_embd = 64;
    want.model.activation = QS_ACT_RELU;
    want.model.dropout = 0.25f;
    want.model.bias = false;
    want.model.init = QS_INIT_XAVIER;
    want.model.init_std = 1.0f;
    want.model.moe.n_experts = 8;
    want.model.moe.top_k = 3; /* a dotted key addresses the same field */
    want.model.moe.gating = QS_GATING_NOISY_TOPK;
    want.model.moe.capacity_factor = 1.25f;
    want.train.lr = 3e-4f;
    want.train.seed = 9007199254740992ull;
    want.train.lr_schedule = QS_LR_CONSTANT;
    want.train.decay_all = true;
    want.train.max_steps = 0;
    snprintf(want.data.path, sizeof want.data.path, "corpus/ü.txt");
    assert_memory_equal(&c, &want, sizeof c);
    assert_int_equal(qs_config_validate(&c), 0);

    assert_int_equal(load(&c, "{}"), 0); /* empty document: no change */
    assert_memory_equal(&c, &want, sizeof c);
    assert_int_equal(load(&c, "{\"model\": {\"moe\": {}}, \"train\": {}}"), 0);
    assert_memory_equal(&c, &want, sizeof c);
}

static void test_unknown_keys(void **state) {
    (void)state;
    assert_load_fails("{\"modle\": {}}", "cfg: unknown key 'modle'");
    assert_load_fails("{\"model\": {\"n_embed\": 3}}", "cfg: unknown key 'model.n_embed'");
    assert_load_fails("{\"model\": {\"moe\": {\"topk\": 3}}}", "cfg: unknown key 'model.moe.topk'");
    assert_load_fails("{\"train\": {\"lr\": 0.1, \"learning_rate\": 0.1}}",
                      "cfg: unknown key 'train.learning_rate'");
    assert_load_fails("{\"data\": {\"file\": \"x\"}}", "cfg: unknown key 'data.file'");
    assert_load_fails("{\"model\": {\"\": 1}}", "cfg: unknown key 'model.'");
    /* A field is not a section. */
    assert_load_fails("{\"model\": {\"n_embd\": {\"x\": 1}}}",
                      "cfg: model.n_embd: expected an integer, got an object");
}

static void test_wrong_types(void **state) {
    (void)state;
    assert_load_fails("{\"model\": {\"n_embd\": \"64\"}}", "cfg: model.n_embd: expected an integer, got a string");
    assert_load_fails("{\"model\": {\"n_embd\": 64.5}}", "cfg: model.n_embd: expected an integer, got 64.5");
    assert_load_fails("{\"model\": {\"n_embd\": true}}", "cfg: model.n_embd: expected an integer, got a boolean");
    assert_load_fails("{\"model\": {\"n_embd\": null}}", "cfg: model.n_embd: expected an integer, got null");
    assert_load_fails("{\"model\": {\"dropout\": \"0.1\"}}", "cfg: model.dropout: expected a number, got a string");
    assert_load_fails("{\"model\": {\"dropout\": [0.1]}}", "cfg: model.dropout: expected a number, got an array");
    assert_load_fails("{\"model\": {\"bias\": 1}}", "cfg: model.bias: expected true or false, got a number");
    assert_load_fails("{\"model\": {\"bias\": \"true\"}}", "cfg: model.bias: expected true or false, got a string");
    assert_load_fails("{\"model\": {\"recompute_layers\": \"all\"}}",
                      "cfg: model.recompute_layers: expected true, false, \"auto\" or a number of blocks, got 'all'");
    assert_load_fails("{\"model\": {\"recompute_layers\": 2.5}}",
                      "cfg: model.recompute_layers: expected true, false, \"auto\" or a number of blocks, got 2.5");
    assert_load_fails("{\"model\": {\"recompute_layers\": null}}",
                      "cfg: model.recompute_layers: expected true, false, \"auto\" or a number of blocks, got null");
    assert_load_fails("{\"model\": {\"recompute_layers\": -1}}",
                      "cfg: model.recompute_layers: must be in [0, 4096], got -1");
    assert_load_fails("{\"model\": {\"activation\": \"tanh\"}}",
                      "cfg: model.activation: expected one of gelu, relu, got 'tanh'");
    assert_load_fails("{\"model\": {\"activation\": \"GELU\"}}",
                      "cfg: model.activation: expected one of gelu, relu, got 'GELU'");
    assert_load_fails("{\"model\": {\"init\": 0}}",
                      "cfg: model.init: expected one of normal, kaiming, xavier, got a number");
    assert_load_fails("{\"model\": {\"moe\": {\"gating\": \"top2\"}}}",
                      "cfg: model.moe.gating: expected one of topk, noisy_topk, got 'top2'");
    assert_load_fails("{\"train\": {\"lr_schedule\": \"exponential\"}}",
                      "cfg: train.lr_schedule: expected one of cosine, constant, linear, wsd, got 'exponential'");
    assert_load_fails("{\"data\": {\"path\": 3}}", "cfg: data.path: expected a string, got a number");
    assert_load_fails("{\"data\": {\"tokenizer\": \"bpe\"}}", "cfg: data.tokenizer: expected one of char, gpt2, got 'bpe'");
    assert_load_fails("{\"train\": {\"seed\": \"1\"}}", "cfg: train.seed: expected an integer, got a string");
    assert_load_fails("{\"train\": {\"seed\": 1.5}}", "cfg: train.seed: expected an integer, got 1.5");

    /* Floats accept integers; integers accept integral numbers in any notation. */
    qs_config c;
    qs_config_defaults(&c);
    assert_int_equal(load(&c, "{\"train\": {\"grad_clip\": 2, \"max_steps\": 2e3, \"eval_iters\": 5.0}}"), 0);
    assert_true(c.train.grad_clip == 2.0f);
    assert_int_equal(c.train.max_steps, 2000);
    assert_int_equal(c.train.eval_iters, 5);
}

static void test_ranges(void **state) {
    (void)state;
    assert_load_fails("{\"model\": {\"dropout\": 1.5}}", "cfg: model.dropout: must be in [0, 1), got 1.5");
    assert_load_fails("{\"model\": {\"dropout\": 1}}", "cfg: model.dropout: must be in [0, 1), got 1");
    assert_load_fails("{\"model\": {\"dropout\": -0.1}}", "cfg: model.dropout: must be in [0, 1), got -0.1");
    /* Rounds to 1.0f, so it is out of range as stored. */
    assert_load_fails("{\"model\": {\"dropout\": 0.99999999999}}",
                      "cfg: model.dropout: must be in [0, 1), got 0.99999999999");
    assert_load_fails("{\"model\": {\"n_embd\": 0}}", "cfg: model.n_embd: must be in [1, 65536], got 0");
    assert_load_fails("{\"model\": {\"seq_len\": -5}}", "cfg: model.seq_len: must be in [1, 1048576], got -5");
    assert_load_fails("{\"model\": {\"vocab_size\": -1}}", "cfg: model.vocab_size: must be in [0, 16777216], got -1");
    assert_load_fails("{\"model\": {\"init_std\": 0}}", "cfg: model.init_std: must be > 0, got 0");
    assert_load_fails("{\"model\": {\"moe\": {\"n_experts\": -1}}}",
                      "cfg: model.moe.n_experts: must be in [0, 4096], got -1");
    assert_load_fails("{\"model\": {\"moe\": {\"top_k\": 0}}}", "cfg: model.moe.top_k: must be in [1, 4096], got 0");
    assert_load_fails("{\"model\": {\"moe\": {\"aux_loss_coef\": -1}}}",
                      "cfg: model.moe.aux_loss_coef: must be >= 0, got -1");
    assert_load_fails("{\"train\": {\"lr\": 0}}", "cfg: train.lr: must be > 0, got 0");
    assert_load_fails("{\"train\": {\"lr\": 1e39}}", "cfg: train.lr: must be in (0, 3.4028234663852886e+38], got 1e+39");
    assert_load_fails("{\"train\": {\"max_steps\": -1}}", "cfg: train.max_steps: must be >= 0, got -1");
    assert_load_fails("{\"train\": {\"max_steps\": 3e9}}", "cfg: train.max_steps: must be in [0, 2147483647], got 3000000000");
    assert_load_fails("{\"train\": {\"max_steps\": 1e300}}", "cfg: train.max_steps: must be in [0, 2147483647], got 1e+300");
    assert_load_fails("{\"train\": {\"batch_size\": 0}}", "cfg: train.batch_size: must be in [1, 1048576], got 0");
    assert_load_fails("{\"train\": {\"beta2\": 1}}", "cfg: train.beta2: must be in [0, 1), got 1");
    assert_load_fails("{\"train\": {\"eps\": 0}}", "cfg: train.eps: must be > 0, got 0");
    assert_load_fails("{\"train\": {\"eval_iters\": 0}}", "cfg: train.eval_iters: must be >= 1, got 0");
    assert_load_fails("{\"train\": {\"log_interval\": 0}}", "cfg: train.log_interval: must be >= 1, got 0");
    assert_load_fails("{\"train\": {\"seed\": -1}}", "cfg: train.seed: must be in [0, 9007199254740992], got -1");
    assert_load_fails("{\"train\": {\"seed\": 9007199254740994}}",
                      "cfg: train.seed: must be in [0, 9007199254740992], got 9007199254740994");
    assert_load_fails("{\"data\": {\"val_fraction\": 0}}", "cfg: data.val_fraction: must be in (0, 1), got 0");
    assert_load_fails("{\"data\": {\"val_fraction\": 1}}", "cfg: data.val_fraction: must be in (0, 1), got 1");
    assert_load_fails("{\"data\": {\"path\": \"\"}}", "cfg: data.path: length must be >= 1, got 0");

    char json[QS_PATH_MAX + 64];
    int n = snprintf(json, sizeof json, "{\"data\": {\"path\": \"");
    memset(json + n, 'p', QS_PATH_MAX);
    snprintf(json + n + QS_PATH_MAX, sizeof json - (size_t)n - QS_PATH_MAX, "\"}}");
    assert_load_fails(json, "cfg: data.path: length must be in [1, 1023], got 1024");
    /* The longest path that fits. */
    memmove(json + n + QS_PATH_MAX - 1, json + n + QS_PATH_MAX, 4);
    qs_config c;
    qs_config_defaults(&c);
    assert_int_equal(load(&c, json), 0);
    assert_int_equal(strlen(c.data.path), QS_PATH_MAX - 1);
}

static void test_malformed_and_non_objects(void **state) {
    (void)state;
    assert_load_fails("{\n  \"model\": {\n    \"n_embd\": 64,\n  }\n}", "cfg: malformed JSON near line 4");
    assert_load_fails("{\"model\": {\"n_embd\": 64}", "cfg: malformed JSON near line 1");
    assert_load_fails("{}\n\n{}", "cfg: malformed JSON near line 3"); /* trailing garbage */
    assert_load_fails("", "cfg: malformed JSON near line 1");
    assert_load_fails("\n\n  nope", "cfg: malformed JSON near line 3");
    assert_load_fails("[1, 2]", "cfg: expected a JSON object, got an array");
    assert_load_fails("42", "cfg: expected a JSON object, got a number");
    assert_load_fails("{\"model\": 3}", "cfg: model: expected an object, got a number");
    assert_load_fails("{\"train\": [\"lr\"]}", "cfg: train: expected an object, got an array");
    assert_load_fails("{\"data\": null}", "cfg: data: expected an object, got null");
    assert_load_fails("{\"model\": {\"moe\": \"none\"}}", "cfg: model.moe: expected an object, got a string");
    /* Valid keys before the bad one are not applied either. */
    assert_load_fails("{\"model\": {\"n_embd\": 64, \"n_layer\": 0}}", "cfg: model.n_layer: must be in [1, 4096], got 0");
}

static void test_load_file(void **state) {
    (void)state;
    char path[] = "/tmp/qs_test_config_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *text = "{\"train\": {\"batch_size\": 8},\n \"model\": {\"n_embed\": 1}}";
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    qs_config c;
    qs_config_defaults(&c);
    char want[128];
    snprintf(want, sizeof want, "%s: unknown key 'model.n_embed'", path);
    assert_error_is(qs_config_load_file(&c, path), want);
    assert_int_equal(c.train.batch_size, 32);

    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("{\"train\": {\"batch_size\": 8}}\n", fp);
    fclose(fp);
    assert_int_equal(qs_config_load_file(&c, path), 0);
    assert_int_equal(c.train.batch_size, 8);
    unlink(path);

    snprintf(want, sizeof want, "cannot open '%s': No such file or directory", path);
    assert_error_is(qs_config_load_file(&c, path), want);
}

static void test_set(void **state) {
    (void)state;
    qs_config c;
    qs_config_defaults(&c);
    assert_int_equal(qs_config_set(&c, "model.n_embd=256"), 0);
    assert_int_equal(c.model.n_embd, 256);
    assert_int_equal(qs_config_set(&c, "train.lr=3e-4"), 0);
    assert_true(c.train.lr == 3e-4f);
    assert_int_equal(qs_config_set(&c, "model.bias=false"), 0);
    assert_false(c.model.bias);
    assert_int_equal(qs_config_set(&c, "model.activation=relu"), 0); /* bare string */
    assert_int_equal(c.model.activation, QS_ACT_RELU);
    assert_int_equal(qs_config_set(&c, "model.activation=\"gelu\""), 0); /* quoted string */
    assert_int_equal(c.model.activation, QS_ACT_GELU);
    assert_int_equal(qs_config_set(&c, "data.path=my corpus.txt"), 0);
    assert_string_equal(c.data.path, "my corpus.txt");
    assert_int_equal(qs_config_set(&c, "data.path=\"a\\\"b\""), 0); /* JSON escapes apply */
    assert_string_equal(c.data.path, "a\"b");
    assert_int_equal(qs_config_set(&c, "data.path=x=y"), 0); /* only the first '=' splits */
    assert_string_equal(c.data.path, "x=y");
    assert_int_equal(qs_config_set(&c, "model.moe.top_k=4"), 0);
    assert_int_equal(c.model.moe.top_k, 4);
    assert_int_equal(qs_config_set(&c, "model.moe={\"n_experts\": 8, \"gating\": \"noisy_topk\"}"), 0);
    assert_int_equal(c.model.moe.n_experts, 8);
    assert_int_equal(c.model.moe.gating, QS_GATING_NOISY_TOPK);
    assert_int_equal(qs_config_set(&c, "train.seed= 42 "), 0); /* JSON allows the spaces */
    assert_int_equal(c.train.seed, 42);
    /* activation checkpointing: a count of blocks, or every block, or none */
    assert_int_equal(qs_config_set(&c, "model.recompute_layers=3"), 0);
    assert_int_equal(c.model.recompute_layers, 3);
    assert_int_equal(qs_config_set(&c, "model.recompute_layers=true"), 0);
    assert_int_equal(c.model.recompute_layers, QS_RECOMPUTE_ALL);
    assert_int_equal(qs_config_set(&c, "model.recompute_layers=false"), 0);
    assert_int_equal(c.model.recompute_layers, 0);
    assert_int_equal(qs_config_set(&c, "model.recompute_layers=auto"), 0);
    assert_int_equal(c.model.recompute_layers, QS_RECOMPUTE_AUTO);

    assert_set_fails("x.y=1", "--set: unknown key 'x.y'");
    assert_set_fails("model.n_embed=1", "--set: unknown key 'model.n_embed'");
    assert_set_fails("model.moe.top=1", "--set: unknown key 'model.moe.top'");
    assert_set_fails("model.n_embd", "--set: expected key=value, got 'model.n_embd'");
    assert_set_fails("=3", "--set: empty key in '=3'");
    assert_set_fails("model.n_embd=abc", "--set: model.n_embd: expected an integer, got a string");
    assert_set_fails("model.n_embd=1.5", "--set: model.n_embd: expected an integer, got 1.5");
    assert_set_fails("model.dropout=", "--set: model.dropout: expected a number, got a string");
    assert_set_fails("model.dropout=2", "--set: model.dropout: must be in [0, 1), got 2");
    assert_set_fails("model.bias=yes", "--set: model.bias: expected true or false, got a string");
    assert_set_fails("model.activation=tanh", "--set: model.activation: expected one of gelu, relu, got 'tanh'");
    assert_set_fails("model=3", "--set: model: expected an object, got a number");
    assert_set_fails("model.moe={\"n_experts\": 8, \"bogus\": 1}", "--set: unknown key 'model.moe.bogus'");
    assert_set_fails("data.path=1", "--set: data.path: expected a string, got a number");
}

static void test_validate(void **state) {
    (void)state;
    qs_config c;
#define EXPECT_INVALID(change, want)                                                               \
    do {                                                                                           \
        qs_config_defaults(&c);                                                                    \
        change;                                                                                    \
        assert_error_is(qs_config_validate(&c), want);                                             \
    } while (0)
    EXPECT_INVALID((c.model.n_embd = 100, c.model.n_head = 8),
                   "model.n_embd (100) must be divisible by model.n_head (8)");
    EXPECT_INVALID((c.model.n_head = 8, c.model.n_kv_head = 3),
                   "model.n_head (8) must be divisible by model.n_kv_head (3)");
    EXPECT_INVALID(c.model.n_kv_head = -1, "model.n_kv_head: must be in [0, 65536], got -1");
    EXPECT_INVALID((c.model.moe.n_experts = 4, c.model.moe.top_k = 5),
                   "model.moe.top_k (5) must be <= model.moe.n_experts (4)");
    EXPECT_INVALID((c.train.batch_size = 32, c.train.micro_batch_size = 5),
                   "train.batch_size (32) must be divisible by train.micro_batch_size (5)");
    EXPECT_INVALID((c.train.lr = 1e-4f, c.train.min_lr = 1e-3f), "train.min_lr (0.001) must be <= train.lr (0.0001)");
    EXPECT_INVALID(c.train.decay_steps = 10, "train.decay_steps applies to train.lr_schedule wsd");
    EXPECT_INVALID((c.train.lr_schedule = QS_LR_WSD, c.train.max_steps = 100, c.train.warmup_steps = 10,
                    c.train.decay_steps = 91),
                   "train.decay_steps (91) must be <= train.max_steps - train.warmup_steps (90)");
    /* Per-key ranges are checked too, for configs built in code. */
    EXPECT_INVALID(c.data.path[0] = '\0', "data.path: length must be >= 1, got 0");
    EXPECT_INVALID(snprintf(c.data.tokenizer, sizeof c.data.tokenizer, "gpt2"),
                   "data.train_shards and data.val_shards must name token shards when data.tokenizer is gpt2");
    EXPECT_INVALID(c.model.dropout = 1.5f, "model.dropout: must be in [0, 1), got 1.5");
    EXPECT_INVALID(c.train.lr = NAN, "train.lr: must be > 0, got nan");
    EXPECT_INVALID(c.model.recompute_layers = -3, "model.recompute_layers: must be in [0, 4096], got -3");
    EXPECT_INVALID((c.model.n_layer = 4, c.model.recompute_layers = 5),
                   "model.recompute_layers (5) must be <= model.n_layer (4); true checkpoints every block");
    EXPECT_INVALID((c.model.type = QS_MODEL_QUADRANET, c.model.recompute_layers = 2),
                   "model.recompute_layers: a QuadraNet checkpoints every block or none (true, false or \"auto\"), "
                   "got 2");
    EXPECT_INVALID(c.model.n_head = 0, "model.n_head: must be in [1, 65536], got 0");
    EXPECT_INVALID(c.model.activation = (qs_activation)7, "model.activation: expected one of gelu, relu, got 7");
    EXPECT_INVALID(c.train.seed = (1ull << 53) + 1, "train.seed: must be in [0, 9007199254740992], got 9007199254740993");
    EXPECT_INVALID(snprintf(c.data.tokenizer, sizeof c.data.tokenizer, "bpe"),
                   "data.tokenizer: expected one of char, gpt2, got 'bpe'");
    EXPECT_INVALID(memset(c.data.tokenizer, 'x', sizeof c.data.tokenizer), /* unterminated */
                   "data.tokenizer: expected one of char, gpt2, got 'xxxxxxxxxxxxxxxx'");
#undef EXPECT_INVALID

    /* Boundary cases that are valid. */
    qs_config_defaults(&c);
    c.model.moe.n_experts = 0;
    c.model.moe.top_k = 8; /* dense model: top_k unused */
    c.train.micro_batch_size = 32;
    c.train.min_lr = c.train.lr;
    c.train.seed = 1ull << 53;
    c.model.n_kv_head = 1; /* multi-query attention */
    c.train.lr_schedule = QS_LR_WSD;
    c.train.decay_steps = c.train.max_steps - c.train.warmup_steps; /* all decay, no stable phase */
    assert_int_equal(qs_config_validate(&c), 0);
    assert_int_equal(qs_config_kv_heads(&c.model), 1);
    c.model.n_kv_head = 0;
    assert_int_equal(qs_config_kv_heads(&c.model), c.model.n_head);
}

/* A random config, valid key by key (cross-field rules do not matter for loading). */
static void random_config(qs_config *c) {
    qs_config_defaults(c);
    memset(c->data.path, 0, sizeof c->data.path);
    c->model.vocab_size = rnd_int(0, 1 << 24);
    c->model.seq_len = rnd_int(1, 1 << 20);
    c->model.n_layer = rnd_int(1, 4096);
    c->model.n_head = rnd_int(1, 65536);
    c->model.n_embd = rnd_int(1, 65536);
    c->model.n_kv_head = rnd_int(0, 65536);
    c->model.ffn_mult = rnd_int(1, 64);
    c->model.activation = (qs_activation)rnd_int(0, 1);
    c->model.bias = rnd() & 1;
    c->model.tie_embeddings = rnd() & 1;
    c->model.recompute_layers = rnd_int(QS_RECOMPUTE_AUTO, 4096);
    c->model.init = (qs_init)rnd_int(0, 2);
    c->model.moe.n_experts = rnd_int(0, 4096);
    c->model.moe.top_k = rnd_int(1, 4096);
    c->model.moe.gating = (qs_gating)rnd_int(0, 1);
    c->train.max_steps = rnd_int(0, INT32_MAX - 1);
    c->train.batch_size = rnd_int(1, 1 << 20);
    c->train.micro_batch_size = rnd_int(0, 1 << 20);
    c->train.lr_schedule = (qs_lr_schedule)rnd_int(0, 3);
    c->train.decay_steps = rnd_int(0, INT32_MAX - 1);
    c->train.warmup_steps = rnd_int(0, INT32_MAX - 1);
    c->train.decay_all = rnd() & 1;
    c->train.seed = rnd() % ((1ull << 53) + 1);
    c->train.eval_interval = rnd_int(0, INT32_MAX - 1);
    c->train.eval_iters = rnd_int(1, INT32_MAX - 1);
    c->train.checkpoint_interval = rnd_int(0, INT32_MAX - 1);
    c->train.log_interval = rnd_int(1, INT32_MAX - 1);
    c->train.sample_tokens = rnd_int(0, INT32_MAX - 1);
    int len = rnd_int(1, 40);
    for (int i = 0; i < len; i++)
        c->data.path[i] = " az/._\"\\\t"[rnd() % 9];
}

/* Bits of floats in the field's range: [0, 1) is bits [0, 0x3f800000), positive finite is
 * [1, 0x7f800000). */
static float rnd_float_bits(uint32_t lo, uint32_t hi) {
    uint32_t b = lo + (uint32_t)(rnd() % (hi - lo));
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static void randomise_floats(qs_config *c) {
    const uint32_t one = 0x3f800000, inf = 0x7f800000;
    c->model.dropout = rnd_float_bits(0, one);
    c->model.init_std = rnd_float_bits(1, inf);
    c->model.moe.capacity_factor = rnd_float_bits(0, inf);
    c->model.moe.aux_loss_coef = rnd_float_bits(0, inf);
    c->model.moe.z_loss_coef = rnd_float_bits(0, inf);
    c->train.lr = rnd_float_bits(1, inf);
    c->train.min_lr = rnd_float_bits(0, inf);
    c->train.weight_decay = rnd_float_bits(0, inf);
    c->train.beta1 = rnd_float_bits(0, one);
    c->train.beta2 = rnd_float_bits(0, one);
    c->train.eps = rnd_float_bits(1, inf);
    c->train.grad_clip = rnd_float_bits(0, inf);
    c->data.val_fraction = rnd_float_bits(1, one);
}

static void assert_round_trip(const qs_config *c) {
    char *json = qs_config_to_json(c);
    assert_non_null(json);
    qs_config back;
    memset(&back, 0, sizeof back); /* every key must come from the JSON */
    if (load(&back, json) != 0)
        fail_msg("reloading failed: %s\n%s", qs_error_last(), json);
    if (memcmp(&back, c, sizeof back) != 0)
        fail_msg("round trip changed the config:\n%s", json);
    free(json);
}

static void test_to_json_round_trip(void **state) {
    (void)state;
    qs_config c;
    qs_config_defaults(&c);
    memset(c.data.path + strlen(c.data.path), 0, sizeof c.data.path - strlen(c.data.path));
    assert_round_trip(&c);

    char *json = qs_config_to_json(&c);
    assert_non_null(json);
    /* Pretty, nested per section, enums by name, floats in short form. */
    assert_non_null(strstr(json, "\n"));
    assert_non_null(strstr(json, "\"moe\":"));
    assert_non_null(strstr(json, "\"activation\":\t\"gelu\""));
    assert_non_null(strstr(json, "\"lr\":\t0.001"));
    assert_non_null(strstr(json, "\"init_std\":\t0.02,"));
    assert_non_null(strstr(json, "\"recompute_layers\":\tfalse,")); /* 0 as the word false */
    free(json);
    c.model.recompute_layers = QS_RECOMPUTE_AUTO;
    json = qs_config_to_json(&c);
    assert_non_null(strstr(json, "\"recompute_layers\":\t\"auto\","));
    assert_null(strstr(json, "\"top_k\":\t2,\n\t\"")); /* top_k sits inside moe, not model */
    free(json);

    for (int iter = 0; iter < 300; iter++) {
        random_config(&c);
        randomise_floats(&c);
        assert_round_trip(&c);
    }
    /* Extremes. */
    random_config(&c);
    randomise_floats(&c);
    c.train.seed = 1ull << 53;
    c.model.dropout = nextafterf(1.0f, 0.0f);
    c.train.lr = FLT_MAX;
    c.train.eps = 1e-45f; /* smallest subnormal */
    c.data.val_fraction = nextafterf(0.0f, 1.0f);
    memset(c.data.path, 'q', QS_PATH_MAX - 1);
    assert_round_trip(&c);
}

/* Every config shipped in configs/ (run from the project root, as make test does) loads
 * and validates: a renamed key or a value out of range breaks here, not on a user. */
/* Memory modes are not the architecture (a resume or a fine-tune may change them); every
 * other model key is, and so is the rest of the section. */
static void test_same_architecture(void **state) {
    (void)state;
    qs_config a, b;
    qs_config_defaults(&a);
    b = a;
    assert_true(qs_config_same_architecture(&a.model, &b.model));
    b.model.recompute_ffn = !a.model.recompute_ffn;
    b.model.recompute_layers = 3;
    assert_true(qs_config_same_architecture(&a.model, &b.model));
    b.model.n_layer++;
    assert_false(qs_config_same_architecture(&a.model, &b.model));
    b = a;
    b.model.dropout = 0.1f;
    assert_false(qs_config_same_architecture(&a.model, &b.model));
    b = a;
    b.model.moe.n_experts = 4;
    assert_false(qs_config_same_architecture(&a.model, &b.model));
    b = a;
    b.model.quadra.widths[2]++;
    assert_false(qs_config_same_architecture(&a.model, &b.model));
}

static void test_shipped_configs(void **state) {
    (void)state;
    glob_t g;
    assert_int_equal(glob("configs/*.json", 0, NULL, &g), 0);
    assert_true(g.gl_pathc >= 8);
    for (size_t i = 0; i < g.gl_pathc; i++) {
        qs_config c;
        qs_config_defaults(&c);
        const int rc = qs_config_load_file(&c, g.gl_pathv[i]);
        if (rc == 0 && qs_config_validate(&c) == 0) continue;
        fail_msg("%s: %s", g.gl_pathv[i], qs_error_last());
    }
    globfree(&g);
}

int main(void) {
    seed = qs_test_seed("test_config");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_load_overrides),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_ranges),
        cmocka_unit_test(test_malformed_and_non_objects),
        cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_set),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_to_json_round_trip),
        cmocka_unit_test(test_same_architecture),
        cmocka_unit_test(test_shipped_configs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

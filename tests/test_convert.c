/* Hugging Face GPT-2 conversion: the converted fixture (tests/make_hf_fixture.py, F16
 * weights) gives transformers' logits; from-hf -> to-hf -> from-hf keeps every
 * parameter bit for bit; unsupported or inconsistent inputs are refused by name.
 * Runs from the repository root, like every test. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quasar/checkpoint.h"
#include "quasar/convert.h"
#include "quasar/error.h"
#include "quasar/model.h"
#include "quasar/fileio.h"
#include "test_json.h"

#define FIXTURE "tests/fixtures/hf_gpt2_tiny"
#define VOCAB "../shared/data/gpt2"

static char tmp[256];

static int setup(void **state) {
    (void)state;
    snprintf(tmp, sizeof tmp, "/tmp/qs_test_convert_XXXXXX");
    return mkdtemp(tmp) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    return system(cmd);
}

static void tmp_path(char *buf, size_t cap, const char *name) { snprintf(buf, cap, "%s/%s", tmp, name); }

/* Opens a converted run's checkpoint into a model sized for one sequence of T tokens. */
static qs_gpt *load_run(const char *run, int T, qs_st_file *f) {
    char step_dir[QS_PATH_MAX + 64], *chars_json;
    qs_config cfg;
    qs_gpt *m;
    assert_int_equal(qs_checkpoint_find(run, step_dir, sizeof step_dir), 0);
    assert_int_equal(qs_checkpoint_open_model(f, step_dir, &cfg, &chars_json), 0);
    assert_null(chars_json);
    assert_string_equal(cfg.data.tokenizer, "gpt2");
    assert_string_equal(cfg.data.vocab_dir, VOCAB);
    assert_int_equal(qs_gpt_create(&m, &cfg.model, qs_backend_cpu(), 1, T), 0);
    assert_int_equal(qs_checkpoint_load_weights(qs_gpt_params(m), f, step_dir), 0);
    return m;
}

static void test_logits_match_transformers(void **state) {
    (void)state;
    char run[300];
    tmp_path(run, sizeof run, "run");
    assert_int_equal(qs_convert_from_hf(FIXTURE, run, VOCAB), 0);
    cJSON *expected = read_json(FIXTURE "/expected_logits.json");
    const cJSON *tokens = cJSON_GetObjectItem(expected, "tokens"), *logits = cJSON_GetObjectItem(expected, "logits");
    const cJSON *argmax = cJSON_GetObjectItem(expected, "argmax"), *lse = cJSON_GetObjectItem(expected, "logsumexp");
    int T = cJSON_GetArraySize(tokens), cols = cJSON_GetObjectItem(expected, "columns")->valueint, ids[64];
    assert_true(T > 0 && T <= 64);
    for (int t = 0; t < T; t++) ids[t] = cJSON_GetArrayItem(tokens, t)->valueint;

    qs_st_file f;
    qs_gpt *m = load_run(run, T, &f);
    int V = qs_gpt_config(m)->vocab_size;
    qs_forward_mode mode = {.train = false};
    qs_gpt_forward(m, ids, NULL, 1, T, &mode);
    float *row = malloc((size_t)V * sizeof *row);
    assert_non_null(row);
    double err = 0, scale = 0;
    for (int t = 0; t < T; t++) {
        qs_gpt_logits_row(m, t, row);
        for (int v = 0; v < cols; v++) {
            double want = cJSON_GetArrayItem(cJSON_GetArrayItem(logits, t), v)->valuedouble;
            err = fmax(err, fabs(row[v] - want));
            scale = fmax(scale, fabs(want));
        }
        /* the whole row: its argmax and log-sum-exp */
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        double mx = row[best], sum = 0;
        for (int v = 0; v < V; v++) sum += exp((double)row[v] - mx);
        double want_lse = cJSON_GetArrayItem(lse, t)->valuedouble;
        assert_int_equal(best, cJSON_GetArrayItem(argmax, t)->valueint);
        assert_true(fabs(mx + log(sum) - want_lse) <= 1e-4 * fmax(1, fabs(want_lse)));
    }
    printf("# max relative logit error vs transformers: %.3g\n", err / scale);
    assert_true(err <= 1e-4 * scale);
    free(row);
    qs_gpt_free(m);
    qs_st_free(&f);
    cJSON_Delete(expected);
}

static void test_round_trip_is_exact(void **state) {
    (void)state;
    char run1[300], hf[300], run2[300];
    tmp_path(run1, sizeof run1, "rt1");
    tmp_path(hf, sizeof hf, "rt_hf");
    tmp_path(run2, sizeof run2, "rt2");
    assert_int_equal(qs_convert_from_hf(FIXTURE, run1, VOCAB), 0);
    assert_int_equal(qs_convert_to_hf(run1, hf), 0);
    assert_int_equal(qs_convert_from_hf(hf, run2, VOCAB), 0);
    qs_st_file a, b;
    qs_gpt *ma = load_run(run1, 1, &a), *mb = load_run(run2, 1, &b);
    /* the same config (architecture, dropout, init) and the same bits */
    assert_string_equal(qs_st_meta_get(&a, "quasar.config"), qs_st_meta_get(&b, "quasar.config"));
    size_t n = qs_gpt_params(ma)->n;
    assert_int_equal(n, qs_gpt_params(mb)->n);
    assert_memory_equal(qs_gpt_params(ma)->data, qs_gpt_params(mb)->data, n * sizeof(float));
    qs_gpt_free(ma);
    qs_gpt_free(mb);
    qs_st_free(&a);
    qs_st_free(&b);
}

/* An HF folder under tmp: the fixture's weights and its config.json with key set to
 * the JSON value (NULL: no config.json at all). */
static void make_variant(char *dir, size_t cap, const char *name, const char *key, const char *value) {
    char path[600], cwd[PATH_MAX], weights[PATH_MAX + 64];
    tmp_path(dir, cap, name);
    assert_int_equal(qs_mkdirs(dir), 0);
    assert_non_null(getcwd(cwd, sizeof cwd));
    snprintf(weights, sizeof weights, "%s/" FIXTURE "/model.safetensors", cwd);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    assert_int_equal(symlink(weights, path), 0);
    if (!key) return;
    cJSON *cfg = read_json(FIXTURE "/config.json");
    cJSON_ReplaceItemInObject(cfg, key, cJSON_Parse(value));
    char *text = cJSON_Print(cfg);
    snprintf(path, sizeof path, "%s/config.json", dir);
    assert_int_equal(qs_file_write_atomic(path, text, strlen(text)), 0);
    free(text);
    cJSON_Delete(cfg);
}

static void expect_refused(const char *hf, const char *needle) {
    char run[300];
    tmp_path(run, sizeof run, "refused");
    assert_int_equal(qs_convert_from_hf(hf, run, VOCAB), -1);
    if (!strstr(qs_error_last(), needle)) fail_msg("'%s' lacks '%s'", qs_error_last(), needle);
    assert_int_equal(access(run, F_OK), -1); /* nothing written */
}

static void test_bad_inputs_are_refused(void **state) {
    (void)state;
    char dir[300];
    make_variant(dir, sizeof dir, "no_config", NULL, NULL);
    expect_refused(dir, "config.json");
    make_variant(dir, sizeof dir, "swish", "activation_function", "\"swish\"");
    expect_refused(dir, "'activation_function' 'swish' is not supported");
    make_variant(dir, sizeof dir, "eps", "layer_norm_epsilon", "1e-6");
    expect_refused(dir, "'layer_norm_epsilon'");
    make_variant(dir, sizeof dir, "inner", "n_inner", "40");
    expect_refused(dir, "'n_inner'");
    make_variant(dir, sizeof dir, "untied", "tie_word_embeddings", "false");
    expect_refused(dir, "'tie_word_embeddings' = false");
    make_variant(dir, sizeof dir, "positions", "n_positions", "64");
    expect_refused(dir, "tensor 'transformer.wpe.weight' is [32,16], but config.json makes it [64,16]");
}

/* An lm_head.weight beside wte (as some exports write it) must repeat it: the same
 * bits convert, one changed value is refused (Quasar ties the head to wte). */
static void test_lm_head_must_repeat_wte(void **state) {
    (void)state;
    qs_st_file f;
    assert_int_equal(qs_st_read(&f, FIXTURE "/model.safetensors"), 0);
    const qs_st_tensor *wte = qs_st_find(&f, "transformer.wte.weight");
    if (!wte) wte = qs_st_find(&f, "wte.weight");
    assert_non_null(wte);
    unsigned char *head = malloc(wte->nbytes);
    assert_non_null(head);
    qs_st_entry e[64];
    assert_true(f.n_tensors < 64);
    for (int k = 0; k < f.n_tensors; k++) {
        const qs_st_tensor *t = &f.tensors[k];
        e[k] = (qs_st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim, .data = t->data};
        memcpy(e[k].shape, t->shape, sizeof t->shape);
    }
    e[f.n_tensors] = (qs_st_entry){.name = "lm_head.weight", .dtype = wte->dtype, .ndim = wte->ndim, .data = head};
    memcpy(e[f.n_tensors].shape, wte->shape, sizeof wte->shape);
    static const char *const names[2] = {"head_same", "head_differs"};
    for (int v = 0; v < 2; v++) {
        memcpy(head, wte->data, wte->nbytes);
        head[wte->nbytes / 2] ^= 0x40; /* one value's exponent */
        if (!v) memcpy(head, wte->data, wte->nbytes);
        char dir[300], path[400], run[300];
        make_variant(dir, sizeof dir, names[v], "tie_word_embeddings", "true");
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        assert_int_equal(unlink(path), 0); /* the fixture's, linked */
        assert_int_equal(qs_st_write(path, e, f.n_tensors + 1, NULL, 0), 0);
        if (v) {
            expect_refused(dir, "lm_head.weight differs from wte.weight");
        } else {
            tmp_path(run, sizeof run, names[v]);
            assert_int_equal(qs_convert_from_hf(dir, run, VOCAB), 0);
        }
    }
    free(head);
    qs_st_free(&f);
}

static void test_existing_run_moe_and_gqa_are_refused(void **state) {
    (void)state;
    char run[300], hf[300];
    tmp_path(run, sizeof run, "once");
    assert_int_equal(qs_convert_from_hf(FIXTURE, run, VOCAB), 0);
    assert_int_equal(qs_convert_from_hf(FIXTURE, run, VOCAB), -1);
    assert_non_null(strstr(qs_error_last(), "already holds a run"));

    /* MoE and grouped-query checkpoints of the same shape have no GPT-2 form */
    static const struct {
        int experts, kv_heads;
        const char *name, *why;
    } kinds[] = {{2, 0, "moe", "Mixture-of-Experts"}, {0, 1, "gqa", "grouped-query attention (model.n_kv_head = 1"}};
    for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) {
        qs_config cfg;
        qs_codec codec;
        qs_gpt *m;
        qs_adamw opt;
        qs_config_defaults(&cfg);
        cfg.model.vocab_size = 50257;
        cfg.model.seq_len = 8;
        cfg.model.n_layer = 1;
        cfg.model.n_head = 2;
        cfg.model.n_kv_head = kinds[k].kv_heads;
        cfg.model.n_embd = 8;
        cfg.model.moe.n_experts = kinds[k].experts;
        cfg.model.moe.top_k = 1;
        snprintf(cfg.data.tokenizer, sizeof cfg.data.tokenizer, "gpt2");
        snprintf(cfg.data.vocab_dir, sizeof cfg.data.vocab_dir, VOCAB);
        snprintf(cfg.data.train_shards, sizeof cfg.data.train_shards, "none");
        snprintf(cfg.data.val_shards, sizeof cfg.data.val_shards, "none");
        assert_int_equal(qs_codec_open(&codec, &cfg.data, NULL), 0);
        assert_int_equal(qs_gpt_create(&m, &cfg.model, qs_backend_cpu(), 1, 1), 0);
        assert_int_equal(qs_adamw_create(&opt, qs_backend_cpu(), qs_gpt_params(m)->n), 0);
        qs_train_state st = {.step = 1};
        qs_guard_init(&st.guard, 0, 0);
        tmp_path(run, sizeof run, kinds[k].name);
        assert_int_equal(qs_checkpoint_save(run, &cfg, &codec, qs_gpt_params(m), &opt, &st), 0);
        char hf_name[16];
        snprintf(hf_name, sizeof hf_name, "%s_hf", kinds[k].name);
        tmp_path(hf, sizeof hf, hf_name);
        assert_int_equal(qs_convert_to_hf(run, hf), -1);
        assert_non_null(strstr(qs_error_last(), kinds[k].why));
        assert_int_equal(access(hf, F_OK), -1);
        qs_adamw_free(&opt);
        qs_gpt_free(m);
        qs_codec_free(&codec);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logits_match_transformers),
        cmocka_unit_test(test_round_trip_is_exact),
        cmocka_unit_test(test_bad_inputs_are_refused),
        cmocka_unit_test(test_lm_head_must_repeat_wte),
        cmocka_unit_test(test_existing_run_moe_and_gqa_are_refused),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

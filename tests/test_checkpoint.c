/* Checkpoints: exact round trip, and every kind of damage refused with a message
 * that says what is wrong: bit flips, truncation, a missing manifest, wrong shapes,
 * missing and unexpected tensors. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quasar/checkpoint.h"
#include "quasar/error.h"
#include "quasar/model.h"
#include "quasar/fileio.h"
#include "quasar/rng.h"
#include "test_seed.h"

static uint64_t seed;
static char run[256], step_dir[512];

static qs_config small_config(int n_embd) {
    qs_config c;
    qs_config_defaults(&c);
    c.model.vocab_size = 9;
    c.model.seq_len = 5;
    c.model.n_layer = 1;
    c.model.n_head = 2;
    c.model.n_embd = n_embd;
    c.model.moe.n_experts = 3;
    c.model.moe.top_k = 2;
    return c;
}

static qs_char_vocab vocab_of(int n) {
    qs_char_vocab v;
    unsigned char text[16];
    for (int i = 0; i < n; i++) text[i] = (unsigned char)('a' + i);
    qs_vocab_build(&v, text, (size_t)n);
    return v;
}

/* A checkpoint of a freshly initialised model with random optimizer moments. */
static int setup(void **state) {
    (void)state;
    snprintf(run, sizeof run, "/tmp/qs_test_ckpt_XXXXXX");
    assert_non_null(mkdtemp(run));
    qs_config c = small_config(8);
    qs_codec codec = {.chars = vocab_of(9)};
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &c.model, qs_backend_cpu(), 1, 5), 0);
    qs_gpt_init(m, seed);
    qs_adamw o;
    assert_int_equal(qs_adamw_create(&o, qs_backend_cpu(), qs_gpt_params(m)->n), 0);
    for (size_t i = 0; i < o.n; i++) {
        o.m[i] = qs_rng_normal(seed, 1, i);
        o.v[i] = qs_rng_uniform(seed, 2, i);
    }
    o.t = 7;
    qs_train_state st = {.step = 7, .seed = seed & ((1ULL << 53) - 1), .tokens_seen = 1234}; /* seeds are JSON numbers */
    qs_guard_init(&st.guard, 0, 0);
    qs_guard_check(&st.guard, 1.5, 0.25);
    assert_int_equal(qs_checkpoint_save(run, &c, &codec, qs_gpt_params(m), &o, &st), 0);
    qs_adamw_free(&o);
    qs_gpt_free(m);
    assert_int_equal(qs_checkpoint_find(run, step_dir, sizeof step_dir), 0);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", run);
    return system(cmd);
}

/* Loads the checkpoint into a model made from its own config. */
static int load_all(qs_gpt **m, qs_adamw *o, qs_train_state *st) {
    qs_st_file f;
    qs_config c;
    char *chars;
    if (qs_checkpoint_open_model(&f, step_dir, &c, &chars)) return -1;
    assert_non_null(strstr(chars, "[97,98,99")); /* the char vocabulary travels along */
    free(chars);
    int rc = qs_gpt_create(m, &c.model, qs_backend_cpu(), 1, 5) || qs_checkpoint_load_weights(qs_gpt_params(*m), &f, step_dir);
    qs_st_free(&f);
    if (rc) return -1;
    if (qs_adamw_create(o, qs_backend_cpu(), qs_gpt_params(*m)->n)) return -1;
    qs_guard_init(&st->guard, 0, 0);
    return qs_checkpoint_load_optim(step_dir, o, st);
}

static void test_round_trip(void **state) {
    (void)state;
    assert_true(strstr(step_dir, "ckpt/step_00000007") != NULL);
    qs_gpt *m = NULL;
    qs_adamw o = {0};
    qs_train_state st;
    assert_int_equal(load_all(&m, &o, &st), 0);
    qs_gpt *ref;
    qs_config c = small_config(8);
    assert_int_equal(qs_gpt_create(&ref, &c.model, qs_backend_cpu(), 1, 5), 0);
    qs_gpt_init(ref, seed);
    assert_memory_equal(qs_gpt_params(m)->data, qs_gpt_params(ref)->data, qs_gpt_params(m)->n * sizeof(float));
    for (size_t i = 0; i < o.n; i += 13) {
        assert_true(o.m[i] == qs_rng_normal(seed, 1, i));
        assert_true(o.v[i] == qs_rng_uniform(seed, 2, i));
    }
    assert_int_equal(o.t, 7);
    assert_int_equal(st.step, 7);
    assert_int_equal(st.tokens_seen, 1234);
    assert_true(st.seed == (seed & ((1ULL << 53) - 1)));
    assert_int_equal(st.guard.n, 1);
    assert_true(st.guard.loss[0] == 1.5);
    qs_adamw_free(&o);
    qs_gpt_free(m);
    qs_gpt_free(ref);
}

/* The checkpoint's model file and its config (the vocabulary left out). */
static void open_model(qs_st_file *f, qs_config *c) {
    char *chars;
    assert_int_equal(qs_checkpoint_open_model(f, step_dir, c, &chars), 0);
    free(chars);
}

/* Loading into a model that holds its linear weights as bf16 only (packed as they load,
 * a chunk of the mapped file at a time) gives the logits of one packed after a whole
 * load, bit for bit; such a model refuses to be saved, and nothing is written. */
static void test_load_into_bf16_only(void **state) {
    (void)state;
    qs_st_file f;
    qs_config c;
    open_model(&f, &c);
    qs_gpt *m[2];
    for (int k = 0; k < 2; k++) {
        assert_int_equal(qs_gpt_create_for(&m[k], &c.model, qs_backend_cpu(), 1, 5, k ? QS_GPT_INFER_BF16 : QS_GPT_INFER),
                         0);
        assert_int_equal(qs_checkpoint_load_weights(qs_gpt_params(m[k]), &f, step_dir), 0);
        if (!k) assert_int_equal(qs_gpt_use_bf16_weights(m[k]), 0);
    }
    qs_st_free(&f);
    const int x[5] = {1, 4, 2, 8, 5};
    float a[16], b[16];
    assert_true(c.model.vocab_size <= 16);
    for (int k = 0; k < 2; k++) assert_int_equal(qs_gpt_prefill(m[k], x, 1, 5), 0);
    qs_gpt_logits_row(m[0], 0, a);
    qs_gpt_logits_row(m[1], 0, b);
    assert_memory_equal(a, b, (size_t)c.model.vocab_size * sizeof(float));
    char out[300];
    snprintf(out, sizeof out, "%s/bf16_only", run);
    qs_adamw o;
    assert_int_equal(qs_adamw_create(&o, qs_backend_cpu(), 1), 0);
    qs_train_state st = {.step = 1};
    qs_guard_init(&st.guard, 0, 0);
    assert_int_equal(qs_checkpoint_save(out, &c, NULL, qs_gpt_params(m[1]), &o, &st), -1);
    assert_non_null(strstr(qs_error_last(), "held as bf16"));
    char latest[340];
    snprintf(latest, sizeof latest, "%s/ckpt/latest", out);
    assert_int_equal(access(latest, F_OK), -1);
    qs_adamw_free(&o);
    for (int k = 0; k < 2; k++) qs_gpt_free(m[k]);
}

/* One static buffer: copy the result before calling again. */
static char *path_of(const char *name) {
    static char p[600];
    snprintf(p, sizeof p, "%s/%s", step_dir, name);
    return p;
}

static void flip_bit(const char *name, uint64_t salt) {
    char *data;
    size_t n;
    assert_int_equal(qs_file_read(path_of(name), &data, &n), 0);
    size_t at = qs_rng_below(seed, 10 + salt, 0, n);
    data[at] ^= (char)(1u << qs_rng_below(seed, 11 + salt, 0, 8));
    assert_int_equal(qs_file_write_atomic(path_of(name), data, n), 0);
    data[at] ^= (char)(1u << qs_rng_below(seed, 11 + salt, 0, 8)); /* keep the original to restore */
    char keep[620];
    snprintf(keep, sizeof keep, "%s.orig", path_of(name));
    assert_int_equal(qs_file_write_atomic(keep, data, n), 0);
    free(data);
}

static void restore(const char *name) {
    char keep[620];
    snprintf(keep, sizeof keep, "%s.orig", path_of(name));
    assert_int_equal(rename(keep, path_of(name)), 0);
}

static void expect_load_error(const char *needle) {
    qs_gpt *m = NULL;
    qs_adamw o = {0};
    qs_train_state st;
    if (load_all(&m, &o, &st) != -1) fail_msg("loaded despite expecting '%s'", needle);
    if (!strstr(qs_error_last(), needle)) fail_msg("error '%s' lacks '%s'", qs_error_last(), needle);
    qs_adamw_free(&o);
    qs_gpt_free(m);
}

static void test_bit_flips_refused(void **state) {
    (void)state;
    const char *files[] = {"model.safetensors", "optim.safetensors", "state.json"};
    for (int i = 0; i < 3; i++) {
        for (int k = 0; k < 5; k++) {
            flip_bit(files[i], (uint64_t)(i * 5 + k) * 2);
            expect_load_error("fails its checksum");
            restore(files[i]);
        }
    }
    test_round_trip(state); /* restored files load again */
}

static void test_truncation_and_manifest(void **state) {
    (void)state;
    char *data;
    size_t n;
    assert_int_equal(qs_file_read(path_of("optim.safetensors"), &data, &n), 0);
    assert_int_equal(truncate(path_of("optim.safetensors"), (off_t)(n / 2)), 0);
    expect_load_error("wrong size");
    assert_int_equal(qs_file_write_atomic(path_of("optim.safetensors"), data, n), 0);
    free(data);

    char manifest[600], aside[620];
    snprintf(manifest, sizeof manifest, "%s", path_of("checksums.json"));
    snprintf(aside, sizeof aside, "%s.aside", manifest);
    assert_int_equal(rename(manifest, aside), 0);
    expect_load_error("checksums.json");
    assert_int_equal(rename(aside, manifest), 0);
    test_round_trip(state);
}

/* The right file with the wrong model: names the tensor and both shapes. */
static void test_wrong_shapes_and_names(void **state) {
    (void)state;
    qs_st_file f;
    qs_config c;
    open_model(&f, &c);
    qs_config other = small_config(6); /* narrower */
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &other.model, qs_backend_cpu(), 1, 5), 0);
    assert_int_equal(qs_checkpoint_load_weights(qs_gpt_params(m), &f, "ckpt"), -1);
    assert_non_null(strstr(qs_error_last(), "is F32 [9,8], expected F32 [9,6]"));
    qs_gpt_free(m);

    other = small_config(8);
    other.model.moe.gating = QS_GATING_NOISY_TOPK; /* needs h.0.mlp.noise.* */
    assert_int_equal(qs_gpt_create(&m, &other.model, qs_backend_cpu(), 1, 5), 0);
    assert_int_equal(qs_checkpoint_load_weights(qs_gpt_params(m), &f, "ckpt"), -1);
    assert_non_null(strstr(qs_error_last(), "missing tensor 'h.0.mlp.noise.weight'"));
    qs_gpt_free(m);

    other = small_config(8);
    other.model.moe.n_experts = 0; /* dense: the router is unexpected */
    assert_int_equal(qs_gpt_create(&m, &other.model, qs_backend_cpu(), 1, 5), 0);
    assert_int_equal(qs_checkpoint_load_weights(qs_gpt_params(m), &f, "ckpt"), -1);
    assert_non_null(strstr(qs_error_last(), "unexpected tensor"));
    qs_gpt_free(m);
    qs_st_free(&f);
}

int main(void) {
    seed = qs_test_seed("test_checkpoint");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_load_into_bf16_only),
        cmocka_unit_test(test_bit_flips_refused),
        cmocka_unit_test(test_truncation_and_manifest),
        cmocka_unit_test(test_wrong_shapes_and_names),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

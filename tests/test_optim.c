/* The optimizer glue around the AdamW op: LR schedule, which tensors decay, the
 * global norm, clipping, and skipping non-finite steps. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/model.h"
#include "quasar/optim.h"
#include "quasar/rng.h"
#include "test_seed.h"

static uint64_t seed;

static qs_train_config train_config(void) {
    qs_config c;
    qs_config_defaults(&c);
    c.train.lr = 1e-2f;
    c.train.min_lr = 1e-3f;
    c.train.warmup_steps = 10;
    c.train.max_steps = 110;
    return c.train;
}

static void test_lr_schedule(void **state) {
    (void)state;
    qs_train_config t = train_config();
    assert_float_equal(qs_lr_at(&t, 0), 1e-3, 1e-9);  /* lr * 1/10 */
    assert_float_equal(qs_lr_at(&t, 9), 1e-2, 1e-9);  /* warmup ends at lr */
    assert_float_equal(qs_lr_at(&t, 10), 1e-2, 1e-9); /* cosine starts at lr */
    assert_float_equal(qs_lr_at(&t, 60), 5.5e-3, 1e-7); /* halfway: (lr + min_lr) / 2 */
    assert_float_equal(qs_lr_at(&t, 110), 1e-3, 1e-9);
    assert_float_equal(qs_lr_at(&t, 500), 1e-3, 1e-9); /* past the end: stays at min_lr */
    for (int s = 11; s < 110; s++) assert_true(qs_lr_at(&t, s) <= qs_lr_at(&t, s - 1));
    t.lr_schedule = QS_LR_CONSTANT;
    assert_float_equal(qs_lr_at(&t, 5), 6e-3, 1e-9);
    assert_float_equal(qs_lr_at(&t, 100), 1e-2, 1e-9);

    t.lr_schedule = QS_LR_LINEAR; /* a straight line from lr at step 10 to min_lr at 110 */
    assert_float_equal(qs_lr_at(&t, 5), 6e-3, 1e-9);
    assert_float_equal(qs_lr_at(&t, 10), 1e-2, 1e-9);
    assert_float_equal(qs_lr_at(&t, 35), 7.75e-3, 1e-7);
    assert_float_equal(qs_lr_at(&t, 60), 5.5e-3, 1e-7);
    assert_float_equal(qs_lr_at(&t, 110), 1e-3, 1e-9);
    assert_float_equal(qs_lr_at(&t, 500), 1e-3, 1e-9);
    for (int s = 11; s <= 110; s++) /* equal steps down */
        assert_float_equal(qs_lr_at(&t, s - 1) - qs_lr_at(&t, s), 9e-5, 1e-8);

    /* warmup-stable-decay: lr through step 90, then a line to min_lr over the last 20
     * (the default decay: a fifth of the 100 steps after warmup) */
    t.lr_schedule = QS_LR_WSD;
    assert_float_equal(qs_lr_at(&t, 5), 6e-3, 1e-9);
    for (int s = 10; s <= 90; s++) assert_float_equal(qs_lr_at(&t, s), 1e-2, 1e-9);
    assert_float_equal(qs_lr_at(&t, 100), 5.5e-3, 1e-7);
    assert_float_equal(qs_lr_at(&t, 110), 1e-3, 1e-9);
    assert_float_equal(qs_lr_at(&t, 500), 1e-3, 1e-9);
    t.decay_steps = 50; /* stable through 60, half way down at 85 */
    assert_float_equal(qs_lr_at(&t, 60), 1e-2, 1e-9);
    assert_float_equal(qs_lr_at(&t, 61), 1e-2 - 9e-3 / 50, 1e-8);
    assert_float_equal(qs_lr_at(&t, 85), 5.5e-3, 1e-7);
    t.max_steps = 200; /* a longer run only lengthens the stable phase */
    assert_float_equal(qs_lr_at(&t, 150), 1e-2, 1e-9);
    assert_float_equal(qs_lr_at(&t, 175), 5.5e-3, 1e-7);
    t.max_steps = 12, t.decay_steps = 0; /* too short for a decay: lr, then min_lr at the end */
    assert_float_equal(qs_lr_at(&t, 11), 1e-2, 1e-9);
    assert_float_equal(qs_lr_at(&t, 12), 1e-3, 1e-9);
}

static qs_gpt *tiny_model(void) {
    qs_config c;
    qs_config_defaults(&c);
    c.model.vocab_size = 7;
    c.model.seq_len = 4;
    c.model.n_layer = 1;
    c.model.n_head = 2;
    c.model.n_embd = 8;
    c.model.moe.n_experts = 2; /* stacked expert biases are 2-D and must not decay */
    c.model.moe.top_k = 1;
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &c.model, qs_backend_cpu(), 1, 4), 0);
    qs_gpt_init(m, seed);
    return m;
}

/* With zero gradients AdamW's step is pure decay: decayed tensors shrink by exactly
 * (1 - lr * wd), the others stay. Matrices and embeddings decay; biases and norms
 * only with decay_all. */
static void test_decay_selection(void **state) {
    (void)state;
    for (int decay_all = 0; decay_all <= 1; decay_all++) {
        qs_gpt *m = tiny_model();
        qs_train_config t = train_config();
        t.weight_decay = 0.5f;
        t.decay_all = decay_all;
        size_t n = qs_gpt_params(m)->n;
        float *before = malloc(n * sizeof(float));
        memcpy(before, qs_gpt_params(m)->data, n * sizeof(float));
        qs_adamw o;
        assert_int_equal(qs_adamw_create(&o, qs_backend_cpu(), n), 0);
        qs_params_zero_grad(qs_gpt_params(m));
        assert_float_equal(qs_adamw_grad_norm(qs_gpt_params(m)), 0.0, 0.0);
        qs_adamw_apply(&o, qs_gpt_params(m), &t, 0.1f, 0.0);
        int decayed = 0, kept = 0;
        for (int i = 0; i < qs_gpt_params(m)->n_tensors; i++) {
            const qs_param_info *p = &qs_gpt_params(m)->info[i];
            /* by name, independent of the roles the model assigns */
            size_t len = strlen(p->name);
            int bias = len > 5 && !strcmp(p->name + len - 5, ".bias"), norm = strstr(p->name, "ln_") != NULL;
            int want = decay_all || (!bias && !norm);
            assert_int_equal(qs_adamw_decays(&t, p), want);
            for (size_t j = 0; j < p->numel; j++) {
                float b = before[p->offset + j], a = qs_gpt_params(m)->data[p->offset + j];
                assert_float_equal(a, want ? b * (1.0f - 0.1f * 0.5f) : b, 1e-7);
            }
            want ? decayed++ : kept++;
        }
        assert_true(decayed > 0 && (decay_all ? kept == 0 : kept > 0));
        qs_adamw_free(&o);
        free(before);
        qs_gpt_free(m);
    }
}

/* The returned norm is the global L2 norm before clipping; clipping rescales the
 * gradient seen by Adam (visible in the second moment after one step). */
static void test_norm_and_clip(void **state) {
    (void)state;
    qs_gpt *m = tiny_model();
    size_t n = qs_gpt_params(m)->n;
    float *g = qs_gpt_params(m)->grad;
    double ss = 0;
    for (size_t j = 0; j < n; j++) {
        g[j] = qs_rng_normal(seed, 9, j);
        ss += (double)g[j] * g[j];
    }
    qs_train_config t = train_config();
    t.weight_decay = 0.0f;
    t.grad_clip = 0.5f;
    qs_adamw o;
    assert_int_equal(qs_adamw_create(&o, qs_backend_cpu(), n), 0);
    double norm = qs_adamw_grad_norm(qs_gpt_params(m));
    assert_float_equal(norm, sqrt(ss), 1e-6 * sqrt(ss));
    qs_adamw_apply(&o, qs_gpt_params(m), &t, 1e-3f, norm);
    double scale = 0.5 / sqrt(ss);
    for (size_t j = 0; j < n; j += 7) /* v = (1 - beta2) * (scale * g)^2 */
        assert_float_equal(o.v[j], (1.0 - t.beta2) * scale * scale * g[j] * g[j], 1e-6 * (o.v[j] + 1e-12));
    assert_int_equal(o.t, 1);
    qs_adamw_free(&o);
    qs_gpt_free(m);
}

/* A non-finite gradient shows in the norm, which the step guard then rejects. */
static void test_nonfinite_norm(void **state) {
    (void)state;
    qs_gpt *m = tiny_model();
    size_t n = qs_gpt_params(m)->n;
    qs_gpt_params(m)->grad[n / 2] = NAN;
    qs_adamw o;
    assert_int_equal(qs_adamw_create(&o, qs_backend_cpu(), n), 0);
    assert_true(isnan(qs_adamw_grad_norm(qs_gpt_params(m))));
    qs_gpt_params(m)->grad[n / 2] = INFINITY;
    assert_false(isfinite(qs_adamw_grad_norm(qs_gpt_params(m))));
    qs_adamw_free(&o);
    qs_gpt_free(m);
}

/* A ZeRO-1 shard: an optimizer over two spans that cut through tensors (decayed and not)
 * updates exactly those parameters, as the whole-table optimizer does over three steps,
 * and leaves the rest alone. */
static void test_shard_spans(void **state) {
    (void)state;
    qs_gpt *whole_m = tiny_model(), *shard_m = tiny_model();
    qs_params *pw = qs_gpt_params(whole_m), *ps = qs_gpt_params(shard_m);
    const size_t n = pw->n;
    const size_t a = 1 + qs_rng_below(seed, 20, 0, n / 3), b = a + 1 + qs_rng_below(seed, 21, 0, n / 3);
    const size_t c = b + 1 + qs_rng_below(seed, 22, 0, n / 4);
    const qs_span own[2] = {{a, b}, {c, n}};
    qs_train_config t = train_config();
    t.weight_decay = 0.3f;
    qs_adamw whole, shard;
    assert_int_equal(qs_adamw_create(&whole, qs_backend_cpu(), n), 0);
    assert_int_equal(qs_adamw_create_spans(&shard, qs_backend_cpu(), n, own, 2), 0);
    assert_int_equal(shard.n, (b - a) + (n - c));
    float *before = malloc(n * sizeof(float));
    memcpy(before, ps->data, n * sizeof(float));
    for (int step = 0; step < 3; step++) {
        for (size_t i = 0; i < n; i++) pw->grad[i] = ps->grad[i] = qs_rng_normal(seed, 23 + step, i);
        qs_adamw_apply(&whole, pw, &t, 1e-2f, 10.0);
        qs_adamw_apply(&shard, ps, &t, 1e-2f, 10.0); /* the same (whole-table) norm */
    }
    size_t moved = 0;
    for (size_t i = 0; i < n; i++) {
        const bool owned = (i >= a && i < b) || i >= c;
        if (owned) {
            moved += ps->data[i] != before[i];
            if (ps->data[i] != pw->data[i]) fail_msg("owned parameter %zu: %g vs %g", i, ps->data[i], pw->data[i]);
        } else if (ps->data[i] != before[i]) {
            fail_msg("parameter %zu outside the shard moved", i);
        }
    }
    assert_true(moved > (b - a) / 2);
    free(before);
    qs_adamw_free(&whole);
    qs_adamw_free(&shard);
    qs_gpt_free(whole_m);
    qs_gpt_free(shard_m);
}

int main(void) {
    seed = qs_test_seed("test_optim");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lr_schedule),
        cmocka_unit_test(test_decay_selection),
        cmocka_unit_test(test_norm_and_clip),
        cmocka_unit_test(test_nonfinite_norm),
        cmocka_unit_test(test_shard_spans),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

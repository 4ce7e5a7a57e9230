/* QuadraNet: the whole model's gradient against finite differences (stochastic depth
 * on, fixed by seed), the same bits in every memory mode, the accuracy count, and the
 * train/eval difference of drop path. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/config.h"
#include "quasar/quadranet.h"
#include "quasar/rng.h"
#include "gradcheck.h"
#include "test_seed.h"

static uint64_t seed;

/* Tiny but complete: four stages (one empty), awkward widths, 3x3 quadconv. */
static qs_model_config tiny_config(void) {
    qs_config c;
    qs_config_defaults(&c);
    qs_model_config m = c.model;
    m.type = QS_MODEL_QUADRANET;
    m.ffn_mult = 2;
    m.init_std = 0.3f;
    qs_quadra_config *q = &m.quadra;
    q->in_channels = 2;
    q->image_size = 8;
    q->stem_patch = 1;
    q->num_classes = 5;
    const int w[4] = {7, 5, 4, 6}, d[4] = {2, 0, 1, 1};
    memcpy(q->widths, w, sizeof w);
    memcpy(q->depths, d, sizeof d);
    q->kernel_size = 3;
    q->layer_scale_init = 0.5f;
    q->drop_path = 0.4f;
    return m;
}

static void draw_batch(const qs_model_config *c, int B, float *x, int *y) {
    const size_t n = (size_t)B * c->quadra.image_size * c->quadra.image_size * c->quadra.in_channels;
    for (size_t i = 0; i < n; i++) x[i] = 2.0f * qs_rng_uniform(seed, 11, i) - 1.0f;
    for (int b = 0; b < B; b++) y[b] = (int)qs_rng_below(seed, 12, (uint64_t)b, (uint64_t)c->quadra.num_classes);
}

/* Random biases: with the zero init, a pixel whose inputs are all near zero gives the
 * stem's LayerNorm a near-constant row, where rstd ~ 1/sqrt(eps) and finite
 * differences lose all accuracy. */
static void randomize_biases(qs_params *ps) {
    for (int t = 0; t < ps->n_tensors; t++) {
        const qs_param_info *p = &ps->info[t];
        if (p->role != QS_ROLE_BIAS && p->role != QS_ROLE_NORM_BIAS) continue;
        for (size_t j = 0; j < p->numel; j++) ps->data[p->offset + j] = qs_rng_uniform(seed, 100 + (uint64_t)t, j) - 0.5f;
    }
}

typedef struct loss_ctx {
    qs_quadranet *m;
    const float *x;
    const int *y;
    int B;
    const qs_forward_mode *mode;
} loss_ctx;

static double loss_at(void *p, bool *same) {
    (void)same; /* no discrete choices in QuadraNet */
    loss_ctx *c = p;
    return qs_quadranet_forward(c->m, c->x, c->y, c->B, c->mode, NULL);
}

static void test_gradcheck(void **state) {
    (void)state;
    const qs_model_config cfg = tiny_config();
    /* 8 images: with drop path up to 0.4, every block then keeps some sample's branch
     * (all 8 dropped: 0.4^8 per block; at 4 it happened in about 1 run in 25) */
    const int B = 8;
    qs_quadranet *m;
    assert_int_equal(qs_quadranet_create(&m, &cfg, qs_backend_cpu(), B), 0);
    assert_int_equal(qs_quadranet_init(m, seed), 0);
    float x[8 * 8 * 8 * 2];
    int y[8];
    draw_batch(&cfg, B, x, y);
    qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 0x5eed};
    qs_params *ps = qs_quadranet_params(m);
    randomize_biases(ps);
    qs_params_zero_grad(ps);
    qs_quadranet_forward(m, x, y, B, &mode, NULL);
    qs_quadranet_backward(m, 1.0f);
    float *grad = malloc(ps->n * sizeof(float));
    memcpy(grad, ps->grad, ps->n * sizeof(float));

    /* Every memory mode against all activations kept: the same loss and gradients, bit
     * for bit (stochastic depth drops the same samples when a block is made again), in
     * smaller plans: recompute_ffn (the config default, m above), recompute_layers
     * alone, both. */
    const bool modes[4][2] = {{false, false}, {true, false}, {false, true}, {true, true}};
    size_t act[4];
    double loss[4];
    for (int k = 0; k < 4; k++) {
        qs_model_config mc = cfg;
        mc.recompute_ffn = modes[k][0];
        mc.recompute_layers = modes[k][1] ? QS_RECOMPUTE_ALL : 0;
        qs_quadranet *mk;
        assert_int_equal(qs_quadranet_create(&mk, &mc, qs_backend_cpu(), B), 0);
        assert_int_equal(qs_quadranet_init(mk, seed), 0);
        qs_params *pk = qs_quadranet_params(mk);
        randomize_biases(pk);
        qs_params_zero_grad(pk);
        loss[k] = qs_quadranet_forward(mk, x, y, B, &mode, NULL);
        qs_quadranet_backward(mk, 1.0f);
        assert_memory_equal(pk->grad, grad, ps->n * sizeof(float));
        act[k] = qs_quadranet_mem_plan(mk)->activations;
        qs_quadranet_free(mk);
    }
    print_message("  quadranet memory modes: activations %zu / %zu / %zu / %zu bytes\n", act[0], act[1], act[2],
                  act[3]);
    assert_true(loss[0] == loss[1] && loss[0] == loss[2] && loss[0] == loss[3]);
    assert_true(act[1] < act[0] && act[2] < act[1] && act[3] == act[2]);

    loss_ctx lc = {m, x, y, B, &mode};
    /* Its per-coordinate gradients (a mean over 8 images through a deep net) are often
     * 1e-4..1e-3, where the fp32 forward's rounding moves the difference quotients by
     * ~1e-4: a 3e-3 floor keeps those coordinates from failing on noise alone. */
    gc_score sc = {.floor = 3e-3};
    int zero_tensors = 0;
    for (int t = 0; t < ps->n_tensors; t++) {
        const qs_param_info *pi = &ps->info[t];
        size_t pick[3] = {0, qs_rng_below(seed, 3, (uint64_t)t, pi->numel), qs_rng_below(seed, 4, (uint64_t)t, pi->numel)};
        double mag = 0;
        for (size_t j = 0; j < pi->numel; j++) {
            mag += fabsf(grad[pi->offset + j]);
            if (fabsf(grad[pi->offset + j]) > fabsf(grad[pi->offset + pick[0]])) pick[0] = j;
        }
        zero_tensors += mag == 0.0;
        for (int k = 0; k < 3; k++) {
            const size_t i = pi->offset + pick[k];
            bool same = true;
            gc_score_add(&sc, pi->name, pick[k], gc_nearest_fd(loss_at, &lc, ps->data + i, grad[i], &same), grad[i]);
        }
    }
    double agg = gc_score_rel(&sc);
    print_message("  quadranet: %d tensors, aggregate rel err %.2e, worst %.2e at %s\n", ps->n_tensors, agg, sc.worst,
                  sc.worst_at);
    assert_int_equal(zero_tensors, 0); /* every tensor takes part */
    assert_true(agg < 1e-2);
    assert_true(sc.worst < 5e-2);
    free(grad);
    qs_quadranet_free(m);
}

static void test_accuracy_and_modes(void **state) {
    (void)state;
    const qs_model_config cfg = tiny_config();
    const int B = 4, K = cfg.quadra.num_classes;
    qs_quadranet *m;
    assert_int_equal(qs_quadranet_create(&m, &cfg, qs_backend_cpu(), B), 0);
    assert_int_equal(qs_quadranet_init(m, seed), 0);
    float x[4 * 8 * 8 * 2], logits[4 * 5], eval_logits[4 * 5];
    int y[4], correct = -1;
    draw_batch(&cfg, B, x, y);
    qs_forward_mode eval = {.train = false}, train = {.train = true, .rng_seed = seed};
    double loss = qs_quadranet_forward(m, x, y, B, &eval, &correct);
    memcpy(eval_logits, qs_quadranet_logits(m), sizeof eval_logits);
    /* the count and the loss, recomputed from the logits */
    int hits = 0;
    double want = 0;
    for (int b = 0; b < B; b++) {
        const float *r = eval_logits + b * K;
        int best = 0;
        double mx = r[0], z = 0;
        for (int k = 1; k < K; k++) {
            if (r[k] > r[best]) best = k;
            mx = fmax(mx, r[k]);
        }
        for (int k = 0; k < K; k++) z += exp(r[k] - mx);
        want += (log(z) + mx - r[y[b]]) / B;
        hits += best == y[b];
    }
    assert_int_equal(correct, hits);
    assert_true(fabs(loss - want) < 1e-5);
    /* labels made to match the argmax score B hits */
    for (int b = 0; b < B; b++) {
        const float *r = eval_logits + b * K;
        y[b] = 0;
        for (int k = 1; k < K; k++)
            if (r[k] > r[y[b]]) y[b] = k;
    }
    qs_quadranet_forward(m, x, y, B, &eval, &correct);
    assert_int_equal(correct, B);
    assert_true(isnan(qs_quadranet_forward(m, x, NULL, B, &eval, NULL)));
    /* drop path changes training outputs only; eval is deterministic */
    qs_quadranet_forward(m, x, y, B, &train, NULL);
    memcpy(logits, qs_quadranet_logits(m), sizeof logits);
    assert_memory_not_equal(logits, eval_logits, sizeof logits);
    qs_quadranet_forward(m, x, y, B, &eval, NULL);
    assert_memory_equal(qs_quadranet_logits(m), eval_logits, sizeof logits);
    qs_quadranet_free(m);
}

int main(void) {
    seed = qs_test_seed("test_quadranet");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gradcheck),
        cmocka_unit_test(test_accuracy_and_modes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

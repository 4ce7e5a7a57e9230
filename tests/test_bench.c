/* The benchmark's arithmetic: the training FLOP formula (docs/ARCHITECTURE.md) against
 * counts made by hand and against a model's own parameter table, and the order
 * statistics the timings are reported with. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "quasar/bench.h"
#include "quasar/model.h"

/* 2 layers, 16 wide, 2 heads, 16 tokens, vocabulary 64, 4x feed-forward (F = 64), tied. */
static qs_model_config tiny_gpt(void) {
    qs_config c;
    qs_config_defaults(&c);
    c.model.n_layer = 2;
    c.model.n_embd = 16;
    c.model.n_head = 2;
    c.model.seq_len = 16;
    c.model.vocab_size = 64;
    c.model.ffn_mult = 4;
    return c.model;
}

static void test_gpt_dense_by_hand(void **state) {
    (void)state;
    qs_model_config m = tiny_gpt();
    /* N = 2 layers x (c_attn 3*256 + c_proj 256 + c_fc 16*64 + c_proj 64*16) + head 64*16
     *   = 2 x 3072 + 1024 = 7168; 6 N = 43008; attention 12 L T C = 12*2*16*16 = 6144 */
    assert_int_equal((long)qs_bench_train_flops_per_item(&m, false), 49152);
    /* one K/V head of 8: c_attn 16 x (16 + 2*8) = 512, N = 2 x 2816 + 1024 = 6656; the
     * attention's products are per query head, unchanged */
    m.n_kv_head = 1;
    assert_int_equal((long)qs_bench_train_flops_per_item(&m, false), 6 * 6656 + 6144);
}

static void test_gpt_moe_by_hand(void **state) {
    (void)state;
    qs_model_config m = tiny_gpt();
    m.moe.n_experts = 4;
    m.moe.top_k = 2;
    m.moe.gating = QS_GATING_TOPK;
    /* per layer 768 + 256 + top-2 experts 2*2048 + router 16*4 = 5184; N = 2*5184 + 1024
     * = 11392; 6 N = 68352; + 6144 */
    assert_int_equal((long)qs_bench_train_flops_per_item(&m, false), 74496);
    m.moe.gating = QS_GATING_NOISY_TOPK; /* + the noise projection, 64 per layer */
    assert_int_equal((long)qs_bench_train_flops_per_item(&m, false), 75264);
}

static void test_gpt_quadconv_by_hand(void **state) {
    (void)state;
    qs_model_config m = tiny_gpt();
    m.mixer = QS_MIXER_QUADCONV;
    m.quadra.kernel_size = 5;
    /* no c_attn: N = 2 x (256 + 2048) + 1024 = 5632, 6 N = 33792; the conv 18 L k C = 2880 */
    assert_int_equal((long)qs_bench_train_flops_per_item(&m, false), 36672);
}

static void test_quadranet_by_hand(void **state) {
    (void)state;
    qs_config c;
    qs_config_defaults(&c);
    qs_model_config m = c.model;
    m.type = QS_MODEL_QUADRANET;
    m.ffn_mult = 2;
    m.quadra = (qs_quadra_config){.in_channels = 1, .image_size = 8, .num_classes = 3, .stem_patch = 1,
                                  .widths = {4, 6, 6, 8}, .depths = {1, 0, 1, 1}, .kernel_size = 3};
    /* multiply-adds: stem 64*4 = 256; stage 0 (8x8): 64 (3*9*4 + 2*4*8) = 11008;
     * stage 1 (4x4): down 16*16*6 = 1536; stage 2 (2x2): down 4*24*6 = 576, block
     * 4 (3*9*6 + 2*6*12) = 1224; stage 3 (1x1): down 24*8 = 192, block 3*9*8 + 2*8*16
     * = 472; head 8*3 = 24. Sum 15288, times 6. */
    assert_int_equal((long)qs_bench_train_flops_per_item(&m, false), 91728);
}

/* For a dense GPT, N is the model's matrices: its WEIGHT tensors (the untied head is one;
 * the embeddings are lookups), with 4, 2 or 1 K/V heads. */
static void test_gpt_matches_param_table(void **state) {
    (void)state;
    for (int kv = 0; kv <= 2; kv++) {
        qs_model_config m = tiny_gpt();
        m.n_layer = 3;
        m.n_embd = 48;
        m.n_head = 4;
        m.n_kv_head = kv;
        m.seq_len = 32;
        m.vocab_size = 100;
        m.tie_embeddings = false;
        qs_gpt *g;
        assert_int_equal(qs_gpt_create(&g, &m, qs_backend_cpu(), 1, m.seq_len), 0);
        const qs_params *ps = qs_gpt_params(g);
        double n = 0;
        for (int i = 0; i < ps->n_tensors; i++) {
            const qs_param_info *p = &ps->info[i];
            if (p->role == QS_ROLE_WEIGHT) n += p->numel;
        }
        qs_gpt_free(g);
        assert_true(qs_bench_train_flops_per_item(&m, false) == 6 * n + 12.0 * m.n_layer * m.seq_len * m.n_embd);
        /* over a frozen base: no weight gradients, attention's backward unchanged */
        assert_true(qs_bench_train_flops_per_item(&m, true) == 4 * n + 12.0 * m.n_layer * m.seq_len * m.n_embd);
    }
}

static void test_stats(void **state) {
    (void)state;
    double odd[] = {5, 1, 4, 2, 3};
    qs_bench_stats s = qs_bench_stats_of(odd, 5);
    assert_true(s.median == 3 && s.min == 1 && s.max == 5 && s.p10 == 1 && s.p90 == 5);
    double even[] = {4, 3, 2, 1, 10, 6, 7, 8, 9, 5, 11};
    s = qs_bench_stats_of(even, 10); /* the first ten: 1..10 */
    assert_true(s.median == 5.5 && s.p10 == 2 && s.p90 == 9 && s.min == 1 && s.max == 10);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gpt_dense_by_hand),
        cmocka_unit_test(test_gpt_moe_by_hand),
        cmocka_unit_test(test_gpt_quadconv_by_hand),
        cmocka_unit_test(test_quadranet_by_hand),
        cmocka_unit_test(test_gpt_matches_param_table),
        cmocka_unit_test(test_stats),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

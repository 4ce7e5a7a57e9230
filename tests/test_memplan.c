/* The memory plan: for random awkward shapes of every model family, what the plan says
 * is exactly what creating the model, its adapters, ring buffers and optimizer takes
 * from the backend (counted by a backend that wraps the CPU's and also reserves op
 * scratch), and a plan that does not fit fails with one line before anything is taken. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "quasar/comm.h"
#include "quasar/data_parallel.h"
#include "quasar/error.h"
#include "quasar/lora.h"
#include "quasar/memplan.h"
#include "quasar/model.h"
#include "quasar/optim.h"
#include "quasar/quadranet.h"
#include "quasar/ring_attention.h"
#include "quasar/rng.h"
#include "quasar/task.h"
#include "test_seed.h"

static uint64_t seed, draws;

static int draw(int lo, int hi) { return lo + (int)(qs_rng_u64(seed, 7, draws++) % (uint64_t)(hi - lo + 1)); }

/* ---- a backend that counts: the CPU's memory, its bytes tallied, a "device" of
 * `capacity` bytes, and op scratch reserved as a grow-only tally like the CUDA one ---- */

enum { MAX_BLOCKS = 64 };
static struct {
    void *p;
    size_t n;
} blocks[MAX_BLOCKS];
static int n_blocks;
static size_t live, reserved, capacity = SIZE_MAX / 2;

static void *count_alloc(size_t bytes) {
    assert_true(n_blocks < MAX_BLOCKS);
    void *p = qs_backend_cpu()->alloc(bytes);
    if (p) {
        blocks[n_blocks].p = p;
        blocks[n_blocks++].n = bytes;
        live += bytes;
    }
    return p;
}

static void count_free(void *p) {
    if (!p) return;
    for (int i = 0; i < n_blocks; i++)
        if (blocks[i].p == p) {
            live -= blocks[i].n;
            blocks[i] = blocks[--n_blocks];
            qs_backend_cpu()->free(p);
            return;
        }
    fail_msg("freeing a block this backend did not allocate");
}

static int count_mem_info(size_t *free_bytes, size_t *total_bytes) {
    *total_bytes = capacity;
    *free_bytes = capacity - live;
    return 0;
}

/* Grows with everything the ops' sizes say, so that a size the model leaves out shows. */
static size_t count_workspace(const qs_op_sizes *s) {
    return 4096 + (size_t)s->rows * 24 + (size_t)s->experts * 40 +
           (size_t)s->rows * (3 * s->heads + 5 * s->kv_heads) * s->head_size;
}

static int count_reserve(const qs_op_sizes *s) {
    const size_t need = count_workspace(s);
    if (need > reserved) {
        live += need - reserved;
        reserved = need;
    }
    return 0;
}

static qs_backend counting;

static void reset(void) {
    assert_int_equal(n_blocks, 0); /* everything created was freed */
    live = reserved = 0;
    capacity = SIZE_MAX / 2;
}

static int setup(void **state) {
    (void)state;
    counting = *qs_backend_cpu();
    counting.name = "counting";
    counting.alloc = count_alloc;
    counting.free = count_free;
    counting.mem_info = count_mem_info;
    counting.workspace_bytes = count_workspace;
    counting.reserve = count_reserve;
    reset();
    return 0;
}

static void assert_plans_equal(const qs_mem_plan *a, const qs_mem_plan *b) {
    assert_int_equal(a->params, b->params);
    assert_int_equal(a->grads, b->grads);
    assert_int_equal(a->optimizer, b->optimizer);
    assert_int_equal(a->activations, b->activations);
    assert_int_equal(a->workspace, b->workspace);
}

/* A random small GPT: awkward widths, dense or MoE, attention (with or without grouped
 * K/V heads) or quadconv, in any of the memory modes. */
static qs_model_config random_gpt(int kind) {
    qs_config c;
    qs_config_defaults(&c);
    qs_model_config m = c.model;
    m.n_head = draw(1, 4);
    m.n_kv_head = draw(0, 1) ? 0 : m.n_head % 2 ? 1 : m.n_head / 2; /* grouped-query K/V or not */
    m.n_embd = m.n_head * draw(2, 9);
    m.n_layer = draw(1, 3);
    m.seq_len = draw(3, 40);
    m.vocab_size = draw(5, 300);
    m.ffn_mult = draw(1, 4);
    m.tie_embeddings = draw(0, 1);
    m.recompute_ffn = draw(0, 1);
    m.recompute_layers = draw(QS_RECOMPUTE_ALL, m.n_layer); /* every block, or the last 0..n_layer */
    if (kind == 1) {
        m.moe.n_experts = draw(2, 9);
        m.moe.top_k = draw(1, m.moe.n_experts);
    } else if (kind == 2) {
        m.mixer = QS_MIXER_QUADCONV;
        m.quadra.kernel_size = draw(2, 5);
    }
    return m;
}

static void test_gpt_plan_is_what_create_takes(void **state) {
    (void)state;
    for (int i = 0; i < 12; i++) {
        const qs_model_config cfg = random_gpt(i % 3);
        const int B = draw(1, 5), T = draw(1, cfg.seq_len);
        const qs_gpt_use use = (qs_gpt_use)(i / 3 % 4); /* each use with each kind of model */
        qs_mem_plan plan;
        assert_int_equal(qs_gpt_plan(&cfg, &counting, B, T, use, 1, &plan), 0);
        assert_int_equal(live, 0); /* planning takes nothing */
        assert_true(plan.activations > 0 && plan.params > 0);
        assert_int_equal(plan.grads, use == QS_GPT_TRAIN ? plan.params : 0);
        const bool attention = cfg.mixer == QS_MIXER_ATTENTION;
        const qs_op_sizes sizes = {.rows = B * T,
                                   .experts = cfg.moe.n_experts,
                                   .heads = attention ? cfg.n_head : 0,
                                   .kv_heads = attention ? qs_config_kv_heads(&cfg) : 0,
                                   .head_size = attention ? cfg.n_embd / cfg.n_head : 0};
        assert_int_equal(plan.workspace, count_workspace(&sizes));
        qs_gpt *m;
        assert_int_equal(qs_gpt_create_for(&m, &cfg, &counting, B, T, use), 0);
        assert_int_equal(live, qs_mem_plan_total(&plan));
        assert_plans_equal(qs_gpt_mem_plan(m), &plan);
        const qs_params *ps = qs_gpt_params(m);
        if (use == QS_GPT_INFER_BF16) { /* the fp32 room of what the panels do not hold, and the panels */
            assert_false(qs_params_whole(ps));
            assert_true(ps->n * sizeof(float) < plan.params);
        } else {
            assert_int_equal(ps->n * sizeof(float), plan.params);
        }
        qs_gpt_free(m);
        assert_int_equal(live, reserved); /* the reserved scratch stays, as the CUDA backend's */
        reset();
    }
}

/* A frozen MoE keeps no per-layer copy of the rows dispatched to its experts (nothing
 * but an adapter on their c_fc reads them, and it gathers them again): one shared
 * [N K, C] buffer, so L - 1 fewer than a trainable model's. */
static void test_frozen_moe_shares_dispatched_rows(void **state) {
    (void)state;
    qs_model_config cfg = random_gpt(1);
    cfg.n_layer = draw(2, 4);
    cfg.recompute_layers = 0;
    const int B = draw(1, 4), T = draw(1, cfg.seq_len);
    qs_mem_plan trained, frozen;
    assert_int_equal(qs_gpt_plan(&cfg, &counting, B, T, QS_GPT_TRAIN, 1, &trained), 0);
    assert_int_equal(qs_gpt_plan(&cfg, &counting, B, T, QS_GPT_FROZEN, 1, &frozen), 0);
    const size_t rows = (size_t)B * T * cfg.moe.top_k * cfg.n_embd, aligned = (rows + 15) / 16 * 16;
    assert_int_equal(trained.activations - frozen.activations, (size_t)(cfg.n_layer - 1) * aligned * sizeof(float));
}

/* An inference model keeps one block's activations, whatever its depth and recompute
 * settings: only an MoE's per-layer routing (idx and slot, NK ints each, and its packed
 * rows' NK global ids) grows with n_layer. A training model of that depth keeps more. */
static void test_inference_plan_is_one_block(void **state) {
    (void)state;
    for (int kind = 0; kind < 3; kind++) {
        qs_model_config cfg = random_gpt(kind);
        const int B = draw(1, 4), T = draw(1, cfg.seq_len), L = draw(2, 5);
        qs_mem_plan one, deep, trained;
        cfg.n_layer = 1;
        assert_int_equal(qs_gpt_plan(&cfg, &counting, B, T, QS_GPT_INFER, 1, &one), 0);
        cfg.n_layer = L;
        cfg.recompute_ffn = !cfg.recompute_ffn;
        cfg.recompute_layers = draw(0, L);
        assert_int_equal(qs_gpt_plan(&cfg, &counting, B, T, QS_GPT_INFER, 1, &deep), 0);
        const size_t NK = (size_t)B * T * (kind == 1 ? cfg.moe.top_k : 1), aligned = (NK + 15) / 16 * 16;
        const size_t routing = kind == 1 ? 2 * aligned * sizeof(int) + NK * sizeof(int64_t) : 0;
        assert_int_equal(deep.activations - one.activations, (size_t)(L - 1) * routing);
        cfg.recompute_layers = 0;
        assert_int_equal(qs_gpt_plan(&cfg, &counting, B, T, QS_GPT_TRAIN, 1, &trained), 0);
        assert_true(trained.activations > deep.activations + (size_t)(L - 1) * B * T * cfg.n_embd * sizeof(float));
    }
}

static void test_lora_plan_is_what_create_takes(void **state) {
    (void)state;
    static const char *const targets[3] = {"q,v,proj,fc_proj", "experts,proj", "fc,proj"};
    for (int i = 0; i < 6; i++) {
        const qs_model_config cfg = random_gpt(i % 2 ? 1 : 0);
        qs_config c;
        qs_config_defaults(&c);
        qs_lora_config lc = c.lora;
        lc.r = draw(1, cfg.n_embd);
        lc.dropout = i % 3 == 0 ? 0.1f : 0.0f;
        snprintf(lc.targets, sizeof lc.targets, "%s", targets[i % 2 ? 1 : (i / 2) % 2 ? 2 : 0]);
        const int B = draw(1, 4), T = draw(1, cfg.seq_len);
        qs_gpt *m;
        assert_int_equal(qs_gpt_create_for(&m, &cfg, &counting, B, T, QS_GPT_FROZEN), 0);
        const size_t before = live;
        qs_mem_plan plan;
        assert_int_equal(qs_lora_plan(&lc, &cfg, &counting, B * T, &plan), 0);
        assert_int_equal(live, before);
        qs_lora *lo;
        assert_int_equal(qs_lora_create(&lo, &lc, m), 0);
        assert_int_equal(live - before, qs_mem_plan_total(&plan));
        assert_int_equal(plan.params, qs_lora_params(lo)->n * sizeof(float));
        assert_int_equal(plan.grads, plan.params);
        qs_lora_free(lo);
        qs_gpt_free(m);
        reset();
    }
}

static void test_quadranet_plan_is_what_create_takes(void **state) {
    (void)state;
    for (int i = 0; i < 4; i++) {
        qs_config c;
        qs_config_defaults(&c);
        qs_model_config cfg = c.model;
        cfg.type = QS_MODEL_QUADRANET;
        qs_quadra_config *q = &cfg.quadra;
        q->stem_patch = draw(1, 3);
        q->image_size = q->stem_patch * 8 * draw(1, 2);
        q->in_channels = 1;
        q->num_classes = draw(2, 11);
        q->kernel_size = 2 * draw(1, 3) + 1;
        cfg.recompute_ffn = draw(0, 1);
        cfg.recompute_layers = draw(0, 1) ? QS_RECOMPUTE_ALL : 0;
        for (int s = 0; s < 4; s++) {
            q->widths[s] = draw(3, 9);
            q->depths[s] = draw(0, 2);
        }
        const int B = draw(1, 6);
        qs_mem_plan plan;
        assert_int_equal(qs_quadranet_plan(&cfg, &counting, B, &plan), 0);
        assert_int_equal(live, 0);
        qs_quadranet *m;
        assert_int_equal(qs_quadranet_create(&m, &cfg, &counting, B), 0);
        assert_int_equal(live, qs_mem_plan_total(&plan));
        assert_plans_equal(qs_quadranet_mem_plan(m), &plan);
        qs_quadranet_free(m);
        reset();
    }
}

static void test_ring_and_optimizer_plans(void **state) {
    (void)state;
    qs_comm *world;
    assert_int_equal(qs_comm_init(&world, QS_COMM_SINGLE), 0);
    const int NKV = draw(1, 2), NH = NKV * draw(1, 3), hs = draw(2, 9), C = NH * hs, B = draw(1, 4),
              Tl = 2 * draw(1, 9);
    qs_ring_attention *ra;
    assert_int_equal(qs_ring_attention_create(&ra, &counting, world, B, Tl, C, NH, NKV, 1), 0);
    assert_int_equal(live, qs_ring_attention_bytes(B, Tl, C, NH, NKV, 1));
    qs_ring_attention_free(ra);
    qs_comm_free(world);
    /* more ranks add two K/V and two dK/dV blocks of [B, Tl, 2 Ckv] each, Ckv = NKV hs */
    const size_t blocks = 4 * (size_t)B * Tl * 2 * NKV * hs * sizeof(float);
    const size_t one = qs_ring_attention_bytes(B, Tl, C, NH, NKV, 1), three = qs_ring_attention_bytes(B, Tl, C, NH, NKV, 3);
    assert_true(three >= one + blocks);
    assert_true(three < one + blocks + 64 * sizeof(float)); /* and no more than their alignment */
    reset();

    /* AdamW's state for every rank count and rank of a ZeRO-1 group, and unsharded */
    const size_t n = (size_t)draw(1, 5000);
    for (int size = 1; size <= 5; size++)
        for (int zero = 0; zero <= 1; zero++)
            for (int rank = 0; rank < size; rank++) {
                qs_dp dp;
                qs_dp_init(&dp, NULL, zero, n, 0);
                dp.size = size, dp.rank = rank, dp.chunk = n / (size_t)size; /* as a group of `size` would */
                qs_adamw o = {0};
                assert_int_equal(qs_dp_create_optim(&dp, &counting, &o), 0);
                assert_int_equal(live, qs_mem_plan_optimizer(n, zero ? size : 1));
                qs_adamw_free(&o);
                reset();
            }
}

static void test_too_big_fails_before_allocating(void **state) {
    (void)state;
    const qs_model_config cfg = random_gpt(1);
    const int B = draw(1, 4), T = cfg.seq_len;
    qs_mem_plan plan;
    assert_int_equal(qs_gpt_plan(&cfg, &counting, B, T, QS_GPT_TRAIN, 1, &plan), 0);
    const size_t need = qs_mem_plan_total(&plan);
    capacity = need - 1;
    qs_gpt *m = NULL;
    assert_int_equal(qs_gpt_create(&m, &cfg, &counting, B, T), -1);
    assert_null(m);
    assert_int_equal(live, 0); /* nothing was taken */
    const char *e = qs_error_last();
    printf("# %s\n", e);
    assert_non_null(strstr(e, "not enough memory on counting: the run needs "));
    assert_non_null(strstr(e, "parameters "));
    assert_non_null(strstr(e, "workspace "));
    assert_non_null(strstr(e, "MiB is free"));
    assert_non_null(strstr(e, "train.micro_batch_size"));
    assert_null(strchr(e, '\n'));
    assert_int_equal(qs_mem_plan_check(&plan, &counting), -1);
    /* exactly enough fits */
    capacity = need;
    assert_int_equal(qs_mem_plan_check(&plan, &counting), 0);
    assert_int_equal(qs_gpt_create(&m, &cfg, &counting, B, T), 0);
    assert_int_equal(live, need);
    qs_gpt_free(m);
    reset();

    /* adapters that do not fit beside their base fail alike, taking nothing more */
    assert_int_equal(qs_gpt_create_for(&m, &cfg, &counting, B, T, QS_GPT_FROZEN), 0);
    qs_config c;
    qs_config_defaults(&c);
    qs_lora_config lc = c.lora;
    snprintf(lc.targets, sizeof lc.targets, "experts");
    lc.r = 1; /* within any n_embd */
    capacity = live;
    const size_t before = live;
    qs_lora *lo = (qs_lora *)&lc; /* must come back NULL */
    assert_int_equal(qs_lora_create(&lo, &lc, m), -1);
    assert_null(lo);
    assert_int_equal(live, before);
    printf("# %s\n", qs_error_last());
    assert_non_null(strstr(qs_error_last(), "not enough memory on counting"));
    qs_gpt_free(m);
    reset();
}

/* model.recompute_layers "auto": an LM task opens with the fewest checkpointed blocks
 * (0, 2, 3, ..., n_layer) whose plan, AdamW's state included, fits the device; when
 * none does it fails with one line, having taken nothing. */
static void test_auto_recompute_takes_the_fewest_that_fit(void **state) {
    (void)state;
    char path[] = "/tmp/quasar_memplan_XXXXXX";
    const int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < 3000; i++) fputc("abcd\n"[draw(0, 4)], f);
    fclose(f);
    for (int round = 0; round < 3; round++) {
        qs_config c;
        qs_config_defaults(&c);
        c.model = random_gpt(round);
        c.model.n_layer = draw(3, 5);
        snprintf(c.data.path, sizeof c.data.path, "%s", path);
        const qs_task_place place = {.micro_B = draw(1, 3), .be = &counting, .optim_shards = 1};
        /* the run's total at each count: strictly less for each block more */
        size_t total[6] = {0};
        for (int n = 0; n <= c.model.n_layer; n++) {
            if (n == 1) continue;
            qs_model_config m = c.model;
            m.recompute_layers = n;
            qs_mem_plan plan;
            assert_int_equal(qs_gpt_plan(&m, &counting, place.micro_B, m.seq_len, QS_GPT_TRAIN, 1, &plan), 0);
            plan.optimizer = qs_mem_plan_optimizer(plan.params / sizeof(float), 1);
            total[n] = qs_mem_plan_total(&plan);
            assert_true(n == 0 || total[n] < total[n == 2 ? 0 : n - 1]);
        }
        /* a count between, none, every block */
        const int want = round == 0 ? draw(2, c.model.n_layer - 1) : round == 1 ? 0 : c.model.n_layer;
        capacity = total[want];
        qs_config run = c;
        run.model.recompute_layers = QS_RECOMPUTE_AUTO;
        qs_task task;
        assert_int_equal(qs_task_open(&task, &run, NULL, &place), 0);
        printf("# %d layers, %zu bytes free: recompute_layers %d\n", c.model.n_layer, capacity,
               run.model.recompute_layers);
        assert_int_equal(run.model.recompute_layers, want);
        assert_int_equal(qs_mem_plan_total(&task.plan), total[want]);
        assert_int_equal(live, total[want] - task.plan.optimizer); /* AdamW's state comes later */
        qs_task_free(&task);
        reset();

        capacity = total[c.model.n_layer] - 1;
        run = c;
        run.model.recompute_layers = QS_RECOMPUTE_AUTO;
        assert_int_equal(qs_task_open(&task, &run, NULL, &place), -1);
        assert_int_equal(live, 0);
        printf("# %s\n", qs_error_last());
        assert_non_null(strstr(qs_error_last(), "not enough memory on counting"));
        assert_non_null(strstr(qs_error_last(), "model.recompute_layers auto already checkpoints every block"));
        reset();
    }
    remove(path);
}

static void test_plan_sums_and_cpu_info(void **state) {
    (void)state;
    qs_mem_plan a = {1, 2, 3, 4, 5}, b = {10, 20, 30, 40, 50};
    qs_mem_plan_add(&a, &b);
    assert_int_equal(qs_mem_plan_total(&a), 165);
    assert_int_equal(a.workspace, 55);
    assert_int_equal(qs_mem_plan_optimizer(10, 1), 80);
    assert_int_equal(qs_mem_plan_optimizer(10, 4), 2 * (2 + 2) * sizeof(float)); /* chunk 2, tail 2 */
    size_t f, t;
    const qs_backend *cpu = qs_backend_cpu();
    assert_int_equal(cpu->mem_info(&f, &t), 0); /* Linux's /proc/meminfo */
    assert_true(t > 0 && f <= t);
    assert_int_equal(cpu->workspace_bytes(&(qs_op_sizes){.rows = 100, .experts = 3, .heads = 4, .kv_heads = 2,
                                                         .head_size = 64}),
                     0);
}

int main(void) {
    seed = qs_test_seed("test_memplan");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gpt_plan_is_what_create_takes),
        cmocka_unit_test(test_frozen_moe_shares_dispatched_rows),
        cmocka_unit_test(test_inference_plan_is_one_block),
        cmocka_unit_test(test_lora_plan_is_what_create_takes),
        cmocka_unit_test(test_quadranet_plan_is_what_create_takes),
        cmocka_unit_test(test_ring_and_optimizer_plans),
        cmocka_unit_test(test_too_big_fails_before_allocating),
        cmocka_unit_test(test_auto_recompute_takes_the_fewest_that_fit),
        cmocka_unit_test(test_plan_sums_and_cpu_info),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}

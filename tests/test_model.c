/* Whole-model gradient checks: the analytic gradient of the full training loss
 * (cross-entropy + MoE router losses) against central finite differences, for dense
 * and MoE GPTs, with dropout and router noise on (fixed by seed, so both sides of
 * each difference see the same masks). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "quasar/config.h"
#include "quasar/model.h"
#include "quasar/bf16.h"
#include "quasar/error.h"
#include "quasar/lora.h"
#include "quasar/params.h"
#include "quasar/rng.h"
#include "quasar/sample.h"
#include "gradcheck.h"
#include "test_seed.h"

static uint64_t seed;

static qs_model_config tiny_config(void) {
    qs_config c;
    qs_config_defaults(&c);
    qs_model_config m = c.model;
    m.vocab_size = 11;
    m.seq_len = 7;
    m.n_layer = 2;
    m.n_head = 2;
    m.n_embd = 6;
    m.ffn_mult = 2;
    m.dropout = 0.1f;
    m.init_std = 0.3f; /* larger weights: larger, better-conditioned gradients */
    return m;
}

/* Full objective of one forward (what backward differentiates with scale 1). */
static double objective(qs_gpt *m, const int *x, const int *y, int B, int T, const qs_forward_mode *mode) {
    double loss = qs_gpt_forward(m, x, y, B, T, mode);
    const qs_model_config *c = qs_gpt_config(m);
    if (c->moe.n_experts > 0) {
        const qs_moe_stats *s = qs_gpt_moe_stats(m);
        loss += c->moe.aux_loss_coef * s->balance + c->moe.z_loss_coef * s->z;
    }
    return loss;
}

static size_t routing_len(const qs_model_config *c, int N) {
    return c->moe.n_experts > 0 ? (size_t)c->n_layer * N * c->moe.top_k : 0;
}

/* One perturbed evaluation of the objective; routing must match the unperturbed pass. */
typedef struct objective_ctx {
    qs_gpt *m;
    const int *x, *y;
    int B, T;
    const qs_forward_mode *mode;
    const int *route0;
    size_t nr;
} objective_ctx;

static double perturbed_objective(void *p, bool *same) {
    objective_ctx *c = p;
    double loss = objective(c->m, c->x, c->y, c->B, c->T, c->mode);
    if (c->nr && memcmp(c->route0, qs_gpt_moe_routing(c->m), c->nr * sizeof(int))) *same = false;
    return loss;
}

/* One check on inputs drawn from `draw`; asserts accuracy on the coordinates it could
 * check and returns whether routing flips left too few of them. */
static bool gradcheck_draw(const qs_model_config *cfg, const char *label, uint64_t draw) {
    const int B = 2, T = 5, N = B * T;
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, cfg, qs_backend_cpu(), B, T + 1), 0);
    qs_gpt_init(m, seed);
    int x[10], y[10];
    for (int i = 0; i < N; i++) {
        x[i] = (int)qs_rng_below(seed, 1 + 16 * draw, (uint64_t)i, (uint64_t)cfg->vocab_size);
        y[i] = (int)qs_rng_below(seed, 2 + 16 * draw, (uint64_t)i, (uint64_t)cfg->vocab_size);
    }
    y[3] = -1; /* an ignored target */
    qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 0xabcdef, .grad_scale = 1.0f};

    qs_params_zero_grad(qs_gpt_params(m));
    objective(m, x, y, B, T, &mode);
    assert_int_equal(qs_gpt_backward(m), 0);
    size_t np = qs_gpt_params(m)->n, nr = routing_len(cfg, N);
    float *grad = malloc(np * sizeof(float));
    memcpy(grad, qs_gpt_params(m)->grad, np * sizeof(float));
    int *route0 = malloc(nr * sizeof(int) + 1);
    if (nr) memcpy(route0, qs_gpt_moe_routing(m), nr * sizeof(int));

    float *p = qs_gpt_params(m)->data;
    qs_forward_mode probe = mode; /* the perturbed passes only evaluate */
    probe.grad_scale = 0.0f;
    objective_ctx oc = {m, x, y, B, T, &probe, route0, nr};
    gc_score sc = {0};
    int skipped = 0;
    for (int t = 0; t < qs_gpt_params(m)->n_tensors; t++) {
        const qs_param_info *pi = &qs_gpt_params(m)->info[t];
        /* the largest-gradient coordinate of each tensor, plus two random ones */
        size_t pick[3] = {0, qs_rng_below(seed, 3, (uint64_t)t, pi->numel), qs_rng_below(seed, 4, (uint64_t)t, pi->numel)};
        for (size_t j = 0; j < pi->numel; j++)
            if (fabsf(grad[pi->offset + j]) > fabsf(grad[pi->offset + pick[0]])) pick[0] = j;
        for (int k = 0; k < 3; k++) {
            size_t i = pi->offset + pick[k];
            bool same = true;
            gc_fd fd = gc_nearest_fd(perturbed_objective, &oc, p + i, grad[i], &same);
            if (!same) { /* top-k selection flipped: the loss is discontinuous here */
                skipped++;
                continue;
            }
            gc_score_add(&sc, pi->name, pick[k], fd, grad[i]);
        }
    }
    double rel = gc_score_rel(&sc);
    printf("# %s: %d coordinates (%d skipped for routing flips), rel err %.2e, worst %.2e at %s\n", label,
           sc.checked, skipped, rel, sc.worst, sc.worst_at);
    assert_true(sc.checked > 0);
    assert_true(rel < 1e-2);
    assert_true(sc.worst < 5e-2);
    free(grad);
    free(route0);
    qs_gpt_free(m);
    return skipped > sc.checked / 10;
}

/* A token whose router logits are nearly tied flips its routing under any upstream
 * perturbation, which skips most coordinates; such draws are redrawn (at most 5). */
static void gradcheck(const qs_model_config *cfg, const char *label) {
    for (uint64_t draw = 0; draw < 5; draw++) {
        if (!gradcheck_draw(cfg, label, draw)) return;
        printf("# %s: near-tie in routing, redrawing the inputs\n", label);
    }
    fail_msg("%s: routing flips skipped too many coordinates in 5 draws", label);
}

static void test_dense_gelu_tied(void **state) {
    (void)state;
    qs_model_config c = tiny_config();
    gradcheck(&c, "dense gelu tied");
}

/* Whole-model checks use smooth GELU: a ReLU unit crossing zero inside +-eps breaks
 * finite differences. ReLU's backward is checked op by op in test_ops. */
static void test_dense_untied_nobias(void **state) {
    (void)state;
    qs_model_config c = tiny_config();
    c.tie_embeddings = false;
    c.bias = false;
    c.recompute_ffn = false; /* each FFN path is gradient-checked in both memory modes */
    gradcheck(&c, "dense untied, no bias, kept activations");
}

/* The CPU backend, counting the token mixers' forward calls: in a backward, the blocks
 * it runs again. */
static int mixer_forwards;
static void counted_attention(float *out, float *lse, const float *q, const float *kv, const qs_attn_block *blk) {
    mixer_forwards++;
    qs_backend_cpu()->ops->attention_block_forward(out, lse, q, kv, blk);
}
static void counted_quadconv(float *y, float *fa, float *fb, const float *x, const float *w, const float *bias,
                             const qs_conv_shape *s) {
    mixer_forwards++;
    qs_backend_cpu()->ops->quadconv_forward(y, fa, fb, x, w, bias, s);
}
static const qs_backend *counting_backend(void) {
    static qs_ops ops;
    static qs_backend be;
    ops = *qs_backend_cpu()->ops;
    ops.attention_block_forward = counted_attention;
    ops.quadconv_forward = counted_quadconv;
    be = *qs_backend_cpu();
    be.ops = &ops;
    return &be;
}

/* The memory modes trade activations for recomputation: recompute_ffn drops [N,F] floats
 * per layer, recompute_layers n everything but the block's input in the last n blocks
 * (which share one block's buffers). In every mode the loss, every gradient, the MoE
 * routing and its statistics must be the same bits as with all activations kept (dropout
 * and router noise are on, so their masks must come back the same), in less memory each
 * step down; the backward runs n - 1 blocks again (the last one's are still in place). */
static void memory_modes_are_exact(qs_model_config c, const char *label) {
    const int B = 2, T = 6, N = B * T, L = c.n_layer;
    int x[12], y[12];
    for (int i = 0; i < N; i++) {
        x[i] = (int)qs_rng_below(seed, 40, (uint64_t)i, (uint64_t)c.vocab_size);
        y[i] = (int)qs_rng_below(seed, 41, (uint64_t)i, (uint64_t)c.vocab_size);
    }
    y[5] = -1;
    qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 0x5eed, .grad_scale = 1.0f};
    /* per recompute_ffn off/on: recompute_layers 0..L, then true; mode 0 keeps everything */
    enum { MAX_LAYERS = 4, PER_FFN = MAX_LAYERS + 2 };
    assert_true(L <= MAX_LAYERS);
    const int per = L + 2, n_modes = 2 * per;
    qs_gpt *m[2 * PER_FFN];
    double loss[2 * PER_FFN];
    size_t act[2 * PER_FFN];
    const size_t nr = routing_len(&c, N);
    for (int r = 0; r < n_modes; r++) {
        c.recompute_ffn = r >= per;
        c.recompute_layers = r % per <= L ? r % per : QS_RECOMPUTE_ALL;
        assert_int_equal(qs_gpt_create(&m[r], &c, counting_backend(), B, T), 0);
        qs_gpt_init(m[r], seed);
        qs_params_zero_grad(qs_gpt_params(m[r]));
        qs_gpt_moe_stats_reset(m[r]);
        loss[r] = objective(m[r], x, y, B, T, &mode);
        mixer_forwards = 0;
        assert_int_equal(qs_gpt_backward(m[r]), 0);
        const int n = c.recompute_layers == QS_RECOMPUTE_ALL ? L : c.recompute_layers;
        assert_int_equal(mixer_forwards, n > 0 ? n - 1 : 0);
        act[r] = qs_gpt_mem_plan(m[r])->activations;
        printf("# %s, recompute_ffn %d, recompute_layers %d: activations %zu bytes\n", label, c.recompute_ffn,
               c.recompute_layers, act[r]);
        if (!r) continue;
        assert_true(loss[r] == loss[0]);
        assert_memory_equal(qs_gpt_params(m[0])->grad, qs_gpt_params(m[r])->grad,
                            qs_gpt_params(m[r])->n * sizeof(float));
        if (!nr) continue;
        assert_memory_equal(qs_gpt_moe_routing(m[0]), qs_gpt_moe_routing(m[r]), nr * sizeof(int));
        const qs_moe_stats *s0 = qs_gpt_moe_stats(m[0]), *s = qs_gpt_moe_stats(m[r]);
        assert_true(s->balance == s0->balance && s->z == s0->z); /* counted once, not again in backward */
        assert_int_equal(s->kept, s0->kept);
        assert_int_equal(s->dropped, s0->dropped);
        assert_memory_equal(s->expert_tokens, s0->expert_tokens, (size_t)c.moe.n_experts * sizeof(int64_t));
    }
    assert_true(act[per] < act[0]); /* recompute_ffn */
    for (int f = 0; f < 2; f++) {
        const size_t *a = act + f * per;
        assert_true(a[1] == a[0]); /* the last block alone: its buffers stay its own */
        for (int n = 1; n < L; n++) assert_true(a[n + 1] < a[n]); /* each further block: one fewer set */
        assert_true(a[L] == a[L + 1]); /* n_layer blocks are all of them */
    }
    assert_true(act[per + L + 1] == act[L + 1]); /* one shared layer either way */

    /* A model made for inference: the same loss, routing and statistics (dropout and
     * noise too) from one block's buffers, fewer than any training mode keeps; and no
     * backward, nor a forward that would start one. */
    qs_gpt *inf;
    assert_int_equal(qs_gpt_create_for(&inf, &c, counting_backend(), B, T, QS_GPT_INFER), 0);
    qs_gpt_init(inf, seed);
    const size_t act_inf = qs_gpt_mem_plan(inf)->activations;
    printf("# %s, inference: activations %zu bytes\n", label, act_inf);
    assert_true(act_inf < act[n_modes - 1]);
    qs_forward_mode no_grad = mode;
    no_grad.grad_scale = 0.0f;
    qs_gpt_moe_stats_reset(inf);
    assert_true(objective(inf, x, y, B, T, &no_grad) == loss[0]);
    assert_false(qs_gpt_failed(inf));
    if (nr) {
        assert_memory_equal(qs_gpt_moe_routing(m[0]), qs_gpt_moe_routing(inf), nr * sizeof(int));
        const qs_moe_stats *s0 = qs_gpt_moe_stats(m[0]), *s = qs_gpt_moe_stats(inf);
        assert_true(s->balance == s0->balance && s->z == s0->z);
        assert_memory_equal(s->expert_tokens, s0->expert_tokens, (size_t)c.moe.n_experts * sizeof(int64_t));
    }
    assert_int_equal(qs_gpt_backward(inf), -1);
    assert_non_null(strstr(qs_error_last(), "inference"));
    assert_true(isnan(qs_gpt_forward(inf, x, y, B, T, &mode)));
    assert_true(qs_gpt_failed(inf));
    assert_non_null(strstr(qs_error_last(), "inference"));
    qs_gpt_free(inf);
    for (int r = 0; r < n_modes; r++) qs_gpt_free(m[r]);
}

/* Grouped-query attention: n_head query heads over n_kv_head K/V heads (width 2 a head). */
static qs_model_config gqa_config(int n_head, int n_kv_head) {
    qs_model_config m = tiny_config();
    m.n_head = n_head;
    m.n_kv_head = n_kv_head;
    m.n_embd = 2 * n_head;
    return m;
}

static void test_gqa_gradients(void **state) {
    (void)state;
    qs_model_config c = gqa_config(4, 2);
    gradcheck(&c, "grouped-query 4 heads over 2");
    c = gqa_config(3, 1);
    c.recompute_ffn = false;
    gradcheck(&c, "multi-query 3 heads over 1");
}

/* Column j of an MHA c_attn [C, 3C] holding the K/V heads of a GQA one [C, C + 2Ckv]
 * once per query head: the GQA column it repeats. */
static int gqa_column(int j, int C, int NH, int NKV) {
    const int hs = C / NH, part = j / C, jj = j % C;
    if (part == 0) return jj; /* q */
    return C + (part - 1) * NKV * hs + jj / hs / (NH / NKV) * hs + jj % hs;
}

/* GQA is multi-head attention whose K/V heads repeat within each group: a GQA model and
 * an MHA model holding its K/V columns once per query head give the same loss and the
 * same gradients, a GQA K/V column's being the sum of the columns that repeat it. */
static void gqa_is_repeated_heads(int NH, int NKV) {
    const qs_model_config gc = gqa_config(NH, NKV);
    qs_model_config mc = gc;
    mc.n_kv_head = 0;
    const int B = 2, T = 6, N = B * T, C = gc.n_embd, W = C + 2 * NKV * (C / NH);
    qs_gpt *g, *m;
    assert_int_equal(qs_gpt_create(&g, &gc, qs_backend_cpu(), B, T), 0);
    assert_int_equal(qs_gpt_create(&m, &mc, qs_backend_cpu(), B, T), 0);
    qs_gpt_init(g, seed);
    qs_params *gp = qs_gpt_params(g), *mp = qs_gpt_params(m);
    assert_true(gp->n < mp->n); /* fewer c_attn columns */
    for (int t = 0; t < mp->n_tensors; t++) {
        const qs_param_info *mi = &mp->info[t];
        const int i = qs_params_find(gp, mi->name);
        assert_true(i >= 0);
        const float *src = qs_params_value(gp, i);
        float *dst = qs_params_value(mp, t);
        if (!strstr(mi->name, "c_attn")) {
            assert_int_equal(mi->numel, gp->info[i].numel);
            memcpy(dst, src, mi->numel * sizeof *dst);
            continue;
        }
        const size_t rows = mi->numel / (3 * (size_t)C); /* the weight's C inputs, or the bias's 1 */
        for (size_t r = 0; r < rows; r++)
            for (int j = 0; j < 3 * C; j++) dst[r * 3 * C + (size_t)j] = src[r * W + (size_t)gqa_column(j, C, NH, NKV)];
    }
    int x[12], y[12];
    for (int i = 0; i < N; i++) {
        x[i] = (int)qs_rng_below(seed, 50, (uint64_t)i, (uint64_t)gc.vocab_size);
        y[i] = (int)qs_rng_below(seed, 51, (uint64_t)i, (uint64_t)gc.vocab_size);
    }
    const qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 0x6aa, .grad_scale = 1.0f};
    qs_params_zero_grad(gp);
    qs_params_zero_grad(mp);
    const double lg = qs_gpt_forward(g, x, y, B, T, &mode), lm = qs_gpt_forward(m, x, y, B, T, &mode);
    assert_int_equal(qs_gpt_backward(g), 0);
    assert_int_equal(qs_gpt_backward(m), 0);
    double worst = 0.0;
    for (int i = 0; i < gp->n_tensors; i++) {
        const qs_param_info *gi = &gp->info[i];
        const int t = qs_params_find(mp, gi->name);
        const float *gg = qs_params_grad(gp, i), *mg = qs_params_grad(mp, t);
        double *want = calloc(gi->numel, sizeof *want);
        assert_non_null(want);
        if (!strstr(gi->name, "c_attn")) {
            for (size_t e = 0; e < gi->numel; e++) want[e] = mg[e];
        } else {
            const size_t rows = gi->numel / (size_t)W;
            for (size_t r = 0; r < rows; r++)
                for (int j = 0; j < 3 * C; j++)
                    want[r * W + (size_t)gqa_column(j, C, NH, NKV)] += mg[r * 3 * C + (size_t)j];
        }
        for (size_t e = 0; e < gi->numel; e++) {
            const double d = fabs(gg[e] - want[e]) / (1e-3 + fabs(want[e]));
            if (d > worst) worst = d;
            if (d > 1e-4) fail_msg("%s[%zu]: GQA gradient %.9g, summed MHA gradient %.9g", gi->name, e, gg[e], want[e]);
        }
        free(want);
    }
    printf("# %d query heads over %d K/V heads: loss %.7f (MHA with repeated K/V %.7f), worst gradient rel diff "
           "%.2e\n", NH, NKV, lg, lm, worst);
    assert_true(fabs(lg - lm) <= 1e-6 * fabs(lm));
    qs_gpt_free(g);
    qs_gpt_free(m);
}

static void test_gqa_is_repeated_heads(void **state) {
    (void)state;
    gqa_is_repeated_heads(4, 2);
    gqa_is_repeated_heads(3, 1);
    gqa_is_repeated_heads(6, 3);
}

static qs_model_config moe_config(void);
static qs_model_config quadconv_config(void);

static void test_memory_modes(void **state) {
    (void)state;
    qs_model_config c = tiny_config();
    c.n_layer = 3;
    memory_modes_are_exact(c, "dense");
    c = moe_config();
    c.n_layer = 3;
    c.moe.gating = QS_GATING_NOISY_TOPK;
    c.moe.capacity_factor = 1.0f;
    memory_modes_are_exact(c, "moe");
    c = gqa_config(4, 2);
    c.activation = QS_ACT_RELU;
    memory_modes_are_exact(c, "gqa, relu");
    c = quadconv_config();
    memory_modes_are_exact(c, "quadconv mixer");
}

/* Sample std of a tensor's initial values. */
static double init_std_of(qs_gpt *m, const char *name) {
    for (int t = 0; t < qs_gpt_params(m)->n_tensors; t++) {
        const qs_param_info *p = &qs_gpt_params(m)->info[t];
        if (strcmp(p->name, name)) continue;
        const float *w = qs_gpt_params(m)->data + p->offset;
        double ss = 0;
        for (size_t j = 0; j < p->numel; j++) ss += (double)w[j] * w[j];
        return sqrt(ss / p->numel);
    }
    fail_msg("no tensor %s", name);
    return 0;
}

/* Each init scheme gives its documented scale (fan_in 64 / fan_out 192 for c_attn). */
/* The hybrid LM: a causal quadratic conv as the token mixer (k = 3 < T, so the window
 * both fills and slides), with an MoE feed-forward for good measure. */
static qs_model_config quadconv_config(void) {
    qs_model_config c = tiny_config();
    c.mixer = QS_MIXER_QUADCONV;
    c.quadra.kernel_size = 3;
    return c;
}

static void test_quadconv_mixer(void **state) {
    (void)state;
    qs_model_config c = quadconv_config();
    gradcheck(&c, "quadconv mixer");
    c.moe.n_experts = 3;
    c.moe.top_k = 2;
    gradcheck(&c, "quadconv mixer + moe");
}

/* The backward pass reports each finished tail of the gradients (qs_params_grads_ready),
 * which data parallelism reduces while the pass goes on: every reported tail must already
 * hold its final values, bit for bit; the tails must grow to the whole table, one after
 * ln_f, one per layer, one after the embeddings; and a pass with every target ignored must
 * report the same points, or data-parallel ranks would start different buckets. */
#define READY_MAX 16
typedef struct ready_log {
    const qs_params *ps;
    int n;
    size_t begin[READY_MAX];
    float *tail[READY_MAX];
} ready_log;

static void log_ready(void *ctx, size_t begin) {
    ready_log *r = ctx;
    assert_true(r->n < READY_MAX);
    const size_t len = r->ps->n - begin;
    r->tail[r->n] = malloc(len * sizeof(float) + 1);
    assert_non_null(r->tail[r->n]);
    memcpy(r->tail[r->n], r->ps->grad + begin, len * sizeof(float));
    r->begin[r->n++] = begin;
}

static void ready_tails_are_final(qs_model_config c, const char *label) {
    const int B = 2, T = 6, N = B * T;
    int x[12], y[12];
    size_t first_pass[READY_MAX];
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < N; i++) {
            x[i] = (int)qs_rng_below(seed, 50, (uint64_t)i, (uint64_t)c.vocab_size);
            y[i] = pass ? -1 : (int)qs_rng_below(seed, 51, (uint64_t)i, (uint64_t)c.vocab_size);
        }
        qs_gpt *m;
        assert_int_equal(qs_gpt_create(&m, &c, qs_backend_cpu(), B, T), 0);
        qs_gpt_init(m, seed);
        qs_params *ps = qs_gpt_params(m);
        qs_params_zero_grad(ps);
        ready_log r = {.ps = ps};
        ps->on_grads_ready = log_ready;
        ps->grads_ready_ctx = &r;
        qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 0x7ead, .grad_scale = 1.0f};
        objective(m, x, y, B, T, &mode);
        assert_int_equal(qs_gpt_backward(m), 0);
        printf("# %s%s: %d tails reported\n", label, pass ? " (targets ignored)" : "", r.n);
        assert_int_equal(r.n, c.n_layer + 2);
        assert_int_equal(r.begin[r.n - 1], 0);
        assert_true(r.begin[0] < ps->n);
        double sq = 0;
        for (size_t i = 0; i < ps->n; i++) sq += (double)ps->grad[i] * ps->grad[i];
        assert_true(pass ? sq == 0 : sq > 0); /* the pass with targets does compute something */
        for (int k = 0; k < r.n; k++) {
            if (k) assert_true(r.begin[k] < r.begin[k - 1]);
            assert_memory_equal(r.tail[k], ps->grad + r.begin[k], (ps->n - r.begin[k]) * sizeof(float));
            if (pass) assert_int_equal(r.begin[k], first_pass[k]);
            else first_pass[k] = r.begin[k];
            free(r.tail[k]);
        }
        qs_gpt_free(m);
    }
}

static void test_grads_ready(void **state) {
    (void)state;
    ready_tails_are_final(tiny_config(), "dense, tied");
    qs_model_config c = tiny_config();
    c.tie_embeddings = false;
    c.bias = false;
    ready_tails_are_final(c, "dense, untied, no bias");
    c = moe_config();
    c.moe.gating = QS_GATING_NOISY_TOPK;
    ready_tails_are_final(c, "moe");
    c.recompute_layers = QS_RECOMPUTE_ALL;
    ready_tails_are_final(c, "moe, recompute_layers");
    c.n_layer = 3;
    c.recompute_layers = 2;
    ready_tails_are_final(c, "moe, recompute_layers 2 of 3");
    ready_tails_are_final(quadconv_config(), "quadconv mixer");
}

static void test_init_schemes(void **state) {
    (void)state;
    qs_model_config c = tiny_config();
    c.n_embd = 64;
    c.n_head = 4;
    c.n_layer = 2;
    c.init_std = 0.02f;
    c.tie_embeddings = false;
    const struct { qs_init init; double attn, proj; } cases[] = {
        {QS_INIT_NORMAL, 0.02, 0.02 / 2.0 /* 1/sqrt(2 * n_layer) */},
        {QS_INIT_KAIMING, sqrt(2.0 / 64), sqrt(2.0 / 64)},
        {QS_INIT_XAVIER, sqrt(2.0 / (64 + 192)), sqrt(2.0 / 128)},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        c.init = cases[i].init;
        qs_gpt *m;
        assert_int_equal(qs_gpt_create(&m, &c, qs_backend_cpu(), 1, 4), 0);
        qs_gpt_init(m, seed);
        assert_float_equal(init_std_of(m, "h.0.attn.c_attn.weight"), cases[i].attn, 0.05 * cases[i].attn);
        assert_float_equal(init_std_of(m, "h.1.attn.c_proj.weight"), cases[i].proj, 0.05 * cases[i].proj);
        assert_float_equal(init_std_of(m, "wte.weight"), 0.02, 0.002);
        assert_float_equal(init_std_of(m, "h.0.ln_1.weight"), 1.0, 0.0);
        assert_float_equal(init_std_of(m, "h.0.attn.c_attn.bias"), 0.0, 0.0);
        qs_gpt_free(m);
    }
}

static qs_model_config moe_config(void) {
    qs_model_config c = tiny_config();
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.aux_loss_coef = 0.1f;
    c.moe.z_loss_coef = 0.01f;
    c.init = QS_INIT_XAVIER;
    return c;
}

static void test_moe_noisy_capacity(void **state) {
    (void)state;
    qs_model_config c = moe_config();
    c.moe.gating = QS_GATING_NOISY_TOPK;
    c.moe.capacity_factor = 1.0f;
    gradcheck(&c, "moe noisy top-2, capacity 1.0");
}

static void test_moe_topk_dropless(void **state) {
    (void)state;
    qs_model_config c = moe_config();
    c.moe.top_k = 1;
    c.recompute_ffn = false;
    gradcheck(&c, "moe top-1 dropless, kept activations");
}

/* Capacity drops in token order and the statistics account for every assignment. */
static void test_moe_stats(void **state) {
    (void)state;
    qs_model_config c = moe_config();
    c.moe.capacity_factor = 0.5f;
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &c, qs_backend_cpu(), 2, 5), 0);
    qs_gpt_init(m, seed);
    int x[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    qs_forward_mode mode = {.train = false};
    qs_gpt_moe_stats_reset(m);
    qs_gpt_forward(m, x, NULL, 2, 5, &mode);
    const qs_moe_stats *s = qs_gpt_moe_stats(m);
    int64_t sum = 0;
    for (int e = 0; e < c.moe.n_experts; e++) {
        /* capacity = ceil(0.5 * 10 * 2 / 4) = 3 per expert and layer */
        assert_true(s->expert_tokens[e] <= 3 * c.n_layer);
        sum += s->expert_tokens[e];
    }
    assert_int_equal(sum, s->kept);
    assert_int_equal(s->kept + s->dropped, 10 * 2 * c.n_layer);
    assert_true(s->dropped >= 10 * 2 * c.n_layer - 4 * 3 * c.n_layer);
    qs_gpt_free(m);
}

/* The classifier runs 1,024 rows at a time (4 x 600 rows: chunks of 1024, 1024, 352).
 * The loss must equal the cross-entropy of the whole logits of a forward without
 * targets; the gradient of the batch must equal the sum over its sequences run alone
 * (one chunk each), weighted by their share of the valid targets; the plan must hold one
 * chunk of logits, not N rows. A prefill keeps each prompt's last-position logits in its
 * row. Backward refuses a forward that asked for no gradient. */
static void test_chunked_classifier(void **state) {
    (void)state;
    qs_model_config c = tiny_config();
    c.vocab_size = 50;
    c.seq_len = 600;
    c.dropout = 0.0f;
    enum { B = 4, T = 600, N = B * T, V = 50 };
    /* 100x the vocabulary costs one chunk of logits more, not N rows */
    qs_model_config wide = c;
    wide.vocab_size = 100 * V;
    qs_mem_plan narrow_plan, wide_plan;
    assert_int_equal(qs_gpt_plan(&c, qs_backend_cpu(), B, T, QS_GPT_TRAIN, 1, &narrow_plan), 0);
    assert_int_equal(qs_gpt_plan(&wide, qs_backend_cpu(), B, T, QS_GPT_TRAIN, 1, &wide_plan), 0);
    const size_t extra = wide_plan.activations - narrow_plan.activations;
    printf("# 100 x the vocabulary: activations +%zu bytes\n", extra);
    assert_true(extra <= (size_t)1024 * (wide.vocab_size - V) * sizeof(float) + 64);

    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &c, qs_backend_cpu(), B, T), 0);
    qs_gpt_init(m, seed);
    int *x = malloc(N * sizeof(int)), *y = malloc(N * sizeof(int)), valid[B] = {0}, n_valid = 0;
    for (int i = 0; i < N; i++) {
        x[i] = (int)qs_rng_below(seed, 60, (uint64_t)i, V);
        y[i] = qs_rng_below(seed, 62, (uint64_t)i, 5) == 2 ? -1 : (int)qs_rng_below(seed, 61, (uint64_t)i, V);
        valid[i / T] += y[i] >= 0;
        n_valid += y[i] >= 0;
    }
    const qs_forward_mode eval = {.train = false};
    qs_gpt_forward(m, x, NULL, B, T, &eval);
    const float *lg = qs_gpt_logits(m);
    double want = 0.0;
    for (int i = 0; i < N; i++) {
        if (y[i] < 0) continue;
        double mx = lg[(size_t)i * V], z = 0.0;
        for (int v = 0; v < V; v++) mx = fmax(mx, lg[(size_t)i * V + v]);
        for (int v = 0; v < V; v++) z += exp(lg[(size_t)i * V + v] - mx);
        want += mx + log(z) - lg[(size_t)i * V + y[i]];
    }
    want /= n_valid;
    float last[B][V];
    for (int b = 0; b < B; b++) memcpy(last[b], lg + ((size_t)b * T + T - 1) * V, sizeof last[b]);
    const double got = qs_gpt_forward(m, x, y, B, T, &eval);
    printf("# loss in chunks %.9f, from whole logits %.9f\n", got, want);
    assert_true(fabs(got - want) < 1e-5 * fabs(want));
    assert_null(qs_gpt_logits(m));
    assert_int_not_equal(qs_gpt_backward(m), 0); /* that forward took no gradient */

    qs_params *ps = qs_gpt_params(m);
    qs_params_zero_grad(ps);
    const qs_forward_mode grad = {.train = false, .grad_scale = 1.0f};
    assert_float_equal(qs_gpt_forward(m, x, y, B, T, &grad), got, 0.0);
    assert_int_equal(qs_gpt_backward(m), 0);
    float *batched = malloc(ps->n * sizeof(float));
    memcpy(batched, ps->grad, ps->n * sizeof(float));
    qs_params_zero_grad(ps);
    for (int b = 0; b < B; b++) {
        const qs_forward_mode share = {.train = false, .grad_scale = (float)valid[b] / (float)n_valid};
        qs_gpt_forward(m, x + b * T, y + b * T, 1, T, &share);
        assert_int_equal(qs_gpt_backward(m), 0);
    }
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < ps->n; i++) {
        worst = fmax(worst, fabs(batched[i] - ps->grad[i]));
        scale = fmax(scale, fabs(batched[i]));
    }
    printf("# gradient in 3 chunks vs 4 sequences alone: max diff %.2e of max %.2e\n", worst, scale);
    assert_true(scale > 0.0 && worst <= 1e-5 * scale);

    assert_int_equal(qs_gpt_prefill(m, x, B, T), 0);
    float row[V];
    for (int b = 0; b < B; b++) {
        qs_gpt_logits_row(m, b, row);
        for (int v = 0; v < V; v++) assert_float_equal(row[v], last[b][v], 1e-5);
    }
    assert_int_not_equal(qs_gpt_backward(m), 0); /* a prefill's activations are not a loss's */
    free(batched);
    free(x);
    free(y);
    qs_gpt_free(m);
}

static float half(const qs_param_info *p, const void *ctx) {
    (void)p;
    (void)ctx;
    return 0.5f;
}

/* qs_params_init stages 4 Mi floats at a time: a tensor longer than that (and the ones
 * after it) must hold the same draws as if written in one piece. */
static void test_init_staging(void **state) {
    (void)state;
    qs_params ps = {0};
    const int64_t big[1] = {(1 << 22) + 1001}, small[1] = {7};
    qs_params_add(&ps, "b", 1, small, QS_ROLE_BIAS, 0, 0, false);
    const int w = qs_params_add(&ps, "w", 1, big, QS_ROLE_WEIGHT, 1, 1, false);
    const int g = qs_params_add(&ps, "g", 1, small, QS_ROLE_NORM_WEIGHT, 0, 0, false);
    const int e = qs_params_add(&ps, "e", 1, small, QS_ROLE_EMBEDDING, 0, 0, false);
    assert_int_equal(qs_params_alloc(&ps, qs_backend_cpu(), false), 0);
    assert_int_equal(qs_params_init(&ps, seed, half, NULL), 0);
    const float *wv = qs_params_value(&ps, w), *gv = qs_params_value(&ps, g), *ev = qs_params_value(&ps, e);
    const size_t at[6] = {0, (1 << 22) - 1, 1 << 22, (size_t)big[0] - 1, qs_rng_below(seed, 70, 0, (uint64_t)big[0]),
                          qs_rng_below(seed, 71, 0, (uint64_t)big[0])};
    for (int k = 0; k < 6; k++) assert_true(wv[at[k]] == 0.5f * qs_rng_normal(seed, (uint64_t)w, at[k]));
    for (int j = 0; j < 7; j++) {
        assert_true(qs_params_value(&ps, 0)[j] == 0.0f && gv[j] == 1.0f);
        assert_true(ev[j] == 0.5f * qs_rng_normal(seed, (uint64_t)e, (uint64_t)j));
    }
    qs_params_free(&ps);
}

/* Eval mode is deterministic whatever the seed; train mode depends on it (dropout). */
static void test_modes(void **state) {
    (void)state;
    qs_model_config c = tiny_config();
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &c, qs_backend_cpu(), 2, 5), 0);
    qs_gpt_init(m, seed);
    int x[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, y[10] = {2, 3, 4, 5, 6, 7, 8, 9, 10, 0};
    qs_forward_mode e1 = {.train = false, .rng_seed = 1}, e2 = {.train = false, .rng_seed = 2};
    qs_forward_mode t1 = {.train = true, .rng_seed = 1}, t2 = {.train = true, .rng_seed = 2};
    assert_true(qs_gpt_forward(m, x, y, 2, 5, &e1) == qs_gpt_forward(m, x, y, 2, 5, &e2));
    double a = qs_gpt_forward(m, x, y, 2, 5, &t1);
    assert_true(a == qs_gpt_forward(m, x, y, 2, 5, &t1));
    assert_true(a != qs_gpt_forward(m, x, y, 2, 5, &t2));
    qs_gpt_free(m);
}

/* Rounds to bf16 in place the weights qs_gpt_use_bf16_weights packs: the linear layers'
 * (stacked experts' too), not the router, embeddings or norms. Returns how many. */
static int round_linear_weights(qs_gpt *m) {
    qs_params *ps = qs_gpt_params(m);
    int n = 0;
    for (int i = 0; i < ps->n_tensors; i++) {
        const char *name = ps->info[i].name;
        if (!strstr(name, ".weight") || !(strstr(name, "c_attn") || strstr(name, "c_proj") || strstr(name, "c_fc") ||
                                          !strcmp(name, "lm_head.weight")))
            continue;
        float *v = qs_params_value(ps, i);
        for (size_t k = 0; k < ps->info[i].numel; k++) v[k] = qs_bf16_to_float(qs_bf16_from_float(v[k]));
        n++;
    }
    return n;
}

/* The linear layers' weights: fp32; bf16 panels packed once the weights are there,
 * which stay; bf16 panels alone, packed as the weights load (QS_GPT_INFER_BF16). */
typedef enum weights_form { FP32, BF16_KEPT, BF16_ONLY } weights_form;

/* KV-cache decoding by a model made for `use` equals a training model's recomputing the
 * whole window each step: the logits at every step (window sliding past seq_len
 * included), and qs_generate's greedy tokens. With bf16, the decoding model runs from
 * bf16 weights (untied: the embedding stays fp32) and the recomputing one from the same
 * values rounded in place, in fp32. */
static void kv_cache_matches_recompute_in(qs_model_config c, const char *label, qs_gpt_use use, weights_form w) {
    const bool bf16 = w != FP32;
    c.dropout = 0.0f;
    if (bf16) c.tie_embeddings = false;
    const int P = 3, STEPS = 2 * 7 + 3; /* seq_len 7: slides twice */
    qs_gpt *cached, *full;
    assert_int_equal(qs_gpt_create_for(&cached, &c, qs_backend_cpu(), 1, c.seq_len, w == BF16_ONLY ? QS_GPT_INFER_BF16 : use),
                     0);
    assert_int_equal(qs_gpt_create(&full, &c, qs_backend_cpu(), 1, c.seq_len), 0);
    assert_int_equal(qs_gpt_init(cached, seed), 0);
    qs_gpt_init(full, seed);
    if (w == BF16_KEPT) assert_int_equal(qs_gpt_use_bf16_weights(cached), 0);
    if (bf16) assert_int_equal(round_linear_weights(full), 1 + c.n_layer * (c.mixer == QS_MIXER_QUADCONV ? 3 : 4));
    int ctx[32], ref[32];
    for (int i = 0; i < P; i++) ctx[i] = ref[i] = (int)qs_rng_below(seed, 20, (uint64_t)i, (uint64_t)c.vocab_size);
    float a[64], b[64];
    double worst = 0;
    qs_forward_mode eval = {.train = false};
    int n = P, in_cache = 0;
    for (int s = 0; s < STEPS; s++, n++) {
        int T = n < c.seq_len ? n : c.seq_len;
        if (in_cache == 0 || in_cache == c.seq_len) {
            assert_int_equal(qs_gpt_prefill(cached, ctx + n - T, 1, T), 0);
            in_cache = T;
        } else {
            const int slot = 0, pos = in_cache++;
            assert_int_equal(qs_gpt_decode(cached, ctx + n - 1, 1, &slot, &pos), 0);
        }
        qs_gpt_logits_row(cached, 0, a);
        qs_gpt_forward(full, ctx + n - T, NULL, 1, T, &eval);
        qs_gpt_logits_row(full, T - 1, b);
        int best = 0;
        for (int v = 0; v < c.vocab_size; v++) {
            worst = fmax(worst, fabs(a[v] - b[v]));
            if (b[v] > b[best]) best = v;
        }
        ctx[n] = best;
    }
    printf("# %s%s%s: kv cache vs recompute over %d steps, max |logit diff| %.2e\n", label,
           use == QS_GPT_INFER ? ", inference model" : "",
           w == BF16_KEPT ? ", bf16 weights" : w == BF16_ONLY ? ", bf16 weights only" : "", STEPS, worst);
    assert_true(worst < 1e-4);
    qs_sample_params greedy = {.temperature = 0};
    assert_int_equal(qs_generate(cached, ref, P, STEPS, &greedy, NULL, NULL), STEPS);
    assert_memory_equal(ref, ctx, (size_t)(P + STEPS) * sizeof(int));
    qs_gpt_free(cached);
    qs_gpt_free(full);
}

/* by a training model (sampling during training) and an inference one (generate) */
static void kv_cache_matches_recompute(qs_model_config c, const char *label) {
    kv_cache_matches_recompute_in(c, label, QS_GPT_TRAIN, FP32);
    kv_cache_matches_recompute_in(c, label, QS_GPT_INFER, FP32);
}

static void test_kv_cache(void **state) {
    (void)state;
    kv_cache_matches_recompute(tiny_config(), "dense");
    kv_cache_matches_recompute(moe_config(), "moe");
    kv_cache_matches_recompute(quadconv_config(), "quadconv mixer");
    kv_cache_matches_recompute(gqa_config(4, 2), "grouped-query");
    kv_cache_matches_recompute(gqa_config(3, 1), "multi-query");
    qs_model_config c = quadconv_config();
    c.recompute_layers = QS_RECOMPUTE_ALL; /* every layer's buffers shared: each fills its cache before the next */
    kv_cache_matches_recompute(c, "quadconv mixer, recompute_layers");
    c = gqa_config(4, 2);
    c.recompute_layers = QS_RECOMPUTE_ALL;
    kv_cache_matches_recompute(c, "grouped-query, recompute_layers");
    c.n_layer = 3;
    c.recompute_layers = 2;
    kv_cache_matches_recompute(c, "grouped-query, recompute_layers 2 of 3");
}

/* Alone (QS_GPT_INFER_BF16, packed as they load) the bf16 panels are the ones packed
 * from loaded fp32 weights: the same logits, bit for bit, tied classifier (packed from
 * the embedding's own room) or not, loaded twice; the table holds only the tensors not
 * packed (and a tied classifier), and such a model takes no adapters. */
static void bf16_only_matches_kept(qs_model_config c, const char *label) {
    c.dropout = 0.0f;
    const int B = 2, T = 5;
    qs_gpt *m[2];
    for (int k = 0; k < 2; k++) {
        assert_int_equal(qs_gpt_create_for(&m[k], &c, qs_backend_cpu(), B, T, k ? QS_GPT_INFER_BF16 : QS_GPT_INFER), 0);
        if (k) assert_int_equal(qs_gpt_init(m[k], seed ^ 1), 0); /* loaded again below: packed again */
        assert_int_equal(qs_gpt_init(m[k], seed), 0);
        if (!k) assert_int_equal(qs_gpt_use_bf16_weights(m[k]), 0);
    }
    const qs_params *kept = qs_gpt_params(m[0]), *only = qs_gpt_params(m[1]);
    size_t held = 0;
    for (int i = 0; i < only->n_tensors; i++)
        if (!qs_params_value(only, i)) held += only->info[i].numel;
    assert_true(held > 0 && only->n == kept->n - held);
    assert_false(qs_params_whole(only));
    int x[10];
    for (int i = 0; i < B * T; i++) x[i] = (int)qs_rng_below(seed, 21, (uint64_t)i, (uint64_t)c.vocab_size);
    float a[64], b[64];
    for (int k = 0; k < 2; k++) assert_int_equal(qs_gpt_prefill(m[k], x, B, T), 0);
    for (int r = 0; r < B; r++) {
        qs_gpt_logits_row(m[0], r, a);
        qs_gpt_logits_row(m[1], r, b);
        assert_memory_equal(a, b, (size_t)c.vocab_size * sizeof(float));
    }
    qs_config lc;
    qs_config_defaults(&lc);
    qs_lora *lo = (qs_lora *)&lc; /* must come back NULL */
    assert_int_equal(qs_lora_create(&lo, &lc.lora, m[1]), -1);
    assert_null(lo);
    assert_non_null(strstr(qs_error_last(), "fp32 weights"));
    printf("# %s: %zu of %zu parameters only as bf16 panels, the same logits\n", label, held, kept->n);
    for (int k = 0; k < 2; k++) qs_gpt_free(m[k]);
}

/* bf16 weights: KV-cache decoding from them equals recomputing from the same values in
 * fp32, for every kind of linear layer, kept beside their fp32 copies or not; a model
 * that trains cannot have them. */
static void test_bf16_weights(void **state) {
    (void)state;
    for (weights_form w = BF16_KEPT; w <= BF16_ONLY; w++) {
        kv_cache_matches_recompute_in(tiny_config(), "dense", QS_GPT_INFER, w);
        kv_cache_matches_recompute_in(moe_config(), "moe", QS_GPT_INFER, w);
        kv_cache_matches_recompute_in(quadconv_config(), "quadconv mixer", QS_GPT_INFER, w);
        kv_cache_matches_recompute_in(gqa_config(4, 2), "grouped-query", QS_GPT_INFER, w);
    }
    qs_model_config c = tiny_config();
    c.bias = false;
    kv_cache_matches_recompute_in(c, "dense, no bias", QS_GPT_INFER, BF16_ONLY);
    bf16_only_matches_kept(tiny_config(), "dense, tied");
    c = moe_config();
    c.tie_embeddings = false;
    bf16_only_matches_kept(c, "moe, untied");
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &c, qs_backend_cpu(), 1, c.seq_len), 0);
    assert_int_not_equal(qs_gpt_use_bf16_weights(m), 0);
    assert_non_null(strstr(qs_error_last(), "frozen"));
    qs_gpt_free(m);
}

/* Prompts of different lengths generated in one batch: greedy, each comes out as it
 * does alone (windows sliding at different steps); sampled with a stop token, prompt 0
 * is qs_generate's, and changing another prompt changes nothing in the rest (no
 * cross-talk between KV-cache slots, also once finished prompts leave the batch). */
static void batch_matches_alone(qs_model_config c, const char *label) {
    c.dropout = 0.0f;
    enum { B = 4, NEW = 12, CAP = 32 };
    const int len[B] = {1, 5, 3, 7}; /* seq_len 7: the last slides at once */
    qs_gpt *m;
    assert_int_equal(qs_gpt_create(&m, &c, qs_backend_cpu(), B, c.seq_len), 0);
    qs_gpt_init(m, seed);
    int buf[B][CAP], solo[CAP], *ctx[B], lens[B];
    for (int b = 0; b < B; b++) ctx[b] = buf[b];
    const qs_sample_params greedy = {.temperature = 0};
    qs_sample_params sampled = {.temperature = 1.0f, .top_k = 5, .seed = seed};
    for (int pass = 0; pass < 2; pass++) {
        const qs_sample_params *sp = pass ? &sampled : &greedy;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < len[b]; i++) buf[b][i] = (int)qs_rng_below(seed, 30 + b, (uint64_t)i, (uint64_t)c.vocab_size);
        if (pass) { /* stop at prompt 0's fourth sampled token: at least one prompt ends early */
            memcpy(solo, buf[0], (size_t)len[0] * sizeof(int));
            assert_int_equal(qs_generate(m, solo, len[0], 4, sp, NULL, NULL), 4);
            sampled.stop_at_token = true;
            sampled.stop_token = solo[len[0] + 3];
        }
        int made = qs_generate_batch(m, ctx, len, B, NEW, sp, lens, NULL, NULL);
        int total = 0;
        for (int b = 0; b < B; b++) total += lens[b] - len[b];
        assert_int_equal(made, total);
        for (int b = 0; b < (pass ? 1 : B); b++) {
            memcpy(solo, buf[b], (size_t)len[b] * sizeof(int));
            int k = qs_generate(m, solo, len[b], NEW, sp, NULL, NULL);
            assert_int_equal(len[b] + k, lens[b]);
            assert_memory_equal(solo, buf[b], (size_t)lens[b] * sizeof(int));
        }
        if (!pass) continue;
        int saved[B][CAP], saved_lens[B], stopped = 0;
        memcpy(saved, buf, sizeof buf);
        memcpy(saved_lens, lens, sizeof lens);
        for (int b = 0; b < B; b++) stopped += lens[b] < len[b] + NEW;
        assert_true(stopped >= 1);
        for (int i = 0; i < len[2]; i++) buf[2][i] = (buf[2][i] + 1) % c.vocab_size;
        assert_true(qs_generate_batch(m, ctx, len, B, NEW, sp, lens, NULL, NULL) >= 0);
        for (int b = 0; b < B; b++) {
            if (b == 2) continue;
            assert_int_equal(lens[b], saved_lens[b]);
            assert_memory_equal(buf[b], saved[b], (size_t)lens[b] * sizeof(int));
        }
        printf("# %s: batch of %d = alone (greedy); sampled: %d of %d stopped early\n", label, B, stopped, B);
    }
    qs_gpt_free(m);
}

static void test_batched_generation(void **state) {
    (void)state;
    batch_matches_alone(tiny_config(), "dense");
    batch_matches_alone(moe_config(), "moe");
    batch_matches_alone(quadconv_config(), "quadconv mixer");
    batch_matches_alone(gqa_config(4, 2), "grouped-query");
}

int main(void) {
    seed = qs_test_seed("test_model");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense_gelu_tied),
        cmocka_unit_test(test_dense_untied_nobias),
        cmocka_unit_test(test_gqa_gradients),
        cmocka_unit_test(test_gqa_is_repeated_heads),
        cmocka_unit_test(test_memory_modes),
        cmocka_unit_test(test_quadconv_mixer),
        cmocka_unit_test(test_grads_ready),
        cmocka_unit_test(test_init_schemes),
        cmocka_unit_test(test_moe_noisy_capacity),
        cmocka_unit_test(test_moe_topk_dropless),
        cmocka_unit_test(test_moe_stats),
        cmocka_unit_test(test_modes),
        cmocka_unit_test(test_chunked_classifier),
        cmocka_unit_test(test_init_staging),
        cmocka_unit_test(test_kv_cache),
        cmocka_unit_test(test_bf16_weights),
        cmocka_unit_test(test_batched_generation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* LoRA: the adapter path against a naive reference and by finite differences (alone and
 * inside whole dense, MoE and quadconv-mixer GPTs, dropout on), the frozen base, the
 * q/k/v column mask of c_attn, merge/unmerge against the unmerged logits and greedy
 * generation, the rows expert adapters draw their dropout at, the adapter files (round
 * trip, size against r, the base fingerprint), refused targets, and adapters written by
 * Hugging Face peft (tests/make_peft_fixture.py) over the converted GPT-2 fixture:
 * peft's own logits with the adapter and merged (also through `quasar merge`), and every
 * refused setting. Runs from the repository root. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "quasar/checkpoint.h"
#include "quasar/checksum.h"
#include "quasar/config.h"
#include "quasar/convert.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/lora.h"
#include "quasar/model.h"
#include "quasar/rng.h"
#include "quasar/sample.h"
#include "gradcheck.h"
#include "test_json.h"
#include "test_seed.h"

static uint64_t seed;

static qs_config tiny(const char *targets) {
    qs_config c;
    qs_config_defaults(&c);
    c.model.vocab_size = 11;
    c.model.seq_len = 7;
    c.model.n_layer = 2;
    c.model.n_head = 2;
    c.model.n_embd = 6;
    c.model.ffn_mult = 2;
    c.model.dropout = 0.1f;
    c.model.init_std = 0.3f;
    c.lora.r = 3;
    c.lora.alpha = 5.0f;
    c.lora.dropout = 0.2f;
    snprintf(c.lora.targets, sizeof c.lora.targets, "%s", targets);
    return c;
}

/* Which of c_attn's q, k, v column blocks (0, 1, 2) output column j is in: C columns of
 * q, then Ckv each of k and v (fewer than C with grouped-query attention). */
static int qkv_block(const qs_model_config *mc, size_t j) {
    const size_t C = (size_t)mc->n_embd, Ckv = C / (size_t)mc->n_head * (size_t)qs_config_kv_heads(mc);
    return j < C ? 0 : j < C + Ckv ? 1 : 2;
}

/* Adapter values drawn at random, B included (B = 0 would hide half the gradient),
 * except the c_attn column blocks of B that the targets leave out: those are always zero
 * (init makes them so and their gradient is masked). */
static void randomise(qs_lora *lo, const qs_model_config *mc, uint64_t stream) {
    qs_params *ps = qs_lora_params(lo);
    const qs_lora_config *lc = qs_lora_config_of(lo);
    for (size_t j = 0; j < ps->n; j++) ps->data[j] = 0.5f * qs_rng_normal(seed, stream, j);
    unsigned t;
    assert_int_equal(qs_config_lora_targets(lc, &t), 0);
    for (int i = 0; i < ps->n_tensors; i++) {
        const qs_param_info *p = &ps->info[i];
        if (!strstr(p->name, "c_attn.lora_B")) continue;
        for (size_t e = 0; e < p->numel; e++) /* B is [out, r] */
            if (!(t & (1u << qkv_block(mc, e / (size_t)lc->r)))) ps->data[p->offset + e] = 0.0f;
    }
}

typedef struct built {
    qs_gpt *m;
    qs_lora *lo;
} built;

static built build_on(const qs_backend *be, const qs_config *c, int B, int T) {
    built b;
    assert_int_equal(qs_gpt_create_for(&b.m, &c->model, be, B, T, QS_GPT_FROZEN), 0);
    qs_gpt_init(b.m, seed);
    assert_int_equal(qs_lora_create(&b.lo, &c->lora, b.m), 0);
    randomise(b.lo, &c->model, 99);
    qs_gpt_set_lora(b.m, b.lo);
    return b;
}

static built build(const qs_config *c, int B, int T) { return build_on(qs_backend_cpu(), c, B, T); }

static void drop(built *b) {
    qs_gpt_free(b->m);
    qs_lora_free(b->lo);
}

/* ---- the LoRA linear alone ---- */

typedef struct lin_ctx {
    qs_lora *lo;
    qs_lora_site site;
    int n, in, out;
    float *x, *y, *R;
    qs_forward_mode mode;
    const int64_t *ids; /* the rows' global ids, for the dropout mask */
} lin_ctx;

static double lin_loss(lin_ctx *c) {
    memset(c->y, 0, (size_t)c->n * c->out * sizeof(float));
    qs_lora_forward(c->lo, 1, c->site, 0, 0, c->n, c->y, c->x, c->ids, &c->mode);
    double s = 0;
    for (size_t i = 0; i < (size_t)c->n * c->out; i++) s += (double)c->R[i] * c->y[i];
    return s;
}

static double lin_loss_v(void *c, bool *same) {
    (void)same;
    return lin_loss(c);
}

static double fd_error(gc_loss_fn f, void *ctx, float *p, double an, bool *same, double floor) {
    return gc_rel_err(gc_nearest_fd(f, ctx, p, an, same), an, floor);
}

static void test_linear_forward_and_gradients(void **state) {
    (void)state;
    for (int rs = 0; rs <= 1; rs++) {
        qs_config c = tiny("fc_proj");
        c.lora.rslora = rs;
        built b = build(&c, 2, 5);
        const int n = 9, in = 12, out = 6, r = c.lora.r; /* mlp.c_proj: F = 12 -> C = 6 */
        int64_t ids[9];
        for (int i = 0; i < n; i++) ids[i] = 1000 + 7 * i;
        lin_ctx lc = {b.lo, QS_LORA_SITE_FC_PROJ, n, in, out, malloc(n * in * sizeof(float)),
                      malloc(n * out * sizeof(float)), malloc(n * out * sizeof(float)),
                      {.train = true, .rng_seed = seed ^ 5}, ids};
        for (int i = 0; i < n * in; i++) lc.x[i] = qs_rng_normal(seed, 1, (uint64_t)i);
        for (int i = 0; i < n * out; i++) lc.R[i] = qs_rng_normal(seed, 2, (uint64_t)i);
        qs_params *ps = qs_lora_params(b.lo);
        int ia = qs_params_find(ps, "base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight");
        int ib = qs_params_find(ps, "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight");
        assert_true(ia >= 0 && ib >= 0);
        const float *A = qs_params_value(ps, ia), *B = qs_params_value(ps, ib);

        /* forward against y = s * drop(x) A^T B^T, the mask read back from dropout itself */
        lin_loss(&lc);
        const double s = rs ? c.lora.alpha / sqrt(r) : c.lora.alpha / r;
        float *xd = malloc(n * in * sizeof(float));
        qs_backend_cpu()->ops->dropout_forward(xd, lc.x, c.lora.dropout, lc.mode.rng_seed,
                                               (1ull << 40) + (1ull * QS_LORA_N_SITES + QS_LORA_SITE_FC_PROJ), ids,
                                               (size_t)n, (size_t)in);
        int dropped = 0;
        for (int i = 0; i < n * in; i++) dropped += xd[i] == 0.0f;
        assert_true(dropped > 0 && dropped < n * in); /* the mask is really on */
        for (int row = 0; row < n; row++)
            for (int o = 0; o < out; o++) {
                double want = 0;
                for (int k = 0; k < r; k++) {
                    double h = 0;
                    for (int i = 0; i < in; i++) h += (double)xd[row * in + i] * A[k * in + i];
                    want += h * B[o * r + k];
                }
                assert_float_equal(lc.y[row * out + o], s * want, 1e-4 * (1 + fabs(s * want)));
            }

        /* gradients of A, B and x */
        qs_params_zero_grad(ps);
        float *dx = calloc((size_t)n * in, sizeof(float));
        lin_loss(&lc);
        qs_lora_backward(b.lo, 1, QS_LORA_SITE_FC_PROJ, 0, 0, n, dx, lc.R, lc.x, ids, &lc.mode);
        /* The loss sums float outputs of size ~10, so a difference quotient carries noise
         * of ~1e-3 absolute: coordinates below the floor are held to it absolutely. */
        const double floor = 5e-2;
        double worst = 0;
        for (int k = 0; k < 6; k++) {
            size_t ja = qs_rng_below(seed, 10, (uint64_t)k, (uint64_t)r * in);
            size_t jb = qs_rng_below(seed, 11, (uint64_t)k, (uint64_t)out * r);
            size_t jx = qs_rng_below(seed, 12, (uint64_t)k, (uint64_t)n * in);
            worst = fmax(worst, fd_error(lin_loss_v, &lc, (float *)A + ja, qs_params_grad(ps, ia)[ja], &(bool){true}, floor));
            worst = fmax(worst, fd_error(lin_loss_v, &lc, (float *)B + jb, qs_params_grad(ps, ib)[jb], &(bool){true}, floor));
            worst = fmax(worst, fd_error(lin_loss_v, &lc, lc.x + jx, dx[jx], &(bool){true}, floor));
        }
        printf("# lora linear (rslora %d): worst rel err %.2e\n", rs, worst);
        assert_true(worst < 1e-2);
        free(xd), free(dx), free(lc.x), free(lc.y), free(lc.R);
        drop(&b);
    }
}

/* ---- whole GPTs with adapters ---- */

typedef struct gpt_ctx {
    qs_gpt *m;
    int x[10], y[10];
    qs_forward_mode mode;
    const int *route0; /* MoE: the routing of the unperturbed pass */
    size_t nr;
} gpt_ctx;

/* *same is cleared when MoE routing differs from route0's. */
static double gpt_loss(void *p, bool *same) {
    gpt_ctx *c = p;
    double loss = qs_gpt_forward(c->m, c->x, c->y, 2, 5, &c->mode);
    if (c->nr && memcmp(c->route0, qs_gpt_moe_routing(c->m), c->nr * sizeof(int))) *same = false;
    const qs_model_config *mc = qs_gpt_config(c->m);
    if (mc->moe.n_experts > 0) {
        const qs_moe_stats *s = qs_gpt_moe_stats(c->m);
        loss += mc->moe.aux_loss_coef * s->balance + mc->moe.z_loss_coef * s->z;
    }
    return loss;
}

/* A frozen GPT on be with random adapters (into *b), a training pass (masks from seed ^
 * rng_xor) over 2 x 5 tokens and targets drawn from streams `stream` and `stream + 1`,
 * and the backward: the adapters hold their gradients. */
static gpt_ctx adapter_pass(const qs_backend *be, const qs_config *c, built *b, uint64_t rng_xor, uint64_t stream) {
    *b = build_on(be, c, 2, 6);
    gpt_ctx g = {.m = b->m, .mode = {.train = true, .rng_seed = seed ^ rng_xor, .grad_scale = 1.0f}};
    for (int i = 0; i < 10; i++) {
        g.x[i] = (int)qs_rng_below(seed, stream, (uint64_t)i, 11);
        g.y[i] = (int)qs_rng_below(seed, stream + 1, (uint64_t)i, 11);
    }
    qs_params_zero_grad(qs_lora_params(b->lo));
    gpt_loss(&g, &(bool){true});
    assert_int_equal(qs_gpt_backward(b->m), 0);
    return g;
}

static void gpt_gradcheck(const qs_config *c, const char *label) {
    built b;
    gpt_ctx g = adapter_pass(qs_backend_cpu(), c, &b, 77, 20);
    assert_null(qs_gpt_params(b.m)->grad); /* the base is frozen: no gradient buffer at all */
    qs_params *ps = qs_lora_params(b.lo);
    size_t nr = c->model.moe.n_experts ? (size_t)c->model.n_layer * 10 * c->model.moe.top_k : 0;
    int *route0 = malloc(nr * sizeof(int) + 1);
    if (nr) memcpy(route0, qs_gpt_moe_routing(b.m), nr * sizeof(int));
    g.route0 = route0;
    g.nr = nr;
    double worst = 0;
    int checked = 0, skipped = 0;
    char worst_at[2 * QS_PARAM_NAME_MAX] = "";
    unsigned targets;
    assert_int_equal(qs_config_lora_targets(&c->lora, &targets), 0);
    /* per tensor, three coordinates checked: its largest gradient, then random ones; a
     * coordinate whose step flips an MoE routing (near a tie in a router's logits) is
     * passed over for the next, up to MAX_PICKS tries */
    enum { PER_TENSOR = 3, MAX_PICKS = 10 };
    for (int t = 0; t < ps->n_tensors; t++) {
        const qs_param_info *pi = &ps->info[t];
        size_t largest = 0;
        for (size_t j = 0; j < pi->numel; j++)
            if (fabsf(ps->grad[pi->offset + j]) > fabsf(ps->grad[pi->offset + largest])) largest = j;
        const bool qkv_b = strstr(pi->name, "c_attn.lora_B") != NULL;
        for (int k = 0, done = 0; k < MAX_PICKS && done < PER_TENSOR; k++) {
            const size_t pick = k == 0 ? largest : qs_rng_below(seed, 29 + (uint64_t)k, (uint64_t)t, pi->numel);
            const size_t i = pi->offset + pick;
            if (qkv_b && !(targets & (1u << qkv_block(&c->model, pick / (size_t)c->lora.r)))) {
                assert_true(ps->grad[i] == 0.0f); /* a block left out: held at zero */
                continue;
            }
            bool same = true;
            double err = fd_error(gpt_loss, &g, ps->data + i, ps->grad[i], &same, 1e-3);
            if (!same) { /* top-k routing changed: the loss is discontinuous there */
                skipped++;
                continue;
            }
            if (err > worst) snprintf(worst_at, sizeof worst_at, "%s[%zu] an %.4g", pi->name, pick, ps->grad[i]);
            worst = fmax(worst, err);
            checked++;
            done++;
        }
    }
    printf("# %s: %d adapter coordinates (%d skipped for routing flips), worst rel err %.2e at %s\n", label,
           checked, skipped, worst, worst_at);
    assert_true(checked > 2 * ps->n_tensors);
    assert_true(worst < 5e-2);
    free(route0);
    drop(&b);
}

static void test_gpt_dense(void **state) {
    (void)state;
    qs_config c = tiny("q,k,v,proj,fc,fc_proj");
    gpt_gradcheck(&c, "dense gpt + lora");
}

static void test_gpt_moe(void **state) {
    (void)state;
    qs_config c = tiny("q,v,proj,experts");
    c.model.moe.n_experts = 3;
    c.model.moe.top_k = 2;
    gpt_gradcheck(&c, "moe gpt + lora");
}

/* Grouped-query K/V: c_attn's B has C rows of q but fewer of k and v. */
static void test_gpt_grouped_query(void **state) {
    (void)state;
    qs_config c = tiny("k,v,proj");
    c.model.n_head = 3;
    c.model.n_kv_head = 1;
    gpt_gradcheck(&c, "multi-query gpt + lora on k, v");
    c = tiny("q,k");
    c.model.n_head = 6;
    c.model.n_kv_head = 2;
    c.model.n_embd = 12;
    gpt_gradcheck(&c, "grouped-query gpt + lora on q, k");
}

static void test_gpt_quadconv_mixer(void **state) {
    (void)state;
    qs_config c = tiny("proj,fc");
    c.model.mixer = QS_MIXER_QUADCONV;
    c.model.quadra.kernel_size = 3;
    gpt_gradcheck(&c, "quadconv-mixer gpt + lora");
}

/* Activation checkpointing under a frozen base: the adapters' gradients (LoRA dropout,
 * model dropout and router noise on) are the same bits as with every activation kept,
 * in a smaller plan with the last two of three blocks checkpointed, smaller still with
 * all three. */
static void adapters_under_recompute(qs_config c, const char *label) {
    static const int counts[3] = {0, 2, QS_RECOMPUTE_ALL};
    float *grad[3];
    size_t act[3], n = 0;
    assert_int_equal(c.model.n_layer, 3);
    for (int r = 0; r < 3; r++) {
        c.model.recompute_layers = counts[r];
        built b;
        adapter_pass(qs_backend_cpu(), &c, &b, 3, 60);
        qs_params *ps = qs_lora_params(b.lo);
        n = ps->n;
        grad[r] = malloc(n * sizeof(float));
        memcpy(grad[r], ps->grad, n * sizeof(float));
        act[r] = qs_gpt_mem_plan(b.m)->activations;
        drop(&b);
    }
    double norm = 0;
    for (size_t j = 0; j < n; j++) norm += fabs(grad[0][j]);
    printf("# %s: activations %zu -> %zu -> %zu bytes, |adapter grad|_1 %.4g\n", label, act[0], act[1], act[2],
           norm);
    assert_true(norm > 0);
    for (int r = 1; r < 3; r++) {
        assert_memory_equal(grad[0], grad[r], n * sizeof(float));
        assert_true(act[r] < act[r - 1]);
    }
    for (int r = 0; r < 3; r++) free(grad[r]);
}

static void test_recompute_layers(void **state) {
    (void)state;
    qs_config c = tiny("q,k,v,proj,fc,fc_proj");
    c.model.n_layer = 3;
    adapters_under_recompute(c, "dense gpt + lora, recompute_layers");
    c = tiny("q,v,experts");
    c.model.n_layer = 3;
    c.model.moe.n_experts = 3;
    c.model.moe.top_k = 2;
    c.model.moe.gating = QS_GATING_NOISY_TOPK;
    adapters_under_recompute(c, "moe gpt + lora, recompute_layers");
}

/* Under recompute_ffn a frozen base makes the FFN activation's output again in the
 * backward only where an adapter on c_proj reads it: without one, the backward needs
 * only the pre-activation (c_proj takes no weight gradient). Counted as GELU passes
 * over a whole pass, whose forward fuses the GELU into c_fc (no adapter on c_fc). */
static int gelu_passes;
static void counted_gelu(float *out, const float *in, size_t n) {
    gelu_passes++;
    qs_backend_cpu()->ops->gelu_forward(out, in, n);
}

static void test_activation_remade_where_read(void **state) {
    (void)state;
    static qs_ops ops;
    static qs_backend be;
    ops = *qs_backend_cpu()->ops;
    ops.gelu_forward = counted_gelu;
    be = *qs_backend_cpu();
    be.ops = &ops;
    static const struct {
        const char *targets;
        int passes;
    } cases[] = {{"q,v", 0}, {"proj", 0}, {"fc_proj", 3}, {"q,fc_proj", 3}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        qs_config c = tiny(cases[k].targets);
        c.model.n_layer = 3;
        c.model.recompute_ffn = true;
        built b;
        gelu_passes = 0;
        adapter_pass(&be, &c, &b, 5, 80);
        printf("# targets %s: %d GELU passes\n", cases[k].targets, gelu_passes);
        assert_int_equal(gelu_passes, cases[k].passes);
        drop(&b);
    }
}

/* Expert adapters draw their dropout masks at each packed row's token's global row:
 * with dropout on the experts' adapters only, the loss of a sequence moves with its
 * global rows (sample0) and a batch's loss is the mean of its sequences' losses taken
 * one by one at the same rows; with adapter dropout off, sample0 changes nothing. A
 * constant, missing or packed-order id fails the first or the second. */
static double moe_loss(const qs_config *c, const int *x, const int *y, int B, uint64_t sample0) {
    built b = build(c, B, 6);
    const qs_forward_mode mode = {.train = true, .rng_seed = seed ^ 5, .sample0 = sample0};
    double loss = qs_gpt_forward(b.m, x, y, B, 6, &mode);
    drop(&b);
    return loss;
}

static void test_expert_dropout_rows(void **state) {
    (void)state;
    qs_config c = tiny("experts");
    c.model.dropout = 0.0f; /* the adapters' masks are the only draws */
    c.model.moe.n_experts = 3;
    c.model.moe.top_k = 2;
    c.lora.dropout = 0.5f;
    int x[12], y[12];
    for (int i = 0; i < 12; i++) {
        x[i] = (int)qs_rng_below(seed, 70, (uint64_t)i, 11);
        y[i] = (int)qs_rng_below(seed, 71, (uint64_t)i, 11);
    }
    const double at0 = moe_loss(&c, x, y, 1, 0), at1 = moe_loss(&c, x, y, 1, 1);
    const double both = moe_loss(&c, x, y, 2, 0), second = moe_loss(&c, x + 6, y + 6, 1, 1);
    printf("# expert adapter dropout: loss %.6f at sample 0, %.6f at sample 1; batch %.6f, mean %.6f\n", at0, at1,
           both, (at0 + second) / 2);
    assert_true(fabs(at0 - at1) > 1e-4);
    assert_float_equal(both, (at0 + second) / 2, 1e-5);
    c.lora.dropout = 0.0f;
    assert_true(moe_loss(&c, x, y, 1, 0) == moe_loss(&c, x, y, 1, 1));
}

/* One of q, k, v targeted: c_attn's B gets no gradient and stays zero outside that block,
 * and a merge touches only its columns of c_attn. The base buffer is untouched by
 * training. */
static void mask_and_frozen_base(const char *target, int n_head, int n_kv_head) {
    qs_config c = tiny(target);
    c.model.n_head = n_head;
    c.model.n_kv_head = n_kv_head;
    const int want = !strcmp(target, "q") ? 0 : !strcmp(target, "k") ? 1 : 2;
    built b = build(&c, 2, 6);
    qs_params *ps = qs_lora_params(b.lo), *base = qs_gpt_params(b.m);
    qs_lora_init(b.lo, seed);
    float *before = malloc(base->n * sizeof(float));
    memcpy(before, base->data, base->n * sizeof(float));
    gpt_ctx g = {.m = b.m, .mode = {.train = true, .rng_seed = seed, .grad_scale = 1.0f}};
    for (int i = 0; i < 10; i++) g.x[i] = g.y[(i + 1) % 10] = (int)qs_rng_below(seed, 40, (uint64_t)i, 11);
    const int C = c.model.n_embd, r = c.lora.r, W = C + 2 * C / n_head * qs_config_kv_heads(&c.model);
    int ib = qs_params_find(ps, "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight");
    for (int step = 0; step < 3; step++) { /* plain SGD on the adapters */
        qs_params_zero_grad(ps);
        gpt_loss(&g, &(bool){true});
        assert_int_equal(qs_gpt_backward(b.m), 0);
        for (size_t j = 0; j < ps->n; j++) ps->data[j] -= 0.5f * ps->grad[j];
    }
    const float *B = qs_params_value(ps, ib);
    assert_int_equal(ps->info[ib].numel, (size_t)W * r);
    double in_norm = 0, out_norm = 0;
    for (int j = 0; j < W * r; j++) *(qkv_block(&c.model, (size_t)j / r) == want ? &in_norm : &out_norm) += fabs(B[j]);
    assert_true(in_norm > 0);
    assert_true(out_norm == 0);
    assert_memory_equal(before, base->data, base->n * sizeof(float));
    assert_int_equal(qs_lora_merge(b.lo, base, 1), 0);
    int iw = qs_params_find(base, "h.0.attn.c_attn.weight");
    const float *Wt = qs_params_value(base, iw), *W0 = before + base->info[iw].offset;
    int changed = 0;
    for (int i = 0; i < C; i++)
        for (int j = 0; j < W; j++) {
            if (qkv_block(&c.model, (size_t)j) != want) assert_true(Wt[i * W + j] == W0[i * W + j]);
            else changed += Wt[i * W + j] != W0[i * W + j];
        }
    assert_true(changed > 0);
    free(before);
    drop(&b);
}

static void test_qkv_mask_and_frozen_base(void **state) {
    (void)state;
    mask_and_frozen_base("q", 2, 0);
    mask_and_frozen_base("k", 2, 1); /* grouped-query: the k and v blocks are narrower than q's */
    mask_and_frozen_base("v", 6, 3);
}

/* Merged weights without the adapter give the adapted model's logits (<= 1e-5) and its
 * greedy continuation; unmerging restores the base up to rounding. Dense and MoE. */
static void merge_check(const qs_config *c, const char *label) {
    const int T = 7;
    built b = build(c, 1, T);
    qs_params *ad = qs_lora_params(b.lo); /* trained-adapter magnitudes, not the gradient checks' */
    for (size_t j = 0; j < ad->n; j++) ad->data[j] *= 0.1f;
    qs_params *base = qs_gpt_params(b.m);
    float *orig = malloc(base->n * sizeof(float));
    memcpy(orig, base->data, base->n * sizeof(float));
    int x[7];
    for (int i = 0; i < T; i++) x[i] = (int)qs_rng_below(seed, 50, (uint64_t)i, 11);
    qs_forward_mode eval = {.train = false};
    const size_t nl = (size_t)T * c->model.vocab_size;
    float *with = malloc(nl * sizeof(float)), *merged = malloc(nl * sizeof(float));
    qs_gpt_forward(b.m, x, NULL, 1, T, &eval);
    memcpy(with, qs_gpt_logits(b.m), nl * sizeof(float));
    qs_sample_params greedy = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = seed};
    int ctx_a[40] = {x[0], x[1]}, ctx_b[40] = {x[0], x[1]};
    assert_true(qs_generate(b.m, ctx_a, 2, 20, &greedy, NULL, NULL) >= 0);

    assert_int_equal(qs_lora_merge(b.lo, base, 1), 0);
    qs_gpt_set_lora(b.m, NULL);
    qs_gpt_forward(b.m, x, NULL, 1, T, &eval);
    memcpy(merged, qs_gpt_logits(b.m), nl * sizeof(float));
    double worst = 0;
    for (size_t i = 0; i < nl; i++) worst = fmax(worst, fabs(with[i] - merged[i]));
    printf("# %s: merged vs adapter logits max diff %.2e\n", label, worst);
    assert_true(worst <= 1e-5);
    assert_true(qs_generate(b.m, ctx_b, 2, 20, &greedy, NULL, NULL) >= 0);
    assert_memory_equal(ctx_a, ctx_b, sizeof ctx_a);

    assert_int_equal(qs_lora_merge(b.lo, base, -1), 0);
    double back = 0;
    for (size_t j = 0; j < base->n; j++) back = fmax(back, fabs(base->data[j] - orig[j]));
    assert_true(back <= 1e-5);
    free(orig), free(with), free(merged);
    drop(&b);
}

static void test_merge_unmerge(void **state) {
    (void)state;
    qs_config c = tiny("q,k,v,proj,fc,fc_proj");
    c.model.init_std = 0.02f; /* GPT-2's: logits of order 1, where 1e-5 is meaningful in fp32 */
    c.lora.dropout = 0.0f;
    merge_check(&c, "dense");
    c.model.n_kv_head = 1;
    merge_check(&c, "dense, multi-query");
    c = tiny("k,proj,experts");
    c.model.init_std = 0.02f;
    c.model.moe.n_experts = 4;
    c.model.moe.top_k = 2;
    c.lora.rslora = true;
    merge_check(&c, "moe");
}

/* ---- files ---- */

static char tmpdir[] = "/tmp/qs_test_lora_XXXXXX";

/* checksums.json over the two adapter files, as the checkpoint writer makes it; returns
 * the size of adapter_model.safetensors. */
static long write_checksums(const char *dir) {
    const char *names[2] = {QS_LORA_WEIGHTS, QS_LORA_CONFIG};
    char path[700], *data;
    size_t n[2];
    unsigned crc[2];
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        assert_int_equal(qs_file_read(path, &data, &n[i]), 0);
        crc[i] = qs_crc32c(0, data, n[i]);
        free(data);
    }
    snprintf(path, sizeof path, "%s/checksums.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "{\"%s\": {\"bytes\": %zu, \"crc32c\": \"%08x\"}, \"%s\": {\"bytes\": %zu, \"crc32c\": \"%08x\"}}",
            names[0], n[0], crc[0], names[1], n[1], crc[1]);
    fclose(f);
    return (long)n[0];
}

static long write_adapter(qs_lora *lo, const char *dir) {
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(qs_lora_write(lo, dir, "base/dir"), 0);
    return write_checksums(dir);
}

/* Round trip; the tensor bytes are exactly proportional to r; another base shape, a
 * flipped byte and a bad adapter_config.json are refused. */
static void test_files(void **state) {
    (void)state;
    char dir[600], dir2[600];
    snprintf(dir, sizeof dir, "%s/a", tmpdir);
    snprintf(dir2, sizeof dir2, "%s/b", tmpdir);
    qs_config c = tiny("q,v,fc");
    long size[3];
    for (int k = 0; k < 3; k++) {
        c.lora.r = 1 << k; /* 1, 2, 4 */
        built b = build(&c, 1, 4);
        size[k] = write_adapter(b.lo, dir);
        if (k == 2) { /* round trip into a fresh table */
            qs_lora *lo2;
            qs_lora_config lc;
            assert_int_equal(qs_lora_read_config(dir, &lc), 0);
            assert_int_equal(lc.r, 4);
            assert_string_equal(lc.targets, "q,v,fc");
            assert_true(lc.alpha == c.lora.alpha && lc.dropout == c.lora.dropout && !lc.rslora);
            assert_int_equal(qs_lora_create(&lo2, &lc, b.m), 0);
            assert_int_equal(qs_lora_load(lo2, dir), 0);
            assert_memory_equal(qs_lora_params(lo2)->data, qs_lora_params(b.lo)->data,
                                qs_lora_params(b.lo)->n * sizeof(float));
            qs_lora_free(lo2);
        }
        drop(&b);
    }
    /* data = r * (floats per rank) * 4 bytes; the JSON header changes by a few bytes only */
    const long per_r = 2L * (6 * 1 + 18 * 1) * 4 + 2L * (6 + 12) * 4; /* c_attn A+B, mlp.c_fc A+B, per layer */
    for (int k = 0; k < 3; k++) {
        long data = (long)(1 << k) * per_r;
        printf("# adapter file, r = %d: %ld bytes (%ld of tensors)\n", 1 << k, size[k], data);
        assert_true(size[k] > data && size[k] < data + 1024);
    }
    assert_true(size[2] - size[1] > size[1] - size[0]);

    /* the r = 4 adapter on a wider base: refused, naming the tensor */
    qs_config wide = tiny("q,v,fc");
    wide.model.n_embd = 8;
    built w = build(&wide, 1, 4);
    qs_lora *lo3;
    char step[700];
    assert_int_equal(qs_lora_open(&lo3, dir, w.m, true, step, sizeof step), -1);
    printf("# %s\n", qs_error_last());
    assert_non_null(strstr(qs_error_last(), "does not fit this base model"));
    assert_non_null(strstr(qs_error_last(), "lora_A.weight"));
    assert_null(lo3);
    drop(&w);

    /* a flipped byte in the tensors */
    char path[700], cmd[1500];
    snprintf(path, sizeof path, "%s/" QS_LORA_WEIGHTS, dir);
    FILE *f = fopen(path, "r+b");
    fseek(f, -3, SEEK_END);
    int ch = fgetc(f);
    fseek(f, -3, SEEK_END);
    fputc(ch ^ 0x10, f);
    fclose(f);
    qs_config c4 = tiny("q,v,fc");
    c4.lora.r = 4;
    built b4 = build(&c4, 1, 4);
    qs_lora *lo4 = NULL;
    assert_int_equal(qs_lora_open(&lo4, dir, b4.m, true, step, sizeof step), -1);
    assert_non_null(strstr(qs_error_last(), "checksum"));
    /* an adapter_config.json with r out of range, its checksum updated: the schema's error */
    write_adapter(b4.lo, dir2);
    snprintf(cmd, sizeof cmd, "sed -i 's/\"r\":.*4,/\"r\": 0,/' %s/" QS_LORA_CONFIG, dir2);
    assert_int_equal(system(cmd), 0);
    write_checksums(dir2);
    qs_lora_config lc;
    assert_int_equal(qs_lora_read_config(dir2, &lc), -1);
    printf("# %s\n", qs_error_last());
    assert_non_null(strstr(qs_error_last(), "'r': --set: lora.r: must be in [1, 4096], got 0"));
    drop(&b4);
}

/* Targets a model does not have, and bad lora settings, are errors naming the key. */
static void test_refused_targets(void **state) {
    (void)state;
    struct {
        const char *targets;
        int mixer, experts, r;
        const char *want;
    } cases[] = {
        {"q,proj", QS_MIXER_QUADCONV, 0, 2, "model.mixer quadconv"},
        {"fc", QS_MIXER_ATTENTION, 3, 2, "use experts"},
        {"experts", QS_MIXER_ATTENTION, 0, 2, "needs an MoE model"},
        {"q", QS_MIXER_ATTENTION, 0, 7, "lora.r (7) must be <= model.n_embd (6)"},
        {"q,x", QS_MIXER_ATTENTION, 0, 2, "lora.targets: unknown target 'x'"},
        {"", QS_MIXER_ATTENTION, 0, 2, "lora.targets"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        qs_config c = tiny(cases[i].targets);
        c.model.mixer = cases[i].mixer;
        c.model.quadra.kernel_size = 3;
        c.model.moe.n_experts = cases[i].experts;
        c.lora.r = cases[i].r;
        qs_gpt *m;
        qs_lora *lo = (qs_lora *)&c; /* must come back NULL */
        assert_int_equal(qs_gpt_create_for(&m, &c.model, qs_backend_cpu(), 1, 4, QS_GPT_FROZEN), 0);
        assert_int_equal(qs_lora_create(&lo, &c.lora, m), -1);
        assert_null(lo);
        printf("# %s\n", qs_error_last());
        assert_non_null(strstr(qs_error_last(), cases[i].want));
        qs_gpt_free(m);
    }
    qs_config c;
    qs_config_defaults(&c);
    assert_int_equal(qs_config_set(&c, "lora.r=0"), -1);
    assert_non_null(strstr(qs_error_last(), "lora.r"));
    assert_int_equal(qs_config_set(&c, "lora.targets=q,up"), 0);
    assert_int_equal(qs_config_validate(&c), -1);
    assert_non_null(strstr(qs_error_last(), "lora.targets: unknown target 'up'"));
}

/* ---- the base fingerprint ---- */

static void sha256_of(const void *data, size_t n, char hex[65]) {
    qs_sha256 s;
    qs_sha256_init(&s);
    qs_sha256_update(&s, data, n);
    qs_sha256_hex(&s, hex);
}

/* FIPS 180-4's examples, and a long input fed in uneven pieces. */
static void test_sha256(void **state) {
    (void)state;
    char hex[65];
    sha256_of("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha256_of("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha256_of(two, strlen(two), hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    static char a[1000000];
    memset(a, 'a', sizeof a);
    qs_sha256 s;
    qs_sha256_init(&s);
    for (size_t i = 0, k = 1; i < sizeof a; i += k, k = k * 7 % 997 + 1)
        qs_sha256_update(&s, a + i, i + k < sizeof a ? k : sizeof a - i);
    qs_sha256_hex(&s, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

/* An adapter records the SHA-256 of its base's weights (their F32 bytes in table order)
 * and loads over that base only; a merged model (base_check false) skips the check. */
static void test_base_fingerprint(void **state) {
    (void)state;
    char dir[600], path[700], step[700], want[65];
    snprintf(dir, sizeof dir, "%s/fp", tmpdir);
    qs_config c = tiny("q,fc");
    built b = build(&c, 1, 4);
    write_adapter(b.lo, dir);
    const qs_params *base = qs_gpt_params(b.m);
    sha256_of(base->data, base->n * sizeof(float), want);
    snprintf(path, sizeof path, "%s/" QS_LORA_CONFIG, dir);
    cJSON *cfg = read_json(path);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(cfg, "quasar_base_sha256")), want);
    cJSON_Delete(cfg);

    qs_lora *lo = NULL;
    assert_int_equal(qs_lora_open(&lo, dir, b.m, true, step, sizeof step), 0);
    qs_lora_free(lo);
    /* the same shape, other weights (one value moved by one ulp) */
    base->data[base->n / 2] = nextafterf(base->data[base->n / 2], INFINITY);
    char other[65];
    sha256_of(base->data, base->n * sizeof(float), other);
    assert_int_equal(qs_lora_open(&lo, dir, b.m, true, step, sizeof step), -1);
    printf("# %s\n", qs_error_last());
    assert_null(lo);
    char both[200];
    snprintf(both, sizeof both, "made for the base 'base/dir' (weights sha256 %.16s...), not for this base (weights "
             "sha256 %.16s...)", want, other);
    assert_non_null(strstr(qs_error_last(), both));
    assert_int_equal(qs_lora_open(&lo, dir, b.m, false, step, sizeof step), 0);
    qs_lora_free(lo);
    drop(&b);
}

/* ---- adapters written by peft ---- */

#define HF_FIXTURE "tests/fixtures/hf_gpt2_tiny"
#define PEFT_FIXTURE "tests/fixtures/peft_gpt2_tiny"
#define VOCAB "../shared/data/gpt2"

/* The converted HF fixture, made once: the base of every peft adapter here. */
static const char *hf_run(void) {
    static char run[600];
    if (!run[0]) {
        snprintf(run, sizeof run, "%s/hf_run", tmpdir);
        assert_int_equal(qs_convert_from_hf(HF_FIXTURE, run, VOCAB), 0);
    }
    return run;
}

/* An inference GPT with the checkpoint in run, sized for one sequence of T tokens. */
static qs_gpt *load_gpt(const char *run, int T) {
    char step[700], *chars;
    qs_config cfg;
    qs_st_file f;
    qs_gpt *m;
    assert_int_equal(qs_checkpoint_find(run, step, sizeof step), 0);
    assert_int_equal(qs_checkpoint_open_model(&f, step, &cfg, &chars), 0);
    assert_int_equal(qs_gpt_create_for(&m, &cfg.model, qs_backend_cpu(), 1, T, QS_GPT_INFER), 0);
    assert_int_equal(qs_checkpoint_load_weights(qs_gpt_params(m), &f, step), 0);
    qs_st_free(&f);
    free(chars);
    return m;
}

typedef struct expected {
    cJSON *root;
    int ids[64], T, cols;
} expected;

static expected read_expected(const char *dir) {
    char path[600];
    snprintf(path, sizeof path, "%s/expected_logits.json", dir);
    expected e = {.root = read_json(path)};
    const cJSON *tokens = cJSON_GetObjectItem(e.root, "tokens");
    e.T = cJSON_GetArraySize(tokens);
    e.cols = cJSON_GetObjectItem(e.root, "columns")->valueint;
    assert_true(e.T > 0 && e.T <= 64);
    for (int t = 0; t < e.T; t++) e.ids[t] = cJSON_GetArrayItem(tokens, t)->valueint;
    return e;
}

/* The largest difference of m's logits for e's tokens from the recorded ones of `which`
 * ("adapter", "merged"), relative to their largest magnitude; with whole_rows, the argmax
 * and log-sum-exp of every whole row are checked on the way. */
static double logits_error(qs_gpt *m, const expected *e, const char *which, bool whole_rows) {
    const cJSON *rec = cJSON_GetObjectItem(e->root, which), *logits = cJSON_GetObjectItem(rec, "logits");
    const cJSON *argmax = cJSON_GetObjectItem(rec, "argmax"), *lse = cJSON_GetObjectItem(rec, "logsumexp");
    const int V = qs_gpt_config(m)->vocab_size;
    qs_forward_mode mode = {.train = false};
    qs_gpt_forward(m, e->ids, NULL, 1, e->T, &mode);
    float *row = malloc((size_t)V * sizeof *row);
    assert_non_null(row);
    double err = 0, scale = 0;
    for (int t = 0; t < e->T; t++) {
        qs_gpt_logits_row(m, t, row);
        for (int v = 0; v < e->cols; v++) {
            double want = cJSON_GetArrayItem(cJSON_GetArrayItem(logits, t), v)->valuedouble;
            err = fmax(err, fabs(row[v] - want));
            scale = fmax(scale, fabs(want));
        }
        if (!whole_rows) continue;
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best]) best = v;
        double sum = 0, want_lse = cJSON_GetArrayItem(lse, t)->valuedouble;
        for (int v = 0; v < V; v++) sum += exp((double)row[v] - row[best]);
        assert_int_equal(best, cJSON_GetArrayItem(argmax, t)->valueint);
        assert_true(fabs(row[best] + log(sum) - want_lse) <= 1e-4 * fmax(1, fabs(want_lse)));
    }
    free(row);
    return err / scale;
}

/* Each peft adapter (list, regex, all-linear; F32, F16, BF16; rslora; layers_to_transform)
 * over the converted base gives peft's logits, and merged, peft's merged logits; the
 * adapter moves the logits by far more than the tolerance. */
static void test_peft_logits(void **state) {
    (void)state;
    static const char *const variants[] = {"", "/bf16_rslora_layer", "/f16_regex", "/all_linear"};
    for (size_t i = 0; i < sizeof variants / sizeof *variants; i++) {
        char dir[300], step[700];
        snprintf(dir, sizeof dir, PEFT_FIXTURE "%s", variants[i]);
        expected e = read_expected(dir);
        qs_gpt *m = load_gpt(hf_run(), e.T);
        const double base_err = logits_error(m, &e, "adapter", false); /* the base alone */
        qs_lora *lo;
        assert_int_equal(qs_lora_open(&lo, dir, m, true, step, sizeof step), 0);
        qs_gpt_set_lora(m, lo);
        const double err = logits_error(m, &e, "adapter", true);
        assert_int_equal(qs_lora_merge(lo, qs_gpt_params(m), 1), 0);
        qs_gpt_set_lora(m, NULL);
        const double merged = logits_error(m, &e, "merged", true);
        printf("# peft adapter %s (targets %s): relative logit error %.2e, merged %.2e (the base alone: %.2e)\n", dir,
               qs_lora_config_of(lo)->targets, err, merged, base_err);
        assert_true(err <= 1e-4 && merged <= 1e-4);
        assert_true(base_err > 100 * 1e-4);
        qs_lora_free(lo);
        qs_gpt_free(m);
        cJSON_Delete(e.root);
    }
}

/* `quasar merge` of the peft adapter (the binary tests/run.sh names in QUASAR) writes a
 * run whose logits are peft's merged ones. */
static void test_peft_cli_merge(void **state) {
    (void)state;
    const char *quasar = getenv("QUASAR");
    if (!quasar) {
        printf("# QUASAR is not set (tests/run.sh sets it): skipped\n");
        skip();
    }
    char out[600], cmd[2000];
    snprintf(out, sizeof out, "%s/peft_merged", tmpdir);
    snprintf(cmd, sizeof cmd, "'%s' merge --model '%s' --adapter " PEFT_FIXTURE " --out '%s'", quasar, hf_run(), out);
    assert_int_equal(system(cmd), 0);
    expected e = read_expected(PEFT_FIXTURE);
    qs_gpt *m = load_gpt(out, e.T);
    const double err = logits_error(m, &e, "merged", true);
    printf("# quasar merge of the peft adapter: relative logit error %.2e against peft's merged model\n", err);
    assert_true(err <= 1e-4);
    qs_gpt_free(m);
    cJSON_Delete(e.root);
}

/* A copy of the main peft fixture under tmpdir/name with adapter_config.json's key set to
 * the JSON value (NULL: removed); the weights as they are, or from `weights`. */
static void peft_variant(char *dir, size_t cap, const char *name, const char *key, const char *value,
                         const char *weights) {
    char path[700], cmd[2000];
    snprintf(dir, cap, "%s/%s", tmpdir, name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && cp %s '%s/" QS_LORA_WEIGHTS "'", dir, dir,
             weights ? weights : PEFT_FIXTURE "/" QS_LORA_WEIGHTS, dir);
    assert_int_equal(system(cmd), 0);
    cJSON *cfg = read_json(PEFT_FIXTURE "/" QS_LORA_CONFIG);
    cJSON_DeleteItemFromObjectCaseSensitive(cfg, key);
    if (value) {
        cJSON *v = cJSON_Parse(value);
        assert_non_null(v);
        cJSON_AddItemToObject(cfg, key, v);
    }
    char *text = cJSON_Print(cfg);
    snprintf(path, sizeof path, "%s/" QS_LORA_CONFIG, dir);
    assert_int_equal(qs_file_write_atomic(path, text, strlen(text)), 0);
    free(text);
    cJSON_Delete(cfg);
}

/* The main fixture's tensors written to path, plus one extra tensor (name, dtype) of
 * [4, 16] when name is not NULL, or with that tensor's dtype changed when it exists. */
static void peft_weights(const char *path, const char *name, qs_dtype dtype) {
    qs_st_file f;
    assert_int_equal(qs_st_read(&f, PEFT_FIXTURE "/" QS_LORA_WEIGHTS), 0);
    qs_st_entry e[64];
    static const int32_t zeros[64];
    int n = 0;
    bool found = false;
    for (int i = 0; i < f.n_tensors; i++, n++) {
        const qs_st_tensor *t = &f.tensors[i];
        e[n] = (qs_st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim, .data = t->data};
        memcpy(e[n].shape, t->shape, sizeof t->shape);
        if (!strcmp(t->name, name)) e[n].dtype = dtype, found = true; /* same size: F32 -> I32 */
    }
    if (!found) e[n++] = (qs_st_entry){.name = name, .dtype = dtype, .ndim = 2, .shape = {4, 16}, .data = zeros};
    assert_int_equal(qs_st_write(path, e, n, NULL, 0), 0);
    qs_st_free(&f);
}

/* Settings plain LoRA cannot reproduce, and tensors that do not fit the config or the
 * base, are one error naming the key or the tensor; settings equal to plain LoRA load. */
static void test_peft_refused(void **state) {
    (void)state;
    char odd[600];
    snprintf(odd, sizeof odd, "%s/odd.safetensors", tmpdir);
    struct {
        const char *key, *value, *want;
        const char *tensor; /* the config as it is, with weights where this tensor is added or made I32 */
    } cases[] = {
        {"use_dora", "true", "'use_dora' = true is not supported (DoRA: Quasar imports plain LoRA adapters only)", NULL},
        {"bias", "\"lora_only\"", "'bias' = \"lora_only\" is not supported (only \"none\"", NULL},
        {"peft_type", "\"IA3\"", "'peft_type' is \"IA3\": only LORA adapters are supported", NULL},
        {"rank_pattern", "{\"c_attn\": 8}", "'rank_pattern' = {\"c_attn\":8} is not supported", NULL},
        {"alpha_pattern", "{\"c_proj\": 2}", "'alpha_pattern' = {\"c_proj\":2} is not supported", NULL},
        {"layers_pattern", "\"layers\"", "'layers_pattern' = \"layers\" is not supported", NULL},
        {"layers_to_transform", "\"all\"", "'layers_to_transform' = \"all\" is not supported", NULL},
        {"modules_to_save", "[\"lm_head\"]", "'modules_to_save' = [\"lm_head\"] is not supported", NULL},
        {"init_lora_weights", "\"pissa\"", "'init_lora_weights' = \"pissa\" is not supported", NULL},
        {"lora_bias", "true", "'lora_bias' = true is not supported", NULL},
        {"some_future_option", "{\"on\": 1}", "'some_future_option' = {\"on\":1} is not supported", NULL},
        {"r", "2", "tensor 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight' is [4,16], but r = 2 and "
                   "this base make it [2,16]", NULL},
        {"r", NULL, "missing 'r'", NULL},
        {"target_modules", "[\"c_attn\"]", "tensor 'base_model.model.transformer.h.0.attn.c_proj.lora_A.weight' is for "
                                          "a module that target_modules does not select in this 2-layer base", NULL},
        {"target_modules", "[\"c_attn\", \"c_proj\", \"c_fc\"]",
         "missing tensor 'base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight' (target_modules selects that module)", NULL},
        {"target_modules", "[\"c_attn\", \"c_proj\", \"lm_head\"]", "target_modules selects 'lm_head', which Quasar "
                                                                   "does not adapt", NULL},
        {"target_modules", "\"(c_attn\"", "'target_modules' is not a regular expression Quasar can read", NULL},
        {"target_modules", "7", "'target_modules' must be a string or a list of strings", NULL},
        {"target_modules", NULL, "'target_modules' is missing", NULL},
        {"layers_to_transform", "[0]", "tensor 'base_model.model.transformer.h.1.attn.c_attn.lora_A.weight' is for a "
                                       "module that target_modules does not select", NULL},
        {"exclude_modules", "[\"mlp.c_proj\"]", "tensor 'base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight' "
                                               "is for a module that target_modules does not select", NULL},
        {"peft_version", "\"0.21.2\"", "unexpected tensor 'base_model.model.lm_head.lora_A.weight'",
         "base_model.model.lm_head.lora_A.weight"},
        {"peft_version", "\"0.21.2\"", "tensor 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight' is I32 (only "
                                  "F32, F16 and BF16 convert)", "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"},
    };
    qs_gpt *m = load_gpt(hf_run(), 4);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char dir[600], step[700], name[32];
        snprintf(name, sizeof name, "refused_%zu", i);
        if (cases[i].tensor) peft_weights(odd, cases[i].tensor, strstr(cases[i].tensor, ".h.0.") ? QS_DT_I32 : QS_DT_F32);
        peft_variant(dir, sizeof dir, name, cases[i].key, cases[i].value, cases[i].tensor ? odd : NULL);
        qs_lora *lo = (qs_lora *)dir; /* must come back NULL */
        assert_int_equal(qs_lora_open(&lo, dir, m, true, step, sizeof step), -1);
        printf("# %s\n", qs_error_last());
        assert_null(lo);
        assert_null(strchr(qs_error_last(), '\n'));
        if (!strstr(qs_error_last(), cases[i].want)) fail_msg("wanted '%s'", cases[i].want);
    }
    /* equal to plain LoRA: a pattern repeating r, fan_in_fan_out false (peft sets it for
     * Conv1D anyway), an unknown option left off, the layer filter naming every layer,
     * an initialisation-only setting, exclusion of a module not targeted, bookkeeping */
    struct {
        const char *key, *value;
    } fine[] = {{"rank_pattern", "{\"c_attn\": 4}"}, {"alpha_pattern", "{\"c_proj\": 8}"},
                {"fan_in_fan_out", "false"}, {"some_future_option", "null"}, {"layers_to_transform", "[0, 1]"},
                {"layers_pattern", "\"h\""}, {"init_lora_weights", "\"gaussian\""}, {"exclude_modules", "[\"mlp.c_fc\"]"},
                {"peft_version", "\"9.9\""}};
    for (size_t i = 0; i < sizeof fine / sizeof *fine; i++) {
        char dir[600], step[700];
        peft_variant(dir, sizeof dir, "fine", fine[i].key, fine[i].value, NULL);
        qs_lora *lo = NULL;
        if (qs_lora_open(&lo, dir, m, true, step, sizeof step)) fail_msg("%s = %s: %s", fine[i].key, fine[i].value, qs_error_last());
        assert_string_equal(qs_lora_config_of(lo)->targets, "q,k,v,proj,fc_proj");
        qs_lora_free(lo);
    }
    qs_gpt_free(m);
}

int main(void) {
    seed = qs_test_seed("test_lora");
    assert_non_null(mkdtemp(tmpdir));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear_forward_and_gradients),
        cmocka_unit_test(test_gpt_dense),
        cmocka_unit_test(test_gpt_moe),
        cmocka_unit_test(test_gpt_grouped_query),
        cmocka_unit_test(test_gpt_quadconv_mixer),
        cmocka_unit_test(test_recompute_layers),
        cmocka_unit_test(test_activation_remade_where_read),
        cmocka_unit_test(test_expert_dropout_rows),
        cmocka_unit_test(test_qkv_mask_and_frozen_base),
        cmocka_unit_test(test_merge_unmerge),
        cmocka_unit_test(test_files),
        cmocka_unit_test(test_refused_targets),
        cmocka_unit_test(test_sha256),
        cmocka_unit_test(test_base_fingerprint),
        cmocka_unit_test(test_peft_logits),
        cmocka_unit_test(test_peft_cli_merge),
        cmocka_unit_test(test_peft_refused),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) rc = 1;
    return rc;
}

/* QuadraNet forward/backward over qs_ops (see quasar/quadranet.h for the shape). */
#include "quasar/quadranet.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plan.h"
#include "quasar/error.h"

enum { NS = QS_QUADRA_STAGES };

/* What a block's backward reads besides its input and output ([N,C] unless noted). */
typedef struct block_acts {
    float *ln1, *mean1, *rstd1, *fa, *fb, *q, *mid, *ln2, *mean2, *rstd2;
    float *h, *g; /* [N,F] before and after GELU (g shared by all blocks under recompute_ffn) */
    float *v;
} block_acts;

/* One QuadraBlock: parameter indices, its activations (one set shared by every block
 * under recompute_layers) and its output. */
typedef struct block {
    int ln1_w, ln1_b, qc_w, qc_b, gamma1, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b, gamma2;
    float drop; /* stochastic depth rate */
    block_acts a;
    float *out;
} block;

typedef struct stage {
    int C, H, depth;                     /* width, side of the feature map, blocks */
    int dln_w, dln_b, down_w, down_b;    /* downsampling into this stage (stages 1..3) */
    float *dln, *dmean, *drstd, *dpatch; /* over the previous stage's map */
    float *in;                           /* the stage's input map [B*H*H, C] */
    block *blocks;
} stage;

struct qs_quadranet {
    qs_model_config cfg;
    const qs_quadra_config *q; /* &cfg.quadra */
    const qs_backend *be;
    int max_B, S, P;           /* image side, stem patch */
    qs_params ps;
    int stem_w, stem_b, stem_ln_w, stem_ln_b, head_ln_w, head_ln_b, head_w, head_b;
    stage st[NS];

    float *act_mem;
    size_t act_floats, act_ints;
    int *int_mem;
    qs_op_sizes sizes;
    qs_mem_plan plan; /* this model's memory (no optimizer) */
    float *img, *stem_patch, *stem_lin, *stem_mean, *stem_rstd;
    float *pooled, *head_ln, *head_mean, *head_rstd, *logits, *losses;
    int *labels;
    /* backward scratch */
    float *dA, *dB, *dt1, *dt2, *dF2, *dpatch, *dhead, *dpool; /* no dlogits: xent_backward overwrites logits */

    int B;
    int held_s, held_j; /* recompute_layers: the block whose activations the shared set holds (-1: none) */
    bool has_labels;
    qs_forward_mode mode;
    float *host_logits, *host_losses;
};

/* Every block checkpointed (model.recompute_layers true; the config allows a QuadraNet
 * no count, and "auto" is resolved to true or false before a task makes the model). */
static bool checkpointed(const qs_quadranet *m) { return m->cfg.recompute_layers == QS_RECOMPUTE_ALL; }

static float *P(const qs_quadranet *m, int i) { return qs_params_value(&m->ps, i); }
static float *G(const qs_quadranet *m, int i) { return qs_params_grad(&m->ps, i); }

/* ---- parameter table ---- */

static int add(qs_quadranet *m, const char *prefix, const char *name, int ndim, int64_t d0, int64_t d1,
               int64_t d2, int64_t d3, qs_param_role role, int fan_in, int fan_out) {
    char full[2 * QS_PARAM_NAME_MAX]; /* names are short; qs_params_add truncates to fit */
    int64_t shape[4] = {d0, d1, d2, d3};
    snprintf(full, sizeof full, "%s%s", prefix, name);
    return qs_params_add(&m->ps, full, ndim, shape, role, fan_in, fan_out, false);
}

static void add_norm(qs_quadranet *m, const char *prefix, const char *name, int C, int *w, int *b) {
    char p[QS_PARAM_NAME_MAX];
    snprintf(p, sizeof p, "%s%s.", prefix, name);
    *w = add(m, p, "weight", 1, C, 0, 0, 0, QS_ROLE_NORM_WEIGHT, 0, 0);
    *b = add(m, p, "bias", 1, C, 0, 0, 0, QS_ROLE_NORM_BIAS, 0, 0);
}

static void add_linear(qs_quadranet *m, const char *prefix, const char *name, int in, int out, int *w, int *b) {
    char p[QS_PARAM_NAME_MAX];
    snprintf(p, sizeof p, "%s%s.", prefix, name);
    *w = add(m, p, "weight", 2, in, out, 0, 0, QS_ROLE_WEIGHT, in, out);
    *b = add(m, p, "bias", 1, out, 0, 0, 0, QS_ROLE_BIAS, in, out);
}

static void build_param_table(qs_quadranet *m) {
    const qs_quadra_config *q = m->q;
    const int k = q->kernel_size;
    char pre[64];
    add_linear(m, "stem.", "proj", m->P * m->P * q->in_channels, q->widths[0], &m->stem_w, &m->stem_b);
    add_norm(m, "stem.", "norm", q->widths[0], &m->stem_ln_w, &m->stem_ln_b);
    for (int s = 0; s < NS; s++) {
        stage *st = &m->st[s];
        const int C = st->C, F = m->cfg.ffn_mult * C;
        if (s > 0) {
            snprintf(pre, sizeof pre, "stages.%d.down.", s);
            add_norm(m, pre, "norm", m->st[s - 1].C, &st->dln_w, &st->dln_b);
            add_linear(m, pre, "proj", 4 * m->st[s - 1].C, C, &st->down_w, &st->down_b);
        }
        for (int j = 0; j < st->depth; j++) {
            block *b = &st->blocks[j];
            snprintf(pre, sizeof pre, "stages.%d.blocks.%d.", s, j);
            add_norm(m, pre, "norm1", C, &b->ln1_w, &b->ln1_b);
            b->qc_w = add(m, pre, "quadconv.weight", 4, 3, k, k, C, QS_ROLE_WEIGHT, k * k, k * k);
            b->qc_b = add(m, pre, "quadconv.bias", 2, 3, C, 0, 0, QS_ROLE_BIAS, 0, 0);
            b->gamma1 = add(m, pre, "gamma1", 1, C, 0, 0, 0, QS_ROLE_SCALE, 0, 0);
            add_norm(m, pre, "norm2", C, &b->ln2_w, &b->ln2_b);
            add_linear(m, pre, "fc1", C, F, &b->fc1_w, &b->fc1_b);
            add_linear(m, pre, "fc2", F, C, &b->fc2_w, &b->fc2_b);
            b->gamma2 = add(m, pre, "gamma2", 1, C, 0, 0, 0, QS_ROLE_SCALE, 0, 0);
        }
    }
    const int CL = m->st[NS - 1].C;
    add_norm(m, "head.", "norm", CL, &m->head_ln_w, &m->head_ln_b);
    add_linear(m, "head.", "fc", CL, q->num_classes, &m->head_w, &m->head_b);
}

/* ---- activation plan ---- */

static size_t map_n(const qs_quadranet *m, int s) { return (size_t)m->max_B * m->st[s].H * m->st[s].H; }

/* A block's activations over N rows: [N,C] maps of nc floats, [N,F] of nf; g its own,
 * or shared_g (by the config, not the pointer: the counting pass has no buffers). */
static void carve_acts(block_acts *a, qs_plan *p, size_t N, size_t nc, size_t nf, bool own_g, float *shared_g) {
    a->ln1 = qs_plan_f(p, nc);
    a->mean1 = qs_plan_f(p, N);
    a->rstd1 = qs_plan_f(p, N);
    a->fa = qs_plan_f(p, nc);
    a->fb = qs_plan_f(p, nc);
    a->q = qs_plan_f(p, nc);
    a->mid = qs_plan_f(p, nc);
    a->ln2 = qs_plan_f(p, nc);
    a->mean2 = qs_plan_f(p, N);
    a->rstd2 = qs_plan_f(p, N);
    a->h = qs_plan_f(p, nf);
    a->g = own_g ? qs_plan_f(p, nf) : shared_g;
    a->v = qs_plan_f(p, nc);
}

static void carve(qs_quadranet *m, qs_plan *p) {
    const qs_quadra_config *q = m->q;
    const size_t B = (size_t)m->max_B, N0 = map_n(m, 0), CL = (size_t)m->st[NS - 1].C;
    size_t max_nc = 0, max_nf = 0, max_patch = 0;
    m->img = qs_plan_f(p, B * m->S * m->S * q->in_channels);
    m->stem_patch = qs_plan_f(p, N0 * m->P * m->P * q->in_channels);
    m->stem_lin = qs_plan_f(p, N0 * q->widths[0]);
    m->stem_mean = qs_plan_f(p, N0);
    m->stem_rstd = qs_plan_f(p, N0);
    for (int s = 0; s < NS; s++) {
        const size_t nc = map_n(m, s) * m->st[s].C, nf = nc * m->cfg.ffn_mult;
        max_nc = nc > max_nc ? nc : max_nc;
        max_nf = nf > max_nf ? nf : max_nf;
    }
    /* recompute_ffn: every block's GELU output in one buffer, made again in backward;
     * recompute_layers: every block's activations but its output in one set, sized for
     * the largest stage, the block's forward run again before its backward */
    const bool share_g = m->cfg.recompute_ffn && !checkpointed(m);
    float *shared_g = share_g ? qs_plan_f(p, max_nf) : NULL;
    block_acts shared = {0};
    if (checkpointed(m)) carve_acts(&shared, p, map_n(m, 0), max_nc, max_nf, true, NULL);
    for (int s = 0; s < NS; s++) {
        stage *st = &m->st[s];
        const size_t N = map_n(m, s), C = (size_t)st->C, F = (size_t)m->cfg.ffn_mult * C;
        if (s > 0) {
            const size_t Np = map_n(m, s - 1), Cp = (size_t)m->st[s - 1].C;
            st->dln = qs_plan_f(p, Np * Cp);
            st->dmean = qs_plan_f(p, Np);
            st->drstd = qs_plan_f(p, Np);
            st->dpatch = qs_plan_f(p, Np * Cp);
            max_patch = Np * Cp > max_patch ? Np * Cp : max_patch;
        }
        st->in = qs_plan_f(p, N * C);
        for (int j = 0; j < st->depth; j++) {
            block *b = &st->blocks[j];
            if (checkpointed(m)) b->a = shared;
            else carve_acts(&b->a, p, N, N * C, N * F, !share_g, shared_g);
            b->out = qs_plan_f(p, N * C);
        }
    }
    m->pooled = qs_plan_f(p, B * CL);
    m->head_ln = qs_plan_f(p, B * CL);
    m->head_mean = qs_plan_f(p, B);
    m->head_rstd = qs_plan_f(p, B);
    m->logits = qs_plan_f(p, B * q->num_classes);
    m->losses = qs_plan_f(p, B);
    m->labels = qs_plan_i(p, B);
    m->dA = qs_plan_f(p, max_nc);
    m->dB = qs_plan_f(p, max_nc);
    m->dt1 = qs_plan_f(p, max_nc);
    m->dt2 = qs_plan_f(p, max_nc);
    m->dF2 = qs_plan_f(p, max_nf);
    m->dpatch = qs_plan_f(p, max_patch);
    m->dhead = qs_plan_f(p, B * CL);
    m->dpool = qs_plan_f(p, B * CL);
}

/* The model's host side, its activation count and m->plan; no backend memory yet. */
static int layout(qs_quadranet **out, const qs_model_config *cfg, const qs_backend *be, int max_B) {
    *out = NULL;
    if (max_B < 1) return qs_error("micro-batch size must be >= 1 (got %d)", max_B);
    qs_quadranet *m = calloc(1, sizeof *m);
    if (!m) return qs_error("out of memory");
    m->cfg = *cfg;
    m->q = &m->cfg.quadra;
    m->be = be;
    m->max_B = max_B;
    m->S = m->q->image_size;
    m->P = m->q->stem_patch;
    int total = 0, seen = 0;
    for (int s = 0; s < NS; s++) total += m->q->depths[s];
    for (int s = 0; s < NS; s++) {
        stage *st = &m->st[s];
        st->C = m->q->widths[s];
        st->H = m->S / m->P >> s;
        st->depth = m->q->depths[s];
        st->blocks = calloc(st->depth ? (size_t)st->depth : 1, sizeof *st->blocks);
        if (!st->blocks) goto oom;
        for (int j = 0; j < st->depth; j++, seen++) /* ConvNeXt's linear rule */
            st->blocks[j].drop = total > 1 ? m->q->drop_path * (float)seen / (float)(total - 1) : m->q->drop_path;
    }
    m->host_logits = malloc((size_t)max_B * m->q->num_classes * sizeof(float));
    m->host_losses = malloc((size_t)max_B * sizeof(float));
    if (!m->host_logits || !m->host_losses) goto oom;
    build_param_table(m);
    if (m->ps.broken) goto oom;
    qs_plan p = {0};
    carve(m, &p);
    m->act_floats = p.nf;
    m->act_ints = p.ni;
    m->sizes = (qs_op_sizes){.rows = max_B, .experts = 0};
    m->plan = (qs_mem_plan){.params = m->ps.n * sizeof(float),
                            .grads = m->ps.n * sizeof(float),
                            .activations = p.nf * sizeof(float) + p.ni * sizeof(int),
                            .workspace = be->workspace_bytes(&m->sizes)};
    *out = m;
    return 0;
oom:
    qs_quadranet_free(m);
    return qs_error("out of memory creating the model");
}

int qs_quadranet_plan(const qs_model_config *cfg, const qs_backend *be, int max_B, qs_mem_plan *plan) {
    qs_quadranet *m;
    if (layout(&m, cfg, be, max_B)) return -1;
    *plan = m->plan;
    qs_quadranet_free(m);
    return 0;
}

int qs_quadranet_create(qs_quadranet **out, const qs_model_config *cfg, const qs_backend *be, int max_B) {
    qs_quadranet *m;
    if (layout(&m, cfg, be, max_B)) return -1;
    if (qs_mem_plan_check(&m->plan, be)) {
        qs_quadranet_free(m);
        return -1;
    }
    int prc = qs_params_alloc(&m->ps, be, true);
    m->act_mem = be->alloc(m->act_floats * sizeof(float));
    m->int_mem = be->alloc(m->act_ints * sizeof(int));
    if (prc || !m->act_mem || !m->int_mem || be->reserve(&m->sizes)) {
        char why[256];
        snprintf(why, sizeof why, "%s", qs_error_last());
        const double need = qs_mem_plan_total(&m->plan) / 1048576.0;
        qs_quadranet_free(m);
        return qs_error("cannot allocate the model's %.1f MiB (%s)", need, why);
    }
    qs_plan q = {.fbase = m->act_mem, .ibase = m->int_mem};
    carve(m, &q);
    *out = m;
    return 0;
}

void qs_quadranet_free(qs_quadranet *m) {
    if (!m) return;
    m->be->free(m->act_mem);
    m->be->free(m->int_mem);
    qs_params_free(&m->ps);
    for (int s = 0; s < NS; s++) free(m->st[s].blocks);
    free(m->host_logits);
    free(m->host_losses);
    free(m);
}

static float init_value(const qs_param_info *p, const void *ctx) {
    const qs_model_config *c = ctx;
    if (p->role == QS_ROLE_SCALE) return c->quadra.layer_scale_init;
    return qs_params_init_std(c->init, c->init_std, p);
}

int qs_quadranet_init(qs_quadranet *m, uint64_t seed) { return qs_params_init(&m->ps, seed, init_value, &m->cfg); }
qs_params *qs_quadranet_params(qs_quadranet *m) { return &m->ps; }
const qs_mem_plan *qs_quadranet_mem_plan(const qs_quadranet *m) { return &m->plan; }
const float *qs_quadranet_logits(const qs_quadranet *m) { return m->logits; }

/* ---- forward ---- */

static qs_conv_shape conv_shape(const qs_quadranet *m, const stage *st) {
    const int k = m->q->kernel_size;
    return (qs_conv_shape){m->B, st->H, st->H, st->C, k, k, k / 2, k / 2};
}

/* Random stream of a block's two stochastic-depth sites. */
static uint64_t drop_stream(int s, int j, int site) { return ((uint64_t)s << 32) | ((uint64_t)j << 1) | (uint64_t)site; }

static float drop_rate(const qs_quadranet *m, const block *b) { return m->mode.train ? b->drop : 0.0f; }

static const float *stage_out(const stage *st) { return st->depth ? st->blocks[st->depth - 1].out : st->in; }

static void block_forward(qs_quadranet *m, int s, int j, const float *x) {
    const qs_ops *ops = m->be->ops;
    const stage *st = &m->st[s];
    block *b = &st->blocks[j];
    const block_acts *a = &b->a;
    const int N = m->B * st->H * st->H, C = st->C, F = m->cfg.ffn_mult * C;
    const qs_conv_shape cs = conv_shape(m, st);
    const float p = drop_rate(m, b);
    ops->layernorm_forward(a->ln1, a->mean1, a->rstd1, x, P(m, b->ln1_w), P(m, b->ln1_b), N, C);
    ops->quadconv_forward(a->q, a->fa, a->fb, a->ln1, P(m, b->qc_w), P(m, b->qc_b), &cs);
    ops->layer_scale_forward(a->mid, x, a->q, P(m, b->gamma1), p, m->mode.rng_seed, drop_stream(s, j, 0),
                             m->mode.sample0, m->B, st->H * st->H, C);
    ops->layernorm_forward(a->ln2, a->mean2, a->rstd2, a->mid, P(m, b->ln2_w), P(m, b->ln2_b), N, C);
    ops->matmul_gelu_forward(a->h, a->g, a->ln2, P(m, b->fc1_w), P(m, b->fc1_b), N, C, F, QS_W_IN_OUT);
    ops->matmul_forward(a->v, a->g, P(m, b->fc2_w), P(m, b->fc2_b), N, F, C, QS_W_IN_OUT);
    ops->layer_scale_forward(b->out, a->mid, a->v, P(m, b->gamma2), p, m->mode.rng_seed, drop_stream(s, j, 1),
                             m->mode.sample0, m->B, st->H * st->H, C);
    m->held_s = s;
    m->held_j = j;
}

double qs_quadranet_forward(qs_quadranet *m, const float *images, const int *labels, int B,
                            const qs_forward_mode *mode, int *correct) {
    const qs_ops *ops = m->be->ops;
    const qs_quadra_config *q = m->q;
    const int K = q->num_classes, Cin = q->in_channels;
    m->B = B;
    m->mode = *mode;
    m->has_labels = labels != NULL;
    m->held_s = m->held_j = -1;
    m->be->upload(m->img, images, (size_t)B * m->S * m->S * Cin * sizeof(float));
    const int H0 = m->st[0].H, N0 = B * H0 * H0;
    ops->space_to_depth_forward(m->stem_patch, m->img, B, m->S, m->S, Cin, m->P);
    ops->matmul_forward(m->stem_lin, m->stem_patch, P(m, m->stem_w), P(m, m->stem_b), N0, m->P * m->P * Cin,
                        m->st[0].C, QS_W_IN_OUT);
    ops->layernorm_forward(m->st[0].in, m->stem_mean, m->stem_rstd, m->stem_lin, P(m, m->stem_ln_w),
                           P(m, m->stem_ln_b), N0, m->st[0].C);
    for (int s = 0; s < NS; s++) {
        stage *st = &m->st[s];
        if (s > 0) {
            const stage *prev = &m->st[s - 1];
            const int Np = B * prev->H * prev->H;
            ops->layernorm_forward(st->dln, st->dmean, st->drstd, stage_out(prev), P(m, st->dln_w), P(m, st->dln_b),
                                   Np, prev->C);
            ops->space_to_depth_forward(st->dpatch, st->dln, B, prev->H, prev->H, prev->C, 2);
            ops->matmul_forward(st->in, st->dpatch, P(m, st->down_w), P(m, st->down_b), B * st->H * st->H,
                                4 * prev->C, st->C, QS_W_IN_OUT);
        }
        for (int j = 0; j < st->depth; j++) block_forward(m, s, j, j ? st->blocks[j - 1].out : st->in);
    }
    const stage *last = &m->st[NS - 1];
    const int CL = last->C;
    ops->avgpool_forward(m->pooled, stage_out(last), B, last->H * last->H, CL);
    ops->layernorm_forward(m->head_ln, m->head_mean, m->head_rstd, m->pooled, P(m, m->head_ln_w), P(m, m->head_ln_b),
                           B, CL);
    ops->matmul_forward(m->logits, m->head_ln, P(m, m->head_w), P(m, m->head_b), B, CL, K, QS_W_IN_OUT);
    if (!labels) return NAN;
    m->be->upload(m->labels, labels, (size_t)B * sizeof(int));
    ops->xent_forward(m->losses, m->logits, m->labels, B, K);
    m->be->download(m->host_losses, m->losses, (size_t)B * sizeof(float));
    double sum = 0.0;
    for (int i = 0; i < B; i++) sum += m->host_losses[i];
    if (correct) {
        m->be->download(m->host_logits, m->logits, (size_t)B * K * sizeof(float));
        int hits = 0;
        for (int i = 0; i < B; i++) {
            const float *row = m->host_logits + (size_t)i * K;
            int best = 0;
            for (int c = 1; c < K; c++)
                if (row[c] > row[best]) best = c;
            hits += best == labels[i];
        }
        *correct = hits;
    }
    return sum / B;
}

/* ---- backward ---- */

static void zero_f(const qs_quadranet *m, float *p, size_t n) { m->be->zero(p, n * sizeof(float)); }

/* dx holds d(block output) on entry and d(block input) on return. */
static void block_backward(qs_quadranet *m, int s, int j, const float *x, float *dx) {
    const qs_ops *ops = m->be->ops;
    const stage *st = &m->st[s];
    const block *b = &st->blocks[j];
    const block_acts *a = &b->a;
    const int HW = st->H * st->H, N = m->B * HW, C = st->C, F = m->cfg.ffn_mult * C;
    const size_t nc = (size_t)N * C, nf = (size_t)N * F;
    const qs_conv_shape cs = conv_shape(m, st);
    const float p = drop_rate(m, b);
    const uint64_t seed = m->mode.rng_seed;
    /* channel MLP branch; d(mid) = dx + what flows back through it */
    zero_f(m, m->dt1, nc);
    ops->layer_scale_backward(m->dt1, G(m, b->gamma2), dx, a->v, P(m, b->gamma2), p, seed, drop_stream(s, j, 1),
                              m->mode.sample0, m->B, HW, C);
    if (m->cfg.recompute_ffn && !checkpointed(m)) ops->gelu_forward(a->g, a->h, nf); /* shared g */
    ops->matmul_backward_dgelu(m->dF2, G(m, b->fc2_w), G(m, b->fc2_b), m->dt1, a->g, a->h, P(m, b->fc2_w), N, F, C,
                               QS_W_IN_OUT);
    zero_f(m, m->dt1, nc);
    ops->matmul_backward(m->dt1, G(m, b->fc1_w), G(m, b->fc1_b), m->dF2, a->ln2, P(m, b->fc1_w), N, C, F, QS_W_IN_OUT);
    ops->layernorm_backward(dx, G(m, b->ln2_w), G(m, b->ln2_b), m->dt1, a->mid, P(m, b->ln2_w), a->mean2, a->rstd2, N,
                            C);
    /* spatial branch */
    zero_f(m, m->dt1, nc);
    ops->layer_scale_backward(m->dt1, G(m, b->gamma1), dx, a->q, P(m, b->gamma1), p, seed, drop_stream(s, j, 0),
                              m->mode.sample0, m->B, HW, C);
    zero_f(m, m->dt2, nc);
    ops->quadconv_backward(m->dt2, G(m, b->qc_w), G(m, b->qc_b), m->dt1, a->ln1, P(m, b->qc_w), a->fa, a->fb, &cs);
    ops->layernorm_backward(dx, G(m, b->ln1_w), G(m, b->ln1_b), m->dt2, x, P(m, b->ln1_w), a->mean1, a->rstd1, N, C);
}

void qs_quadranet_backward(qs_quadranet *m, float scale) {
    const qs_ops *ops = m->be->ops;
    const qs_quadra_config *q = m->q;
    const int B = m->B, K = q->num_classes, Cin = q->in_channels;
    const stage *last = &m->st[NS - 1];
    const int CL = last->C;
    ops->xent_backward(m->logits, m->losses, m->labels, scale / (float)B, B, K); /* the forward's losses */
    zero_f(m, m->dhead, (size_t)B * CL);
    ops->matmul_backward(m->dhead, G(m, m->head_w), G(m, m->head_b), m->logits, m->head_ln, P(m, m->head_w), B, CL, K,
                         QS_W_IN_OUT);
    zero_f(m, m->dpool, (size_t)B * CL);
    ops->layernorm_backward(m->dpool, G(m, m->head_ln_w), G(m, m->head_ln_b), m->dhead, m->pooled, P(m, m->head_ln_w),
                            m->head_mean, m->head_rstd, B, CL);
    float *dx = m->dA, *dother = m->dB;
    zero_f(m, dx, (size_t)B * last->H * last->H * CL);
    ops->avgpool_backward(dx, m->dpool, B, last->H * last->H, CL);
    for (int s = NS - 1; s >= 0; s--) {
        const stage *st = &m->st[s];
        for (int j = st->depth - 1; j >= 0; j--) {
            const float *x = j ? st->blocks[j - 1].out : st->in;
            /* the shared set holds the forward's last block, then each one made again */
            if (checkpointed(m) && (m->held_s != s || m->held_j != j)) block_forward(m, s, j, x);
            block_backward(m, s, j, x, dx);
        }
        if (s == 0) break;
        const stage *prev = &m->st[s - 1];
        const int Np = B * prev->H * prev->H;
        zero_f(m, m->dpatch, (size_t)Np * prev->C);
        ops->matmul_backward(m->dpatch, G(m, st->down_w), G(m, st->down_b), dx, st->dpatch, P(m, st->down_w),
                             B * st->H * st->H, 4 * prev->C, st->C, QS_W_IN_OUT);
        zero_f(m, m->dt1, (size_t)Np * prev->C);
        ops->space_to_depth_backward(m->dt1, m->dpatch, B, prev->H, prev->H, prev->C, 2);
        zero_f(m, dother, (size_t)Np * prev->C);
        ops->layernorm_backward(dother, G(m, st->dln_w), G(m, st->dln_b), m->dt1, stage_out(prev), P(m, st->dln_w),
                                st->dmean, st->drstd, Np, prev->C);
        float *t = dx;
        dx = dother;
        dother = t;
    }
    const int N0 = B * m->st[0].H * m->st[0].H, C0 = m->st[0].C;
    zero_f(m, m->dt1, (size_t)N0 * C0);
    ops->layernorm_backward(m->dt1, G(m, m->stem_ln_w), G(m, m->stem_ln_b), dx, m->stem_lin, P(m, m->stem_ln_w),
                            m->stem_mean, m->stem_rstd, N0, C0);
    ops->matmul_backward(NULL, G(m, m->stem_w), G(m, m->stem_b), m->dt1, m->stem_patch, P(m, m->stem_w), N0,
                         m->P * m->P * Cin, C0, QS_W_IN_OUT);
}

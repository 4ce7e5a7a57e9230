/* GPT forward/backward over qs_ops. Pre-LayerNorm blocks:
 *   x = x + drop(proj(attn(ln_1(x))));  x = x + drop(ffn(ln_2(x)))
 * where ffn is Linear-act-Linear or a sparse MoE of such experts. */
#include "quasar/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"
#include "quasar/lora.h"
#include "quasar/memplan.h"
#include "quasar/ring_attention.h"
#include "quasar/rng.h"
#include "plan.h"

/* Indices into the parameter table; -1 where the config has no such tensor. */
typedef struct layer_params {
    int ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b;
    int qc_w, qc_b; /* causal quadratic conv of a "quadconv" mixer (then no qkv) */
    int fc_w, fc_b, fcproj_w, fcproj_b; /* dense, or [E, ...] stacked experts */
    int router_w, router_b, noise_w, noise_b;
} layer_params;

/* Forward activations of one block. ln1, ln2, attproj and ffout (and fch_act under
 * recompute_ffn; every float buffer of the blocks recompute_layers names) point into
 * buffers all such blocks share (see carve). */
typedef struct layer_acts {
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *lse, *atty, *attproj, *res_mid; /* lse [B,NH,T] */
    float *fa, *fb; /* quadconv mixer: the two factors (inside qkv's room) */
    float *ln2, *ln2_mean, *ln2_rstd;
    float *fch, *fch_act;             /* dense: [N,F]; MoE: packed [N*K,F] */
    float *ffout;                     /* [N,C] */
    float *rlogit, *nlogit, *hlogit;  /* MoE router: clean, noise, noisy [N,E] */
    float *gate, *xe, *ye;            /* [N*K], packed [N*K,C] x2 */
    int *idx, *slot;                  /* [N*K] */
    qs_moe_load load;                 /* its arrays: host [E], [E+1], [E] */
} layer_acts;

/* The linear layers that get bf16 panels: weight tensor, its fan in and out, layout,
 * and the experts stacked in it (1: a plain layer). */
typedef struct bf16_site {
    int w, n_in, n_out, stack;
    qs_weight_layout layout;
} bf16_site;

struct qs_gpt {
    qs_model_config cfg;
    const qs_backend *be;
    int max_B, max_T;
    int V, C, L, NH, F, E, K;
    int NKV, Wqkv; /* key/value heads (grouped-query attention); a qkv row's width, C + 2 NKV C / NH */

    qs_params ps;       /* no gradient buffer when frozen (a LoRA base) */
    bool frozen;        /* no weight gradients, so fewer activations kept (carve) */
    bool forward_only;  /* QS_GPT_INFER(_BF16): no backward, so one block's activations serve all */
    qs_lora *lora;      /* adapters on the linear layers, or NULL */
    int wte, wpe, lnf_w, lnf_b, lm_head; /* lm_head == wte when tied */
    layer_params *lp;
    /* The linear layers' weights again as bf16 panels, for inference
     * (qs_gpt_use_bf16_weights): backend memory, tensor i's first at w16_at[i], and
     * SIZE_MAX where a tensor has none. NULL: the fp32 weights serve. Without their fp32
     * copies (QS_GPT_INFER_BF16), a weight being loaded gathers in w16_stage (the size of
     * the largest) until it can be packed; w16_packed counts the weights packed by the
     * load under way. */
    uint16_t *w16;
    size_t *w16_at;
    bf16_site *w16_sites;
    int n_w16_sites, w16_packed;
    size_t w16_elems;
    float *w16_stage;
    size_t w16_stage_floats;

    /* activations */
    float *act_mem;
    size_t act_floats, act_ints;
    int *int_mem;
    qs_op_sizes sizes; /* what the ops see, for the backend's scratch */
    qs_mem_plan plan;  /* this model's memory (no optimizer) */
    float **res; /* [L+1] residual stream [N,C] */
    layer_acts *la;
    float *lnf, *lnf_mean, *lnf_rstd, *losses;
    /* The classifier runs over chunks of logit_rows rows, so the [N, V] logits (the
     * largest activation) never exist whole in training: logits holds one chunk.
     * logits_all, made on the first forward without targets that needs it, holds every
     * row; shown is the last forward's logits (qs_gpt_logits), NULL after a loss. */
    float *logits, *logits_all, *shown;
    int logit_rows;
    int *tok, *pos, *tgt; /* per row: token, position, target */
    int *slots;           /* decoding: each row's KV-cache slot */
    /* backward scratch */
    float *dres, *dln, *dbranch, *datty, *dqkv; /* dln: the forward leaves ln_f's gradient in it */
    float *delta; /* attention's row term [B,NH,T] */
    float *dF1; /* [max(N, N*K), F]: the gradient at the FFN activation (or, fused, at its input) */
    float *dxe, *dye, *dgate; /* MoE packed */
    float *dh, *dnoise; /* MoE router: at the routing logits, and at the noise logits */

    /* KV cache for decoding: [L][max_B][NKV][seq_len][hs] each, made on first prefill.
     * A quadconv mixer keeps its layer's LayerNorm outputs [max_B][seq_len][C] in kcache
     * instead, and convolves the last k of them per new token (conv_tmp: 3 rows of k*C). */
    float *kcache, *vcache, *conv_tmp;

    /* last forward */
    int B, T, n_valid;
    qs_forward_mode mode;
    /* global row of each token (see qs_forward_mode.sample0), and of each layer's packed
     * MoE rows for the experts' adapters: backend [max_B*max_T] and [L][max_B*max_T*K];
     * host_ids holds the token rows, then one layer's packed rows */
    int64_t *row_ids, *packed_ids, *host_ids;
    int *host_slot, *host_pos;

    /* sequence parallelism: the ring over the group, and each local row's global
     * position (0..max_T-1 without it) */
    qs_ring_attention *ring;
    int *seq_pos;
    bool failed;
    bool noisy_used;
    /* recompute_layers: the checkpointed layer whose activations the shared buffers hold,
     * and whether the forward running is a recomputation (whose MoE routing is not taken
     * in again) */
    int held_layer;
    bool recomputing;
    float *host_losses;
    int *routing; /* host [L][N*K] */
    qs_moe_stats stats;
};

/* ---- parameter table ---- */


/* A linear layer [in, out] (optionally stacked over n_stack experts) plus its bias. */
static void add_linear(qs_gpt *m, const char *prefix, int n_stack, int in, int out,
                       bool bias, bool residual_proj, int *w, int *b) {
    char name[QS_PARAM_NAME_MAX];
    int64_t ws[3], bs[2];
    int wd = 0, bd = 0;
    if (n_stack > 0) {
        ws[wd++] = n_stack;
        bs[bd++] = n_stack;
    }
    ws[wd++] = in;
    ws[wd++] = out;
    bs[bd++] = out;
    snprintf(name, sizeof name, "%s.weight", prefix);
    *w = qs_params_add(&m->ps, name, wd, ws, QS_ROLE_WEIGHT, in, out, residual_proj);
    *b = -1;
    if (bias) {
        snprintf(name, sizeof name, "%s.bias", prefix);
        *b = qs_params_add(&m->ps, name, bd, bs, QS_ROLE_BIAS, in, out, false);
    }
}

static void add_layernorm(qs_gpt *m, const char *prefix, int *w, int *b) {
    char name[QS_PARAM_NAME_MAX];
    int64_t s[1] = {m->C};
    snprintf(name, sizeof name, "%s.weight", prefix);
    *w = qs_params_add(&m->ps, name, 1, s, QS_ROLE_NORM_WEIGHT, 0, 0, false);
    snprintf(name, sizeof name, "%s.bias", prefix);
    *b = qs_params_add(&m->ps, name, 1, s, QS_ROLE_NORM_BIAS, 0, 0, false);
}

static void build_param_table(qs_gpt *m) {
    const qs_model_config *c = &m->cfg;
    char pre[64];
    int64_t s[2] = {m->V, m->C};
    m->wte = qs_params_add(&m->ps, "wte.weight", 2, s, QS_ROLE_EMBEDDING, m->C, m->V, false);
    s[0] = c->seq_len;
    m->wpe = qs_params_add(&m->ps, "wpe.weight", 2, s, QS_ROLE_EMBEDDING, m->C, c->seq_len, false);
    for (int l = 0; l < m->L; l++) {
        layer_params *p = &m->lp[l];
        snprintf(pre, sizeof pre, "h.%d.ln_1", l);
        add_layernorm(m, pre, &p->ln1_w, &p->ln1_b);
        p->qkv_w = p->qkv_b = p->qc_w = p->qc_b = -1;
        if (c->mixer == QS_MIXER_QUADCONV) {
            const int k = c->quadra.kernel_size;
            int64_t ws[4] = {3, 1, k, m->C}, bs[2] = {3, m->C};
            snprintf(pre, sizeof pre, "h.%d.attn.quadconv.weight", l);
            p->qc_w = qs_params_add(&m->ps, pre, 4, ws, QS_ROLE_WEIGHT, k, k, false);
            snprintf(pre, sizeof pre, "h.%d.attn.quadconv.bias", l);
            p->qc_b = qs_params_add(&m->ps, pre, 2, bs, QS_ROLE_BIAS, k, k, false);
        } else {
            snprintf(pre, sizeof pre, "h.%d.attn.c_attn", l);
            add_linear(m, pre, 0, m->C, m->Wqkv, c->bias, false, &p->qkv_w, &p->qkv_b);
        }
        snprintf(pre, sizeof pre, "h.%d.attn.c_proj", l);
        add_linear(m, pre, 0, m->C, m->C, c->bias, true, &p->proj_w, &p->proj_b);
        snprintf(pre, sizeof pre, "h.%d.ln_2", l);
        add_layernorm(m, pre, &p->ln2_w, &p->ln2_b);
        p->router_w = p->router_b = p->noise_w = p->noise_b = -1;
        if (m->E > 0) {
            /* The router's biases are part of the gating formula, so always present. */
            snprintf(pre, sizeof pre, "h.%d.mlp.router", l);
            add_linear(m, pre, 0, m->C, m->E, true, false, &p->router_w, &p->router_b);
            if (c->moe.gating == QS_GATING_NOISY_TOPK) {
                snprintf(pre, sizeof pre, "h.%d.mlp.noise", l);
                add_linear(m, pre, 0, m->C, m->E, true, false, &p->noise_w, &p->noise_b);
            }
            snprintf(pre, sizeof pre, "h.%d.mlp.experts.c_fc", l);
            add_linear(m, pre, m->E, m->C, m->F, c->bias, false, &p->fc_w, &p->fc_b);
            snprintf(pre, sizeof pre, "h.%d.mlp.experts.c_proj", l);
            add_linear(m, pre, m->E, m->F, m->C, c->bias, true, &p->fcproj_w, &p->fcproj_b);
        } else {
            snprintf(pre, sizeof pre, "h.%d.mlp.c_fc", l);
            add_linear(m, pre, 0, m->C, m->F, c->bias, false, &p->fc_w, &p->fc_b);
            snprintf(pre, sizeof pre, "h.%d.mlp.c_proj", l);
            add_linear(m, pre, 0, m->F, m->C, c->bias, true, &p->fcproj_w, &p->fcproj_b);
        }
    }
    add_layernorm(m, "ln_f", &m->lnf_w, &m->lnf_b);
    if (c->tie_embeddings) {
        m->lm_head = m->wte;
    } else {
        s[0] = m->V;
        s[1] = m->C;
        m->lm_head = qs_params_add(&m->ps, "lm_head.weight", 2, s, QS_ROLE_WEIGHT, m->C, m->V, false);
    }
}

static float *P(const qs_gpt *m, int idx) { return qs_params_value(&m->ps, idx); }
static float *G(const qs_gpt *m, int idx) { return qs_params_grad(&m->ps, idx); }

static qs_weight_layout lm_head_layout(void) { return QS_W_OUT_IN; /* [V, C], as wte */ }

/* Weight tensor idx's bf16 panels (stacked experts: expert e's), or NULL. */
static const uint16_t *W16(const qs_gpt *m, int idx, int e, int n_in, int n_out) {
    if (!m->w16 || idx < 0 || m->w16_at[idx] == SIZE_MAX) return NULL;
    return m->w16 + m->w16_at[idx] + (size_t)e * qs_bf16_packed_elems(n_in, n_out);
}

/* out[N, n_out] = inp @ W + bias (b < 0: none), W tensor w in `layout`: from its bf16
 * panels when the model has them. */
static void linear_forward(const qs_gpt *m, float *out, const float *inp, int w, int b, int N, int n_in, int n_out,
                           qs_weight_layout layout) {
    const uint16_t *w16 = W16(m, w, 0, n_in, n_out);
    if (w16) m->be->ops->matmul_forward_bf16(out, inp, w16, P(m, b), N, n_in, n_out);
    else m->be->ops->matmul_forward(out, inp, P(m, w), P(m, b), N, n_in, n_out, layout);
}

/* The same for stacked experts over their packed rows (offsets: host, E + 1). */
static void experts_forward(const qs_gpt *m, float *out, const float *inp, int w, int b, const int *off, int n_in,
                            int n_out) {
    if (!W16(m, w, 0, n_in, n_out)) {
        m->be->ops->matmul_grouped_forward(out, inp, P(m, w), P(m, b), off, m->E, n_in, n_out);
        return;
    }
    for (int e = 0; e < m->E; e++)
        m->be->ops->matmul_forward_bf16(out + (size_t)off[e] * n_out, inp + (size_t)off[e] * n_in,
                                        W16(m, w, e, n_in, n_out), b >= 0 ? P(m, b) + (size_t)e * n_out : NULL,
                                        off[e + 1] - off[e], n_in, n_out);
}

/* One layer's float activations; ln1, ln2, the branch outputs, and the activation's
 * output under recompute_ffn and a frozen MoE's dispatched rows, in shared's buffers,
 * which all layers share (chosen by the config, not by the pointers: the counting pass
 * has none). */
static void carve_layer(const qs_gpt *m, qs_plan *p, layer_acts *a, const layer_acts *shared) {
    size_t N = (size_t)m->max_B * m->max_T, C = m->C, F = m->F, E = m->E;
    size_t NK = m->E > 0 ? N * m->K : N;
    a->ln1 = shared->ln1;
    a->ln1_mean = qs_plan_f(p, N);
    a->ln1_rstd = qs_plan_f(p, N);
    a->qkv = qs_plan_f(p, N * m->Wqkv); /* a quadconv mixer's is 3C wide: fa and fb fit */
    if (m->cfg.mixer == QS_MIXER_QUADCONV) {
        a->fa = a->qkv;
        a->fb = a->qkv ? a->qkv + N * C : NULL;
    } else {
        a->lse = qs_plan_f(p, N * m->NH);
    }
    a->atty = qs_plan_f(p, N * C);
    a->attproj = a->ffout = shared->attproj; /* attproj is spent before ffout is made */
    a->res_mid = qs_plan_f(p, N * C);
    a->ln2 = shared->ln2;
    a->ln2_mean = qs_plan_f(p, N);
    a->ln2_rstd = qs_plan_f(p, N);
    a->fch = qs_plan_f(p, NK * F);
    a->fch_act = m->cfg.recompute_ffn ? shared->fch_act : qs_plan_f(p, NK * F);
    if (m->E > 0) {
        a->rlogit = qs_plan_f(p, N * E);
        a->nlogit = qs_plan_f(p, N * E);
        a->hlogit = qs_plan_f(p, N * E);
        a->gate = qs_plan_f(p, NK);
        a->xe = m->frozen ? shared->xe : qs_plan_f(p, NK * C);
        a->ye = qs_plan_f(p, NK * C);
    }
}

static void carve(qs_gpt *m, qs_plan *p) {
    size_t N = (size_t)m->max_B * m->max_T, C = m->C, F = m->F, E = m->E, K = m->K;
    size_t NK = m->E > 0 ? N * K : N;
    /* forward only, one stream updated in place: block l reads stream l only for res_mid,
     * before it writes stream l + 1 */
    for (int l = 0; l <= m->L; l++) m->res[l] = m->forward_only && l > 0 ? m->res[0] : qs_plan_f(p, N * C);
    /* What a backward need not read is not kept per layer but lives in one buffer all
     * layers share: the branch outputs (added into the stream at once); the LayerNorms'
     * outputs (made again from the stream and the saved statistics when a backward needs
     * them); under recompute_ffn the activation's output (made again from fch); in a
     * frozen MoE the rows dispatched to the experts (gathered again from ln_2 for an
     * adapter on their c_fc, the only reader without weight gradients). */
    layer_acts shared = {.attproj = qs_plan_f(p, N * C), .ln1 = qs_plan_f(p, N * C), .ln2 = qs_plan_f(p, N * C)};
    if (m->cfg.recompute_ffn) shared.fch_act = qs_plan_f(p, NK * F);
    if (m->E > 0 && m->frozen) shared.xe = qs_plan_f(p, NK * C);
    /* activation checkpointing: the last recompute_layers blocks share the floats of
     * the first of them (see recompute_layer); the last rather than the first, as the
     * forward leaves the last block's activations in place for the backward to start on.
     * Forward only: every block shares the first's. */
    int first_ckpt = m->forward_only ? 0 : m->L;
    while (first_ckpt > 0 && qs_config_recomputes(&m->cfg, first_ckpt - 1)) first_ckpt--;
    for (int l = 0; l < m->L; l++) {
        layer_acts *a = &m->la[l];
        if (l > first_ckpt) {
            /* each keeps its own routing (qs_gpt_moe_routing) and load */
            const qs_moe_load load = a->load;
            *a = m->la[first_ckpt];
            a->load = load;
        } else {
            carve_layer(m, p, a, &shared);
        }
        if (m->E > 0) {
            a->idx = qs_plan_i(p, NK);
            a->slot = qs_plan_i(p, NK);
        }
    }
    m->lnf = qs_plan_f(p, N * C);
    m->lnf_mean = qs_plan_f(p, N);
    m->lnf_rstd = qs_plan_f(p, N);
    m->logits = qs_plan_f(p, (size_t)m->logit_rows * m->V);
    m->losses = qs_plan_f(p, N);
    m->tok = qs_plan_i(p, N);
    m->pos = qs_plan_i(p, N);
    m->slots = qs_plan_i(p, m->max_B);
    m->tgt = qs_plan_i(p, N);
    /* forward only: no backward scratch, but dln gathers a prefill's last rows */
    m->dln = qs_plan_f(p, (m->forward_only ? (size_t)m->max_B : N) * C);
    if (m->forward_only) return;
    m->dres = qs_plan_f(p, N * C);
    m->dbranch = qs_plan_f(p, N * C);
    m->datty = qs_plan_f(p, N * C);
    m->dqkv = qs_plan_f(p, N * m->Wqkv);
    m->delta = qs_plan_f(p, N * m->NH);
    m->dF1 = qs_plan_f(p, NK * F);
    if (m->E > 0) {
        m->dxe = qs_plan_f(p, NK * C);
        m->dye = qs_plan_f(p, NK * C);
        m->dgate = qs_plan_f(p, NK);
        m->dh = qs_plan_f(p, N * E);
        m->dnoise = qs_plan_f(p, N * E);
    }
}

/* Rows of a classifier chunk: its logits about as large as an [N, C] activation (the
 * classifier's own input), in multiples of 64 rows for the GEMMs' tiles; but at least
 * 1024 rows, as each chunk's products read the whole [V, C] weight (fewer rows leave
 * them memory-bound: with 16 rows a 124M step took 10.7 s on the CPU, not ~6.3), and
 * at least max_B so that a prefill's or a decode's logits fit in one chunk. */
static int logit_rows_for(const qs_gpt *m, size_t N) {
    size_t r = (N * (size_t)m->C + (size_t)m->V - 1) / (size_t)m->V;
    r = (r + 63) / 64 * 64;
    if (r < 1024) r = 1024;
    if (r < (size_t)m->max_B) r = (size_t)m->max_B;
    return (int)(r < N ? r : N);
}

/* MoE: the global row ids of each layer's packed (token, choice) rows, for dropout. */
static size_t packed_id_count(const qs_gpt *m) {
    return m->E > 0 ? (size_t)m->L * m->max_B * m->max_T * m->K : 0;
}

/* ---- bf16 panels of the linear layers ---- */

static int bf16_sites(const qs_gpt *m, bf16_site *out) {
    int n = 0;
    const int stack = m->E > 0 ? m->E : 1;
    out[n++] = (bf16_site){m->lm_head, m->C, m->V, 1, lm_head_layout()};
    for (int l = 0; l < m->L; l++) {
        const layer_params *p = &m->lp[l];
        if (p->qkv_w >= 0) out[n++] = (bf16_site){p->qkv_w, m->C, m->Wqkv, 1, QS_W_IN_OUT};
        out[n++] = (bf16_site){p->proj_w, m->C, m->C, 1, QS_W_IN_OUT};
        out[n++] = (bf16_site){p->fc_w, m->C, m->F, stack, QS_W_IN_OUT};
        out[n++] = (bf16_site){p->fcproj_w, m->F, m->C, stack, QS_W_IN_OUT};
    }
    return n;
}

/* Site t's panels from its fp32 weights at src (backend memory; stacked experts). */
static void pack_site(const qs_gpt *m, const bf16_site *t, const float *src) {
    for (int e = 0; e < t->stack; e++)
        m->be->ops->matmul_pack_bf16(m->w16 + m->w16_at[t->w] + (size_t)e * qs_bf16_packed_elems(t->n_in, t->n_out),
                                     src + (size_t)e * t->n_in * t->n_out, t->n_in, t->n_out, t->layout);
}

/* The parameter table's on_load of a QS_GPT_INFER_BF16 model: a weight's values gather
 * in the staging buffer and are packed once all are there (the tied classifier from its
 * own room); the buffer goes once every weight is packed (a later load makes it again). */
static int take_weight(void *ctx, int i, size_t j0, size_t n, const float *host) {
    qs_gpt *m = ctx;
    const bf16_site *t = NULL;
    for (int s = 0; s < m->n_w16_sites && !t; s++)
        if (m->w16_sites[s].w == i) t = &m->w16_sites[s];
    if (!t) return 0;
    const bool held = m->ps.info[i].held_elsewhere;
    if (held && !m->w16_stage && !(m->w16_stage = m->be->alloc(m->w16_stage_floats * sizeof(float)))) return -1;
    if (held) m->be->upload(m->w16_stage + j0, host, n * sizeof(float));
    if (j0 + n < m->ps.info[i].numel) return 0;
    pack_site(m, t, held ? m->w16_stage : P(m, i));
    if (++m->w16_packed == m->n_w16_sites) {
        m->be->free(m->w16_stage);
        m->w16_stage = NULL;
        m->w16_packed = 0;
    }
    return 0;
}

/* The linear layers' panel layout (w16_sites, w16_at, w16_elems); host side only. held:
 * the weights also give up their fp32 room (the tied classifier keeps it: it is the
 * embedding) and reach take_weight as they load, through a staging buffer the size of
 * the largest (w16_stage_floats); before the parameters are allocated. */
static int plan_bf16(qs_gpt *m, bool held) {
    if (!m->be->ops->matmul_pack_bf16 || !m->be->ops->matmul_forward_bf16)
        return qs_error("bf16 weights: the %s backend has no products from them", m->be->name);
    free(m->w16_sites); /* a failed call's */
    free(m->w16_at);
    m->w16_sites = malloc((size_t)(1 + 4 * m->L) * sizeof *m->w16_sites);
    m->w16_at = malloc((size_t)m->ps.n_tensors * sizeof *m->w16_at);
    if (!m->w16_sites || !m->w16_at) return qs_error("out of memory");
    m->n_w16_sites = bf16_sites(m, m->w16_sites);
    m->w16_elems = 0;
    for (int i = 0; i < m->ps.n_tensors; i++) m->w16_at[i] = SIZE_MAX;
    for (int s = 0; s < m->n_w16_sites; s++) {
        const bf16_site *t = &m->w16_sites[s];
        m->w16_at[t->w] = m->w16_elems;
        m->w16_elems += (size_t)t->stack * qs_bf16_packed_elems(t->n_in, t->n_out);
        if (!held) continue;
        qs_param_info *p = &m->ps.info[t->w];
        p->observed = true;
        p->held_elsewhere = t->w != m->wte;
        const size_t floats = (size_t)t->stack * t->n_in * t->n_out;
        if (p->held_elsewhere && floats > m->w16_stage_floats) m->w16_stage_floats = floats;
    }
    if (held) {
        m->ps.on_load = take_weight;
        m->ps.on_load_ctx = m;
        qs_params_hold(&m->ps);
    }
    return 0;
}

/* The model's host side: its sizes, host arrays, parameter table and activation count,
 * and m->plan; no backend memory yet. */
static int layout(qs_gpt **out, const qs_model_config *cfg, const qs_backend *be, int max_B, int max_T,
                  qs_gpt_use use) {
    *out = NULL;
    if (cfg->vocab_size < 1) return qs_error("model.vocab_size must be set (got %d)", cfg->vocab_size);
    if (max_T < 1 || max_T > cfg->seq_len)
        return qs_error("sequence length %d is outside [1, model.seq_len=%d]", max_T, cfg->seq_len);
    if (max_B < 1) return qs_error("micro-batch size must be >= 1 (got %d)", max_B);
    if (cfg->mixer == QS_MIXER_ATTENTION && be->max_head_size && cfg->n_embd / cfg->n_head > be->max_head_size)
        return qs_error("model.n_embd / model.n_head = %d: the %s backend's attention takes heads of at most %d",
                        cfg->n_embd / cfg->n_head, be->name, be->max_head_size);
    if (qs_config_kv_heads(cfg) < 1 || cfg->n_head % qs_config_kv_heads(cfg))
        return qs_error("model.n_head (%d) must be divisible by model.n_kv_head (%d)", cfg->n_head,
                        qs_config_kv_heads(cfg));
    qs_gpt *m = calloc(1, sizeof *m);
    if (!m) return qs_error("out of memory");
    m->cfg = *cfg;
    m->be = be;
    m->max_B = max_B;
    m->max_T = max_T;
    m->V = cfg->vocab_size;
    m->C = cfg->n_embd;
    m->L = cfg->n_layer;
    m->NH = cfg->n_head;
    /* a quadconv mixer has no heads to group */
    m->NKV = cfg->mixer == QS_MIXER_ATTENTION ? qs_config_kv_heads(cfg) : m->NH;
    m->Wqkv = m->C + 2 * (m->C / m->NH) * m->NKV;
    m->F = cfg->ffn_mult * cfg->n_embd;
    m->E = cfg->moe.n_experts;
    m->K = m->E > 0 ? cfg->moe.top_k : 1;
    m->frozen = use != QS_GPT_TRAIN;
    m->forward_only = use == QS_GPT_INFER || use == QS_GPT_INFER_BF16;
    m->lp = calloc((size_t)m->L, sizeof *m->lp);
    m->la = calloc((size_t)m->L, sizeof *m->la);
    m->res = calloc((size_t)m->L + 1, sizeof *m->res);
    size_t N = (size_t)max_B * max_T;
    m->host_losses = malloc(N * sizeof(float));
    m->host_ids = malloc(N * (m->K + 1) * sizeof(int64_t));
    m->host_slot = malloc(N * m->K * sizeof(int));
    m->host_pos = malloc(N * sizeof(int));
    m->seq_pos = malloc((size_t)max_T * sizeof(int));
    if (!m->lp || !m->la || !m->res || !m->host_losses || !m->host_ids || !m->host_slot || !m->host_pos ||
        !m->seq_pos)
        goto oom;
    for (int t = 0; t < max_T; t++) m->seq_pos[t] = t;
    if (m->E > 0) {
        m->routing = malloc((size_t)m->L * N * m->K * sizeof(int));
        m->stats.expert_tokens = calloc((size_t)m->E, sizeof(int64_t));
        if (!m->routing || !m->stats.expert_tokens) goto oom;
        for (int l = 0; l < m->L; l++) {
            layer_acts *a = &m->la[l];
            a->load.counts = calloc((size_t)m->E, sizeof(int));
            a->load.offsets = calloc((size_t)m->E + 1, sizeof(int));
            a->load.routed = calloc((size_t)m->E, sizeof(int));
            if (!a->load.counts || !a->load.offsets || !a->load.routed) goto oom;
        }
    }
    build_param_table(m);
    if (m->ps.broken) goto oom;
    if (use == QS_GPT_INFER_BF16 && plan_bf16(m, true)) {
        qs_gpt_free(m);
        return -1;
    }
    m->logit_rows = logit_rows_for(m, N);
    qs_plan p = {0};
    carve(m, &p);
    m->act_floats = p.nf;
    m->act_ints = p.ni;
    m->sizes = (qs_op_sizes){.rows = (int)N, .experts = m->E};
    if (m->cfg.mixer == QS_MIXER_ATTENTION)
        m->sizes.heads = m->NH, m->sizes.kv_heads = m->NKV, m->sizes.head_size = m->C / m->NH;
    m->plan = (qs_mem_plan){
        /* QS_GPT_INFER_BF16: also the panels, and the staging a load takes */
        .params = m->ps.n * sizeof(float) +
                  (use == QS_GPT_INFER_BF16 ? m->w16_elems * sizeof(uint16_t) + m->w16_stage_floats * sizeof(float) : 0),
        .grads = m->frozen ? 0 : m->ps.n * sizeof(float),
        .activations = p.nf * sizeof(float) + p.ni * sizeof(int) + (N + packed_id_count(m)) * sizeof(int64_t),
        .workspace = be->workspace_bytes(&m->sizes),
    };
    *out = m;
    return 0;
oom:
    qs_gpt_free(m);
    return qs_error("out of memory creating the model");
}

int qs_gpt_plan(const qs_model_config *cfg, const qs_backend *be, int max_B, int max_T, qs_gpt_use use, int sp,
                qs_mem_plan *plan) {
    qs_gpt *m;
    if (layout(&m, cfg, be, max_B, max_T, use)) return -1;
    *plan = m->plan;
    if (sp > 1) plan->activations += qs_ring_attention_bytes(max_B, max_T, m->C, m->NH, m->NKV, sp);
    qs_gpt_free(m);
    return 0;
}

static int create(qs_gpt **out, const qs_model_config *cfg, const qs_backend *be, int max_B, int max_T,
                  qs_gpt_use use) {
    qs_gpt *m;
    if (layout(&m, cfg, be, max_B, max_T, use)) return -1;
    if (qs_mem_plan_check(&m->plan, be)) {
        qs_gpt_free(m);
        return -1;
    }
    const size_t N = (size_t)max_B * max_T;
    m->row_ids = be->alloc(N * sizeof(int64_t));
    m->packed_ids = m->E > 0 ? be->alloc(packed_id_count(m) * sizeof(int64_t)) : NULL;
    int prc = qs_params_alloc(&m->ps, be, !m->frozen);
    if (!prc && use == QS_GPT_INFER_BF16 &&
        (!(m->w16 = be->alloc(m->w16_elems * sizeof *m->w16)) ||
         !(m->w16_stage = be->alloc(m->w16_stage_floats * sizeof(float)))))
        prc = -1;
    m->act_mem = be->alloc(m->act_floats * sizeof(float));
    m->int_mem = be->alloc(m->act_ints * sizeof(int));
    if (prc || !m->row_ids || (m->E > 0 && !m->packed_ids) || !m->act_mem || !m->int_mem || be->reserve(&m->sizes)) {
        char why[256];
        snprintf(why, sizeof why, "%s", qs_error_last());
        const double need = qs_mem_plan_total(&m->plan) / 1048576.0;
        qs_gpt_free(m);
        return qs_error("cannot allocate the model's %.1f MiB (%s)", need, why);
    }
    qs_plan q = {.fbase = m->act_mem, .ibase = m->int_mem};
    carve(m, &q);
    *out = m;
    return 0;
}

int qs_gpt_create(qs_gpt **out, const qs_model_config *cfg, const qs_backend *be, int max_B, int max_T) {
    return create(out, cfg, be, max_B, max_T, QS_GPT_TRAIN);
}

int qs_gpt_create_for(qs_gpt **out, const qs_model_config *cfg, const qs_backend *be, int max_B, int max_T,
                      qs_gpt_use use) {
    return create(out, cfg, be, max_B, max_T, use);
}

void qs_gpt_free(qs_gpt *m) {
    if (!m) return;
    const qs_backend *be = m->be;
    qs_params_free(&m->ps);
    be->free(m->act_mem);
    be->free(m->int_mem);
    be->free(m->logits_all);
    be->free(m->kcache);
    be->free(m->conv_tmp);
    be->free(m->vcache);
    be->free(m->w16);
    free(m->w16_at);
    free(m->w16_sites);
    be->free(m->w16_stage);
    be->free(m->row_ids);
    be->free(m->packed_ids);
    free(m->host_ids);
    free(m->host_slot);
    free(m->host_pos);
    free(m->seq_pos);
    qs_ring_attention_free(m->ring);
    if (m->la)
        for (int l = 0; l < m->L; l++) {
            free(m->la[l].load.counts);
            free(m->la[l].load.offsets);
            free(m->la[l].load.routed);
        }
    free(m->la);
    free(m->lp);
    free(m->res);
    free(m->host_losses);
    free(m->routing);
    free(m->stats.expert_tokens);
    free(m);
}

/* ---- init ---- */

static float init_value(const qs_param_info *p, const void *ctx) {
    const qs_gpt *m = ctx;
    const qs_model_config *c = &m->cfg;
    if (p->role == QS_ROLE_EMBEDDING) return c->init_std;
    if (c->init != QS_INIT_NORMAL) return qs_params_init_std(c->init, c->init_std, p);
    /* GPT-2: scale projections into the residual stream by depth. */
    return p->residual_proj ? c->init_std / sqrtf(2.0f * (float)m->L) : c->init_std;
}

int qs_gpt_init(qs_gpt *m, uint64_t seed) { return qs_params_init(&m->ps, seed, init_value, m); }

/* ---- accessors ---- */

const qs_model_config *qs_gpt_config(const qs_gpt *m) { return &m->cfg; }
const qs_backend *qs_gpt_backend(const qs_gpt *m) { return m->be; }
qs_params *qs_gpt_params(qs_gpt *m) { return &m->ps; }
const qs_mem_plan *qs_gpt_mem_plan(const qs_gpt *m) { return &m->plan; }
int qs_gpt_max_tokens(const qs_gpt *m) { return m->max_B * m->max_T; }
void qs_gpt_set_lora(qs_gpt *m, qs_lora *lora) { m->lora = lora; }

int qs_gpt_use_bf16_weights(qs_gpt *m) {
    if (!m->frozen) return qs_error("bf16 weights are for inference: the model must be frozen");
    if (m->w16) return 0;
    if (plan_bf16(m, false) || !(m->w16 = m->be->alloc(m->w16_elems * sizeof *m->w16))) return -1;
    for (int s = 0; s < m->n_w16_sites; s++) pack_site(m, &m->w16_sites[s], P(m, m->w16_sites[s].w));
    return 0;
}

const int *qs_gpt_sequence_positions(const qs_gpt *m) { return m->seq_pos; }
bool qs_gpt_failed(const qs_gpt *m) { return m->failed; }

int qs_gpt_set_sequence_parallel(qs_gpt *m, qs_comm *group) {
    const int sp = qs_comm_size(group), T = m->cfg.seq_len;
    if (m->cfg.mixer != QS_MIXER_ATTENTION)
        return qs_error("parallel.sp %d: sequence parallelism needs the attention mixer (model.mixer)", sp);
    if (T % (2 * sp) || m->max_T != T / sp)
        return qs_error("parallel.sp %d: model.seq_len %d must be a multiple of 2 x sp, and the model sized for "
                        "%d of its rows (is %d)", sp, T, T / sp, m->max_T);
    if (m->ring) return qs_error("sequence parallelism is already set up");
    if (qs_ring_attention_positions(sp, qs_comm_rank(group), T, m->seq_pos) ||
        qs_ring_attention_create(&m->ring, m->be, group, m->max_B, m->max_T, m->C, m->NH, m->NKV, 1))
        return -1;
    return 0;
}
const float *qs_gpt_logits(const qs_gpt *m) { return m->shown; }
void qs_gpt_logits_row(const qs_gpt *m, int row, float *out) {
    m->be->download(out, m->shown + (size_t)row * m->V, (size_t)m->V * sizeof(float));
}
const qs_moe_stats *qs_gpt_moe_stats(const qs_gpt *m) { return &m->stats; }
/* Fetched on demand: each layer's choices stay on the backend until the next forward. */
const int *qs_gpt_moe_routing(const qs_gpt *m) {
    if (m->E == 0) return NULL;
    const size_t NK = (size_t)m->B * m->T * m->K;
    for (int l = 0; l < m->L; l++) m->be->download(m->routing + (size_t)l * NK, m->la[l].idx, NK * sizeof(int));
    return m->routing;
}

void qs_gpt_moe_stats_reset(qs_gpt *m) {
    if (m->E > 0) memset(m->stats.expert_tokens, 0, (size_t)m->E * sizeof(int64_t));
    m->stats.kept = m->stats.dropped = 0;
}


/* ---- forward ---- */

/* Random streams: one per (layer, site) so masks never repeat within a pass. */
enum { SITE_ATTN = 0, SITE_FFN = 1, SITE_NOISE = 2, SITE_EMBED = 3, N_SITES = 4 };
static uint64_t stream_of(int layer, int site) { return (uint64_t)layer * N_SITES + (uint64_t)site; }

static bool dropout_on(const qs_gpt *m) { return m->mode.train && m->cfg.dropout > 0.0f; }

static void drop_forward(qs_gpt *m, float *x, size_t n, int layer, int site) {
    if (dropout_on(m))
        m->be->ops->dropout_forward(x, x, m->cfg.dropout, m->mode.rng_seed, stream_of(layer, site), m->row_ids,
                                    n / m->C, m->C);
}

/* Gradient through a dropout site: dres itself when dropout is off, else the masked
 * copy in the dbranch scratch. */
static const float *drop_backward(qs_gpt *m, const float *dres, size_t n, int layer, int site) {
    if (!dropout_on(m)) return dres;
    m->be->zero(m->dbranch, n * sizeof(float));
    m->be->ops->dropout_backward(m->dbranch, dres, m->cfg.dropout, m->mode.rng_seed,
                                 stream_of(layer, site), m->row_ids, n / m->C, m->C);
    return m->dbranch;
}

static void act_forward(const qs_gpt *m, float *out, const float *in, size_t n) {
    if (m->cfg.activation == QS_ACT_GELU) m->be->ops->gelu_forward(out, in, n);
    else m->be->ops->relu_forward(out, in, n);
}

static void act_backward(const qs_gpt *m, float *din, const float *in, const float *dout, size_t n) {
    if (m->cfg.activation == QS_ACT_GELU) m->be->ops->gelu_backward(din, in, dout, n);
    else m->be->ops->relu_backward(din, in, dout, n);
}

/* Layer l's packed MoE rows' global ids. */
static int64_t *packed_ids_of(const qs_gpt *m, int l) {
    return m->packed_ids + (size_t)l * m->max_B * m->max_T * m->K;
}

/* The global rows of an adapter's input rows row0..: tokens, or packed expert rows. */
static const int64_t *lora_row_ids(const qs_gpt *m, int l, qs_lora_site site, size_t row0) {
    bool expert = m->E > 0 && (site == QS_LORA_SITE_FC || site == QS_LORA_SITE_FC_PROJ);
    return (expert ? packed_ids_of(m, l) : m->row_ids) + row0;
}

/* The LoRA path of linear layer `site` (rows row0.. of expert e's packed rows for a
 * stacked MoE site), added into y after the base layer: y += s * drop(x) A^T B^T. */
static void lora_forward(const qs_gpt *m, int l, qs_lora_site site, int e, size_t row0, int n, float *y,
                         const float *x) {
    if (m->lora) qs_lora_forward(m->lora, l, site, e, (int)row0, n, y, x, lora_row_ids(m, l, site, row0), &m->mode);
}

/* Its backward: adapter gradients, and dx += the path's input gradient. */
static void lora_backward(const qs_gpt *m, int l, qs_lora_site site, int e, size_t row0, int n, float *dx,
                          const float *dy, const float *x) {
    if (m->lora) qs_lora_backward(m->lora, l, site, e, (int)row0, n, dx, dy, x, lora_row_ids(m, l, site, row0), &m->mode);
}

/* The LoRA paths of a stacked MoE site, expert by expert over its packed rows (offsets:
 * the route's), y [rows, y_cols] and x [rows, x_cols]. */
static void experts_lora_forward(const qs_gpt *m, int l, qs_lora_site site, const int *off, float *y, int y_cols,
                                 const float *x, int x_cols) {
    for (int e = 0; m->lora && e < m->E; e++)
        if (off[e + 1] > off[e])
            lora_forward(m, l, site, e, off[e], off[e + 1] - off[e], y + (size_t)off[e] * y_cols,
                         x + (size_t)off[e] * x_cols);
}

static void experts_lora_backward(const qs_gpt *m, int l, qs_lora_site site, const int *off, float *dx, const float *dy,
                                  int y_cols, const float *x, int x_cols) {
    for (int e = 0; m->lora && e < m->E; e++)
        if (off[e + 1] > off[e])
            lora_backward(m, l, site, e, off[e], off[e + 1] - off[e], dx + (size_t)off[e] * x_cols,
                          dy + (size_t)off[e] * y_cols, x + (size_t)off[e] * x_cols);
}

/* Packed row slot[i] holds token i / K, so it draws as that token's row (each token
 * reaches an expert at most once, and adapter streams are per expert). */
static void set_packed_ids(qs_gpt *m, int l, const int *slot, int N) {
    const size_t NK = (size_t)N * m->K;
    const int64_t *tok = m->host_ids;
    int64_t *packed = m->host_ids + N;
    m->be->download(m->host_slot, slot, NK * sizeof(int));
    for (size_t i = 0; i < NK; i++)
        if (m->host_slot[i] >= 0) packed[m->host_slot[i]] = tok[i / (size_t)m->K];
    m->be->upload(packed_ids_of(m, l), packed, NK * sizeof(int64_t));
}

/* Layer l's router over N tokens: capacity from the config, noise from the layer's own
 * stream. */
static qs_moe_router router_of(const qs_gpt *m, int l, int N) {
    qs_moe_router r = {.N = N, .E = m->E, .K = m->K, .capacity = 0, .seed = m->mode.rng_seed,
                       .stream = stream_of(l, SITE_NOISE), .row_ids = m->row_ids};
    if (m->cfg.moe.capacity_factor > 0.0f)
        r.capacity = (int)ceil((double)m->cfg.moe.capacity_factor * N * m->K / m->E);
    return r;
}

static void moe_forward(qs_gpt *m, int l, int N) {
    const qs_ops *ops = m->be->ops;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    int C = m->C, F = m->F, E = m->E, K = m->K;
    ops->matmul_forward(a->rlogit, a->ln2, P(m, p->router_w), P(m, p->router_b), N, C, E, QS_W_IN_OUT);
    if (m->noisy_used)
        ops->matmul_forward(a->nlogit, a->ln2, P(m, p->noise_w), P(m, p->noise_b), N, C, E, QS_W_IN_OUT);
    const qs_moe_router r = router_of(m, l, N);
    qs_moe_load *load = &a->load;
    ops->moe_route_forward(load, a->idx, a->gate, a->slot, a->hlogit, a->rlogit, m->noisy_used ? a->nlogit : NULL,
                           &r);
    /* a recomputation's routing is the forward's: counted, and its packed rows' ids
     * (a per-layer buffer) set, once */
    if (!m->recomputing) {
        if (m->lora && m->mode.train) set_packed_ids(m, l, a->slot, N);
        m->stats.balance += load->balance;
        m->stats.z += load->z;
        m->stats.dropped += load->dropped;
        for (int e = 0; e < E; e++) {
            m->stats.expert_tokens[e] += load->counts[e];
            m->stats.kept += load->counts[e];
        }
    }

    ops->moe_dispatch_forward(a->xe, a->ln2, a->slot, N, K, C);
    const int *off = load->offsets;
    const size_t rows = (size_t)off[E];
    experts_forward(m, a->fch, a->xe, p->fc_w, p->fc_b, off, C, F);
    experts_lora_forward(m, l, QS_LORA_SITE_FC, off, a->fch, F, a->xe, C);
    act_forward(m, a->fch_act, a->fch, rows * F);
    experts_forward(m, a->ye, a->fch_act, p->fcproj_w, p->fcproj_b, off, F, C);
    experts_lora_forward(m, l, QS_LORA_SITE_FC_PROJ, off, a->ye, C, a->fch_act, F);
    ops->moe_combine_forward(a->ffout, a->ye, a->gate, a->slot, N, K, C);
}

/* Whether the GELU goes into the linear layer next to it (matmul_gelu_forward before,
 * matmul_backward_dgelu after): unless an adapter's path comes between them, or the
 * layer runs from bf16 weights. */
static bool gelu_fused(const qs_gpt *m, int l, qs_lora_site site) {
    return m->cfg.activation == QS_ACT_GELU && !(m->lora && qs_lora_adapts(m->lora, l, site)) && !m->w16;
}

static void dense_ffn_forward(qs_gpt *m, int l, int N) {
    const qs_ops *ops = m->be->ops;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    if (gelu_fused(m, l, QS_LORA_SITE_FC)) {
        ops->matmul_gelu_forward(a->fch, a->fch_act, a->ln2, P(m, p->fc_w), P(m, p->fc_b), N, m->C, m->F,
                                 QS_W_IN_OUT);
    } else {
        linear_forward(m, a->fch, a->ln2, p->fc_w, p->fc_b, N, m->C, m->F, QS_W_IN_OUT);
        lora_forward(m, l, QS_LORA_SITE_FC, 0, 0, N, a->fch, a->ln2);
        act_forward(m, a->fch_act, a->fch, (size_t)N * m->F);
    }
    linear_forward(m, a->ffout, a->fch_act, p->fcproj_w, p->fcproj_b, N, m->F, m->C, QS_W_IN_OUT);
    lora_forward(m, l, QS_LORA_SITE_FC_PROJ, 0, 0, N, a->ffout, a->fch_act);
}

/* Floats per cached position of a layer and slot: NKV heads of keys (or values), or a
 * quadconv mixer's LayerNorm row. */
static size_t cache_width(const qs_gpt *m) {
    return m->cfg.mixer == QS_MIXER_QUADCONV ? (size_t)m->C : (size_t)m->NKV * (m->C / m->NH);
}

/* Layer l's slice of a KV cache. */
static float *cache_of(const qs_gpt *m, float *cache, int l) {
    return cache + (size_t)l * m->max_B * m->cfg.seq_len * cache_width(m);
}

/* The causal conv over one sequence of T steps (b-th of B when batched). */
static qs_conv_shape mixer_shape(const qs_gpt *m, int B, int T) {
    const int k = m->cfg.quadra.kernel_size;
    return (qs_conv_shape){B, 1, T, m->C, 1, k, 0, k - 1};
}

/* Quadconv token mixing of layer l into atty: over the whole sequences, or when
 * decoding (slots given) for each row's one new position against the LayerNorm rows
 * cached in its slot. */
static void mixer_conv_forward(qs_gpt *m, int l, int B, int T, const int *slots) {
    const qs_ops *ops = m->be->ops;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    const int C = m->C, k = m->cfg.quadra.kernel_size, S = m->cfg.seq_len;
    if (!slots) {
        qs_conv_shape s = mixer_shape(m, B, T);
        ops->quadconv_forward(a->atty, a->fa, a->fb, a->ln1, P(m, p->qc_w), P(m, p->qc_b), &s);
        return;
    }
    float *rows = cache_of(m, m->kcache, l);
    float *y = m->conv_tmp, *fa = y + (size_t)k * C, *fb = fa + (size_t)k * C;
    for (int b = 0; b < B; b++) {
        const int pos = m->host_pos[b], first = pos - k + 1 > 0 ? pos - k + 1 : 0, w = pos - first + 1;
        const qs_conv_shape s = mixer_shape(m, 1, w);
        float *hist = rows + (size_t)slots[b] * S * C;
        m->be->copy(hist + (size_t)pos * C, a->ln1 + (size_t)b * C, (size_t)C * sizeof(float));
        ops->quadconv_forward(y, fa, fb, hist + (size_t)first * C, P(m, p->qc_w), P(m, p->qc_b), &s);
        m->be->copy(a->atty + (size_t)b * C, y + (size_t)(w - 1) * C, (size_t)C * sizeof(float));
    }
}

/* Causal self-attention of B whole sequences: one block of the blockwise ops, q, k and v
 * read in place from qkv and their gradients written in place into dqkv. Saves only
 * the log-sum-exp, so memory is linear in T. */
static void whole_attention_forward(qs_gpt *m, layer_acts *a, int B, int T) {
    const qs_attn_block blk = qs_attn_block_self(B, T, m->C, m->NH, m->NKV, 1);
    m->be->ops->attention_block_forward(a->atty, a->lse, a->qkv, a->qkv + m->C, &blk);
}

static void whole_attention_backward(qs_gpt *m, layer_acts *a, int B, int T) {
    const qs_ops *ops = m->be->ops;
    const qs_attn_block blk = qs_attn_block_self(B, T, m->C, m->NH, m->NKV, 1);
    ops->attention_delta(m->delta, m->datty, a->atty, B, T, m->C, m->NH);
    ops->attention_block_backward(m->dqkv, m->dqkv + m->C, m->datty, a->qkv, a->qkv + m->C, a->lse, m->delta, &blk);
}

/* Ring attention of a layer; the ring's workspace is for the full micro-batch. */
static void ring_forward(qs_gpt *m, layer_acts *a, int B) {
    if (m->failed) return;
    if (B != m->max_B) m->failed = qs_error("a sequence-parallel forward takes %d sequences, not %d", m->max_B, B) != 0;
    else m->failed = qs_ring_attention_forward(m->ring, a->atty, a->lse, a->qkv) != 0;
}

/* The LayerNorm that reads residual stream l: block l's ln_1, or ln_f after the last. */
typedef struct ln_of_stream {
    float *out, *mean, *rstd;
    const float *w, *b;
} ln_of_stream;

static ln_of_stream ln_reading(qs_gpt *m, int l) {
    if (l == m->L) return (ln_of_stream){m->lnf, m->lnf_mean, m->lnf_rstd, P(m, m->lnf_w), P(m, m->lnf_b)};
    layer_acts *a = &m->la[l];
    return (ln_of_stream){a->ln1, a->ln1_mean, a->ln1_rstd, P(m, m->lp[l].ln1_w), P(m, m->lp[l].ln1_b)};
}

/* A prefill's part of layer l: its B prompts' keys and values (or, for a quadconv
 * mixer, the LayerNorm rows the next tokens' convolutions read) into slots slot0... */
static void fill_cache(qs_gpt *m, int l, int B, int T, int slot0) {
    const int C = m->C, S = m->cfg.seq_len;
    if (m->lp[l].qc_w >= 0) {
        for (int b = 0; b < B; b++)
            m->be->copy(cache_of(m, m->kcache, l) + (size_t)(slot0 + b) * S * C, m->la[l].ln1 + (size_t)b * T * C,
                        (size_t)T * C * sizeof(float));
        return;
    }
    const size_t slot_off = (size_t)slot0 * S * cache_width(m); /* a slot: NKV heads of S positions */
    m->be->ops->kv_cache_fill(cache_of(m, m->kcache, l) + slot_off, cache_of(m, m->vcache, l) + slot_off,
                              m->la[l].qkv, B, T, C, m->NH, m->NKV, S);
}

/* Block l from its ln_1 output (made by the caller) up to its FFN branch's output in
 * ffout, which the caller adds into the stream. */
static void layer_forward(qs_gpt *m, int l, int B, int T, const int *slots, int fill_slot0) {
    const qs_ops *ops = m->be->ops;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    const int N = B * T, C = m->C;
    const size_t NC = (size_t)N * C;
    if (p->qc_w >= 0) {
        mixer_conv_forward(m, l, B, T, slots);
    } else {
        linear_forward(m, a->qkv, a->ln1, p->qkv_w, p->qkv_b, N, C, m->Wqkv, QS_W_IN_OUT);
        lora_forward(m, l, QS_LORA_SITE_QKV, 0, 0, N, a->qkv, a->ln1);
        if (slots)
            ops->attention_decode(a->atty, cache_of(m, m->kcache, l), cache_of(m, m->vcache, l), a->qkv, B, C,
                                  m->NH, m->NKV, m->slots, m->pos, m->cfg.seq_len);
        else if (m->ring)
            ring_forward(m, a, B);
        else
            whole_attention_forward(m, a, B, T);
    }
    if (fill_slot0 >= 0) fill_cache(m, l, B, T, fill_slot0);
    linear_forward(m, a->attproj, a->atty, p->proj_w, p->proj_b, N, C, C, QS_W_IN_OUT);
    lora_forward(m, l, QS_LORA_SITE_PROJ, 0, 0, N, a->attproj, a->atty);
    drop_forward(m, a->attproj, NC, l, SITE_ATTN);
    ops->residual_layernorm_forward(a->res_mid, a->ln2, a->ln2_mean, a->ln2_rstd, m->res[l], a->attproj,
                                    P(m, p->ln2_w), P(m, p->ln2_b), N, C);
    if (m->E > 0) moe_forward(m, l, N);
    else dense_ffn_forward(m, l, N);
    drop_forward(m, a->ffout, NC, l, SITE_FFN);
}

/* Embeddings through ln_f for B sequences of T tokens at positions 0..T-1, filling KV
 * cache slots fill_slot0.. when it is >= 0 (a prefill); or, when decoding (T = 1), row
 * b's token at position pos[b] against the KV cache of slot slots[b] (host arrays). */
static void trunk_forward(qs_gpt *m, const int *tokens, int B, int T, const int *slots, const int *pos,
                          int fill_slot0, const qs_forward_mode *mode) {
    const qs_ops *ops = m->be->ops;
    int N = B * T, C = m->C;
    size_t NC = (size_t)N * C;
    m->B = B;
    m->T = T;
    m->mode = *mode;
    m->noisy_used = m->E > 0 && mode->train && m->cfg.moe.gating == QS_GATING_NOISY_TOPK;
    m->stats.balance = m->stats.z = 0.0;
    m->be->upload(m->tok, tokens, (size_t)N * sizeof(int));
    for (int r = 0; r < N; r++) m->host_pos[r] = pos ? pos[r] : m->seq_pos[r % T];
    m->be->upload(m->pos, m->host_pos, (size_t)N * sizeof(int));
    if (slots) m->be->upload(m->slots, slots, (size_t)N * sizeof(int));
    if (mode->train) {
        for (int r = 0; r < N; r++)
            m->host_ids[r] = (int64_t)((mode->sample0 + (uint64_t)(r / T)) * (uint64_t)m->cfg.seq_len) + m->host_pos[r];
        m->be->upload(m->row_ids, m->host_ids, (size_t)N * sizeof(int64_t));
    }

    ops->embed_forward(m->res[0], m->tok, m->pos, P(m, m->wte), P(m, m->wpe), N, C);
    drop_forward(m, m->res[0], NC, m->L, SITE_EMBED);
    ln_of_stream ln = ln_reading(m, 0);
    ops->layernorm_forward(ln.out, ln.mean, ln.rstd, m->res[0], ln.w, ln.b, N, C);
    for (int l = 0; l < m->L; l++) {
        layer_forward(m, l, B, T, slots, fill_slot0);
        /* the stream's next LayerNorm (the next block's ln_1, or ln_f) reads the sum */
        ln = ln_reading(m, l + 1);
        ops->residual_layernorm_forward(m->res[l + 1], ln.out, ln.mean, ln.rstd, m->la[l].res_mid, m->la[l].ffout,
                                        ln.w, ln.b, N, C);
    }
    m->held_layer = m->L - 1;
}

/* Logits of n rows of ln_f's output into out [n, V]. */
static void classify(const qs_gpt *m, float *out, const float *lnf, int n) {
    linear_forward(m, out, lnf, m->lm_head, -1, n, m->C, m->V, lm_head_layout());
}

/* B prompts of T tokens into KV-cache slots slot0.. */
static int prefill(qs_gpt *m, const int *tokens, int B, int T, int slot0) {
    if (m->ring) return qs_error("KV-cache inference does not run sequence-parallel");
    if (slot0 < 0 || slot0 + B > m->max_B || T > m->max_T || T < 1)
        return qs_error("prefill of %d x %d tokens into slot %d exceeds the model's %d x %d", B, T, slot0, m->max_B,
                        m->max_T);
    size_t per = (size_t)m->L * m->max_B * m->cfg.seq_len * cache_width(m) * sizeof(float);
    if (!m->kcache && !(m->kcache = m->be->alloc(per))) return -1;
    if (!m->vcache && !(m->vcache = m->be->alloc(per))) return -1;
    if (m->cfg.mixer == QS_MIXER_QUADCONV && !m->conv_tmp &&
        !(m->conv_tmp = m->be->alloc(3 * (size_t)m->cfg.quadra.kernel_size * m->C * sizeof(float))))
        return -1;
    qs_forward_mode mode = {.train = false};
    trunk_forward(m, tokens, B, T, NULL, NULL, slot0, &mode);
    /* only each prompt's last position predicts: its ln_f rows gathered into dln */
    const size_t row = (size_t)m->C * sizeof(float);
    for (int b = 0; b < B; b++) m->be->copy(m->dln + (size_t)b * m->C, m->lnf + ((size_t)b * T + T - 1) * m->C, row);
    classify(m, m->logits, m->dln, B);
    m->shown = m->logits;
    m->n_valid = 0;
    return 0;
}

int qs_gpt_prefill(qs_gpt *m, const int *tokens, int B, int T) { return prefill(m, tokens, B, T, 0); }

int qs_gpt_prefill_slot(qs_gpt *m, const int *tokens, int T, int slot) { return prefill(m, tokens, 1, T, slot); }

int qs_gpt_decode(qs_gpt *m, const int *tokens, int B, const int *slots, const int *pos) {
    if (!m->kcache || B < 1 || B > m->max_B) return qs_error("decode of %d rows needs a prefill and at most %d rows", B, m->max_B);
    for (int b = 0; b < B; b++) {
        if (pos[b] < 1 || pos[b] >= m->cfg.seq_len || slots[b] < 0 || slots[b] >= m->max_B)
            return qs_error("decode row %d: position %d must be in [1, %d) and slot %d in [0, %d)", b, pos[b],
                            m->cfg.seq_len, slots[b], m->max_B);
        for (int c = 0; c < b; c++)
            if (slots[c] == slots[b]) return qs_error("decode: rows %d and %d share KV-cache slot %d", c, b, slots[b]);
    }
    qs_forward_mode mode = {.train = false};
    trunk_forward(m, tokens, B, 1, slots, pos, -1, &mode);
    classify(m, m->logits, m->lnf, B);
    m->shown = m->logits;
    m->n_valid = 0;
    return 0;
}

static void zero_f(const qs_gpt *m, float *p, size_t n) { m->be->zero(p, n * sizeof(float)); }

/* All N rows' logits into `shown`: the chunk buffer when they fit, else logits_all. */
static int classify_all(qs_gpt *m, int N) {
    if (N > m->logit_rows && !m->logits_all &&
        !(m->logits_all = m->be->alloc((size_t)m->max_B * m->max_T * m->V * sizeof(float))))
        return -1;
    m->shown = N > m->logit_rows ? m->logits_all : m->logits;
    classify(m, m->shown, m->lnf, N);
    return 0;
}

/* The loss over chunks of rows; with a gradient scale, each chunk's logits are turned
 * into their gradient at once, and from it ln_f's (into dln) and the classifier
 * weight's: so backward starts at ln_f. */
static double chunked_loss(qs_gpt *m, const int *targets, int N) {
    const qs_ops *ops = m->be->ops;
    const int C = m->C, V = m->V;
    m->be->upload(m->tgt, targets, (size_t)N * sizeof(int));
    for (int i = 0; i < N; i++) m->n_valid += targets[i] >= 0;
    const float dloss = m->n_valid ? m->mode.grad_scale / (float)m->n_valid : 0.0f;
    if (m->mode.grad_scale != 0.0f) zero_f(m, m->dln, (size_t)N * C);
    for (int r0 = 0; r0 < N; r0 += m->logit_rows) {
        const int n = N - r0 < m->logit_rows ? N - r0 : m->logit_rows;
        const float *lnf = m->lnf + (size_t)r0 * C;
        classify(m, m->logits, lnf, n);
        ops->xent_forward(m->losses + r0, m->logits, m->tgt + r0, n, V);
        if (dloss == 0.0f) continue;
        ops->xent_backward(m->logits, m->losses + r0, m->tgt + r0, dloss, n, V);
        ops->matmul_backward(m->dln + (size_t)r0 * C, G(m, m->lm_head), NULL, m->logits, lnf, P(m, m->lm_head), n,
                             C, V, lm_head_layout());
    }
    m->be->download(m->host_losses, m->losses, (size_t)N * sizeof(float));
    double sum = 0.0;
    for (int i = 0; i < N; i++)
        if (targets[i] >= 0) sum += m->host_losses[i];
    return m->n_valid ? sum / m->n_valid : 0.0;
}

double qs_gpt_forward(qs_gpt *m, const int *tokens, const int *targets, int B, int T,
                      const qs_forward_mode *mode) {
    if (m->forward_only && mode->grad_scale != 0.0f) {
        m->failed = true;
        qs_error("a forward with a gradient scale needs a model made for training, not inference");
        return NAN;
    }
    trunk_forward(m, tokens, B, T, NULL, NULL, -1, mode);
    m->n_valid = 0;
    m->shown = NULL;
    if (targets) return chunked_loss(m, targets, B * T);
    if (classify_all(m, B * T)) m->failed = true;
    return 0.0;
}

/* ---- backward ---- */

/* The activation's backward, once c_proj's backward has read its output fch_act for the
 * last time: that buffer then takes the gradient at the activation's input, so the
 * backward needs one [rows, F] scratch (dF1, the gradient at the output), not two. */
static float *act_backward_in_place(qs_gpt *m, layer_acts *a, size_t n) {
    zero_f(m, a->fch_act, n);
    act_backward(m, a->fch_act, a->fch, m->dF1, n);
    return a->fch_act;
}

/* Whether layer l's backward reads its FFN activation's output: for c_proj's weight
 * gradient, or for an adapter on c_proj. A frozen base without one reads only the
 * pre-activation. */
static bool act_read(const qs_gpt *m, int l) {
    return !m->frozen || (m->lora && qs_lora_adapts(m->lora, l, QS_LORA_SITE_FC_PROJ));
}

/* Whether the backward must make layer l's FFN activation output again: under
 * recompute_ffn where it reads it, unless recompute_layers has just made the whole
 * layer again. */
static bool act_dropped(const qs_gpt *m, int l) {
    return m->cfg.recompute_ffn && !qs_config_recomputes(&m->cfg, l) && act_read(m, l);
}

/* dln += d(ffn)/d(ln_2 output) given dy = gradient at the FFN output. Under
 * recompute_ffn the activation's output is made again from fch (one elementwise pass)
 * instead of being kept per layer. */
static void dense_ffn_backward(qs_gpt *m, int l, int N, const float *dy) {
    const qs_ops *ops = m->be->ops;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    size_t NF = (size_t)N * m->F;
    if (act_dropped(m, l)) act_forward(m, a->fch_act, a->fch, NF);
    const float *dpre = m->dF1; /* the gradient at the activation's input */
    if (gelu_fused(m, l, QS_LORA_SITE_FC_PROJ)) {
        ops->matmul_backward_dgelu(m->dF1, G(m, p->fcproj_w), G(m, p->fcproj_b), dy, a->fch_act, a->fch,
                                   P(m, p->fcproj_w), N, m->F, m->C, QS_W_IN_OUT);
    } else {
        zero_f(m, m->dF1, NF);
        ops->matmul_backward(m->dF1, G(m, p->fcproj_w), G(m, p->fcproj_b), dy, a->fch_act,
                             P(m, p->fcproj_w), N, m->F, m->C, QS_W_IN_OUT);
        lora_backward(m, l, QS_LORA_SITE_FC_PROJ, 0, 0, N, m->dF1, dy, a->fch_act);
        dpre = act_backward_in_place(m, a, NF);
    }
    ops->matmul_backward(m->dln, G(m, p->fc_w), G(m, p->fc_b), dpre, a->ln2, P(m, p->fc_w), N,
                         m->C, m->F, QS_W_IN_OUT);
    lora_backward(m, l, QS_LORA_SITE_FC, 0, 0, N, m->dln, dpre, a->ln2);
}

static void moe_backward(qs_gpt *m, int l, int N, const float *dy, float scale) {
    const qs_ops *ops = m->be->ops;
    const layer_params *p = &m->lp[l];
    layer_acts *a = &m->la[l];
    int C = m->C, F = m->F, E = m->E, K = m->K;
    size_t rows = (size_t)a->load.offsets[E], NK = (size_t)N * K;
    zero_f(m, m->dye, rows * C);
    zero_f(m, m->dgate, NK);
    ops->moe_combine_backward(m->dye, m->dgate, dy, a->ye, a->gate, a->slot, N, K, C);
    if (act_dropped(m, l)) act_forward(m, a->fch_act, a->fch, rows * F); /* as in dense_ffn_backward */
    zero_f(m, m->dF1, rows * F);
    zero_f(m, m->dxe, rows * C);
    const int *off = a->load.offsets;
    ops->matmul_grouped_backward(m->dF1, G(m, p->fcproj_w), G(m, p->fcproj_b), m->dye, a->fch_act, P(m, p->fcproj_w),
                                 off, E, F, C);
    experts_lora_backward(m, l, QS_LORA_SITE_FC_PROJ, off, m->dF1, m->dye, C, a->fch_act, F);
    const float *dpre = act_backward_in_place(m, a, rows * F);
    /* a frozen MoE's dispatched rows are shared (carve): gathered again for an adapter */
    if (m->frozen && !qs_config_recomputes(&m->cfg, l) && m->lora && qs_lora_adapts(m->lora, l, QS_LORA_SITE_FC))
        ops->moe_dispatch_forward(a->xe, a->ln2, a->slot, N, K, C);
    ops->matmul_grouped_backward(m->dxe, G(m, p->fc_w), G(m, p->fc_b), dpre, a->xe, P(m, p->fc_w), off, E, C, F);
    experts_lora_backward(m, l, QS_LORA_SITE_FC, off, m->dxe, dpre, F, a->xe, C);
    ops->moe_dispatch_backward(m->dln, m->dxe, a->slot, N, K, C);

    const size_t NE = (size_t)N * E;
    const qs_moe_router r = router_of(m, l, N);
    zero_f(m, m->dh, NE);
    if (m->noisy_used) zero_f(m, m->dnoise, NE);
    /* the routing logits: the noisy ones (hlogit) under noisy gating, else the clean */
    ops->moe_route_backward(m->dh, m->noisy_used ? m->dnoise : NULL, m->dgate, a->idx, a->gate,
                            m->noisy_used ? a->hlogit : a->rlogit, m->noisy_used ? a->nlogit : NULL, &a->load,
                            scale * m->cfg.moe.aux_loss_coef, scale * m->cfg.moe.z_loss_coef, &r);
    if (m->noisy_used)
        ops->matmul_backward(m->dln, G(m, p->noise_w), G(m, p->noise_b), m->dnoise, a->ln2,
                             P(m, p->noise_w), N, C, E, QS_W_IN_OUT);
    ops->matmul_backward(m->dln, G(m, p->router_w), G(m, p->router_b), m->dh, a->ln2,
                         P(m, p->router_w), N, C, E, QS_W_IN_OUT);
}

/* The backward pass tells the parameter table each time a tail of the gradients is final
 * (after ln_f, after each layer, after the embeddings), so data parallelism can reduce it
 * meanwhile. A pass with nothing to compute tells the same points, so that every rank
 * starts the same reductions in the same order. */
static void grads_ready_all(qs_gpt *m) {
    qs_params_grads_ready(&m->ps, m->lnf_w);
    for (int l = m->L - 1; l >= 0; l--) qs_params_grads_ready(&m->ps, m->lp[l].ln1_w);
    qs_params_grads_ready(&m->ps, m->wte);
}

/* Activation checkpointing (recompute_layers): layer l's activations made again from its
 * input res[l], which is kept, into the buffers all checkpointed layers share. The same
 * ops on the same inputs, with dropout and router noise keyed by (seed, layer, row), give
 * the forward's values; a ring's attention runs again, on every rank alike. */
static void recompute_layer(qs_gpt *m, int l) {
    const ln_of_stream ln = ln_reading(m, l);
    m->be->ops->layernorm_forward(ln.out, ln.mean, ln.rstd, m->res[l], ln.w, ln.b, m->B * m->T, m->C);
    m->recomputing = true;
    layer_forward(m, l, m->B, m->T, NULL, -1);
    m->recomputing = false;
    m->held_layer = l;
}

int qs_gpt_backward(qs_gpt *m) {
    const qs_ops *ops = m->be->ops;
    int B = m->B, T = m->T, N = B * T, C = m->C;
    size_t NC = (size_t)N * C;
    const float scale = m->mode.grad_scale;
    if (m->forward_only) return qs_error("backward needs a model made for training, not inference");
    /* logits shown: the last pass had no targets (or was a prefill or decode), so it took
     * no classifier gradient */
    if (scale == 0.0f || m->shown)
        return qs_error("backward needs a forward with targets and a gradient scale (qs_forward_mode.grad_scale)");
    /* nothing to learn from; but a ring's backward is collective, so its ranks all run it */
    if (m->n_valid == 0 && !m->ring) {
        grads_ready_all(m);
        return 0;
    }

    zero_f(m, m->dres, NC);
    ops->layernorm_backward(m->dres, G(m, m->lnf_w), G(m, m->lnf_b), m->dln, m->res[m->L],
                            P(m, m->lnf_w), m->lnf_mean, m->lnf_rstd, N, C);
    qs_params_grads_ready(&m->ps, m->lnf_w);

    for (int l = m->L - 1; l >= 0; l--) {
        const layer_params *p = &m->lp[l];
        layer_acts *a = &m->la[l];
        /* a checkpointed layer's buffers hold the whole layer, LayerNorm outputs too */
        const bool whole = qs_config_recomputes(&m->cfg, l);
        if (whole && m->held_layer != l) recompute_layer(m, l);
        /* feed-forward branch; dres then becomes the gradient at res_mid */
        if (!whole && (!m->frozen || (m->lora && qs_lora_adapts(m->lora, l, QS_LORA_SITE_FC))))
            ops->layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->res_mid, P(m, p->ln2_w), P(m, p->ln2_b), N,
                                   C);
        const float *dy = drop_backward(m, m->dres, NC, l, SITE_FFN);
        zero_f(m, m->dln, NC);
        if (m->E > 0) moe_backward(m, l, N, dy, scale);
        else dense_ffn_backward(m, l, N, dy);
        ops->layernorm_backward(m->dres, G(m, p->ln2_w), G(m, p->ln2_b), m->dln, a->res_mid,
                                P(m, p->ln2_w), a->ln2_mean, a->ln2_rstd, N, C);
        /* the mixer's input, for its weight gradients or adapters (a quadconv's always) */
        if (!whole && (!m->frozen || p->qc_w >= 0 || (m->lora && qs_lora_adapts(m->lora, l, QS_LORA_SITE_QKV))))
            ops->layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, m->res[l], P(m, p->ln1_w), P(m, p->ln1_b), N,
                                   C);
        /* attention branch; dres then becomes the gradient at res[l] */
        dy = drop_backward(m, m->dres, NC, l, SITE_ATTN);
        zero_f(m, m->datty, NC);
        ops->matmul_backward(m->datty, G(m, p->proj_w), G(m, p->proj_b), dy, a->atty,
                             P(m, p->proj_w), N, C, C, QS_W_IN_OUT);
        lora_backward(m, l, QS_LORA_SITE_PROJ, 0, 0, N, m->datty, dy, a->atty);
        zero_f(m, m->dln, NC);
        if (p->qc_w >= 0) {
            qs_conv_shape s = mixer_shape(m, B, T);
            ops->quadconv_backward(m->dln, G(m, p->qc_w), G(m, p->qc_b), m->datty, a->ln1, P(m, p->qc_w), a->fa,
                                   a->fb, &s);
        } else {
            zero_f(m, m->dqkv, (size_t)N * m->Wqkv);
            if (m->ring && !m->failed)
                m->failed = qs_ring_attention_backward(m->ring, m->dqkv, m->datty, a->qkv, a->atty, a->lse) != 0;
            else if (!m->ring)
                whole_attention_backward(m, a, B, T);
            ops->matmul_backward(m->dln, G(m, p->qkv_w), G(m, p->qkv_b), m->dqkv, a->ln1, P(m, p->qkv_w), N, C,
                                 m->Wqkv, QS_W_IN_OUT);
            lora_backward(m, l, QS_LORA_SITE_QKV, 0, 0, N, m->dln, m->dqkv, a->ln1);
        }
        ops->layernorm_backward(m->dres, G(m, p->ln1_w), G(m, p->ln1_b), m->dln, m->res[l],
                                P(m, p->ln1_w), a->ln1_mean, a->ln1_rstd, N, C);
        qs_params_grads_ready(&m->ps, p->ln1_w);
    }
    if (!m->ps.grad) return 0; /* a frozen base: no embedding gradients to take */
    const float *demb = drop_backward(m, m->dres, NC, m->L, SITE_EMBED);
    ops->embed_backward(G(m, m->wte), G(m, m->wpe), demb, m->tok, m->pos, B * T, C);
    qs_params_grads_ready(&m->ps, m->wte);
    return 0;
}

/* The op interface. Model code is written once against qs_ops; each backend
 * (CPU reference in csrc/cpu, CUDA in kernels/) fills the table.
 *
 * Conventions
 * - Pointers are backend memory (host for CPU, device for CUDA), fp32, row-major.
 * - Every backward ACCUMULATES (+=) into its gradient outputs, parameter and
 *   activation gradients alike; callers zero them. A NULL gradient output is skipped.
 * - Randomness (dropout, router noise) is counter-based: the same (seed, stream)
 *   reproduces the same mask/noise in forward and backward, nothing is stored. Row r of
 *   an [N, W] tensor is global row row_ids[r] (backend memory; NULL: r), and element
 *   (r, c) draws counter row_ids[r] * W + c (qs_rng_counter), so a token's mask is the
 *   same whichever rank, micro-batch or sequence block holds it.
 * - Matrix weights use the [in, out] layout (Hugging Face GPT-2's Conv1D), so
 *   y = x @ W + b. QS_W_OUT_IN selects [out, in] (nn.Linear, tied lm head).
 */
#ifndef QUASAR_OPS_H
#define QUASAR_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "quasar/hostdev.h"

typedef enum { QS_W_IN_OUT = 0, QS_W_OUT_IN = 1 } qs_weight_layout;

/* A bf16-packed weight (matmul_pack_bf16): column panels of this width, each its n_in
 * rows in order: element (i, j) at ((j / 32) * n_in + i) * 32 + j % 32. */
#define QS_BF16_PANEL 32
static inline size_t qs_bf16_packed_elems(int n_in, int n_out) {
    return (size_t)n_in * (size_t)((n_out + QS_BF16_PANEL - 1) / QS_BF16_PANEL) * QS_BF16_PANEL;
}

/* A stride-1 depthwise convolution over channels-last x [B,H,W,C] whose output has the
 * input's size: tap (i, j) of a KH x KW filter reads x[b, h+i-pad_top, w+j-pad_left, c]
 * (zero outside the image). "Same" 2D: KH = KW = k odd, pad_top = pad_left = k/2.
 * Causal 1D over a sequence of W = T steps: H = 1, KH = 1, KW = k, pad_left = k-1. */
typedef struct qs_conv_shape {
    int B, H, W, C, KH, KW, pad_top, pad_left;
} qs_conv_shape;

/* One block of blockwise attention, the form of every attention in the engine (a whole
 * sequence is one block of itself; ring attention merges many): Tq query rows of each
 * of B sequences against Tk key/value rows, both cut out of longer buffers. Row t of
 * sequence b of the block lies (b * q_len + t) rows past the q pointer given (row stride
 * q_stride; dq alike), (b * q_len + t) * C floats past out / dout, and its head-h
 * statistic (b * NH + h) * q_len + t past lse / delta; key row j lies (b * kv_len + j)
 * rows of kv_stride past kv (dkv alike), k in its columns [0, Ckv) and v in [Ckv, 2Ckv).
 * So q can point into the model's qkv [B,T,C+2Ckv] (stride C + 2Ckv) with kv at its
 * column C, or kv at a packed [B,Tk,2Ckv] block that travels around a ring (stride
 * 2Ckv). Query head h uses columns [h*hs, (h+1)*hs) of q, hs = C / NH, and reads key /
 * value head h / (NH / NKV) (grouped-query attention: NKV divides NH; NKV = NH is plain
 * multi-head), whose columns in k and v are [g*hs, (g+1)*hs); Ckv = NKV * hs. Scores are
 * scaled by 1/sqrt(hs). */
typedef struct qs_attn_block {
    int B, C, NH, NKV;
    int Tq, Tk;              /* query and key/value rows of the block */
    int q_len, kv_len;       /* rows per sequence of the buffers it is cut from */
    int q_stride, kv_stride; /* floats from one row of q (dq) / kv (dkv) to the next */
    int q_pos0, k_pos0;      /* global positions of query row 0 and key row 0 */
    int causal;              /* 1: key j is visible to query i iff k_pos0 + j <= q_pos0 + i */
} qs_attn_block;

/* The width of the block's k (and of its v): NKV heads of C / NH. */
static inline QS_HD int qs_attn_kv_width(const qs_attn_block *k) { return k->C / k->NH * k->NKV; }

/* B sequences of T rows of a qkv [B,T,C+2Ckv] buffer, each attending to itself: the
 * block the model's attention is (q at qkv, kv at qkv + C, both stride C + 2Ckv). */
static inline qs_attn_block qs_attn_block_self(int B, int T, int C, int NH, int NKV, int causal) {
    const int stride = C + 2 * (C / NH) * NKV;
    return (qs_attn_block){.B = B, .C = C, .NH = NH, .NKV = NKV, .Tq = T, .Tk = T, .q_len = T, .kv_len = T,
                           .q_stride = stride, .kv_stride = stride, .q_pos0 = 0, .k_pos0 = 0, .causal = causal};
}

/* The keys query row i of the block sees: a prefix of them, as positions rise with i. */
static inline QS_HD int qs_attn_visible_keys(const qs_attn_block *k, int i) {
    if (!k->causal) return k->Tk;
    const long long n = (long long)k->q_pos0 + i - k->k_pos0 + 1;
    return n < 0 ? 0 : n > k->Tk ? k->Tk : (int)n;
}

/* A sparse MoE router's sizes: N tokens over E experts, top-K; at most `capacity`
 * assignments per expert (<= 0: dropless); router noise drawn from (seed, stream) at
 * counter row_ids[n] * E + e (backend memory; NULL: n), as ops draw all randomness. */
typedef struct qs_moe_router {
    int N, E, K, capacity;
    uint64_t seed, stream;
    const int64_t *row_ids;
} qs_moe_router;

/* What routing tells the host (HOST memory; arrays of E, offsets E + 1): see
 * moe_route_forward. */
typedef struct qs_moe_load {
    int *routed, *counts, *offsets;
    int dropped;
    float balance, z;
} qs_moe_load;

typedef struct qs_ops {
    /* out[r,:] = wte[tok[r],:] + wpe[pos[r],:] over N rows: each row's token (in [0, V))
     * and position (a prefill's 0..T-1 per sequence, a decode step's own position, a
     * sequence-parallel rank's block positions). Backward scatters into both tables. */
    void (*embed_forward)(float *out, const int *tok, const int *pos, const float *wte,
                          const float *wpe, int N, int C);
    void (*embed_backward)(float *dwte, float *dwpe, const float *dout, const int *tok,
                           const int *pos, int N, int C);

    /* LayerNorm over the last dim (eps 1e-5); saves mean[N], rstd[N]. */
    void (*layernorm_forward)(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C);
    void (*layernorm_backward)(float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *mean,
                               const float *rstd, int N, int C);
    /* The residual add fused with the LayerNorm that reads its sum: res = inp + branch
     * (res may alias inp), then out = LayerNorm(res), the same bits as layernorm_forward
     * of the sum, with one pass less over memory than adding first. Its backward is
     * layernorm_backward into the residual's gradient (the add passes it through). */
    void (*residual_layernorm_forward)(float *res, float *out, float *mean, float *rstd,
                                       const float *inp, const float *branch, const float *w,
                                       const float *b, int N, int C);

    /* out[N,n_out] = inp[N,n_in] @ W + bias (bias may be NULL). W is [n_in,n_out] or
     * [n_out,n_in]. */
    void (*matmul_forward)(float *out, const float *inp, const float *w, const float *bias,
                           int N, int n_in, int n_out, qs_weight_layout layout);
    void (*matmul_backward)(float *dinp, float *dw, float *dbias, const float *dout,
                            const float *inp, const float *w, int N, int n_in, int n_out,
                            qs_weight_layout layout);
    /* Grouped linear layers (an MoE layer's experts over their packed rows): rows
     * offsets[g] .. offsets[g+1]-1 of inp [rows, n_in] go through group g's weight and
     * bias, out = inp @ w[g] + bias[g], with w [groups][n_in][n_out] and bias
     * [groups][n_out] (NULL: none). offsets [groups+1] is HOST memory (moe_route_forward
     * returns it); a group may be empty. Backward accumulates dinp, dw[g], dbias[g] as
     * matmul_backward does for each group (NULL outputs skipped). */
    void (*matmul_grouped_forward)(float *out, const float *inp, const float *w, const float *bias,
                                   const int *offsets, int groups, int n_in, int n_out);
    void (*matmul_grouped_backward)(float *dinp, float *dw, float *dbias, const float *dout,
                                    const float *inp, const float *w, const int *offsets,
                                    int groups, int n_in, int n_out);
    /* A linear layer with GELU after it, pre = inp @ W + bias and out = gelu(pre) (both
     * [N,n_out]; the CUDA backend fuses them into the GEMM's epilogue). Its partner,
     * matmul_backward_dgelu, is the backward of the next layer, y = gelu(pre) @ W + bias
     * with act = gelu(pre) its input [N,n_in]: dw and dbias accumulate as in
     * matmul_backward, and the input gradient goes on through the GELU,
     * dpre = gelu'(pre) * (dout @ W^T), which is written, not added. */
    void (*matmul_gelu_forward)(float *pre, float *out, const float *inp, const float *w, const float *bias,
                                int N, int n_in, int n_out, qs_weight_layout layout);
    void (*matmul_backward_dgelu)(float *dpre, float *dw, float *dbias, const float *dout, const float *act,
                                  const float *pre, const float *w, int N, int n_in, int n_out,
                                  qs_weight_layout layout);
    /* out[N,n_out] += alpha * inp[N,n_in] @ W, W laid out as for matmul_forward: a GEMM
     * with beta = 1 (LoRA's low-rank path adds into the base layer's output with it). */
    void (*matmul_acc)(float *out, const float *inp, const float *w, float alpha, int N, int n_in,
                       int n_out, qs_weight_layout layout);
    /* Inference from bf16 weights, half the bytes a decode step streams. matmul_pack_bf16
     * rounds W (laid out as for matmul_forward) to bf16, nearest even, into dst in panels
     * of QS_BF16_PANEL columns (qs_bf16_packed_elems; the last panel padded with zeros);
     * matmul_forward_bf16 is matmul_forward from such a weight, products and sums in fp32.
     * NULL on a backend without them. */
    void (*matmul_pack_bf16)(uint16_t *dst, const float *w, int n_in, int n_out, qs_weight_layout layout);
    void (*matmul_forward_bf16)(float *out, const float *inp, const uint16_t *w, const float *bias, int N,
                                int n_in, int n_out);

    /* Blockwise attention over a qs_attn_block (layouts there). attention_block_forward
     * writes the block-normalised output out [B,Tq,C] and lse [B,NH,Tq], the natural log
     * of the sum of exp(scaled score) over the keys each query sees; a query that sees
     * none gets out = 0, lse = -inf. attention_merge folds a block's (out_b, lse_b) into
     * a running (out, lse) over the same query rows, in place: lse' = logaddexp(lse,
     * lse_b), out' = out exp(lse - lse') + out_b exp(lse_b - lse'); a -inf side adds
     * nothing (both -inf leaves the row as it is). Merging every key block's result gives
     * attention over all of them, with memory linear in the block sizes. */
    void (*attention_block_forward)(float *out, float *lse, const float *q, const float *kv,
                                    const qs_attn_block *blk);
    void (*attention_merge)(float *out, float *lse, const float *out_b, const float *lse_b,
                            const qs_attn_block *blk);
    /* delta[B,NH,T] = the per-head row sums of dout * out over [B,T,C], out the final
     * (merged) output: the softmax backward's row term, computed once for all blocks. */
    void (*attention_delta)(float *delta, const float *dout, const float *out, int B, int T,
                            int C, int NH);
    /* One block's share of the attention backward, given dout and the FINAL lse and delta:
     * P = exp(S - lse) over the visible keys (S the scaled scores), dv += P^T dout,
     * dS = P * (dout V^T - delta), dq += scale dS K, dk += scale dS^T Q. dq has q's layout,
     * dkv kv's. Summed over the key blocks it is the whole attention's backward. */
    void (*attention_block_backward)(float *dq, float *dkv, const float *dout, const float *q,
                                     const float *kv, const float *lse, const float *delta,
                                     const qs_attn_block *blk);
    /* kv [B,T,2Ckv] = the k and v columns of qkv [B,T,C+2Ckv] (a block to send around a
     * ring); backward: dqkv's k and v columns += dkv. */
    void (*kv_pack_forward)(float *kv, const float *qkv, int B, int T, int C, int Ckv);
    void (*kv_pack_backward)(float *dqkv, const float *dkv, int B, int T, int C, int Ckv);

    /* KV cache for decoding, caches [slots,NKV,max_T,hs] (the K/V heads only, as
     * qs_attn_block). kv_cache_fill copies the k and v of qkv [B,T,C+2Ckv] (a prefill's)
     * into positions 0..T-1 of slots 0..B-1. For each row b of qkv [B,C+2Ckv],
     * attention_decode appends its new token's k, v at position pos[b] of slot slots[b]
     * and writes out[b,:], its causal attention over positions 0..pos[b] of that slot
     * (same scale and head layout as qs_attn_block; slots distinct). */
    void (*kv_cache_fill)(float *kcache, float *vcache, const float *qkv, int B, int T, int C, int NH,
                          int NKV, int max_T);
    void (*attention_decode)(float *out, float *kcache, float *vcache, const float *qkv, int B, int C,
                             int NH, int NKV, const int *slots, const int *pos, int max_T);

    /* GELU (tanh approximation, as GPT-2) and ReLU, elementwise over n. */
    void (*gelu_forward)(float *out, const float *inp, size_t n);
    void (*gelu_backward)(float *dinp, const float *inp, const float *dout, size_t n);
    void (*relu_forward)(float *out, const float *inp, size_t n);
    void (*relu_backward)(float *dinp, const float *inp, const float *dout, size_t n);

    /* Inverted dropout with drop probability p over [N, W]: element (r, c) is kept iff
     * qs_rng_uniform(seed, stream, its counter) >= p, and kept values are scaled by
     * 1/(1-p). out may alias inp; backward applies the same mask and scale. p == 0 copies. */
    void (*dropout_forward)(float *out, const float *inp, float p, uint64_t seed,
                            uint64_t stream, const int64_t *row_ids, size_t N, size_t W);
    void (*dropout_backward)(float *dinp, const float *dout, float p, uint64_t seed,
                             uint64_t stream, const int64_t *row_ids, size_t N, size_t W);

    /* Fused softmax + cross-entropy over rows of logits [N,V].
     * losses[n] = -log softmax(logits[n])[targets[n]]; a negative target is ignored
     * (loss 0, no gradient). Backward takes the forward's losses of the same logits, so
     * the softmax is one pass: a row's log-sum-exp is its loss plus its target's logit,
     * softmax(x)[v] = exp((x[v] - x[t]) - loss). It REPLACES the logits by their
     * gradient, logits[n,:] = dloss * (softmax(logits[n]) - onehot(targets[n])) (0 for an
     * ignored row): the one op that does not accumulate, because the logits ([N,V], the
     * largest activation of a language model) have no use after it, so their gradient
     * needs no buffer of its own. */
    void (*xent_forward)(float *losses, const float *logits, const int *targets, int N, int V);
    void (*xent_backward)(float *logits, const float *losses, const int *targets, float dloss, int N, int V);

    /* The router of a sparse MoE layer, from its logits [N,E] to packed rows, in one op
     * so that a backend can fuse it (r: sizes, capacity and the noise's draws).
     *   Routing logits: with noise_logits (noisy top-k gating, Shazeer et al.)
     *     h = clean + z * softplus(noise_logits), z = qs_rng_normal(seed, stream,
     *     counter) per element, written to h; without (NULL), h is left alone and the
     *     routing logits are clean.
     *   idx[N,K]:  the K largest routing logits per token in descending order (ties:
     *     lower index first; quasar/topk.h); gate[N,K] the softmax over those K only.
     *   Capacity, in token order: for n = 0..N-1, k = 0..K-1, expert e = idx[n*K+k]
     *     takes the assignment if fewer than r->capacity already went to it, else it is
     *     dropped (capacity <= 0: dropless). slot[N*K] is each assignment's packed row,
     *     or -1 if dropped; the rows of expert e are load->offsets[e] .. offsets[e+1]-1,
     *     in token order.
     *   *load (HOST memory, the sizes of the expert GEMMs): routed[E] assignments before
     *     dropping, counts[E] kept, offsets[E+1] their prefix sum, the number dropped,
     *     and the regularizers over the routing logits x:
     *       balance = E * sum_i f_i * P_i, f_i = routed[i] / (N*K), P_i = mean_n softmax(x[n])_i
     *       z       = mean_n logsumexp(x[n])^2.
     * Backward, with f a constant and x the routing logits (h or clean), accumulates the
     * gradient at x, dx = d(sum dgate . gate) + balance_coef d(balance) + z_coef d(z),
     * into dclean, and dx * z * sigmoid(noise_logits) into dnoise (noisy gating only). */
    void (*moe_route_forward)(qs_moe_load *load, int *idx, float *gate, int *slot, float *h,
                              const float *clean, const float *noise_logits, const qs_moe_router *r);
    void (*moe_route_backward)(float *dclean, float *dnoise, const float *dgate, const int *idx,
                               const float *gate, const float *x, const float *noise_logits,
                               const qs_moe_load *load, float balance_coef, float z_coef,
                               const qs_moe_router *r);

    /* Packed expert input: xe[slot[n*K+k], :] = x[n, :] for kept assignments.
     * Backward: dx[n,:] += dxe[slot[n*K+k],:]. */
    void (*moe_dispatch_forward)(float *xe, const float *x, const int *slot, int N, int K,
                                 int C);
    void (*moe_dispatch_backward)(float *dx, const float *dxe, const int *slot, int N, int K,
                                  int C);
    /* y[n,:] = sum over kept k of gate[n*K+k] * ye[slot[n*K+k], :] (overwrites y;
     * a token with every assignment dropped gets 0). Backward accumulates
     * dye[slot,:] += gate * dy[n,:] and dgate[n*K+k] += dot(dy[n,:], ye[slot,:]). */
    void (*moe_combine_forward)(float *y, const float *ye, const float *gate, const int *slot,
                                int N, int K, int C);
    void (*moe_combine_backward)(float *dye, float *dgate, const float *dy, const float *ye,
                                 const float *gate, const int *slot, int N, int K, int C);

    /* Quadratic depthwise convolution (QuadraNet): y = fa * fb + fc with
     * f_i = W_i * x + b_i, the three filters w [3][KH][KW][C] and biases bias [3][C].
     * Saves the two factors fa, fb [B,H,W,C] (all the backward needs besides x).
     * Backward accumulates dx, dw [3][KH][KW][C], dbias [3][C]. */
    void (*quadconv_forward)(float *y, float *fa, float *fb, const float *x, const float *w,
                             const float *bias, const qs_conv_shape *s);
    void (*quadconv_backward)(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                              const float *w, const float *fa, const float *fb,
                              const qs_conv_shape *s);

    /* Patches of p x p pixels as channels: out [B,H/p,W/p,p*p*C] with
     * out[b,i,j,(di*p+dj)*C+c] = inp[b,i*p+di,j*p+dj,c] (H, W divisible by p). A matmul
     * after it is a p x p stride-p convolution. Backward accumulates dinp. */
    void (*space_to_depth_forward)(float *out, const float *inp, int B, int H, int W, int C, int p);
    void (*space_to_depth_backward)(float *dinp, const float *dout, int B, int H, int W, int C,
                                    int p);

    /* Mean over the N positions of inp [B,N,C] -> out [B,C]; backward accumulates. */
    void (*avgpool_forward)(float *out, const float *inp, int B, int N, int C);
    void (*avgpool_backward)(float *dinp, const float *dout, int B, int N, int C);

    /* Residual branch with layer scale and stochastic depth:
     *   out[b,n,c] = resid[b,n,c] + gamma[c] * keep_b * inp[b,n,c]
     * keep_b = (qs_rng_uniform(seed, stream, sample0 + b) >= p) / (1 - p) drops sample b's whole
     * branch (p = 0: keep all). out may alias resid. The residual's gradient is dout
     * itself; backward accumulates dinp and dgamma. */
    void (*layer_scale_forward)(float *out, const float *resid, const float *inp, const float *gamma,
                                float p, uint64_t seed, uint64_t stream, uint64_t sample0, int B,
                                int N, int C);
    void (*layer_scale_backward)(float *dinp, float *dgamma, const float *dout, const float *inp,
                                 const float *gamma, float p, uint64_t seed, uint64_t stream,
                                 uint64_t sample0, int B, int N, int C);

    /* Sum of squares of g[0..n), accumulated in double. */
    double (*sumsq)(const float *g, size_t n);
    /* AdamW on one tensor (PyTorch semantics, bias-corrected, decoupled decay):
     *   g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
     *   p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), step t >= 1. */
    void (*adamw_update)(float *p, const float *grad, float *m, float *v, size_t n, float lr,
                         float beta1, float beta2, float eps, float wd, int t, float grad_scale);
} qs_ops;

#endif

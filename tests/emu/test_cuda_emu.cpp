/* The CUDA attention kernels (kernels/attention_block.cu: the fused forward, the dq and
 * dk/dv backward kernels, merge, delta, K/V packing) run on the CPU under
 * tests/emu/cuda_emu.h and are compared with the CPU backend's ops on the same inputs:
 * every tile width (head sizes up to 32, 64, 128, 256), sequences of one token and off
 * every tile, blocks whose early queries see no key, packed and in-place K/V, causal and
 * not, gradients accumulated onto random values, and NULL gradient outputs. Inputs,
 * shapes and the emulator's thread order are fresh each run (the seed is printed;
 * QS_TEST_SEED replays a failure). A pass says the kernels' indexing, masking and
 * synchronisation are right; their speed, and the device's own rounding, wait for
 * `make test-gpu` on a GPU. */
#include "cuda_emu.h"

#include "../../kernels/attention_block.cu"

extern "C" {
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "quasar/backend.h"
}
#include "../test_seed.h"

static const qs_ops *cpu;
static uint64_t seed, draws;

static float uni(float lo, float hi) { return lo + (hi - lo) * qs_rng_uniform(seed, 0xe4u, draws++); }
static int irand(int lo, int hi) { return lo + (int)qs_rng_below(seed, 0xe4u, draws++, (uint64_t)(hi - lo + 1)); }

/* One array twice: [0] for the CPU ops, [1] for the emulated kernels. */
struct pair {
    std::vector<float> v[2];
    explicit pair(size_t n, float lo, float hi) {
        v[0].resize(n);
        for (size_t i = 0; i < n; i++) v[0][i] = uni(lo, hi);
        v[1] = v[0];
    }
    float *at(int s) { return v[s].data(); }
};

/* The parity harness's measure: |emu - cpu| over max(|cpu|, rms(cpu)) <= tol; infinities
 * and NaN must match exactly. */
static void expect_close(const char *what, pair &p, double tol) {
    const std::vector<float> &c = p.v[0], &g = p.v[1];
    double ss = 0.0;
    size_t finite = 0;
    for (float x : c)
        if (isfinite(x)) ss += (double)x * x, finite++;
    const double rms = finite ? sqrt(ss / (double)finite) : 0.0;
    for (size_t i = 0; i < c.size(); i++) {
        if (!isfinite(c[i]) || !isfinite(g[i])) {
            if (!(isnan(c[i]) && isnan(g[i])) && c[i] != g[i])
                fail_msg("%s[%zu]: cpu %.9g, emulated cuda %.9g", what, i, (double)c[i], (double)g[i]);
            continue;
        }
        const double ref = fabs(c[i]) > rms ? fabs(c[i]) : rms, err = fabs((double)g[i] - c[i]);
        if (err > tol * (ref > 0.0 ? ref : 1.0))
            fail_msg("%s[%zu]: cpu %.9g, emulated cuda %.9g (rms %.3g)", what, i, (double)c[i], (double)g[i], rms);
    }
}

#define RED 1e-4  /* sums over keys or head columns */
#define ELEM 1e-5 /* per element */

/* A block cut out of longer buffers, as parity.c's: `shared` puts kv at column C of q's
 * rows (a sequence's own qkv, stride 3C), else kv is a packed [., 2C] buffer. */
static void check_block(const char *label, qs_attn_block k, bool shared) {
    const size_t nq = (size_t)k.B * k.q_len * k.q_stride, nkv = (size_t)k.B * k.kv_len * k.kv_stride;
    const size_t no = (size_t)k.B * k.q_len * k.C, ns = (size_t)k.B * k.NH * k.q_len;
    const size_t kv_at = shared ? (size_t)k.C : 0;
    pair q(nq, -1.5f, 1.5f), kvp(shared ? 0 : nkv, -1.5f, 1.5f);
    pair out(no, NAN, NAN), lse(ns, NAN, NAN); /* untouched rows stay NaN on both sides */
    emu_set_seed(seed ^ draws++);
    for (int s = 0; s < 2; s++) {
        const float *kv = (shared ? q.at(s) : kvp.at(s)) + kv_at;
        if (s == 0) cpu->attention_block_forward(out.at(s), lse.at(s), q.at(s), kv, &k);
        else qs_cuda_attention_block_forward(out.at(s), lse.at(s), q.at(s), kv, &k);
    }
    expect_close("out", out, RED);
    expect_close("lse", lse, RED);
    int empty = 0;
    for (size_t i = 0; i < ns; i++) empty += lse.v[0][i] == -INFINITY;
    /* from here both sides start from the CPU's results */
    out.v[1] = out.v[0], lse.v[1] = lse.v[0];

    /* merge a second block's result in; some of its rows saw no key */
    pair out_b(no, -1.0f, 1.0f), lse_b(ns, -3.0f, 3.0f);
    for (size_t i = 0; i < ns; i++)
        if (i % 4 == 1) lse_b.v[0][i] = lse_b.v[1][i] = -INFINITY;
    cpu->attention_merge(out.at(0), lse.at(0), out_b.at(0), lse_b.at(0), &k);
    qs_cuda_attention_merge(out.at(1), lse.at(1), out_b.at(1), lse_b.at(1), &k);
    expect_close("merged out", out, ELEM);
    expect_close("merged lse", lse, ELEM);
    out.v[1] = out.v[0], lse.v[1] = lse.v[0];

    /* delta over the whole buffer's rows, then the backward onto random gradients */
    pair dout(no, -1.0f, 1.0f), delta(ns, NAN, NAN);
    cpu->attention_delta(delta.at(0), dout.at(0), out.at(0), k.B, k.q_len, k.C, k.NH);
    qs_cuda_attention_delta(delta.at(1), dout.at(1), out.at(1), k.B, k.q_len, k.C, k.NH);
    expect_close("delta", delta, RED);
    delta.v[1] = delta.v[0];
    for (int mode = 0; mode < 3; mode++) { /* both gradients, dq only, dkv only */
        pair dq(nq, -1.0f, 1.0f), dkv(shared ? 0 : nkv, -1.0f, 1.0f);
        for (int s = 0; s < 2; s++) {
            const float *kv = (shared ? q.at(s) : kvp.at(s)) + kv_at;
            float *g_q = mode == 2 ? NULL : dq.at(s);
            float *g_kv = mode == 1 ? NULL : (shared ? dq.at(s) : dkv.at(s)) + kv_at;
            if (s == 0)
                cpu->attention_block_backward(g_q, g_kv, dout.at(s), q.at(s), kv, lse.at(s), delta.at(s), &k);
            else
                qs_cuda_attention_block_backward(g_q, g_kv, dout.at(s), q.at(s), kv, lse.at(s), delta.at(s), &k);
        }
        static const char *const names[] = {"dq (both)", "dq (dq only)", "dq (dkv only)"};
        expect_close(names[mode], dq, RED);
        if (!shared) expect_close(mode == 0 ? "dkv (both)" : mode == 1 ? "dkv (dq only)" : "dkv (dkv only)", dkv, RED);
    }
    print_message("  %s: B=%d NH=%d hs=%d Tq=%d at %d, Tk=%d at %d%s%s: %d query rows see no key\n", label, k.B, k.NH,
                  k.C / k.NH, k.Tq, k.q_pos0, k.Tk, k.k_pos0, k.causal ? ", causal" : "",
                  shared ? ", K/V in qkv" : ", packed K/V", empty);
}

/* B sequences of T tokens attending to themselves, as the model runs it. */
static qs_attn_block whole(int B, int NH, int hs, int T) {
    const int C = NH * hs;
    return qs_attn_block{B, C, NH, T, T, T, T, 3 * C, 3 * C, 0, 0, 1};
}

/* Tq query rows at q_pos0 against Tk packed key rows at k_pos0, inside padded buffers. */
static qs_attn_block cut(int B, int NH, int hs, int Tq, int Tk, int q_pos0, int k_pos0, int causal) {
    const int C = NH * hs;
    return qs_attn_block{B, C, NH, Tq, Tk, Tq + 3, Tk + 2, 3 * C + 1, 2 * C + 3, q_pos0, k_pos0, causal};
}

static void test_whole_sequences(void **state) {
    (void)state;
    check_block("one token", whole(2, 3, 5, 1), true);
    check_block("tile width 32", whole(2, 2, 13, 37), true);
    check_block("tile width 64", whole(1, 2, 64, 50), true);
    check_block("tile width 128", whole(1, 1, 128, 34), true);
    check_block("tile width 256 (shared memory opt-in)", whole(1, 1, 200, 33), true);
    check_block("random", whole(irand(1, 2), irand(1, 3), irand(1, 70), irand(1, 40)), true);
}

static void test_blocks(void **state) {
    (void)state;
    check_block("a later query block", cut(2, 2, 64, 50, 70, 90, 40, 1), false);
    check_block("non-causal", cut(1, 2, 128, 20, 45, 0, 0, 0), false);
    check_block("keys ahead of the early queries", cut(1, 1, 96, 40, 90, 20, 30, 1), false);
    check_block("keys all in the future", cut(1, 2, 8, 5, 6, 0, 10, 1), false);
    check_block("random", cut(irand(1, 2), irand(1, 2), irand(1, 40), irand(1, 40), irand(1, 40), irand(0, 50),
                                irand(0, 50), irand(0, 1)),
                false);
}

static void test_kv_pack(void **state) {
    (void)state;
    const int B = irand(1, 3), T = irand(1, 20), C = irand(1, 24);
    pair qkv((size_t)B * T * 3 * C, -1.0f, 1.0f), kv((size_t)B * T * 2 * C, NAN, NAN);
    cpu->kv_pack_forward(kv.at(0), qkv.at(0), B, T, C);
    qs_cuda_kv_pack_forward(kv.at(1), qkv.at(1), B, T, C);
    expect_close("kv", kv, 0.0);
    pair dqkv((size_t)B * T * 3 * C, -1.0f, 1.0f);
    cpu->kv_pack_backward(dqkv.at(0), kv.at(0), B, T, C);
    qs_cuda_kv_pack_backward(dqkv.at(1), kv.at(1), B, T, C);
    expect_close("dqkv", dqkv, 0.0);
}

int main(void) {
    seed = qs_test_seed("test_cuda_emu");
    cpu = qs_backend_cpu()->ops;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_whole_sequences),
        cmocka_unit_test(test_blocks),
        cmocka_unit_test(test_kv_pack),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

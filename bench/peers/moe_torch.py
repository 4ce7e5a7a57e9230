"""PyTorch peer of `quasar bench moe`: makeMoE's sparse MoE layer (gpt_torch.SparseMoE:
a top-k router, a softmax over the kept logits, and a Python loop over the experts, each
taking its tokens by a boolean mask) forward + backward, beside a dense FFN of the same
active FLOPs (Linear-GELU(tanh)-Linear, hidden K F), both timed the same way as Quasar's.

  python3 bench/peers/moe_torch.py [--shape a|b] [--tokens N] [--embd C] [--ffn F]
                                   [--experts E] [--top-k K] [--repeats N]
                                   [--device cpu|cuda] [--dtype fp32|bf16] [--threads N]

The shapes and their defaults are Quasar's (csrc/bench.c, bench_moe): shape a is E=8
experts top-2 with F=4C, shape b E=64 top-8 with F=C; N x C is 16384 x 768 on a GPU and
2048 x 384 on the CPU. Inputs x ~ N(0, 1) and dy ~ N(0, 1); the backward is that of
sum(y * dy) + 0.01 x the balance loss (Quasar's layer adds the same), and it produces
the input's gradient as Quasar's does. Gradients accumulate over the repeats, as
Quasar's. Prints one JSON record (common.py) whose result names are Quasar's."""
import argparse
import sys
import time

import torch

import common
from gpt_torch import MLP, SparseMoE

BALANCE_COEF = 0.01  # csrc/bench_moe.c


def shape(a, dev):
    fine = a.shape == "b"
    N = a.tokens or (16384 if dev.type == "cuda" else 2048)
    C = a.embd or (768 if dev.type == "cuda" else 384)
    E = a.experts or (64 if fine else 8)
    K = a.top_k or (8 if fine else 2)
    F = a.ffn or (C if fine else 4 * C)
    if K > E:
        sys.exit("error: --top-k must be <= --experts")
    return N, C, F, E, K


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["a", "b"], default="a")
    for flag in ["--tokens", "--embd", "--ffn", "--experts", "--top-k"]:
        ap.add_argument(flag, type=int, default=0)
    ap.add_argument("--repeats", type=int, default=20, help="timed layers (default 20, as quasar bench moe)")
    common.add_common_args(ap)
    a = ap.parse_args()
    if a.repeats < 1 or min(a.tokens, a.embd, a.ffn, a.experts, a.top_k) < 0:
        ap.error("--repeats must be positive and the sizes not negative (0: the shape's default)")
    dev, dtype, threads = common.setup(a)
    N, C, F, E, K = shape(a, dev)
    ceiling = common.gemm_ceiling(dev, dtype)
    m = {"n_embd": C, "bias": True, "activation": "gelu", "ffn_mult": 4,
         "moe": {"n_experts": E, "top_k": K, "gating": "topk", "capacity_factor": 0.0,
                 "aux_loss_coef": BALANCE_COEF, "z_loss_coef": 0.0}}
    torch.manual_seed(1337)
    moe = SparseMoE(m, F).to(dev).train()
    dense = MLP(m, K * F).to(dev).train()
    x = torch.randn(N, C, device=dev).requires_grad_(True)
    dy = torch.randn(N, C, device=dev)
    coef = torch.tensor(BALANCE_COEF, device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def moe_fwd_bwd():
        with autocast:
            y = moe(x)
        torch.autograd.backward([y, moe.aux_loss], [dy.to(y.dtype), coef])

    def dense_fwd_bwd():
        with autocast:
            y = dense(x)
        y.backward(dy.to(y.dtype))

    def timed(run):
        common.sync(dev)
        t0 = time.perf_counter()
        run()
        common.sync(dev)
        return 1e3 * (time.perf_counter() - t0)

    for _ in range(2):  # warm-up, as Quasar's
        timed(moe_fwd_bwd)
        timed(dense_fwd_bwd)
    layer, dense_ms = [], []
    for _ in range(a.repeats):
        layer.append(timed(moe_fwd_bwd))
        dense_ms.append(timed(dense_fwd_bwd))
    sl, sd = common.stats(layer), common.stats(dense_ms)
    with torch.no_grad():
        rows = torch.bincount(moe.route(x).topk(K, dim=-1).indices.flatten(), minlength=E).tolist()
    gd = 12.0 * N * K * F * C / (sd["median"] / 1e3)
    sh = f"N={N} C={C} F={F} E={E} top-{K}, dropless"
    results = [
        ("moe_layer_fwd_bwd_ms", f"MoE layer forward + backward, ms per call, median of {a.repeats} ({sh}; "
                                 f"p10 {sl['p10']:.4f}, p90 {sl['p90']:.4f})", sl["median"]),
        ("moe_ffn_dense_fwd_bwd_ms", f"dense FFN of the same active FLOPs (hidden {K * F}), forward + backward, ms, "
                                     f"median of {a.repeats} (p10 {sd['p10']:.4f}, p90 {sd['p90']:.4f})", sd["median"]),
        ("moe_layer_over_dense", "MoE layer ms / dense FFN ms", sl["median"] / sd["median"]),
        ("moe_layer_tokens_per_s", f"tokens through the MoE layer's forward + backward per second ({sh})",
         N / (sl["median"] / 1e3)),
        ("moe_ffn_dense_gflop_per_s", f"the dense FFN, GFLOP/s; {gd / ceiling:.3f} of the GEMM ceiling", gd / 1e9),
    ]
    peer = f"PyTorch {torch.__version__} eager, makeMoE's expert loop, {a.dtype}"
    common.emit(common.record(
        dev, threads, peer, results, dtype=a.dtype, repeats=a.repeats,
        shape={"N": N, "C": C, "F": F, "E": E, "K": K}, expert_rows=rows,
        ceilings={"gemm": f"{common.gemm_n(dev)}^3 torch.mm {a.dtype}, best of 5",
                  "gemm_gflop_per_s": common.rnd(ceiling / 1e9)},
        layer_ms={k: round(v, 4) for k, v in sl.items()}, dense_ms={k: round(v, 4) for k, v in sd.items()}))


if __name__ == "__main__":
    main()

"""PyTorch peer of `quasar bench train` for the GPT family: the same model, batch and
optimizer step, built from the same Quasar config, timed the same way.

  python3 bench/peers/gpt_torch.py --config FILE [--steps N] [--warmup N] [--compile]
                                   [--device cpu|cuda] [--dtype fp32|bf16] [--threads N]

The model is nanoGPT's (csrc/model.c has the same): token + learned position embeddings,
pre-LayerNorm blocks x = x + drop(proj(mix(ln_1(x)))); x = x + drop(ffn(ln_2(x))),
final LayerNorm, LM head tied to the token embedding or not. mix is causal attention
through scaled_dot_product_attention(is_causal=True), or with model.mixer "quadconv" a
causal quadratic depthwise conv (one Conv1d(C, 3C, k, groups=C): y = a * b + c). ffn is
Linear-GELU(tanh)/ReLU-Linear, or with model.moe.n_experts > 0 makeMoE's sparse MoE
(github.com/AviSoori1x/makeMoE): a (noisy) top-k router whose kept logits go through a
softmax, and a Python loop over the experts, each taking the tokens routed to it by a
boolean mask; plus the Switch load-balancing loss Quasar adds (model.moe.aux_loss_coef).
Dropout where Quasar has it: embeddings, after each block's two branches.

One step, as csrc/bench.c's train_step: zero the gradients, forward + backward over the
micro-batches (random windows of the training text, as nanoGPT's get_batch; random
tokens for BPE-shard configs, which then need model.vocab_size), global gradient norm
(clipped at train.grad_clip; computed even when that is 0), AdamW with weight decay on
matrices and embeddings only (fused where torch has it, else foreach).
--compile wraps the model in torch.compile; when compiling fails the peer says so in
the record ("mode") and times eager instead. Prints one JSON record (common.py);
--profile N prints where N more steps spend their time (torch.profiler) to stderr."""
import argparse
import math
import os
import sys
import time

# On the CPU, torch.compile's workers run in this process, so that their CPU time counts
# as the peer's own and not as "others_cpu"; on a GPU, parallel compile saves minutes.
if "cuda" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        C = m["n_embd"]
        self.n_head = m["n_head"]
        self.c_attn = nn.Linear(C, 3 * C, bias=m["bias"])
        self.c_proj = nn.Linear(C, C, bias=m["bias"])

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class QuadConvMixer(nn.Module):
    """Causal quadratic depthwise conv over the sequence, then c_proj: per channel three
    k-tap filters with biases, y = (Wa*x + ba) (Wb*x + bb) + (Wc*x + bc), each output
    seeing the k - 1 tokens before it and itself (left padding)."""

    def __init__(self, m):
        super().__init__()
        C, self.k = m["n_embd"], m["quadra"]["kernel_size"]
        self.conv = nn.Conv1d(C, 3 * C, self.k, groups=C)  # output channel 3c + j: filter j of channel c
        self.c_proj = nn.Linear(C, C, bias=m["bias"])

    def forward(self, x):
        B, T, C = x.shape
        h = self.conv(F.pad(x.transpose(1, 2), (self.k - 1, 0))).view(B, C, 3, T)
        y = h[:, :, 0] * h[:, :, 1] + h[:, :, 2]
        return self.c_proj(y.transpose(1, 2))


def activation(m):
    return nn.GELU(approximate="tanh") if m["activation"] == "gelu" else nn.ReLU()


class MLP(nn.Sequential):
    def __init__(self, m, hidden=None):
        C, bias = m["n_embd"], m["bias"]
        H = hidden or m["ffn_mult"] * C
        super().__init__(nn.Linear(C, H, bias=bias), activation(m), nn.Linear(H, C, bias=bias))


class SparseMoE(nn.Module):
    """makeMoE's NoisyTopkRouter + SparseMoE, dropless (capacity_factor 0), with the
    Switch balance loss E * sum_e f_e P_e over the routing logits (Quasar's); experts of
    `hidden` width (default ffn_mult C)."""

    def __init__(self, m, hidden=None):
        super().__init__()
        moe = m["moe"]
        if moe["capacity_factor"] > 0 or moe["z_loss_coef"] > 0:
            sys.exit("error: the MoE peer is makeMoE's dropless layer: capacity_factor and z_loss_coef must be 0")
        C, E = m["n_embd"], moe["n_experts"]
        self.top_k, self.aux_coef = moe["top_k"], moe["aux_loss_coef"]
        self.route = nn.Linear(C, E)
        self.noise = nn.Linear(C, E) if moe["gating"] == "noisy_topk" else None
        self.experts = nn.ModuleList(MLP(m, hidden) for _ in range(E))
        self.aux_loss = None

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = self.route(flat)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(flat))
        top, idx = logits.topk(self.top_k, dim=-1)
        gates = F.softmax(torch.full_like(logits, float("-inf")).scatter(-1, idx, top), dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            mask = (idx == e).any(dim=-1)
            if mask.any():
                out[mask] += expert(flat[mask]) * gates[mask, e].unsqueeze(1)
        if self.aux_coef > 0 and self.training:
            E = logits.shape[-1]
            f = torch.bincount(idx.flatten(), minlength=E).to(logits.dtype) / idx.numel()
            self.aux_loss = E * (f * F.softmax(logits, dim=-1).mean(0)).sum()
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(m["n_embd"]), nn.LayerNorm(m["n_embd"])
        self.mix = QuadConvMixer(m) if m["mixer"] == "quadconv" else Attention(m)
        self.ffn = SparseMoE(m) if m["moe"]["n_experts"] > 0 else MLP(m)
        self.drop = nn.Dropout(m["dropout"])

    def forward(self, x):
        x = x + self.drop(self.mix(self.ln_1(x)))
        return x + self.drop(self.ffn(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, m):
        super().__init__()
        C, V = m["n_embd"], m["vocab_size"]
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(m["seq_len"], C)
        self.drop = nn.Dropout(m["dropout"])
        self.h = nn.ModuleList(Block(m) for _ in range(m["n_layer"]))
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        if m["tie_embeddings"]:
            self.lm_head.weight = self.wte.weight
        if m["init"] == "normal":  # else PyTorch's own (Kaiming-uniform) init
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    nn.init.normal_(p, 0.0, m["init_std"])
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
        self.moe_coef = m["moe"]["aux_loss_coef"] if m["moe"]["n_experts"] > 0 else 0.0

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for b in self.h:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))
        if self.moe_coef > 0:
            loss = loss + self.moe_coef * sum(b.ffn.aux_loss for b in self.h)
        return loss


def adamw(model, t):
    """AdamW over two groups, as csrc/optim.c decays: matrices and embeddings (dim >= 2)
    or everything with train.decay_all. Fused when torch offers it on this device."""
    ps = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in ps if t["decay_all"] or p.dim() >= 2]
    rest = [p for p in ps if not (t["decay_all"] or p.dim() >= 2)]
    groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    kw = dict(lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"])
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20, as quasar bench train)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, N more steps under torch.profiler: its top ops to stderr")
    common.add_common_args(ap)
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    dev, dtype, threads = common.setup(a)
    cfg = common.load_config(a.config)
    m, t = cfg["model"], cfg["train"]
    if m["type"] != "gpt":
        sys.exit(f"error: {a.config}: model.type {m['type']!r}; this peer builds GPTs")
    rss_floor = common.rss_now_mib()  # the interpreter and torch, before the data and the model
    data, m["vocab_size"] = common.corpus(cfg)
    ceiling = common.gemm_ceiling(dev, dtype)
    mem_reset = common.reset_peak_memory(dev)

    torch.manual_seed(t["seed"])
    model = GPT(m).to(dev)
    opt, opt_kind = adamw(model, t)
    run, mode = model, "eager"
    if a.compile:
        run, mode = torch.compile(model), "torch.compile (default mode)"
    B = t["batch_size"]
    micro = t["micro_batch_size"] or B
    accum, T = B // micro, m["seq_len"]
    clip = t["grad_clip"] if t["grad_clip"] > 0 else math.inf  # the norm is taken either way
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def batch():
        """micro windows of T + 1 tokens: inputs and their next tokens"""
        if data is None:
            w = torch.randint(m["vocab_size"], (micro, T + 1))
        else:
            w = torch.stack([data[i:i + T + 1] for i in torch.randint(len(data) - T, (micro,))])
        w = w.to(dev, non_blocking=True)
        return w[:, :-1], w[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            x, y = batch()
            with autocast:
                loss = run(x, y) / accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        opt.step()
        return total

    def first_step():  # compiles under --compile; a compiler failure falls back to eager
        nonlocal run, mode, compile_error
        try:
            return step()
        except Exception as e:  # noqa: BLE001 -- whatever the compiler raised: say so, time eager
            if run is model:
                raise
            compile_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            print(f"gpt_torch: torch.compile failed ({compile_error}); timing eager", file=sys.stderr)
            run, mode = model, "eager (torch.compile failed)"
            return step()

    model.train()
    compile_error, ms = None, []
    for s in range(a.warmup + a.steps):
        common.sync(dev)
        t0 = time.perf_counter()
        loss = first_step() if s == 0 else step()
        common.sync(dev)
        if s >= a.warmup:
            ms.append(1e3 * (time.perf_counter() - t0))
        if s == 0:
            loss0 = float(loss)
    loss1 = float(loss)
    if a.profile:
        with torch.profiler.profile() as prof:
            for _ in range(a.profile):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    st = common.stats(ms)
    tokens = B * T
    flops_tok = common.flops_per_token(m)
    per_s = tokens / (st["median"] / 1e3)
    flop_s = flops_tok * per_s
    n_params = sum(p.numel() for p in model.parameters())
    peer = (f"PyTorch {torch.__version__} {mode}, SDPA, AdamW {opt_kind}, {a.dtype}"
            + (", makeMoE layer" if m["moe"]["n_experts"] else "")
            + (", Conv1d quadconv mixer" if m["mixer"] == "quadconv" else ""))
    mem_name, mem_metric = (("train_peak_rss_mib", "peak resident memory, MiB (getrusage max RSS, the "
                             "interpreter and torch's libraries included)") if dev.type == "cpu" else
                            ("train_peak_gpu_mem_mib", "peak GPU memory, MiB (torch.cuda.max_memory_allocated)"))
    results = [
        ("train_tokens_per_s", f"training tokens/s at the median step time (batch {B})", per_s),
        ("train_ms_per_step", f"ms per optimizer step, median of {a.steps} (p10 {st['p10']:.2f}, p90 {st['p90']:.2f}, "
                              f"min {st['min']:.2f}, max {st['max']:.2f})", st["median"]),
        ("train_gflop_per_s", f"model GFLOP/s ({flops_tok:.6g} FLOP per token, csrc/bench.c's formula)", flop_s / 1e9),
        ("train_mfu", f"MFU: model FLOP/s over the measured {common.gemm_n(dev)}^3 torch.mm ceiling "
                      f"({ceiling / 1e9:.1f} GFLOP/s)",
         flop_s / ceiling),
        (mem_name, mem_metric, common.peak_memory_mib(dev)),
    ]
    common.emit(common.record(
        dev, threads, peer, results, mode=mode, compile_error=compile_error, optimizer=f"AdamW ({opt_kind})",
        dtype=a.dtype, ceilings={"gemm": f"{common.gemm_n(dev)}^3 torch.mm {a.dtype}, best of 5", "gemm_gflop_per_s": common.rnd(ceiling / 1e9)},
        data="random tokens" if data is None else cfg["data"]["path"],
        model={"type": "gpt", "params": n_params, "batch_size": B, "micro_batch_size": micro, "items_per_sample": T},
        steps=a.steps, warmup=a.warmup, flops_per_item=flops_tok, flops_per_step=flops_tok * tokens,
        step_ms={k: round(v, 4) for k, v in st.items()}, loss_first=common.rnd(loss0), loss_last=common.rnd(loss1),
        peak_mem_excludes_ceiling=mem_reset, rss_after_imports_mib=common.rnd(rss_floor)))


if __name__ == "__main__":
    main()

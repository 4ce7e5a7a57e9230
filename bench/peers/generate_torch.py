"""PyTorch peer of `quasar bench generate`: Hugging Face transformers' GPT2LMHeadModel
of the config's shape (random weights), `generate` with its KV cache, greedy, one
sequence; the same prompt and new-token counts and the same three figures.

  python3 bench/peers/generate_torch.py --config FILE [--prompt-tokens N] [--new-tokens N]
                                        [--repeats N] [--device cpu|cuda] [--dtype fp32|bf16]
                                        [--threads N]

GPT-2's block is Quasar's GPT (pre-LayerNorm, GELU tanh = "gelu_new", learned positions,
tied head); model.dropout is off when generating in both. As csrc/bench.c does: 1 + repeats
generations, the first untimed; prefill = the time from the call to the first new token
(prompt forward + first pick), prefill tokens/s = prompt tokens / its median; decode =
the gaps between consecutive new tokens over all runs, tokens/s = 1 / their median; peak
memory as gpt_torch.py's.
Tokens are timed as `generate` hands them to a streamer (on CUDA after a copy to the
host, so each stamp follows the GPU's work). Prints one JSON record (common.py)."""
import argparse
import sys
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.streamers import BaseStreamer

import common


class TokenClock(BaseStreamer):
    """Stamps each new token; generate's first put() is the prompt, not a token."""

    def __init__(self):
        self.stamps, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def hf_model(m, dev, dtype):
    if m["moe"]["n_experts"] or m["mixer"] != "attention" or not m["bias"]:
        sys.exit("error: the generate peer is GPT-2: dense attention models with biases only")
    hf = GPT2Config(vocab_size=m["vocab_size"], n_positions=m["seq_len"], n_embd=m["n_embd"],
                    n_layer=m["n_layer"], n_head=m["n_head"], n_inner=m["ffn_mult"] * m["n_embd"],
                    activation_function="gelu_new" if m["activation"] == "gelu" else "relu",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=m["tie_embeddings"],
                    bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = GPT2LMHeadModel(hf).to(dev, dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="default: half of model.seq_len")
    ap.add_argument("--new-tokens", type=int, default=0, help="default: the rest of model.seq_len")
    ap.add_argument("--repeats", type=int, default=5, help="timed generations after one warm-up (default 5)")
    common.add_common_args(ap)
    a = ap.parse_args()
    dev, dtype, threads = common.setup(a)
    cfg = common.load_config(a.config)
    m = cfg["model"]
    _, m["vocab_size"] = common.corpus(cfg)
    T, V = m["seq_len"], m["vocab_size"]
    P = a.prompt_tokens or max(T // 2, 1)
    n_new = a.new_tokens or T - P
    if n_new < 2 or P + n_new > T:
        sys.exit(f"error: --prompt-tokens ({P}) + --new-tokens ({n_new}) must fit model.seq_len ({T}) "
                 "with at least 2 new tokens")
    torch.manual_seed(cfg["train"]["seed"])
    common.reset_peak_memory(dev)
    model = hf_model(m, dev, dtype)
    prompt = torch.randint(V, (1, P), device=dev)
    prefill, gaps = [], []
    with torch.inference_mode():
        for r in range(a.repeats + 1):
            clock = TokenClock()
            common.sync(dev)
            t0 = time.perf_counter()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, use_cache=True, streamer=clock)
            if out.shape[1] != P + n_new or len(clock.stamps) != n_new:
                sys.exit(f"error: generate made {out.shape[1] - P} tokens ({len(clock.stamps)} stamped), not {n_new}")
            if r > 0:
                prefill.append(clock.stamps[0] - t0)
                gaps += [b - a_ for a_, b in zip(clock.stamps, clock.stamps[1:])]
    pre, dec = common.stats(prefill), common.stats(gaps)
    mem_name, mem_metric = (("generate_peak_rss_mib", "peak resident memory, MiB (getrusage max RSS, the "
                             "interpreter and torch's libraries included)") if dev.type == "cpu" else
                            ("generate_peak_gpu_mem_mib", "peak GPU memory, MiB (torch.cuda.max_memory_allocated)"))

    peer = (f"transformers {transformers.__version__} GPT2LMHeadModel.generate (KV cache, greedy, "
            f"{model.config._attn_implementation} attention), PyTorch {torch.__version__}, {a.dtype}")
    results = [
        ("generate_prefill_tokens_per_s",
         f"prefill tokens/s: a {P}-token prompt and its first new token, median of {a.repeats}", P / pre["median"]),
        ("generate_decode_tokens_per_s",
         f"decode tokens/s, one sequence, KV cache: 1 / the median gap between new tokens ({len(gaps)} gaps)",
         1.0 / dec["median"]),
        ("generate_decode_ms_per_token",
         f"ms per new token, median (p10 {dec['p10'] * 1e3:.4f}, p90 {dec['p90'] * 1e3:.4f})", dec["median"] * 1e3),
        (mem_name, mem_metric, common.peak_memory_mib(dev)),
    ]
    common.emit(common.record(
        dev, threads, peer, results, dtype=a.dtype, ceilings=None,
        model={"params": sum(p.numel() for p in model.parameters()), "seq_len": T, "vocab_size": V},
        prompt_tokens=P, new_tokens=n_new, runs=a.repeats,
        decode_ms={k: round(v * 1e3, 5) for k, v in dec.items()}))


if __name__ == "__main__":
    main()

"""What the PyTorch peers share: the command-line options every peer takes, Quasar's
config defaults, the FLOP formula, timing statistics, the ceiling, peak memory, how busy
the rest of the machine was, and the JSON record in bench/results' format
(../shared/docs/DESIGN.md: {"device", "date", "commit", "results": [{"name", "metric",
"quasar", "peer", "peer_value", "ratio"}]}).

A peer's record carries its figures under "peer_value" with "quasar" and "ratio" null,
and uses the same result names as `quasar bench`, so that bench/peers/compare.py can
pair the two by name. Each figure is measured the way csrc/bench.c measures Quasar's."""
import json
import os
import resource
import subprocess
import sys
import time

import torch

# ---- how busy the rest of the machine was (csrc/bench.c, cpu_now) ----


def cpu_ticks():
    """(busy, total) CPU ticks since boot from /proc/stat's first line, and this process's
    own user + system time in ticks (all its threads)."""
    busy = total = float("nan")
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        total = busy + v[3] + v[4]  # + idle iowait
    except (OSError, ValueError, IndexError):
        pass
    u = resource.getrusage(resource.RUSAGE_SELF)
    return busy, total, (u.ru_utime + u.ru_stime) * os.sysconf("SC_CLK_TCK")


_START = cpu_ticks()  # the peer's lifetime, as Quasar counts from the start of `bench`


def others_cpu(start=None):
    """Share of all CPU time since `start` (default: this module's import) that other
    processes took: the same figure as the "others_cpu" of Quasar's records."""
    b0, t0, s0 = start or _START
    b1, t1, s1 = cpu_ticks()
    if not t1 > t0:
        return None
    return max(0.0, (b1 - b0 - (s1 - s0)) / (t1 - t0))


def load_avg_1m():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return None


# ---- options, device, threads ----


def add_common_args(ap):
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: autocast over the model (fp32 weights and AdamW); meaningful on cuda")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default: OMP_NUM_THREADS, else all cores, as Quasar)")


def setup(a):
    """Applies --threads and returns (torch.device, torch.dtype, threads)."""
    threads = a.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count()
    torch.set_num_threads(threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    return torch.device(a.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype], threads


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def device_name(dev):
    """Quasar's spelling on the CPU: "cpu-2core (model name)"."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu-{os.cpu_count()}core ({cpu})"


# ---- Quasar's configs ----

# The defaults of the keys the peers read (csrc/config.c, the fields table); a config file
# overrides them as `quasar` would.
DEFAULTS = {
    "model": {"type": "gpt", "mixer": "attention", "vocab_size": 0, "seq_len": 64, "n_layer": 4, "n_head": 4,
              "n_embd": 128, "ffn_mult": 4, "activation": "gelu", "dropout": 0.0, "bias": True,
              "tie_embeddings": True, "init": "normal", "init_std": 0.02,
              "moe": {"n_experts": 0, "top_k": 2, "gating": "topk", "capacity_factor": 0.0,
                      "aux_loss_coef": 0.01, "z_loss_coef": 0.0},
              "quadra": {"kernel_size": 7}},
    "train": {"batch_size": 32, "micro_batch_size": 0, "lr": 1e-3, "weight_decay": 0.1, "decay_all": False,
              "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "grad_clip": 1.0, "seed": 1337},
    "data": {"path": "data/shakespeare_char/input.txt", "tokenizer": "char", "val_fraction": 0.1},
}


def _merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_config(path):
    with open(path) as f:
        return _merge(DEFAULTS, json.load(f))


def corpus(cfg):
    """The training tokens and the vocabulary size. Char-level data as Quasar's codec reads
    it: one token per distinct byte, ids in byte order, the text before the val_fraction
    tail; model.vocab_size 0 takes the vocabulary's size. Other tokenizers (GPT-2 BPE
    shards): None for the tokens, so the caller draws random ones (the timing does not
    depend on their values), and model.vocab_size must be set."""
    d, m = cfg["data"], cfg["model"]
    if d["tokenizer"] != "char":
        if not m["vocab_size"]:
            sys.exit(f"error: data.tokenizer {d['tokenizer']!r}: the peers need model.vocab_size")
        return None, m["vocab_size"]
    with open(d["path"], "rb") as f:
        raw = f.read()
    chars = sorted(set(raw))
    lut = torch.full((256,), -1, dtype=torch.long)
    lut[torch.tensor(chars)] = torch.arange(len(chars))
    ids = lut[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]
    n_train = len(ids) - int(len(ids) * d["val_fraction"])
    return ids[:n_train], m["vocab_size"] or len(chars)


def flops_per_token(m):
    """Model FLOPs of training on one token: the numerator of MFU, the formula of
    csrc/bench.c (qs_bench_train_flops_per_item) for a GPT, written out again here:
    6 N + 12 L T C (attention layers) + 18 L k C (quadconv-mixer layers), where N, the
    matrix weights a token passes through, is per layer c_attn 3C^2 (attention only),
    c_proj C^2, the feed-forward 2CF (top_k of them for MoE, plus the router CE and the
    noise projection CE when noisy), plus the LM head VC. Attention counts the full
    T x T (causal masking's saving is not credited, as in PaLM and nanoGPT)."""
    C, T, F = m["n_embd"], m["seq_len"], m["ffn_mult"] * m["n_embd"]
    moe = m["moe"]
    E = moe["n_experts"]
    layer = C * C + (moe["top_k"] if E > 0 else 1) * 2.0 * C * F
    if E > 0:
        layer += C * E * (2 if moe["gating"] == "noisy_topk" else 1)
    layer += 3.0 * m["quadra"]["kernel_size"] * C if m["mixer"] == "quadconv" else 3.0 * C * C + 2.0 * T * C
    return 6.0 * (m["n_layer"] * layer + m["vocab_size"] * C)


# ---- measurement ----


def stats(xs):
    """Median and nearest-rank p10/p90, min, max: csrc/bench.c's qs_bench_stats_of."""
    x, n = sorted(xs), len(xs)
    med = x[n // 2] if n % 2 else 0.5 * (x[n // 2 - 1] + x[n // 2])
    return {"median": med, "p10": x[int(0.1 * (n - 1) + 0.5)], "p90": x[int(0.9 * (n - 1) + 0.5)],
            "min": x[0], "max": x[-1]}


def gemm_n(dev):
    """The ceiling GEMM's size, as Quasar's (csrc/bench.c): 2048 on a CPU, 8192 on a GPU."""
    return 8192 if dev.type == "cuda" else 2048


def gemm_ceiling(dev, dtype, runs=5):
    """FLOP/s of a gemm_n(dev)^3 torch.mm in `dtype`, best of `runs` after one warm-up: the
    MFU denominator, measured in this process the way Quasar measures its own."""
    n = gemm_n(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.rand(n, n, device=dev, dtype=dtype, generator=g) - 0.5
    b = torch.rand(n, n, device=dev, dtype=dtype, generator=g) - 0.5
    best = float("inf")
    for r in range(runs + 1):
        sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(dev)
        if r > 0:
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def reset_peak_memory(dev):
    """Starts the peak count afresh so that the ceiling's buffers do not count (Quasar:
    "5" into /proc/self/clear_refs). Returns whether it could."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(dev):
    """CPU: the process's peak RSS (getrusage, as Quasar; the interpreter and torch's
    libraries included). CUDA: torch.cuda.max_memory_allocated."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_now_mib():
    """The process's resident memory now (VmRSS), MiB: with torch imported and nothing
    built yet, the floor under the peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024.0
    except (OSError, StopIteration, ValueError):
        return None


# ---- the record ----


def commit():
    r = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True)
    return r.stdout.strip() or None


def rnd(v, digits=6):
    return None if v is None else float(f"{v:.{digits}g}")


def record(dev, threads, peer, results, **fields):
    """The peer's record: DESIGN.md's head, the load, `fields`, then `results` given as
    (name, metric, value) with the value under "peer_value"."""
    out = {"device": device_name(dev), "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit(),
           "command": "python3 " + " ".join(sys.argv), "peer": peer, "torch": torch.__version__,
           "threads": threads, "load_avg_1m": load_avg_1m(), "others_cpu": rnd(others_cpu())}
    out.update(fields)
    out["results"] = [{"name": n, "metric": m, "quasar": None, "peer": peer, "peer_value": rnd(v), "ratio": None}
                      for n, m, v in results]
    return out


def emit(rec):
    json.dump(rec, sys.stdout)
    sys.stdout.write("\n")

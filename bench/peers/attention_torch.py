"""PyTorch peer of `quasar bench attention`: torch.nn.functional.scaled_dot_product_attention
(on a GPU in bf16 its FlashAttention backend, forced, so that a silent fall back to
another backend cannot pass for it), causal and not, forward and forward + backward, at
every sequence length x head size of the sweep.

  python3 bench/peers/attention_torch.py [--seq T,...] [--head-size HS,...] [--tokens N]
                                         [--width C] [--repeats N] [--backend flash|math]
                                         [--device cpu|cuda] [--dtype fp32|bf16] [--threads N]

--backend math forces SDPA's plain path, which keeps the T x T scores: the naive
attention that issue 5's 16k-token run is set against. A point that runs out of device
memory gets null figures and its place in "out_of_memory"; each point's peak device
memory (torch.cuda.max_memory_allocated over its calls) is in "points".

The sweep and its defaults are Quasar's (csrc/bench.c, bench_attention): N tokens in all,
B = N / T sequences (at least 1) of C / HS heads; q, k, v [B, heads, T, HS] ~ N(0, 1) in
--dtype, dout too. The FLOP count is Quasar's (FlashAttention's): the forward
4 B NH T^2 HS, half when causal, forward + backward 3.5x the forward. Each figure is the
median of --repeats calls after two warm-ups, timed with CUDA events on a GPU. Prints one
JSON record (common.py) whose result names are Quasar's."""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common


def sizes(text, flag, ap):
    try:
        v = [int(x) for x in text.split(",")]
    except ValueError:
        v = []
    if not v or min(v) < 1:
        ap.error(f"{flag}: expected comma-separated positive sizes, got {text!r}")
    return v


def timer(dev):
    """ms of one call of fn: CUDA events on a GPU (as Quasar's backend), the clock on a CPU."""
    if dev.type == "cuda":
        def timed(fn):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
    return timed


def time_point(B, NH, T, hs, causal, dev, dtype, backend, timed, repeats):
    """The medians (common.stats) of the forward and of forward + backward at one point,
    after two warm-ups; q, k, v, dout ~ N(0, 1), freed on the way out."""
    g = torch.Generator(device=dev).manual_seed(T * 1000 + hs)
    q, k, v, dout = (torch.randn(B, NH, T, hs, device=dev, dtype=dtype, generator=g) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)

    def fwd():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        fwd().backward(dout)

    for _ in range(2):
        fwd_bwd()
    tf = [timed(fwd) for _ in range(repeats)]
    tb = [timed(fwd_bwd) for _ in range(repeats)]
    return common.stats(tf), common.stats(tb)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", default="")
    ap.add_argument("--head-size", default="64,128")
    ap.add_argument("--tokens", type=int, default=0)
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per point and pass (default 10, as Quasar)")
    ap.add_argument("--backend", choices=["flash", "math"], default="flash",
                    help="flash (default; forced on a GPU in bf16, else SDPA's own choice) or math (T x T scores)")
    common.add_common_args(ap)
    a = ap.parse_args()
    dev, dtype, threads = common.setup(a)
    gpu = dev.type == "cuda"
    seqs = sizes(a.seq or ("1024,4096,16384" if gpu else "256,1024"), "--seq", ap)
    heads = sizes(a.head_size, "--head-size", ap)
    tokens, width = a.tokens or (16384 if gpu else 2048), a.width or (2048 if gpu else 512)
    if a.repeats < 1 or any(width % h for h in heads):
        ap.error("--repeats must be positive and --width a multiple of every head size")
    backend = None
    if a.backend == "math" or (gpu and dtype == torch.bfloat16):
        backend = SDPBackend.MATH if a.backend == "math" else SDPBackend.FLASH_ATTENTION
    ceiling = common.gemm_ceiling(dev, dtype)
    timed = timer(dev)
    results, points, oom = [], [], []
    for T in seqs:
        for hs in heads:
            for causal in (True, False):
                B, NH = max(1, tokens // T), width // hs
                mask = "causal" if causal else "full"
                names = [f"attention_T{T}_hs{hs}_{mask}_{p}_tflop_per_s" for p in ("fwd", "fwd_bwd")]
                point = {"T": T, "hs": hs, "B": B, "NH": NH, "causal": causal}
                common.reset_peak_memory(dev)
                try:
                    sf, sb = time_point(B, NH, T, hs, causal, dev, dtype, backend, timed, a.repeats)
                except torch.cuda.OutOfMemoryError:
                    oom.append(point)
                    results += [(n, "out of device memory", None) for n in names]
                    torch.cuda.empty_cache()
                    continue
                flops = 4.0 * B * NH * T * T * hs * (0.5 if causal else 1.0)
                for n, what, s, fl in ((names[0], "forward", sf, flops), (names[1], "forward + backward", sb, 3.5 * flops)):
                    r = fl / (s["median"] / 1e3)
                    results.append((n, f"attention {what}, TFLOP/s (B={B} NH={NH} T={T} hs={hs}{' causal' if causal else ''}; "
                                       f"{s['median']:.4f} ms, median of {a.repeats}, p10 {s['p10']:.4f}, "
                                       f"p90 {s['p90']:.4f}; {r / ceiling:.3f} of the GEMM ceiling)", r / 1e12))
                point.update(fwd_ms=common.rnd(sf["median"]), fwd_bwd_ms=common.rnd(sb["median"]))
                if gpu:
                    point["peak_mib"] = common.rnd(common.peak_memory_mib(dev))
                points.append(point)
    kind = {"flash": "FlashAttention backend (forced), ", "math": "math backend (forced; T x T scores), "}
    peer = (f"PyTorch {torch.__version__} scaled_dot_product_attention, "
            + (kind[a.backend] if backend is not None else "default backend, ") + a.dtype)
    common.emit(common.record(
        dev, threads, peer, results, dtype=a.dtype, repeats=a.repeats, points=points, out_of_memory=oom,
        flops="FlashAttention's count: forward 4 B NH T^2 hs, half when causal; forward + backward 3.5x the forward",
        ceilings={"gemm": f"{common.gemm_n(dev)}^3 torch.mm {a.dtype}, best of 5",
                  "gemm_gflop_per_s": common.rnd(ceiling / 1e9)}))


if __name__ == "__main__":
    main()

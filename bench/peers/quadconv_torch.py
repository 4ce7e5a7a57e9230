"""PyTorch eager peer of the quadratic depthwise conv: three depthwise Conv2d (groups=C,
'same' padding) + multiply + add, channels_last, forward + backward.
usage: python3 bench/peers/quadconv_torch.py B H W C K [--device cpu|cuda] [--dtype fp32|bf16]
       [--repeats N] [--threads N]
Prints the same JSON fields as build/bench/quadconv_speed (medians)."""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    for k in "B H W C K".split():
        ap.add_argument(k, type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, dt = torch.device(a.device), torch.float32 if a.dtype == "fp32" else torch.bfloat16
    convs = [torch.nn.Conv2d(a.C, a.C, a.K, padding=a.K // 2, groups=a.C).to(dev, dt)
             .to(memory_format=torch.channels_last) for _ in range(3)]
    x = torch.randn(a.B, a.C, a.H, a.W, device=dev, dtype=dt).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fwd():
        return convs[0](x) * convs[1](x) + convs[2](x)

    y = fwd()
    y.backward(dy)  # warm-up
    tf, tb = [], []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        y = fwd()
        sync()
        t1 = time.perf_counter()
        y.backward(dy)
        sync()
        tf.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    f, b = sorted(tf)[len(tf) // 2], sorted(tb)[len(tb) // 2]
    n = a.B * a.H * a.W * a.C
    flops, nbytes = 17.0 * a.K * a.K * n, 9.0 * n * x.element_size()
    print(json.dumps({"B": a.B, "H": a.H, "W": a.W, "C": a.C, "k": a.K, "fwd_ms": round(1e3 * f, 3),
                      "bwd_ms": round(1e3 * b, 3), "gflop_per_s": round(flops / (f + b) / 1e9, 2),
                      "gb_per_s": round(nbytes / (f + b) / 1e9, 2)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Single-thread GPT-2 encode throughput: Quasar (release build, bench/tokenizer_speed.c,
timing qs_tokenizer_encode alone) against tiktoken built from the same vocabulary files,
on the >= 5 MB test corpus (tests/tokenizer_corpus.py). Best of --repeats for each;
records bench/results/<date>-cpu-<N>core-tokenizer.json (ratio > 1: Quasar faster).

  bench/tokenizer_speed.py [--vocab-dir ../shared/data/gpt2] [--repeats 5] [--mb 5]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from tokenizer_corpus import corpus, local_gpt2  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-dir", default=os.path.join(ROOT, "..", "shared", "data", "gpt2"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mb", type=int, default=5)
    a = ap.parse_args()
    import tiktoken

    subprocess.run(["make", "-s", "-C", ROOT, "build/bench/tokenizer_speed"], check=True)
    text = corpus(a.mb, 1)
    data = text.encode("utf-8")
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        f.write(data)
        f.flush()
        out = subprocess.run([os.path.join(ROOT, "build", "bench", "tokenizer_speed"), a.vocab_dir, f.name,
                              str(a.repeats)], check=True, capture_output=True, text=True).stdout
    q = json.loads(out)

    enc = local_gpt2(a.vocab_dir)
    best = float("inf")
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ids = enc.encode(text, allowed_special="all")
        best = min(best, time.perf_counter() - t0)
    if len(ids) != q["tokens"]:
        sys.exit(f"error: quasar made {q['tokens']} tokens, tiktoken {len(ids)}")
    peer_mbs = len(data) / best / 1e6

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.machine())
    device = f"cpu-{os.cpu_count()}core"
    date = datetime.date.today().isoformat()
    rec = {
        "device": f"{device} ({cpu})",
        "date": date,
        "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "command": f"bench/tokenizer_speed.py --repeats {a.repeats} --mb {a.mb}",
        "results": [{
            "name": "gpt2_encode_throughput",
            "metric": f"single-thread encode, MB/s (10^6 bytes), best of {a.repeats}, "
                      f"{len(data)}-byte corpus, {len(ids)} tokens",
            "quasar": round(q["mb_per_s"], 2),
            "peer": f"tiktoken {tiktoken.__version__} encode(allowed_special='all'), same vocabulary files",
            "peer_value": round(peer_mbs, 2),
            "ratio": round(q["mb_per_s"] / peer_mbs, 3),
        }],
    }
    print(f"{'':10}{'MB/s':>10}{'seconds':>10}")
    print(f"{'quasar':10}{q['mb_per_s']:10.2f}{q['best_s']:10.4f}")
    print(f"{'tiktoken':10}{peer_mbs:10.2f}{best:10.4f}")
    print(f"ratio (quasar / tiktoken): {q['mb_per_s'] / peer_mbs:.2f}x")
    path = os.path.join(ROOT, "bench", "results", f"{date}-{device}-tokenizer.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()

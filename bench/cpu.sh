#!/usr/bin/env bash
# The CPU benchmark suite in one call on this machine: `quasar bench train` on the CPU
# configs, `bench kernels`, `bench attention`, `bench moe` (shapes a and b) and `bench
# generate`, merged into
# bench/results/<date>-<device>-bench.json (DESIGN.md's format; each result's name is
# prefixed with its topic, and the commands' own records are kept under "records").
#   bench/cpu.sh [STEPS]           timed training steps per config (default 20)
#   QUASAR=path bench/cpu.sh       time that binary instead of building build/quasar
# Timings on a shared machine are indicative: every record carries "others_cpu", the
# share of the CPU time other processes took while it ran (top level: per topic).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
q=${QUASAR:-}
if [ -z "$q" ]; then
  make -s -j"$(nproc)" build/quasar
  q=./build/quasar
fi
./data/prepare_shakespeare.sh
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # TOPIC quasar-bench-args...
  local topic=$1; shift
  echo "bench: $topic: quasar bench $*" >&2
  "$q" bench "$@" --json >"$out/$topic.json"
}
run cpu_default train --config configs/shakespeare_char_cpu.json --steps "$steps"
run makemoe train --config configs/shakespeare_char_moe.json --steps "$steps"
run hybrid_lm train --config configs/shakespeare_char_quadconv.json --steps "$steps"
if [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  run quadranet train --config configs/quadranet_fmnist.json --steps "$steps"
fi
run kernels kernels
run attention attention
run moe_a moe --shape a
run moe_b moe --shape b
run generate generate --config configs/shakespeare_char_cpu.json --repeats 20

QS_OUT=$out python3 - <<'PY'
import datetime, glob, json, os, subprocess, sys
sys.path.insert(0, "bench/peers")
from compare import prefixed  # compare.py's result names
recs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.environ["QS_OUT"] + "/*.json"))}
first = next(iter(recs.values()))
results = []
for topic, r in recs.items():
    for e in r["results"]:
        e = dict(e)
        if not e["name"].startswith("kernel_"):
            e["name"] = prefixed(topic, e["name"])
        results.append(e)
date = datetime.date.today().isoformat()
device = first["device"]
short = device.split(" ")[0]
commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
out = {"device": device, "date": date, "commit": commit or None, "command": "bench/cpu.sh",
       "others_cpu": {t: r.get("others_cpu") for t, r in recs.items()},
       "results": results, "records": recs}
path = f"bench/results/{date}-{short}-bench.json"
json.dump(out, open(path, "w"), indent=2)
print("wrote", path)
for e in results:
    print(f'{e["name"]:48s} {e["quasar"]:>12.6g}')
PY

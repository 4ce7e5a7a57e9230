#!/usr/bin/env bash
# Quasar's quadratic depthwise conv against the PyTorch eager peer (three depthwise
# Conv2d + multiply + add, channels_last), forward + backward, in one call on one machine,
# and records bench/results/<date>-<device>-quadconv.json (ratio > 1: Quasar faster).
#   bench/quadconv.sh [B H W C K]     (default 8 56 56 64 7: the issue's shape, batch cut for a CPU)
# The CPU build's op; the CUDA one joins when kernels/quadconv.cu exists.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=("${@:-8 56 56 64 7}")
read -r -a shape <<<"${shape[*]}"
make -s -j"$(nproc)" build/bench/quadconv_speed
q=$(./build/bench/quadconv_speed "${shape[@]}" 10)
p=$(python3 bench/peers/quadconv_torch.py "${shape[@]}" --repeats 10 --threads "$(nproc)")
echo "quasar:  $q"
echo "pytorch: $p"
QS_Q=$q QS_P=$p python3 - <<'PY'
import datetime, json, os, platform, subprocess
q, p = json.loads(os.environ["QS_Q"]), json.loads(os.environ["QS_P"])
import torch
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
device = f"cpu-{os.cpu_count()}core"
shape = f"B={q['B']} {q['H']}x{q['W']} C={q['C']} k={q['k']} fp32"
res = []
for key, metric in (("fwd_ms", "forward ms, median of 10"), ("bwd_ms", "backward ms, median of 10")):
    res.append({"name": f"quadconv_{key}", "metric": f"{metric} ({shape})", "quasar": q[key],
                "peer": f"PyTorch {torch.__version__} eager, 3 depthwise Conv2d + mul + add, channels_last",
                "peer_value": p[key], "ratio": round(p[key] / q[key], 3)})
tot_q, tot_p = q["fwd_ms"] + q["bwd_ms"], p["fwd_ms"] + p["bwd_ms"]
res.append({"name": "quadconv_fwd_bwd_ms", "metric": f"forward + backward ms ({shape})", "quasar": round(tot_q, 3),
            "peer": res[0]["peer"], "peer_value": round(tot_p, 3), "ratio": round(tot_p / tot_q, 3)})
res.append({"name": "quadconv_gflop_per_s", "metric": "GFLOP/s, 17 k^2 NC per forward + backward (bench/NOTES.md)",
            "quasar": q["gflop_per_s"], "peer": res[0]["peer"], "peer_value": p["gflop_per_s"],
            "ratio": round(q["gflop_per_s"] / p["gflop_per_s"], 3)})
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
date = datetime.date.today().isoformat()
out = {"device": f"{device} ({cpu})", "date": date, "commit": commit,
       "command": "bench/quadconv.sh " + " ".join(str(q[k]) for k in ("B", "H", "W", "C", "k")), "results": res}
path = f"bench/results/{date}-{device}-quadconv.json"
json.dump(out, open(path, "w"), indent=2)
print("wrote", path)
PY

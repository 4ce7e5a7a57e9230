#!/usr/bin/env bash
# Trains a tiny-Shakespeare recipe on this machine and records its wall time, tokens/s
# and final validation loss in bench/results/<date>-<device>-<topic>.json.
#   bench/shakespeare.sh CONFIG TOPIC PEER PEER_VAL_LOSS [quasar train options...]
# e.g. bench/shakespeare.sh configs/shakespeare_char_moe.json makemoe "makeMoE (reported)" 1.7508 \
#        --set train.eval_iters=50
# The final loss is re-measured with `quasar eval` over 400 validation batches (makeMoE's
# eval_iters), whatever the run used for its periodic evals.
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1 topic=$2 peer=$3 peer_loss=$4; shift 4
make -s -j"$(nproc)" build/quasar
./data/prepare_shakespeare.sh
run=runs/bench_$topic
rm -rf "$run"
start=$(date +%s.%N)
./build/quasar train --config "$config" --out "$run" "$@"
end=$(date +%s.%N)
./build/quasar eval --model "$run" --set train.eval_iters=400 >"$run/eval400.json"
device="cpu-$(nproc)core"
# what quasar's own records call this machine, OpenBLAS's kernels included
described=$(./build/quasar bench kernels --quick --repeats 1 --only gemm_fwd --json |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["device"])')
QS_RUN=$run QS_START=$start QS_END=$end QS_DEVICE=$device QS_TOPIC=$topic QS_PEER=$peer \
QS_PEER_LOSS=$peer_loss QS_CONFIG=$config QS_ARGS="$*" QS_DESCRIBED=$described python3 - <<'PY'
import json, os, statistics, subprocess, datetime
run = os.environ["QS_RUN"]
steps = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
train = [s for s in steps if "train_loss" in s]
vals = [s for s in steps if "val_loss" in s]
final = json.load(open(f"{run}/eval400.json"))
peer_loss = float(os.environ["QS_PEER_LOSS"])
date = datetime.date.today().isoformat()
rec = {
    "device": os.environ["QS_DESCRIBED"],
    "date": date,
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "command": f'bench/shakespeare.sh {os.environ["QS_CONFIG"]} {os.environ["QS_TOPIC"]} ... {os.environ["QS_ARGS"]}',
    "results": [
        {"name": f'{os.environ["QS_TOPIC"]}_val_loss', "metric": "validation loss, 400 batches (lower is better)",
         "quasar": final["val_loss"], "peer": os.environ["QS_PEER"], "peer_value": peer_loss,
         "ratio": round(peer_loss / final["val_loss"], 4)},
        {"name": f'{os.environ["QS_TOPIC"]}_wall_time', "metric": "seconds, whole run incl. evals and checkpoints",
         "quasar": round(float(os.environ["QS_END"]) - float(os.environ["QS_START"]), 1), "peer": None, "peer_value": None, "ratio": None},
        {"name": f'{os.environ["QS_TOPIC"]}_tokens_per_s', "metric": "training tokens/s, median over steps",
         "quasar": round(statistics.median(s["tokens_per_s"] for s in train), 1), "peer": None, "peer_value": None, "ratio": None},
    ],
    "steps": train[-1]["step"],
    "last_periodic_val_loss": vals[-1]["val_loss"] if vals else None,
}
os.makedirs("bench/results", exist_ok=True)
path = f'bench/results/{date}-{os.environ["QS_DEVICE"]}-{os.environ["QS_TOPIC"]}.json'
json.dump(rec, open(path, "w"), indent=2)
print(open(path).read())
PY

#!/usr/bin/env bash
# Peak resident memory of what a user runs on the CPU, for one or two quasar binaries
# side by side (a change's before and after): GPT-2 124M generation from random weights
# and from a checkpoint (fp32 and bf16 weights), eval, conversion to and from Hugging
# Face's layout, resuming a run through a step and a checkpoint, and training a small
# model from 200M tokens of shards. Prints one line
# per case and binary: "case<TAB>binary<TAB>peak RSS MiB<TAB>seconds".
#   bench/memory.sh QUASAR [QUASAR_BEFORE]
# Needs python3 with numpy (the synthetic shards) and GNU time; about 1.5 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
bins=("$@")
[ ${#bins[@]} -ge 1 ] || { echo "usage: bench/memory.sh QUASAR [QUASAR_BEFORE]" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cfg=configs/gpt2_124m_shakespeare.json

# a GPT-2 124M checkpoint (seq_len 64 to keep its one training step short)
"${bins[0]}" train --config $cfg --out "$work/ck" --set train.max_steps=1 --set train.batch_size=1 \
  --set train.micro_batch_size=1 --set model.seq_len=64 --set train.eval_interval=0 --set train.sample_tokens=0 \
  >/dev/null 2>&1
"${bins[0]}" convert --to-hf "$work/ck" --out "$work/hf" >/dev/null 2>&1
# 200M tokens in four shards of 50M, and a small model that trains from them
python3 - "$work" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)
for name, n in [(f"train_{i:06d}", 50_000_000) for i in range(4)] + [("val_000000", 1_000_000)]:
    hdr = np.zeros(256, np.int32); hdr[:3] = (20240520, 1, n)
    with open(f"{sys.argv[1]}/{name}.bin", "wb") as f:
        f.write(hdr.tobytes()); f.write(rng.integers(0, 50257, n, dtype=np.uint16).tobytes())
PY
cat >"$work/shards.json" <<JSON
{"model": {"seq_len": 64, "n_layer": 2, "n_head": 2, "n_embd": 64},
 "train": {"max_steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_interval": 20, "eval_iters": 2,
           "log_interval": 10, "checkpoint_interval": 0, "sample_tokens": 0, "seed": 3},
 "data": {"tokenizer": "gpt2", "train_shards": "$work/train_*.bin", "val_shards": "$work/val_*.bin",
          "vocab_dir": "$PWD/../shared/data/gpt2"}}
JSON

measure() { # CASE BINARY ARGS...
  local name=$1 bin=$2; shift 2
  /usr/bin/time -f "%M %e" -o "$work/time" "$bin" "$@" >/dev/null 2>&1 || echo "$name: $bin failed" >&2
  read -r kib secs <"$work/time"
  awk -v n="$name" -v b="$bin" -v k="$kib" -v s="$secs" 'BEGIN { printf "%s\t%s\t%.0f\t%s\n", n, b, k / 1024, s }'
}

for w in fp32 bf16; do
  for p in 32 512; do
    for b in "${bins[@]}"; do
      measure "bench generate, random weights, $w, prompt $p" "$b" bench generate --config $cfg --temperature 0 \
        --prompt-tokens $p --new-tokens 4 --repeats 1 --weights $w
    done
  done
  for b in "${bins[@]}"; do
    measure "generate from a checkpoint, $w" "$b" generate --model "$work/ck" --max-tokens 16 --weights $w --prompt x
    measure "eval of a checkpoint, $w" "$b" eval --model "$work/ck" --set train.eval_iters=1 --weights $w
  done
done
for b in "${bins[@]}"; do
  rm -rf "$work/c" "$work/h"
  measure "convert --from-hf" "$b" convert --from-hf "$work/hf" --out "$work/c" --vocab-dir "$PWD/../shared/data/gpt2"
  measure "convert --to-hf" "$b" convert --to-hf "$work/ck" --out "$work/h"
  rm -rf "$work/r" && cp -r "$work/ck" "$work/r"
  measure "resume, one step, a checkpoint" "$b" train --resume "$work/r" --set train.max_steps=2
  rm -rf "$work/s"
  measure "train from 200M tokens of shards" "$b" train --config "$work/shards.json" --out "$work/s"
done

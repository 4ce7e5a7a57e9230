#!/usr/bin/env bash
# GPT-2 token shards of tiny Shakespeare for the GPT-2-shaped configs: the first 90% of
# the corpus's lines in data/shakespeare_gpt2/train_000000.bin, the rest in
# val_000000.bin (llm.c's format, written by `quasar shard`). Needs build/quasar and GPT-2's
# vocabulary (encoder.json, vocab.bpe) in ../shared/data/gpt2 or $QS_VOCAB_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
quasar=${QUASAR:-$here/../build/quasar}
vocab=${QS_VOCAB_DIR:-$here/../../shared/data/gpt2}
out="$here/shakespeare_gpt2"
[ -x "$quasar" ] || { echo "error: $quasar not found (run make first)" >&2; exit 1; }
[ -f "$vocab/encoder.json" ] && [ -f "$vocab/vocab.bpe" ] ||
  { echo "error: GPT-2's encoder.json and vocab.bpe not found in $vocab (set QS_VOCAB_DIR)" >&2; exit 1; }
[ -f "$out/train_000000.bin" ] && [ -f "$out/val_000000.bin" ] && exit 0
"$here/prepare_shakespeare.sh"
text="$here/shakespeare_char/input.txt"
lines=$(wc -l <"$text")
split=$((lines * 9 / 10))
mkdir -p "$out"
head -n "$split" "$text" | "$quasar" shard --tokenizer gpt2 --vocab-dir "$vocab" --out "$out/train.tmp"
tail -n +"$((split + 1))" "$text" | "$quasar" shard --tokenizer gpt2 --vocab-dir "$vocab" --out "$out/val.tmp"
mv "$out/train.tmp_000000.bin" "$out/train_000000.bin"
mv "$out/val.tmp_000000.bin" "$out/val_000000.bin"
echo "prepared $out (train and val shards)" >&2

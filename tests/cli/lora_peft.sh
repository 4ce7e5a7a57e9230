# LoRA over a converted Hugging Face GPT-2 (tests/fixtures/hf_gpt2_tiny): the adapters
# Hugging Face peft wrote (tests/fixtures/peft_gpt2_tiny; their logits against peft's are
# checked in tests/test_lora.c) generate, evaluate, merge and unmerge; a finetune over the
# converted base lowers its validation loss and records the base's fingerprint, which
# refuses the adapter over another base of the same shape; unsupported peft settings and
# wrong shapes are one error line, and nothing saved is touched.
root=$(cd "$(dirname "$0")/../.." && pwd)
hf=$root/tests/fixtures/hf_gpt2_tiny
peft=$root/tests/fixtures/peft_gpt2_tiny
vocab=$root/../shared/data/gpt2
. "$root/tests/cli_lib.sh"

expect_ok "convert the HF GPT-2 fixture" "$QUASAR" convert --from-hf "$hf" --out base --vocab-dir "$vocab"
sums() { (cd "$1" && find . -type f -exec sha256sum {} + | sort); }
sums base >base.sums

gen() { "$QUASAR" generate --temperature 0 --prompt "Hello, world" --max-tokens 12 "$@" 2>/dev/null; }
for v in "" /bf16_rslora_layer /f16_regex /all_linear; do
  expect_ok "generate with the peft adapter ${v:-/}" "$QUASAR" generate --model base --adapter "$peft$v" --max-tokens 4
done
expect_ok "merge the peft adapter" "$QUASAR" merge --model base --adapter "$peft" --out merged
a=$(gen --model base --adapter "$peft") b=$(gen --model merged) c=$(gen --model base)
[ -n "$a" ] && [ "$a" = "$b" ] && ok "greedy text with the peft adapter equals the merged model's" \
  || not_ok "greedy text with the peft adapter equals the merged model's" "'$a' vs '$b'"
[ "$a" != "$c" ] && ok "the peft adapter changes the base's greedy text" || not_ok "the peft adapter changes the base's greedy text"
expect_ok "unmerge the peft adapter" "$QUASAR" merge --unmerge --model merged --adapter "$peft" --out unmerged
[ "$(gen --model unmerged)" = "$c" ] && ok "the unmerged model generates as the base" \
  || not_ok "the unmerged model generates as the base"

# a gpt2-tokenized dataset for the converted run (its data shards are placeholders)
make_corpus corpus.txt
"$QUASAR" shard --vocab-dir "$vocab" --out sh/train <corpus.txt 2>/dev/null
head -c 3000 corpus.txt | "$QUASAR" shard --vocab-dir "$vocab" --out sh/val 2>/dev/null
data=(--set data.train_shards="$WORK/sh/train_*.bin" --set data.val_shards="$WORK/sh/val_*.bin")
ev() { "$QUASAR" eval "${data[@]}" "$@" 2>/dev/null | grep -o '"val_loss": [0-9.]*'; }
a=$(ev --model base --adapter "$peft") b=$(ev --model merged)
[ -n "$a" ] && [ "$a" = "$b" ] && ok "eval with the peft adapter equals eval of the merged model ($a)" \
  || not_ok "eval with the peft adapter equals eval of the merged model" "'$a' vs '$b'"

cat >ft.json <<JSON
{"train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "eval_interval": 2, "eval_iters": 1,
           "log_interval": 1, "checkpoint_interval": 2, "sample_tokens": 8, "seed": 3},
 "data": {"train_shards": "$WORK/sh/train_*.bin", "val_shards": "$WORK/sh/val_*.bin"},
 "lora": {"r": 4, "alpha": 8, "targets": "q,v,proj,fc"}}
JSON
expect_ok "finetune over the converted base" "$QUASAR" finetune --base base --config ft.json --out ft
python3 - ft/metrics.jsonl <<'PY' && ok "the finetune lowers the validation loss" || not_ok "the finetune lowers the validation loss"
import json, sys
val = [r["val_loss"] for r in map(json.loads, open(sys.argv[1])) if "val_loss" in r]
sys.exit(0 if len(val) == 2 and val[1] < val[0] else 1)
PY
step=ft/ckpt/step_00000004
# the fingerprint: SHA-256 of the data section of the base's model.safetensors
if python3 - base/ckpt/step_00000000/model.safetensors $step/adapter_config.json <<'PY'
import hashlib, json, struct, sys
data = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", data[:8])[0]
sys.exit(0 if json.load(open(sys.argv[2]))["quasar_base_sha256"] == hashlib.sha256(data[8 + n:]).hexdigest() else 1)
PY
then ok "the adapter records the SHA-256 of the base's tensor data"; else not_ok "the adapter records the SHA-256 of the base's tensor data"; fi
a=$(ev --model base --adapter ft) b=$(ev --model base)
[ -n "$a" ] && [ "$a" != "$b" ] && ok "eval with the finetuned adapter ($b -> $a)" || not_ok "eval with the finetuned adapter" "'$b' vs '$a'"
expect_ok "finetune 2 steps then stop" "$QUASAR" finetune --base base --config ft.json --out re --until 2
sums re >re.sums

# another base of the same shape (the peft-merged one): the fingerprint refuses it
fp="made for the base 'base/ckpt/step_00000000' \(weights sha256 [0-9a-f]{16}\.\.\.\), not for this base \(weights sha256 [0-9a-f]{16}\.\.\.\)"
expect_error "generate: a Quasar adapter over another base of its shape" "$fp" "$QUASAR" generate --model merged --adapter ft
expect_error "eval: the same" "$fp" "$QUASAR" eval --model merged --adapter ft "${data[@]}"
expect_error "merge: the same" "$fp" "$QUASAR" merge --model merged --adapter ft --out x1
expect_error "finetune --resume over another base" "$fp" "$QUASAR" finetune --base merged --resume re
sums re | cmp -s - re.sums && ok "the refused resume leaves its run untouched" || not_ok "the refused resume leaves its run untouched"
expect_ok "finetune --resume over its own base" "$QUASAR" finetune --base base --resume re

# unsupported peft settings and wrong shapes
bad_peft() { # NAME SED-EXPRESSION
  mkdir "$1" && cp "$peft/adapter_model.safetensors" "$1/" && sed "$2" "$peft/adapter_config.json" >"$1/adapter_config.json"
}
bad_peft dora 's/"use_dora": false/"use_dora": true/'
expect_error "a DoRA adapter" "'use_dora' = true is not supported \(DoRA" "$QUASAR" generate --model base --adapter dora
bad_peft bias 's/"bias": "none"/"bias": "all"/'
expect_error "trained biases" "'bias' = \"all\" is not supported" "$QUASAR" merge --model base --adapter bias --out x2
bad_peft ranks 's/"rank_pattern": {}/"rank_pattern": {"c_fc": 16}/'
expect_error "per-module ranks" "'rank_pattern' = \{\"c_fc\":16\} is not supported" "$QUASAR" generate --model base --adapter ranks
bad_peft rank2 's/"r": 4,/"r": 2,/'
expect_error "tensors of another rank" "c_attn.lora_A.weight' is \[4,16\], but r = 2 and this base make it \[2,16\]" \
  "$QUASAR" generate --model base --adapter rank2
bad_peft ia3 's/"peft_type": "LORA"/"peft_type": "IA3"/'
expect_error "another peft_type" "'peft_type' is \"IA3\": only LORA adapters are supported" "$QUASAR" generate --model base --adapter ia3

sums base | cmp -s - base.sums && ok "the base run is untouched" || not_ok "the base run is untouched"
[ ! -e x1 ] && [ ! -e x2 ] && ok "failed merges write nothing" || not_ok "failed merges write nothing"

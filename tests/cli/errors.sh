# Bad input of every kind: one "error:" line naming the problem, non-zero exit, no
# sanitizer report, and nothing already saved is damaged.
. "$(dirname "$0")/../cli_lib.sh"
make_corpus corpus.txt
tiny_config good.json
Q=$QUASAR

# command line
expect_error "unknown command" "unknown command 'trian'" $Q trian
expect_error "unknown flag" "unknown option '--lr'" $Q train --config good.json --lr 3
expect_error "flag without value" "--out needs a value" $Q train --config good.json --out
expect_error "non-numeric value" "--max-tokens: invalid value 'many'" $Q generate --model x --max-tokens many
expect_error "out-of-range value" "--top-p: invalid value '1.5'" $Q generate --model x --top-p 1.5
expect_error "train without config" "needs --config" $Q train
expect_error "bad device" "--device: expected cpu or cuda" $Q train --config good.json --device tpu
# this tree has no CUDA (or no GPU): one line saying which, and no run folder
expect_error "cuda without a GPU" "^error: --device cuda: (this build has no CUDA|no CUDA device is visible)" \
  $Q train --config good.json --device cuda --out cuda_run
[ ! -e cuda_run ] && ok "cuda without a GPU: no run folder" || not_ok "cuda without a GPU: no run folder"
expect_ok "--help" $Q train --help
expect_ok "top-level --help" $Q --help

# configs
echo '{"model": {"n_layer": 2,}' >bad.json
expect_error "malformed JSON" "bad.json: malformed JSON near line 1" $Q train --config bad.json
expect_error "missing config file" "nope.json" $Q train --config nope.json
echo '{"model": {"n_embed": 64}}' >unk.json
expect_error "unknown key" "unknown key 'model.n_embed'" $Q train --config unk.json
echo '{"model": {"moe": {"topk": 2}}}' >unk2.json
expect_error "unknown nested key" "unknown key 'model.moe.topk'" $Q train --config unk2.json
echo '{"train": {"lr": "fast"}}' >type.json
expect_error "wrong type" "train.lr" $Q train --config type.json
echo '{"model": {"dropout": 1.5}}' >range.json
expect_error "out of range" "model.dropout" $Q train --config range.json
echo '{"model": {"n_embd": 100, "n_head": 8}}' >div.json
expect_error "inconsistent values" "divisible" $Q train --config div.json
expect_error "--set unknown key" "unknown key 'train.steps'" $Q train --config good.json --set train.steps=3
expect_error "--set without =" "train.lr" $Q train --config good.json --set train.lr
expect_error "--set bad enum" "model.activation" $Q train --config good.json --set model.activation=tanh
expect_error "--set negative bucket" "parallel.bucket_mb: must be in \\[0, 1048576\\], got -1" \
  $Q train --config good.json --set parallel.bucket_mb=-1

# data
expect_error "missing data file" "missing.txt" $Q train --config good.json --set data.path=missing.txt --out r0
printf 'tiny' >short.txt
expect_error "corpus too small" "too little" $Q train --config good.json --set data.path=$WORK/short.txt --out r1

# checkpoints: train a reference run, then break copies of it
expect_ok "reference run" $Q train --config good.json --out run
ck=run/ckpt/step_00000006
sum0=$(cat run/ckpt/latest $ck/* | sha256sum)
expect_error "no checkpoint" "no checkpoint in 'nowhere'" $Q generate --model nowhere
metrics0=$(sha256sum <run/metrics.jsonl)
expect_error "a new run over a saved one" "'run' already holds a run; continue it with --resume run" \
  $Q train --config good.json --out run
expect_error "a new run over a saved one, dry run" "already holds a run" $Q train --config good.json --out run --dry-run
[ "$(sha256sum <run/metrics.jsonl)" = "$metrics0" ] && ok "the saved run's metrics are untouched" \
  || not_ok "the saved run's metrics are untouched"
cp -r run broken
head -c 100 $ck/model.safetensors >broken/ckpt/step_00000006/model.safetensors
expect_error "truncated checkpoint" "model.safetensors" $Q generate --model broken
chmod 000 broken/ckpt/step_00000006/model.safetensors
if [ "$(id -u)" -ne 0 ]; then expect_error "unreadable checkpoint" "model.safetensors" $Q generate --model broken; fi
chmod 644 broken/ckpt/step_00000006/model.safetensors
printf 'garbage' >broken/ckpt/step_00000006/model.safetensors
expect_error "garbage checkpoint" "model.safetensors" $Q eval --model broken
echo "../../etc" >broken/ckpt/latest
expect_error "bad latest marker" "latest" $Q generate --model broken
cp -r run badstate
echo '{"step": "six"}' >badstate/ckpt/step_00000006/state.json
expect_error "corrupt state.json on resume" "state.json" $Q train --resume badstate --set train.max_steps=8
cp -r run wrongshape
expect_error "resume with another architecture" "model section differs" $Q train --resume wrongshape --set model.n_layer=3
expect_error "resume checkpointing more blocks than there are" \
  "model.recompute_layers .3. must be <= model.n_layer .2." \
  $Q train --resume wrongshape --set model.recompute_layers=3
expect_error "prompt outside the vocabulary" "--prompt: byte 0x7e" $Q generate --model run --prompt "~"
expect_error "generate on an unknown device" "--device: expected cpu or cuda, got 'tpu'" \
  $Q generate --model run --device tpu
expect_error "generate with weights neither fp32 nor bf16" "--weights: expected fp32 or bf16, got 'int8'" \
  $Q generate --model run --weights int8
# weights large enough (init_std 0.5) that their bf16 rounding shows in the loss
expect_ok "a run of large weights" $Q train --config good.json --out wide --set model.init_std=0.5 --set train.max_steps=1
expect_ok "eval from fp32 weights" $Q eval --model wide
cp "$WORK/out" eval32.json
expect_ok "eval from bf16 weights" $Q eval --model wide --weights bf16
python3 - eval32.json "$WORK/out" <<'PY' && ok "eval: bf16 weights move the validation loss, by under 1%" \
  || not_ok "eval: bf16 weights move the validation loss, by under 1%" "$(cat eval32.json "$WORK/out")"
import json, sys
a, b = (json.load(open(f))["val_loss"] for f in sys.argv[1:3])
assert a != b and abs(a - b) < 0.01 * a, (a, b)
PY
expect_error "eval with weights neither fp32 nor bf16" "--weights: expected fp32 or bf16, got 'fp8'" \
  $Q eval --model run --weights fp8
expect_error "eval on cuda without a GPU" "^error: --device cuda: (this build has no CUDA|no CUDA device is visible)" \
  $Q eval --model run --device cuda
[ "$(cat run/ckpt/latest $ck/* | sha256sum)" = "$sum0" ] && ok "failed commands left the saved run intact" \
  || not_ok "failed commands left the saved run intact"

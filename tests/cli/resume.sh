# Training end to end, and exact resume: N steps + resume for N more must give the
# same losses and bit-identical weights as 2N steps in one go (dense and MoE).
. "$(dirname "$0")/../cli_lib.sh"
make_corpus corpus.txt

for variant in dense moe; do
  extra=""
  [ $variant = moe ] && extra='"moe": {"n_experts": 4, "top_k": 2, "gating": "noisy_topk", "capacity_factor": 1.25, "z_loss_coef": 0.001}'
  tiny_config $variant.json "$extra"
  expect_ok "$variant: 6 steps in one go" "$QUASAR" train --config $variant.json --out one_$variant || continue
  expect_ok "$variant: 3 steps then stop" "$QUASAR" train --config $variant.json --out two_$variant --until 3 || continue
  [ "$(cat two_$variant/ckpt/latest)" = step_00000003 ] && ok "$variant: latest names step 3" \
    || not_ok "$variant: latest names step 3" "$(cat two_$variant/ckpt/latest)"
  expect_ok "$variant: resume for 3 more" "$QUASAR" train --resume two_$variant || continue
  if cmp -s one_$variant/ckpt/step_00000006/model.safetensors two_$variant/ckpt/step_00000006/model.safetensors \
     && cmp -s one_$variant/ckpt/step_00000006/optim.safetensors two_$variant/ckpt/step_00000006/optim.safetensors; then
    ok "$variant: resumed weights and optimizer state are bit-identical"
  else
    not_ok "$variant: resumed weights and optimizer state are bit-identical"
  fi
  losses() { grep -o '"\(train\|val\)_loss": [0-9.e+-]*' "$1/metrics.jsonl"; }
  if [ "$(losses one_$variant)" = "$(losses two_$variant)" ] && [ "$(losses one_$variant | wc -l)" -eq 8 ]; then
    ok "$variant: resumed metrics.jsonl has the same 6 train and 2 val losses"
  else
    not_ok "$variant: resumed metrics.jsonl has the same 6 train and 2 val losses" "$(diff <(losses one_$variant) <(losses two_$variant) | head -5)"
  fi
  if grep -q '"step": 6, "train_loss"' one_$variant/metrics.jsonl && grep -q '"grad_norm"' one_$variant/metrics.jsonl \
     && grep -q '"tokens_per_s"' one_$variant/metrics.jsonl && [ -s one_$variant/samples.txt ] \
     && [ -f one_$variant/config.json ]; then
    ok "$variant: run folder has config.json, metrics.jsonl fields and samples.txt"
  else
    not_ok "$variant: run folder has config.json, metrics.jsonl fields and samples.txt"
  fi
done
# How activations are kept is not the architecture: a run resumed with activation
# checkpointing on (the same bits on the CPU) ends bit-identical to the one-go run.
expect_ok "moe: 3 steps then stop, again" "$QUASAR" train --config moe.json --out rl_moe --until 3 \
  && expect_ok "moe: resume with model.recompute_layers" "$QUASAR" train --resume rl_moe \
    --set model.recompute_layers=true \
  && { same_tensors one_moe/ckpt/step_00000006/model.safetensors rl_moe/ckpt/step_00000006/model.safetensors \
    && cmp -s one_moe/ckpt/step_00000006/optim.safetensors rl_moe/ckpt/step_00000006/optim.safetensors \
    && ok "moe: resumed with recompute_layers, weights and optimizer state are bit-identical" \
    || not_ok "moe: resumed with recompute_layers, weights and optimizer state are bit-identical"; }
grep -q '"expert_tokens"' one_moe/metrics.jsonl && grep -q '"dropped_frac"' one_moe/metrics.jsonl \
  && ok "moe: metrics log expert counts and dropped fraction" || not_ok "moe: metrics log expert counts and dropped fraction"

# --dry-run: everything but writing. A new run's makes no run folder; a resumed run's
# leaves every file of the run as it was. Both end with the estimate.
tree_sum() { find "$1" -type f | sort | xargs cat | sha256sum; }
expect_ok "dry run" "$QUASAR" train --config dense.json --out dry --dry-run \
  && { [ ! -e dry ] \
      && grep -q "^quasar: dry run: 3 step(s) from step 0, .* the 6 steps to step 6 .*nothing was written$" "$WORK/err" \
      && ok "dry run: no run folder, and the estimate" \
    || not_ok "dry run: no run folder, and the estimate" "$(tail -2 "$WORK/err")"; }
sum_before=$(tree_sum two_dense)
expect_ok "dry run of a resume" "$QUASAR" train --resume two_dense --dry-run --set train.max_steps=20 \
  && { [ "$(tree_sum two_dense)" = "$sum_before" ] \
      && grep -q "^quasar: dry run: 3 step(s) from step 6, .* the 14 steps to step 20 " "$WORK/err" \
      && ok "dry run of a resume: the run folder is untouched" \
    || not_ok "dry run of a resume: the run folder is untouched" "$(tail -2 "$WORK/err")"; }

# Warmup-stable-decay: a run stopped in its stable phase goes on, longer, at the same
# learning rate, and decays over its last decay_steps whatever max_steps became.
expect_ok "wsd: 3 of 6 steps" "$QUASAR" train --config dense.json --out wsd --until 3 \
  --set train.lr_schedule=wsd --set train.decay_steps=2 --set train.warmup_steps=1 \
  && expect_ok "wsd: resumed for 10 steps in all" "$QUASAR" train --resume wsd --set train.max_steps=10 \
  && { lrs=$(grep -o '"lr": [0-9.e+-]*' wsd/metrics.jsonl | cut -d' ' -f2 | tr '\n' ' ')
    [ "$lrs" = "0.003 0.003 0.003 0.003 0.003 0.003 0.003 0.003 0.003 0.00155 " ] \
      && ok "wsd: lr stays 3e-3 through step 9, then halfway to min_lr 1e-4" \
      || not_ok "wsd: lr stays 3e-3 through step 9, then halfway to min_lr 1e-4" "got: $lrs"; }

# generate and eval from the finished run
expect_ok "generate from a run folder" "$QUASAR" generate --model one_dense --prompt "First" --max-tokens 30 --seed 3 --top-k 5 --top-p 0.9
cp "$WORK/out" gen1
"$QUASAR" generate --model one_dense/ckpt/step_00000006 --prompt "First" --max-tokens 30 --seed 3 --top-k 5 --top-p 0.9 >gen2 2>/dev/null
[ "$(head -c 5 gen1)" = First ] && [ "$(wc -c <gen1)" -eq 36 ] && cmp -s gen1 gen2 \
  && ok "generate: prompt + 30 tokens, same output for the same seed" || not_ok "generate: prompt + 30 tokens, same output for the same seed"
expect_ok "generate greedy" "$QUASAR" generate --model one_dense --temperature 0 --max-tokens 10
# several prompts in one batch: JSON lines in prompt order, prompt 0 as it comes alone
expect_ok "generate a batch of 3 prompts" "$QUASAR" generate --model one_dense --prompt "First" --prompt 'All: speak' \
  --prompt "S" --max-tokens 30 --seed 3 --top-k 5 --top-p 0.9
if python3 - "$WORK/out" gen1 <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert [l["prompt"] for l in lines] == [0, 1, 2], lines
assert lines[0]["text"] == open(sys.argv[2]).read().rstrip("\n"), (lines[0], open(sys.argv[2]).read())
assert lines[1]["text"].startswith('All: speak') and lines[2]["text"].startswith("S")
assert all(len(l["text"]) > 20 for l in lines)
PY
then ok "batch: JSON lines per prompt; prompt 0 equals its single-prompt generation"
else not_ok "batch: JSON lines per prompt; prompt 0 equals its single-prompt generation" "$(head -3 "$WORK/out")"; fi
expect_error "batch: an empty prompt is refused" "--prompt must not be empty" "$QUASAR" generate --model one_dense --prompt a --prompt ""
expect_ok "eval prints JSON" "$QUASAR" eval --model one_moe
grep -qE '^\{"step": 6, "val_loss": [0-9.]+' "$WORK/out" && ok "eval: step and val_loss" || not_ok "eval: step and val_loss" "$(cat "$WORK/out")"

# Gradient accumulation: 4 micro-batches of 1 give the same step as one batch of 4 (the
# same rows, by counter), up to float rounding; dropout off so the masks cannot differ.
tiny_config acc.json
expect_ok "accumulation: batch 4 in one pass" "$QUASAR" train --config acc.json --out acc_one \
  --set model.dropout=0 --set train.max_steps=2 --set train.micro_batch_size=4
expect_ok "accumulation: batch 4 as 4 x 1" "$QUASAR" train --config acc.json --out acc_four \
  --set model.dropout=0 --set train.max_steps=2 --set train.micro_batch_size=1
if python3 - acc_one/metrics.jsonl acc_four/metrics.jsonl <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p) if '"train_loss"' in l] for p in sys.argv[1:3])
assert len(a) == len(b) == 2
for x, y in zip(a, b):
    for k in ("train_loss", "grad_norm"):
        assert abs(x[k] - y[k]) <= 1e-4 * abs(x[k]), (k, x[k], y[k])
PY
then ok "accumulation: same losses and gradient norms"; else not_ok "accumulation: same losses and gradient norms"; fi

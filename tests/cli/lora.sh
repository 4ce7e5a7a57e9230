# LoRA end to end: finetune over a frozen base (dense and MoE), the base checkpoint
# bitwise unchanged, an optimizer sized to the adapters alone, exact resume, generate and
# eval with --adapter, merge / unmerge against the adapted model, and bad input.
. "$(dirname "$0")/../cli_lib.sh"
make_corpus corpus.txt
# the new corpus keeps to the base's characters
for i in $(seq 1 50); do echo "Speak, citizens: the good patricians would relieve us all $i."; done >new.txt

lora_config() { # FILE TARGETS
  cat >"$1" <<JSON
{
  "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 1,
            "eval_interval": 3, "eval_iters": 2, "log_interval": 1, "checkpoint_interval": 3,
            "sample_tokens": 10, "seed": 5},
  "data": {"path": "$WORK/new.txt"},
  "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "$2"}
}
JSON
}

for variant in dense moe; do
  extra="" targets="q,v,proj,fc,fc_proj"
  if [ $variant = moe ]; then
    extra='"moe": {"n_experts": 3, "top_k": 2}' targets="q,k,proj,experts"
  fi
  tiny_config base_$variant.json "$extra"
  expect_ok "$variant: train the base" "$QUASAR" train --config base_$variant.json --out base_$variant || continue
  (cd base_$variant && find . -type f -exec sha256sum {} + | sort) >base_$variant.sums
  lora_config ft_$variant.json "$targets"
  expect_ok "$variant: finetune --dry-run" "$QUASAR" finetune --config ft_$variant.json --base base_$variant \
    --out dry_$variant --dry-run \
    && { [ ! -e dry_$variant ] && grep -q "^quasar: dry run: 3 step(s) from step 0" "$WORK/err" \
      && ok "$variant: finetune --dry-run writes nothing" || not_ok "$variant: finetune --dry-run writes nothing"; }
  expect_ok "$variant: finetune 6 steps" "$QUASAR" finetune --config ft_$variant.json --base base_$variant --out ft_$variant || continue
  n_params=$(sed -n 's/^quasar: \([0-9]*\) parameters.*/\1/p' "$WORK/err")
  (cd base_$variant && sha256sum -c --quiet ../base_$variant.sums) >/dev/null 2>&1 \
    && ok "$variant: every file of the base run is bitwise unchanged" || not_ok "$variant: every file of the base run is bitwise unchanged"
  step=ft_$variant/ckpt/step_00000006
  [ -f $step/adapter_model.safetensors ] && [ -f $step/adapter_config.json ] && [ ! -e $step/model.safetensors ] \
    && grep -q adapter_model.safetensors $step/checksums.json && grep -q '"peft_type":.*"LORA"' $step/adapter_config.json \
    && ok "$variant: checkpoints hold adapter_model.safetensors + adapter_config.json, checksummed" \
    || not_ok "$variant: checkpoints hold adapter_model.safetensors + adapter_config.json, checksummed" "$(ls $step)"
  # the optimizer holds two moments per adapter parameter and nothing else
  optim=$(stat -c %s $step/optim.safetensors) want=$((8 * n_params))
  [ -n "$n_params" ] && [ "$optim" -gt "$want" ] && [ "$optim" -lt $((want + 512)) ] \
    && ok "$variant: optimizer state is the adapters' alone ($n_params parameters, $optim bytes)" \
    || not_ok "$variant: optimizer state is the adapters' alone" "params '$n_params', optim $optim bytes"
  grep -q '"val_loss"' ft_$variant/metrics.jsonl && [ -s ft_$variant/samples.txt ] \
    && ok "$variant: metrics and samples written" || not_ok "$variant: metrics and samples written"

  # exact resume
  expect_ok "$variant: finetune 3 steps then stop" "$QUASAR" finetune --config ft_$variant.json --base base_$variant --out re_$variant --until 3
  expect_ok "$variant: resume for 3 more" "$QUASAR" finetune --base base_$variant --resume re_$variant
  cmp -s $step/adapter_model.safetensors re_$variant/ckpt/step_00000006/adapter_model.safetensors \
    && cmp -s $step/optim.safetensors re_$variant/ckpt/step_00000006/optim.safetensors \
    && ok "$variant: resumed adapter and optimizer state are bit-identical" \
    || not_ok "$variant: resumed adapter and optimizer state are bit-identical"

  # activation checkpointing chosen for the fine-tune (not the base's architecture)
  expect_ok "$variant: finetune with model.recompute_layers" "$QUASAR" finetune --config ft_$variant.json \
    --base base_$variant --out rl_$variant --set model.recompute_layers=true \
    && { cmp -s $step/adapter_model.safetensors rl_$variant/ckpt/step_00000006/adapter_model.safetensors \
      && ok "$variant: the adapter trained with recompute_layers is bit-identical" \
      || not_ok "$variant: the adapter trained with recompute_layers is bit-identical"; }

  # greedy generation: adapter on the base == the merged model; unmerge gives the base back
  gen() { "$QUASAR" generate --temperature 0 --prompt "Speak" --max-tokens 40 "$@" 2>/dev/null; }
  expect_ok "$variant: merge" "$QUASAR" merge --model base_$variant --adapter ft_$variant --out merged_$variant
  [ "$(gen --model base_$variant --adapter ft_$variant)" = "$(gen --model merged_$variant)" ] \
    && ok "$variant: greedy generation with --adapter equals the merged model's" \
    || not_ok "$variant: greedy generation with --adapter equals the merged model's"
  expect_ok "$variant: unmerge" "$QUASAR" merge --unmerge --model merged_$variant --adapter ft_$variant --out unmerged_$variant
  [ "$(gen --model unmerged_$variant)" = "$(gen --model base_$variant)" ] \
    && ok "$variant: unmerged model generates as the base" || not_ok "$variant: unmerged model generates as the base"
  ev() { "$QUASAR" eval --set data.path="$WORK/new.txt" --set train.seed=5 "$@" 2>/dev/null | grep -o '"val_loss": [0-9.]*'; }
  a=$(ev --model base_$variant --adapter ft_$variant) b=$(ev --model merged_$variant)
  [ -n "$a" ] && [ "$a" = "$b" ] && ok "$variant: eval --adapter equals eval of the merged model ($a)" \
    || not_ok "$variant: eval --adapter equals eval of the merged model" "'$a' vs '$b'"
  c=$(ev --model base_$variant)
  [ -n "$c" ] && [ "$a" != "$c" ] && ok "$variant: the adapter changes the base's validation loss ($c -> $a)" \
    || not_ok "$variant: the adapter changes the base's validation loss" "'$c' vs '$a'"
  # the adapters' paths add onto products from bf16 base weights (the FFN's GELU unfused)
  d=$(ev --model base_$variant --adapter ft_$variant --weights bf16)
  python3 -c "import sys; a, d = (float(x.split()[1]) for x in sys.argv[1:3]); assert abs(a - d) < 0.01 * a" "$a" "$d" \
    && ok "$variant: eval --adapter from bf16 base weights, within 1% of fp32's (${d#*: })" \
    || not_ok "$variant: eval --adapter from bf16 base weights, within 1% of fp32's" "'$a' vs '$d'"
done

# several adapters over one base, chosen at load time
lora_config r2.json "q,v"
expect_ok "a second adapter (r 2, q,v) over the same base" "$QUASAR" finetune --config r2.json --base base_dense --out ft_r2 --set lora.r=2
s2=$(stat -c %s ft_r2/ckpt/step_00000006/adapter_model.safetensors)
expect_ok "the same with r 8" "$QUASAR" finetune --config r2.json --base base_dense --out ft_r8 --set lora.r=8
s8=$(stat -c %s ft_r8/ckpt/step_00000006/adapter_model.safetensors)
# q,v on 2 layers of width 16: (16 + 48) * r floats per layer, so r 2 -> 8 adds exactly 3072 bytes
[ $((s8 - s2)) -eq 3072 ] && ok "adapter file size scales with r ($s2 -> $s8 bytes)" || not_ok "adapter file size scales with r" "$s2 -> $s8"
[ "$(ev --model base_dense --adapter ft_r2)" != "$(ev --model base_dense --adapter ft_dense)" ] \
  && ok "two adapters over one base, chosen at load time, evaluate differently" \
  || not_ok "two adapters over one base, chosen at load time, evaluate differently"

# bad input: one error line, nothing saved damaged
(cd base_dense && find . -type f -exec sha256sum {} + | sort) >base_dense.sums
expect_error "finetune without --base" "needs --base" "$QUASAR" finetune --config r2.json
expect_error "a base that is not a checkpoint" "--base: no checkpoint" "$QUASAR" finetune --config r2.json --base nowhere --out x1
expect_error "lora.r out of range" "lora.r: must be in \[1, 4096\], got 0" "$QUASAR" finetune --config r2.json --base base_dense --out x2 --set lora.r=0
expect_error "lora.r above n_embd" "lora.r \(32\) must be <= model.n_embd \(16\)" "$QUASAR" finetune --config r2.json --base base_dense --out x3 --set lora.r=32
expect_error "unknown target" "lora.targets: unknown target 'qq'" "$QUASAR" finetune --config r2.json --base base_dense --out x4 --set lora.targets=qq,v
expect_error "experts on a dense model" "lora.targets: experts needs an MoE model" "$QUASAR" finetune --config r2.json --base base_dense --out x5 --set lora.targets=experts
expect_error "fc on an MoE model" "use experts" "$QUASAR" finetune --config r2.json --base base_moe --out x6 --set lora.targets=fc
expect_error "an architecture change" "model: the architecture is the base checkpoint's" "$QUASAR" finetune --config r2.json --base base_dense --out x7 --set model.n_layer=3
expect_error "an unknown --device" "--device: expected cpu or cuda, got 'tpu'" "$QUASAR" finetune --config r2.json --base base_dense --out x_dev --device tpu
printf 'Speak ~ citizens\n%.0s' $(seq 1 40) >alien.txt
expect_error "characters outside the base's vocabulary" "byte 0x7e at offset 6 is not in the vocabulary" "$QUASAR" finetune --config r2.json --base base_dense --out x8 --set data.path="$WORK/alien.txt"
expect_error "generate with a missing adapter" "--adapter: no checkpoint in 'nowhere'" "$QUASAR" generate --model base_dense --adapter nowhere
"$QUASAR" train --config base_dense.json --out wide --set model.n_embd=32 --set train.max_steps=1 \
  --set train.sample_tokens=0 >/dev/null 2>&1
expect_error "an adapter made for another base shape" "does not fit this base model: .*lora_A.weight' is F32 \[4,16\], expected F32 \[4,32\]" \
  "$QUASAR" generate --model wide --adapter ft_dense --max-tokens 3
cp -r ft_dense bad && printf 'x' >>bad/ckpt/step_00000006/adapter_model.safetensors
expect_error "a damaged adapter" "wrong size" "$QUASAR" generate --model base_dense --adapter bad
expect_error "merge into an existing run" "already holds a run" "$QUASAR" merge --model base_dense --adapter ft_dense --out base_dense
expect_error "resume with another lora section" "the lora section differs" "$QUASAR" finetune --base base_dense --resume re_dense --set lora.alpha=3
(cd base_dense && sha256sum -c --quiet ../base_dense.sums) >/dev/null 2>&1 \
  && ok "the base run is untouched by every failed command" || not_ok "the base run is untouched by every failed command"

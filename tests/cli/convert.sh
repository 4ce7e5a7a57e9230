# quasar convert: a Hugging Face GPT-2 folder (the F16 fixture) becomes a run that
# generates, exports back to a folder that converts again, and bad input fails with
# one error line.
root=$(cd "$(dirname "$0")/../.." && pwd)
fixture=$root/tests/fixtures/hf_gpt2_tiny
vocab=$root/../shared/data/gpt2
. "$root/tests/cli_lib.sh"

expect_ok "from-hf: the F16 fixture converts" "$QUASAR" convert --from-hf "$fixture" --out run --vocab-dir "$vocab"
[ "$(cat run/ckpt/latest)" = step_00000000 ] && [ -f run/config.json ] \
  && ok "from-hf: a run with step_00000000 and config.json" || not_ok "from-hf: a run with step_00000000 and config.json"
expect_ok "generate from the converted run" "$QUASAR" generate --model run --prompt "Hello" --max-tokens 5 --temperature 0
cp "$WORK/out" gen1
"$QUASAR" generate --model run/ckpt/step_00000000 --prompt "Hello" --max-tokens 5 --temperature 0 >gen2 2>/dev/null
[ "$(head -c 5 gen1)" = Hello ] && [ "$(wc -c <gen1)" -gt 6 ] && cmp -s gen1 gen2 \
  && ok "generate: greedy continuation of the prompt, the same twice" || not_ok "generate: greedy continuation of the prompt, the same twice" "$(cat gen1)"

expect_ok "generate from bf16 weights" "$QUASAR" generate --model run --prompt "Hello" --max-tokens 5 --temperature 0 \
  --weights bf16
[ "$(head -c 5 "$WORK/out")" = Hello ] && [ "$(wc -c <"$WORK/out")" -gt 6 ] \
  && ok "generate: bf16 weights continue the prompt" || not_ok "generate: bf16 weights continue the prompt" "$(cat "$WORK/out")"

expect_ok "to-hf: export the run" "$QUASAR" convert --to-hf run --out hf
grep -q '"model_type":.*"gpt2"' hf/config.json && [ -s hf/model.safetensors ] \
  && ok "to-hf: config.json and model.safetensors" || not_ok "to-hf: config.json and model.safetensors"
expect_ok "from-hf: the export converts again" "$QUASAR" convert --from-hf hf --out run2 --vocab-dir "$vocab"
"$QUASAR" generate --model run2 --prompt "Hello" --max-tokens 5 --temperature 0 >gen3 2>/dev/null
cmp -s gen1 gen3 && ok "round trip: the same greedy text" || not_ok "round trip: the same greedy text" "$(cat gen3)"

expect_error "from-hf into an existing run" "already holds a run" "$QUASAR" convert --from-hf "$fixture" --out run --vocab-dir "$vocab"
mkdir empty
expect_error "from-hf without config.json" "empty/config.json" "$QUASAR" convert --from-hf empty --out bad --vocab-dir "$vocab"
mkdir swish && ln -s "$fixture/model.safetensors" swish/
sed 's/"gelu_new"/"swish"/' "$fixture/config.json" >swish/config.json
expect_error "from-hf with an unsupported activation" "'activation_function' 'swish' is not supported" \
  "$QUASAR" convert --from-hf swish --out bad --vocab-dir "$vocab"
expect_error "from-hf with a missing vocabulary" "nowhere" "$QUASAR" convert --from-hf "$fixture" --out bad --vocab-dir nowhere
expect_error "convert needs a direction" "one of --from-hf DIR or --to-hf DIR" "$QUASAR" convert --out x
expect_error "convert needs --out" "needs --out" "$QUASAR" convert --to-hf run
expect_error "to-hf from no checkpoint" "no checkpoint in 'empty'" "$QUASAR" convert --to-hf empty --out bad
[ ! -e bad ] && ok "failed conversions write nothing" || not_ok "failed conversions write nothing"

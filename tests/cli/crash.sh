# Crash safety: kill -9 at random moments of a run that checkpoints every step (so many
# kills land inside a checkpoint write). After every kill, ckpt/latest must name a
# complete, loadable checkpoint; resuming each time, the finished run must be
# bit-identical to one that was never interrupted.
. "$(dirname "$0")/../cli_lib.sh"
make_corpus corpus.txt
tiny_config c.json
sets=(--set train.max_steps=800 --set train.checkpoint_interval=1 --set train.keep_checkpoints=2
      --set train.eval_interval=500 --set train.sample_tokens=0)
expect_ok "uninterrupted reference run" "$QUASAR" train --config c.json --out ref "${sets[@]}"

kills=0 tries=0 broken=""
RANDOM=${QS_TEST_SEED:-$$}
while [ $kills -lt 20 ] && [ $tries -lt 100 ]; do
  tries=$((tries + 1))
  if [ -f run/ckpt/latest ]; then args=(--resume run); else args=(--config c.json --out run "${sets[@]}"); fi
  "$QUASAR" train "${args[@]}" >/dev/null 2>&1 &
  pid=$!
  sleep "0.$(printf '%03d' $((20 + RANDOM % 400)))"
  kill -9 $pid 2>/dev/null && kills=$((kills + 1))
  wait $pid 2>/dev/null
  if [ -f run/ckpt/latest ] && ! "$QUASAR" eval --model run --set train.eval_iters=1 >/dev/null 2>"$WORK/err"; then
    broken="after kill $kills ($(cat run/ckpt/latest)): $(cat "$WORK/err")"
    break
  fi
done
echo "# $kills kills in $tries tries; last checkpoint $(cat run/ckpt/latest 2>/dev/null)"
if [ -z "$broken" ] && [ $kills -eq 20 ]; then ok "20 kills -9: latest always named a loadable checkpoint"
else not_ok "20 kills -9: latest always named a loadable checkpoint" "${broken:-only $kills kills landed}"; fi

if [ -f run/ckpt/latest ]; then args=(--resume run); else args=(--config c.json --out run "${sets[@]}"); fi
expect_ok "the killed run finishes" "$QUASAR" train "${args[@]}"
cmp -s ref/ckpt/step_00000800/model.safetensors run/ckpt/step_00000800/model.safetensors \
  && cmp -s ref/ckpt/step_00000800/optim.safetensors run/ckpt/step_00000800/optim.safetensors \
  && ok "after 20 kills and resumes the weights are bit-identical to the uninterrupted run" \
  || not_ok "after 20 kills and resumes the weights are bit-identical to the uninterrupted run"
[ "$(ls -d run/ckpt/step_* | wc -l)" -le 2 ] && ok "keep_checkpoints=2 pruned older checkpoints" \
  || not_ok "keep_checkpoints=2 pruned older checkpoints" "$(ls run/ckpt)"

# Faults from the environment: a full disk (simulated with a file-size limit), a run
# folder the user may not write, and a diverging run. Each ends with one clear error,
# and nothing already saved is damaged.
. "$(dirname "$0")/../cli_lib.sh"
make_corpus corpus.txt
tiny_config c.json
expect_ok "reference run" "$QUASAR" train --config c.json --out run
snapshot() { cat run/ckpt/latest run/ckpt/step_00000006/* | sha256sum; }
before=$(snapshot)
intact() {
  if [ "$(snapshot)" = "$before" ] && "$QUASAR" eval --model run --set train.eval_iters=1 >/dev/null 2>&1 \
     && [ -z "$(ls -a run/ckpt | grep '^\.tmp-')" ]; then ok "$1: saved checkpoint intact, no temp folder left"
  else not_ok "$1: saved checkpoint intact, no temp folder left" "$(ls -a run/ckpt)"; fi
}

# Disk full: files may not grow past 24 KiB, smaller than a checkpoint's model file.
# SIGXFSZ is ignored so the write fails with EFBIG instead of killing the process.
full_disk() { (ulimit -f 24; trap '' XFSZ; exec "$@"); }
expect_run_error "disk full while checkpointing" "File too large" \
  full_disk "$QUASAR" train --resume run --set train.max_steps=9
intact "disk full"

# A run folder this user cannot write (run as nobody; root would be allowed).
if [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null; then
  chmod 755 "$WORK"
  as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
  expect_run_error "read-only run folder" "Permission denied" as_nobody "$QUASAR" train --resume run --set train.max_steps=9
  intact "read-only run folder"
  expect_error "unwritable --out" "Permission denied" as_nobody "$QUASAR" train --config c.json --out run/new
else
  echo "# skipped the permission cases: needs root and setpriv to act as another user"
fi

# Divergence: an absurd learning rate blows the weights up; every later step is
# non-finite, skipped, logged as null (valid JSON) and counted, and the run stops.
expect_run_error "diverging run stops" "3 steps in a row skipped.*last checkpoint kept" \
  "$QUASAR" train --config c.json --out boom --set train.lr=1e30 --set train.warmup_steps=0 \
  --set train.max_bad_steps=3 --set train.checkpoint_interval=1 --set train.grad_clip=0
if python3 - boom/metrics.jsonl <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
skipped = [l for l in lines if l.get("skipped") == "nonfinite"]
assert len(skipped) == 3 and skipped[-1]["skipped_nonfinite"] == 3, lines[-3:]
assert all(l["train_loss"] is None or l["grad_norm"] is None for l in skipped)
assert any("val_loss" in l and l["val_loss"] is None for l in lines)
PY
then ok "diverging run: skipped steps logged as JSON with nulls and counts"
else not_ok "diverging run: skipped steps logged as JSON with nulls and counts"; fi
"$QUASAR" eval --model boom --set train.eval_iters=1 >/dev/null 2>&1 \
  && ok "diverging run: its last checkpoint still loads" || not_ok "diverging run: its last checkpoint still loads"

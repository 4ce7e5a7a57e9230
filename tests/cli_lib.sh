# Helpers for CLI tests: TAP-style "ok"/"not ok" lines counted by tests/run.sh.
# QUASAR is the binary under test (the ASan/UBSan build in `make test`).
: "${QUASAR:?QUASAR must name the quasar binary}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

ok() { echo "ok - $1"; }
not_ok() { echo "not ok - $1"; shift; [ $# -gt 0 ] && printf '#   %s\n' "$@"; return 0; }

sanitizer_report() { grep -qE 'AddressSanitizer|LeakSanitizer|runtime error:' "$1"; }

# expect_error NAME PATTERN CMD...: fails with non-zero exit and exactly one stderr
# line, "error: ...", matching PATTERN, and no sanitizer report.
expect_error() {
  local name=$1 pat=$2; shift 2
  "$@" >"$WORK/out" 2>"$WORK/err"; local rc=$?
  if [ $rc -eq 0 ]; then not_ok "$name" "exit 0, expected failure"; return; fi
  if sanitizer_report "$WORK/err"; then not_ok "$name" "sanitizer report:" "$(head -5 "$WORK/err")"; return; fi
  if [ "$(wc -l <"$WORK/err")" -ne 1 ] || ! grep -q '^error: ' "$WORK/err"; then
    not_ok "$name" "stderr is not one 'error:' line:" "$(head -3 "$WORK/err")"; return
  fi
  if ! grep -qE -- "$pat" "$WORK/err"; then not_ok "$name" "message lacks /$pat/: $(cat "$WORK/err")"; return; fi
  ok "$name"
}

# expect_run_error NAME PATTERN CMD...: a failure after the run has started: progress
# lines may precede it, but the last stderr line is the only "error: ..." line.
expect_run_error() {
  local name=$1 pat=$2; shift 2
  "$@" >"$WORK/out" 2>"$WORK/err"; local rc=$?
  if [ $rc -eq 0 ]; then not_ok "$name" "exit 0, expected failure"; return; fi
  if sanitizer_report "$WORK/err"; then not_ok "$name" "sanitizer report:" "$(head -5 "$WORK/err")"; return; fi
  if [ "$(grep -c '^error: ' "$WORK/err")" -ne 1 ] || ! tail -n1 "$WORK/err" | grep -q '^error: '; then
    not_ok "$name" "last stderr line is not the one 'error:' line:" "$(tail -3 "$WORK/err")"; return
  fi
  if ! tail -n1 "$WORK/err" | grep -qE -- "$pat"; then not_ok "$name" "message lacks /$pat/: $(tail -n1 "$WORK/err")"; return; fi
  ok "$name"
}

# expect_ok NAME CMD...: exits 0 without a sanitizer report.
expect_ok() {
  local name=$1; shift
  "$@" >"$WORK/out" 2>"$WORK/err"; local rc=$?
  if [ $rc -ne 0 ] || sanitizer_report "$WORK/err"; then
    not_ok "$name" "exit $rc" "$(tail -5 "$WORK/err")"; return 1
  fi
  ok "$name"
}

# A small corpus: enough distinct characters and text for both splits.
make_corpus() {
  for i in $(seq 1 60); do
    echo "First Citizen: we are accounted poor citizens, the patricians good $i."
    echo "All: Speak, speak! What authority surfeits on would relieve us."
  done >"$1"
}

# tiny_config FILE [EXTRA_MODEL_JSON]: a model small enough for ASan runs.
tiny_config() {
  cat >"$1" <<JSON
{
  "model": {"seq_len": 16, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.1 ${2:+, $2}},
  "train": {"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "lr": 3e-3,
            "warmup_steps": 2, "eval_interval": 3, "eval_iters": 2, "log_interval": 1,
            "checkpoint_interval": 3, "sample_tokens": 20, "seed": 7},
  "data": {"path": "$WORK/corpus.txt"}
}
JSON
}

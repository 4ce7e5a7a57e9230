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

# json_check NAME FILE CHECK: FILE holds one JSON record in DESIGN.md's bench format with
# positive, finite "quasar" values, and CHECK (Python over the record r and v, its
# results by name) holds. Without python3 only the record's shape is checked, with grep.
json_check() {
  local name=$1 file=$2 check=$3 out
  if ! command -v python3 >/dev/null; then
    grep -q '^{"device": ' "$file" && grep -q '"results": \[' "$file" && ! grep -qE '"quasar": (null|-|0[,}])' "$file" \
      && ok "$name (shape only: no python3)" || not_ok "$name" "$(head -c 300 "$file")"
    return
  fi
  if out=$(python3 - "$file" "$check" 2>&1 <<'PY'
import json, math, sys
r = json.load(open(sys.argv[1]))
def pos(x): return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
for k in ("device", "date", "commit", "command", "results"):
    assert k in r, "no " + k
assert r["results"], "no results"
for e in r["results"]:
    assert set(e) >= {"name", "metric", "quasar", "peer", "peer_value", "ratio"}, e
    assert pos(e["quasar"]), e
v = {e["name"]: e["quasar"] for e in r["results"]}
exec(sys.argv[2])
PY
  ); then ok "$name"; else not_ok "$name" "$out"; fi
}

# same_tensors A B: two safetensors files hold the same tensors, bit for bit (their
# metadata, which carries the run's config, may differ)
same_tensors() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys
def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        head.pop("__metadata__", None)
        return head, f.read()
sys.exit(tensors(sys.argv[1]) != tensors(sys.argv[2]))
PY
}

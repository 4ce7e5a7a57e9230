# Replays every fuzz target's seed corpus and crash regressions (tests/fuzz/) through its
# gcc ASan/UBSan replay binary, which `make test` builds next to $QUASAR.
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/tests/cli_lib.sh"
bin=$(dirname "$QUASAR")/fuzz

for src in "$root"/tests/fuzz/fuzz_*.c; do
  t=$(basename "$src" .c); t=${t#fuzz_}
  dirs=("$root/tests/fuzz/corpus/$t")
  [ -d "$root/tests/fuzz/regressions/$t" ] && dirs+=("$root/tests/fuzz/regressions/$t")
  if "$bin/replay_$t" "${dirs[@]}" >"$WORK/out" 2>&1 && ! sanitizer_report "$WORK/out"; then
    ok "fuzz $t: $(tail -n1 "$WORK/out")"
  else
    mapfile -t why < <(tail -n 8 "$WORK/out")
    not_ok "fuzz $t: corpus or regression input fails" "${why[@]}"
  fi
done

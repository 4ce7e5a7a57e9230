#!/usr/bin/env bash
# PNG plots with gnuplot (Debian: apt-get install gnuplot-nox).
#   bench/plot.sh loss RUN_DIR                    -> RUN_DIR/loss.png: train_loss and val_loss
#                                                    against step, from RUN_DIR/metrics.jsonl
#   bench/plot.sh bars [-o PNG] RESULTS_JSON...   -> a bar chart of each result's Quasar / peer
#                                                    ratio (> 1: Quasar better), log scale
#                                                    (default PNG: ./ratios.png)
# The JSON is read with awk alone (no python or jq): metrics.jsonl lines are flat objects,
# and in results files every entry's "name" comes before its "ratio". Prints the PNG's path.
set -euo pipefail
usage() { echo "usage: bench/plot.sh loss RUN_DIR | bench/plot.sh bars [-o PNG] RESULTS_JSON..." >&2; exit 2; }
die() { echo "error: $*" >&2; exit 1; }
command -v gnuplot >/dev/null || die "gnuplot is not installed (Debian: apt-get install gnuplot-nox)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# pngcairo draws smoother text; gnuplot builds without cairo have png.
term=png
gnuplot -e 'set terminal pngcairo' >/dev/null 2>&1 && term=pngcairo

plot_loss() {
  local run=$1 metrics=$1/metrics.jsonl
  [ -f "$metrics" ] || die "$metrics: no such file"
  # "key": number on each line; null (a skipped step) and absent keys give nothing.
  awk -v train="$tmp/train.dat" -v val="$tmp/val.dat" '
    function num(key,   m) {
      if (!match($0, "\"" key "\"[ \t]*:[ \t]*-?[0-9][0-9.eE+-]*")) return ""
      m = substr($0, RSTART, RLENGTH); sub(/^[^:]*:[ \t]*/, "", m); return m
    }
    { s = num("step"); t = num("train_loss"); v = num("val_loss")
      if (s != "" && t != "") print s, t > train
      if (s != "" && v != "") print s, v > val }' "$metrics"
  [ -s "$tmp/train.dat" ] || die "$metrics: no train_loss lines"
  local with_val=0
  [ -s "$tmp/val.dat" ] && with_val=1
  cat >"$tmp/loss.gp" <<'GP'
set terminal TERM size 900,560 noenhanced
set output ARG1
set title ARG4
set xlabel 'step'
set ylabel 'loss'
set grid
set key top right
if (ARG5 eq '1') {
  plot ARG2 using 1:2 with lines lw 1 lc rgb '#1f77b4' title 'train_loss', \
       ARG3 using 1:2 with linespoints pt 7 ps 0.8 lw 2 lc rgb '#d62728' title 'val_loss'
} else {
  plot ARG2 using 1:2 with lines lw 1 lc rgb '#1f77b4' title 'train_loss'
}
GP
  sed -i "s/TERM/$term/" "$tmp/loss.gp"
  gnuplot -c "$tmp/loss.gp" "$run/loss.png" "$tmp/train.dat" "$tmp/val.dat" "$run: loss" "$with_val"
  echo "$run/loss.png"
}

plot_bars() {
  local out=ratios.png
  if [ "${1:-}" = "-o" ]; then out=${2:?-o needs a PNG path}; shift 2; fi
  [ $# -gt 0 ] || usage
  for f in "$@"; do
    [ -f "$f" ] || die "$f: no such file"
    # The whole file as one record; each numeric "ratio" goes with the "name" before it
    # (tab-separated: names may hold spaces).
    awk 'BEGIN { RS = "\001" }
      { text = $0
        while (match(text, /"(name|ratio)"[ \t\r\n]*:[ \t\r\n]*("[^"]*"|-?[0-9][0-9.eE+-]*|null)/)) {
          kv = substr(text, RSTART, RLENGTH); text = substr(text, RSTART + RLENGTH)
          key = kv; sub(/^"/, "", key); sub(/".*/, "", key)
          val = kv; sub(/^"[a-z]*"[ \t\r\n]*:[ \t\r\n]*/, "", val)
          if (key == "name") { gsub(/"/, "", val); name = length(val) > 36 ? substr(val, 1, 34) ".." : val }
          else if (val != "null" && name != "" && val + 0 > 0) { print name "\t" val; name = "" }
        } }' "$f" >>"$tmp/bars.dat"
  done
  [ -s "$tmp/bars.dat" ] || die "no result with a numeric ratio in $*"
  local n width
  n=$(wc -l <"$tmp/bars.dat")
  width=$((n * 60 + 240)); [ "$width" -ge 640 ] || width=640
  cat >"$tmp/bars.gp" <<'GP'
set terminal TERM size WIDTH,640 noenhanced
set output ARG1
set title 'Quasar / peer (> 1: Quasar better)'
set logscale y 2
set grid ytics
set xtics rotate by -40 scale 0 font ',9'
set xrange [-0.7:NBARS - 0.3]
set datafile separator '\t'
set ylabel 'ratio'
set key off
plot ARG2 using 0:2:($0-0.35):($0+0.35):(1):2:($2 >= 1 ? 0x2ca02c : 0xd62728):xtic(1) \
       with boxxyerror fs solid 0.8 lc rgb variable, \
     1 with lines dt 2 lc rgb 'black'
GP
  sed -i "s/TERM/$term/; s/WIDTH/$width/; s/NBARS/$n/" "$tmp/bars.gp"
  gnuplot -c "$tmp/bars.gp" "$out" "$tmp/bars.dat"
  echo "$out"
}

case "${1:-}" in
  loss) [ $# -eq 2 ] || usage; plot_loss "$2" ;;
  bars) shift; plot_bars "$@" ;;
  *) usage ;;
esac

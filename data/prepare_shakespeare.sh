#!/usr/bin/env bash
# Puts tiny Shakespeare (the 1,115,394-byte char-rnn corpus) at
# data/shakespeare_char/input.txt. Looks beside the project (../shared/data), then in
# data/, and otherwise downloads it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/shakespeare_char/input.txt"
size=1115394
[ -f "$out" ] && [ "$(wc -c <"$out")" -eq "$size" ] && exit 0
mkdir -p "$(dirname "$out")"
for src in "$here/../../shared/data/tinyshakespeare.txt" "$here/tinyshakespeare.txt"; do
  if [ -f "$src" ]; then
    cp "$src" "$out.tmp"
    break
  fi
done
if [ ! -f "$out.tmp" ]; then
  url=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
  echo "downloading $url" >&2
  curl -fsSL "$url" -o "$out.tmp" || wget -qO "$out.tmp" "$url"
fi
if [ "$(wc -c <"$out.tmp")" -ne "$size" ]; then
  echo "error: tiny Shakespeare should be $size bytes, got $(wc -c <"$out.tmp")" >&2
  rm -f "$out.tmp"
  exit 1
fi
mv "$out.tmp" "$out"
echo "prepared $out" >&2

#!/usr/bin/env bash
# The LoRA worked example's corpus: the licence texts of Debian's base-files package
# (/usr/share/common-licenses, every file once, symlinks skipped) as
# data/licenses_char/input.txt, limited to the characters of tiny Shakespeare, because a
# LoRA fine-tune keeps its base's char vocabulary. Tabs, form feeds and carriage returns
# become spaces or newlines, double quotes and backquotes become ', and every other
# character the base does not know (digits but 3, ( ) [ ] < > / " # % * _ = + @ ...) is
# dropped; runs of spaces are squeezed. The last 10% is the validation split.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=${LICENSES_DIR:-/usr/share/common-licenses}
out="$here/licenses_char/input.txt"
"$here/prepare_shakespeare.sh"
[ -d "$src" ] || { echo "error: $src not found (Debian's base-files package)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
files=$(find "$src" -maxdepth 1 -type f | LC_ALL=C sort)
# shellcheck disable=SC2086
cat $files | LC_ALL=C tr '\t\r\f"`' '  \n'"''" >"$out.raw"
keep=$(LC_ALL=C tr -d '\n' <"$here/shakespeare_char/input.txt" | LC_ALL=C fold -w1 | LC_ALL=C sort -u | tr -d '\n')
LC_ALL=C tr -cd "$(printf '%s' "$keep" | sed 's/\\/\\\\/g; s/-/\\-/g')"'\n' <"$out.raw" | LC_ALL=C tr -s ' ' >"$out.tmp"
rm -f "$out.raw"
mv "$out.tmp" "$out"
echo "prepared $out ($(wc -c <"$out") bytes from $(echo "$files" | wc -l) licences)" >&2

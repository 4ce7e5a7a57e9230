#!/usr/bin/env bash
# Fills .deps/ (git-ignored) with the host libraries a build needs that a bare GPU machine
# may lack: cJSON, OpenBLAS (and its Fortran runtime), PCRE2, zlib, as Debian packages
# unpacked into one prefix, include/ and lib/. Run it on a Debian or Ubuntu machine that
# can reach its package mirror, then carry .deps to the GPU machine, where
# tests/gpu/device.sh builds with CJSON_HOME=OPENBLAS_HOME=$PWD/.deps (both add the
# prefix's include/ and lib/, with an rpath, so the rest is found there too).
set -euo pipefail
cd "$(dirname "$0")/../.."
pkgs=(libcjson1 libcjson-dev libopenblas0-pthread libopenblas-pthread-dev libgfortran5 libquadmath0
      libpcre2-8-0 libpcre2-dev zlib1g zlib1g-dev)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "${pkgs[@]}" >/dev/null)
for f in "$work"/*.deb; do dpkg -x "$f" "$work/root"; done
r=$work/root
rm -rf .deps
mkdir -p .deps/include .deps/lib
cp -r "$r/usr/include/cjson" "$r/usr/include/pcre2.h" "$r/usr/include/zlib.h" "$r/usr/include/zconf.h" .deps/include/
cp "$r"/usr/include/x86_64-linux-gnu/openblas-pthread/{cblas.h,openblas_config.h} .deps/include/
# The shared objects only (no static archives, no LAPACK): each real file, then the
# names the linker (lib*.so) and the loader (the soname) look for.
lib() { # lib DIR PATTERN LINK_NAME...: the first file in DIR named like PATTERN
  local real
  real=$(find "$1" -maxdepth 1 -type f -name "$2" -print -quit)
  [ -n "$real" ] || { echo "carry_deps: no $2 in $1" >&2; exit 1; }
  shift 2
  cp "$real" .deps/lib/
  for name in "$@"; do ln -sf "$(basename "$real")" ".deps/lib/$name"; done
}
L=$r/usr/lib/x86_64-linux-gnu
lib "$L" 'libcjson.so.1.*' libcjson.so.1 libcjson.so
lib "$L/openblas-pthread" 'libopenblasp-r*.so' libopenblas.so.0 libopenblas.so
lib "$L" 'libgfortran.so.5.*' libgfortran.so.5
lib "$L" 'libquadmath.so.0.*' libquadmath.so.0
lib "$L" 'libpcre2-8.so.0.*' libpcre2-8.so.0 libpcre2-8.so
lib "$([ -d "$r/lib/x86_64-linux-gnu" ] && echo "$r/lib/x86_64-linux-gnu" || echo "$L")" 'libz.so.1.*' libz.so.1 libz.so
echo "carry_deps: .deps holds $(du -sh .deps | cut -f1)"

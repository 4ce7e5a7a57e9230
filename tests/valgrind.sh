#!/usr/bin/env bash
# A short train, resume and generate under valgrind's memcheck: no invalid access, no
# use of uninitialised values, no definite leaks. QUASAR is a portable (-march-free) build.
set -u
QUASAR=$(cd "$(dirname "$QUASAR")" && pwd)/$(basename "$QUASAR")
. "$(dirname "$0")/cli_lib.sh"
export OPENBLAS_CORETYPE=Haswell # AVX2 kernels: valgrind does not know AVX-512
vg() { valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite "$@"; }
make_corpus corpus.txt
tiny_config c.json
expect_ok "valgrind: train 3 steps" vg "$QUASAR" train --config c.json --out run --until 3
expect_ok "valgrind: resume to the end" vg "$QUASAR" train --resume run
expect_ok "valgrind: generate" vg "$QUASAR" generate --model run --max-tokens 20 --top-k 5
expect_ok "valgrind: generate from bf16 weights" vg "$QUASAR" generate --model run --max-tokens 20 --weights bf16

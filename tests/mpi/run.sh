#!/usr/bin/env bash
# The multi-rank checks (comm_test.c: the comm layer; ring_test.c: ring attention): one
# process always, then 1, 2, 3 and 4 MPI ranks when the build has MPI (QS_MPI=1; without
# QS_MPI, whether the binaries link MPI). The emulated CUDA build's comm_test runs the
# same checks through the NCCL backend (comm_nccl.c over tests/emu's NCCL).
# Prints TAP lines ("ok - ...", "not ok - ...") for tests/run.sh.
set -u
build=${1:?usage: tests/mpi/run.sh BUILD_DIR}
here=$(cd "$(dirname "$0")" && pwd)
bins=("$build/tests/mpi/comm_test" "$build/tests/mpi/ring_test")
nccl=$build/emu/comm_test
for bin in "${bins[@]}" "$nccl"; do
  if [ ! -x "$bin" ]; then echo "not ok - $bin is not built"; exit 1; fi
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT

failed=0
# run LABEL CMD...: its output, and a "not ok" line of our own if it failed silently
# (a crash, an abort before any verdict, or a hang: a whole run takes seconds).
run() {
  local label=$1; shift
  timeout -k 10 120 "$@" >"$log" 2>&1; local rc=$?
  cat "$log"
  if [ $rc -ne 0 ] && ! grep -q '^not ok ' "$log"; then echo "not ok - $label exited with status $rc"; fi
  [ $rc -eq 0 ] || failed=1
}

for bin in "${bins[@]}"; do run "${bin##*/} single" "$bin" single; done
run "comm_test nccl" "$nccl" nccl

mpi=${QS_MPI:-$(ldd "$bin" | grep -q libmpi && echo 1 || echo 0)}
if [ "$mpi" != 1 ]; then
  echo "# skipped the MPI ranks: this build has no MPI (mpicc not found, or MPI=0)"
  exit $failed
fi
if ! command -v mpirun >/dev/null; then echo "not ok - the build has MPI but mpirun is not on the PATH"; exit 1; fi
# Open MPI refuses root unless told; a test machine or container often is root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Open MPI's own allocations at exit, from components it has unloaded by then (so only
# the slow unwinder finds their libraries): suppressed by library, ours still reported.
export LSAN_OPTIONS=suppressions=$here/lsan.supp:fast_unwind_on_malloc=0:print_suppressions=0
for np in 1 2 3 4; do
  for bin in "${bins[@]}"; do run "${bin##*/} mpi np=$np" mpirun --oversubscribe -np "$np" "$bin" mpi; done
  run "comm_test nccl np=$np" mpirun --oversubscribe -np "$np" "$nccl" nccl
done
exit $failed

#!/usr/bin/env bash
# Quasar's main job: build if needed, prepare tiny Shakespeare, train.
#   ./train.sh                       the default run for this machine
#   ./train.sh --config FILE [...]   any `quasar train` options pass through
#   ./train.sh --gpus N ...          N ranks (mpirun, or srun under SLURM)
set -euo pipefail
cd "$(dirname "$0")"

gpus=1 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus=${2:?--gpus needs a number}; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$gpus" in ''|*[!0-9]*|0) echo "error: --gpus expects a positive integer, got '$gpus'" >&2; exit 2 ;; esac
if [ "$gpus" -gt 1 ]; then
  echo "error: --gpus $gpus: multi-rank training is not in this build yet; run with one rank" >&2
  exit 2
fi

make -s -j"$(nproc)" build/quasar
./data/prepare_shakespeare.sh

# The CUDA training backend is not in this build yet, so every default run is the
# CPU-sized one; a GPU config joins here when it is.
has_config=0
for a in "${args[@]+"${args[@]}"}"; do case "$a" in --config|--resume) has_config=1 ;; esac; done
if [ "$has_config" -eq 0 ]; then
  args=(--config configs/shakespeare_char_cpu.json --out runs/shakespeare_char_cpu "${args[@]+"${args[@]}"}")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
exec ./build/quasar train "${args[@]}"

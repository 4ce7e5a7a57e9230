#!/usr/bin/env bash
# Quasar's main job: build if needed, prepare tiny Shakespeare, train.
#   ./train.sh                       the default run for this machine
#   ./train.sh --config FILE [...]   any `quasar train` options pass through
#   ./train.sh --gpus N ...          N ranks on this node (mpirun), or in a Slurm job
#                                    (SLURM_JOB_ID set) a step of N tasks (srun)
#   srun ... ./train.sh ...          every task of a Slurm step trains as one rank
# train.batch_size is the global batch, so the same config is the same run on any
# number of ranks (docs/SCALING.md). With a GPU each rank trains on one (NCCL between
# them); without, on the CPU (MPI between them).
set -euo pipefail
cd "$(dirname "$0")"

gpus=1 args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus=${2:-}; shift $(( $# > 1 ? 2 : 1 )) ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$gpus" in ''|*[!0-9]*|0*) echo "error: --gpus expects a positive integer, got '$gpus'" >&2; exit 2 ;; esac

# Inside a step srun started, every task is already a rank: build and data are the
# job script's business (one process), so each task only trains.
in_step=${SLURM_STEP_ID:+${SLURM_PROCID:+1}}
if [ -z "$in_step" ]; then
  make -s -j"$(nproc)" build/quasar
  ./data/prepare_shakespeare.sh
fi
launch=()
if [ "$gpus" -gt 1 ]; then
  if [ -n "$in_step" ]; then
    echo "error: --gpus $gpus inside an srun step: the step's tasks are the ranks; drop --gpus" >&2; exit 2
  elif [ -n "${SLURM_JOB_ID:-}" ]; then
    launch=(srun --ntasks="$gpus" --kill-on-bad-exit=1)
  elif command -v mpirun >/dev/null; then
    launch=(mpirun -np "$gpus")
    # Open MPI refuses root unless told (containers often are root), and counts cores, not
    # ranks, unless oversubscribing is allowed: a CPU machine runs N ranks on fewer cores.
    [ "$(id -u)" -eq 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    mpirun --version 2>/dev/null | grep -q "Open MPI" && launch+=(--oversubscribe)
  else
    echo "error: --gpus $gpus needs mpirun (Open MPI or MPICH) or a Slurm allocation" >&2; exit 2
  fi
fi

# The GPU when this node has one (nvidia-smi lists it) and the build has the CUDA backend,
# unless --device says otherwise; each rank then takes one GPU. Without --config, the
# default run sized for that device.
has_config=0 has_device=0
for a in "${args[@]+"${args[@]}"}"; do
  case "$a" in --config|--resume) has_config=1 ;; --device) has_device=1 ;; esac
done
target=cpu
if [ "$has_device" -eq 0 ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && ldd build/quasar | grep -q libcudart; then
  target=gpu
  args=(--device cuda "${args[@]+"${args[@]}"}")
fi
if [ "$has_config" -eq 0 ]; then
  args=(--config "configs/shakespeare_char_$target.json" --out "runs/shakespeare_char_$target" "${args[@]+"${args[@]}"}")
fi

# the node's cores shared among its ranks
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / gpus > 0 ? $(nproc) / gpus : 1 ))}
cmd=("${launch[@]+"${launch[@]}"}" ./build/quasar train "${args[@]}")
echo "+ ${cmd[*]}" >&2
# Train, then draw the run's loss curve (bench/plot.sh needs gnuplot: Debian's
# gnuplot-nox); the exit status stays training's.
rc=0
"${cmd[@]}" || rc=$?
run=runs/default dry=0
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in --out|--resume) run=${args[i + 1]:-$run} ;; --dry-run) dry=1 ;; esac
done
# a dry run writes nothing, the plot included
if [ "$rc" -eq 0 ] && [ "$dry" -eq 0 ] && [ "${SLURM_PROCID:-0}" = 0 ] && [ -s "$run/metrics.jsonl" ]; then
  if ! command -v gnuplot >/dev/null; then
    echo "note: no gnuplot, so no $run/loss.png (Debian: apt-get install gnuplot-nox)" >&2
  elif bench/plot.sh loss "$run" >/dev/null; then
    echo "loss curve: $run/loss.png" >&2
  fi
fi
exit "$rc"

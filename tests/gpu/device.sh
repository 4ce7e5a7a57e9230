#!/usr/bin/env bash
# shellcheck disable=SC2317 # the steps' functions are called through step's bash -c
# A GPU machine's checks in one prepared script, for a lease of a few minutes: the build,
# the parity harness, compute-sanitizer, the kernel and training benchmarks and the
# PyTorch comparison. Steps run in the order given, each under its own time limit, and
# are skipped once the deadline is near, so that one that hangs costs only its share and
# the logs still come back. Logs and results go to $OUT (the device tool brings back at
# most 8 files), else to runs/device/.
#   tests/gpu/device.sh [STEP...]      default: build parity attention kernels memcheck train
#   steps: build parity attention kernels moe memcheck racecheck synccheck initcheck train
#          generate compare compare_gpt2 trainsh (attention also profiles its kernels with ncu, and
#          counts their SASS instructions)
#   DEADLINE=S   seconds from the start after which no step starts (default 540)
# A bare machine lacks cJSON and may lack OpenBLAS, PCRE2 and zlib: carry .deps
# (tests/gpu/carry_deps.sh fills it) and data/shakespeare_char, data/shakespeare_gpt2
# (./data/prepare_shakespeare.sh, data/prepare_shakespeare_gpt2.sh). NCCL is taken from
# CUDA_HOME, or from Python's nvidia-nccl package when that is where it is.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit
out=${OUT:-runs/device}
mkdir -p "$out"
start=$SECONDS deadline=${DEADLINE:-540}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build parity attention kernels memcheck train)

# ---- the toolchain and libraries, exported so that nested makes (compare.sh, train.sh)
# build with the same flags ----
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "${nvcc:-/usr/local/cuda/bin/nvcc}")")}
export MPI=${MPI:-0}
# (the loader path too: OpenBLAS's own needs, its Fortran runtime, are not the binary's
# RUNPATH's business)
[ -d .deps/lib ] && export CJSON_HOME=${CJSON_HOME:-$PWD/.deps} OPENBLAS_HOME=${OPENBLAS_HOME:-$PWD/.deps} \
  LD_LIBRARY_PATH=$PWD/.deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ -z "${NCCL_HOME:-}" ] && [ ! -f "$CUDA_HOME/include/nccl.h" ]; then
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  h=$(find "$site/nvidia" -name nccl.h 2>/dev/null | head -1)
  l=$(find "$site/nvidia" -name 'libnccl.so*' 2>/dev/null | head -1)
  if [ -n "$h" ] && [ -n "$l" ]; then # the wheel has no libnccl.so for the linker: a prefix with one
    export NCCL_HOME=/tmp/quasar-nccl
    mkdir -p "$NCCL_HOME/include" "$NCCL_HOME/lib"
    ln -sf "$h" "$NCCL_HOME/include/nccl.h"
    ln -sf "$l" "$NCCL_HOME/lib/libnccl.so"
    ln -sf "$l" "$NCCL_HOME/lib/libnccl.so.2"
  else
    export NCCL=0
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
Q=build/quasar P=build/tests/gpu/parity
SAN=${COMPUTE_SANITIZER:-$CUDA_HOME/bin/compute-sanitizer}
command -v "$SAN" >/dev/null || SAN=compute-sanitizer

# The steps' bodies run under timeout, so as commands: exported functions.
parity() { # the harness, its failures and summary lines
  "$P" >"$out/parity.tap" 2>&1
  local rc=$?
  grep -E '^not ok|^# ' "$out/parity.tap" | tail -n 40
  [ "$rc" -eq 0 ] || tail -n 3 "$out/parity.tap"
  return "$rc"
}
kernels() { # kernels PRECISION
  "$Q" bench kernels --device cuda --precision "$1" --json >"$out/kernels-$1.json"
}
sanitize() { # sanitize TOOL: the harness under one compute-sanitizer tool, a short training run
  QS_PARITY_STEPS=3 "$SAN" --tool "$1" --error-exitcode 1 "$P" >>"$out/sanitizer.log" 2>&1
  local rc=$?
  tail -n 5 "$out/sanitizer.log"
  return "$rc"
}
moe_grouped() { # issue 6's experts, bf16, shapes a and b: cuBLAS's grouped GEMM, then Quasar's kernel
  local shape g
  for shape in a b; do
    for g in cublas quasar; do
      "$Q" bench moe --device cuda --precision bf16 --shape "$shape" --grouped "$g" --json || return
    done
  done
}
bench_train() { # full and LoRA at GPT-2 124M in bf16, micro-batch 8 and 4, 0 / 6 / 12 blocks checkpointed
  local mb rl lora
  for mb in 8 4; do
    for rl in false 6 true; do
      for lora in full lora; do
        local extra=()
        [ "$lora" = full ] || extra=(--lora)
        echo "# bench train mb $mb recompute_layers $rl $lora"
        "$Q" bench train --config configs/gpt2_124m_shakespeare.json --device cuda --steps 10 --warmup 3 --json \
          --set train.precision=bf16 --set train.batch_size="$mb" --set train.micro_batch_size="$mb" \
          --set model.recompute_layers="$rl" "${extra[@]}" >>"$out/train.jsonl" || return
      done
    done
  done
}
generate() { # decode at GPT-2 124M on the device from fp32 and bf16 weights: 1 and 8 prompts, a long prefill
  local w b
  for w in fp32 bf16; do
    for b in 1 8; do
      "$Q" bench generate --config configs/gpt2_124m_shakespeare.json --device cuda --weights "$w" --batch "$b" \
        --prompt-tokens 32 --new-tokens 64 --repeats 3 --json || return
    done
    "$Q" bench generate --config configs/gpt2_124m_shakespeare.json --device cuda --weights "$w" \
      --prompt-tokens 1022 --new-tokens 2 --repeats 3 --json || return
  done
}
attention_profile() { # what limits the bf16 attention (issue 5): counters of one point's kernels, then their SASS
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  # T 4096, hs 128, B 4, NH 16 (its causal point): the first call's staging, forward, dq and dk/dv
  if [ -n "$ncu" ]; then
    "$ncu" --clock-control none -k 'regex:(flash_.*bf16|stage_heads)' --launch-count 9 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
      "$Q" bench attention --device cuda --precision bf16 --seq 4096 --head-size 128 --repeats 1 2>&1 |
      grep -v '^==PROF==' | cut -c1-150
  else
    echo "no ncu"
  fi
  # static instruction counts of each bf16 attention kernel: products, shared loads, copies, barriers, exp2
  "$CUDA_HOME/bin/cuobjdump" --dump-sass "$Q" | awk '
    /Function :/ { f = $3; next }
    f ~ /_bf16_kernel/ && /^ +\/\*[0-9a-f]+\*\/ / {
      op = $2; if (op ~ /^@/) op = $3; sub(/[.;].*/, "", op); n[f " " op]++; total[f]++ }
    END { for (k in n) { split(k, p, " "); if (p[2] ~ /^(HMMA|LDSM|LDGSTS|LDG|STG|LDS|STS|BAR|MUFU|SHFL)$/) print k, n[k] }
          for (f in total) print f, "all", total[f] }' | sort
}
export -f parity kernels moe_grouped sanitize bench_train generate attention_profile
export out P Q SAN

# step NAME LIMIT COMMAND...: runs it under its limit unless the deadline is too near;
# one line with its status and seconds either way.
failed=()
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [ $((SECONDS - start + 20)) -gt "$deadline" ]; then
    echo "## $name: skipped, $((SECONDS - start)) s of the ${deadline} s deadline gone"
    return
  fi
  local left=$((deadline - (SECONDS - start)))
  [ "$limit" -le "$left" ] || limit=$left
  echo "## $name: start (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@"
  rc=$?
  [ $rc -eq 0 ] || failed+=("$name")
  echo "## $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ', timed out')"
}

main() {
  local rev
  rev=$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+changes')
  echo "# $(date -u +%FT%TZ) $rev, steps: ${steps[*]}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/# gpu: /'
  echo "# nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -1)"
  echo "# CUDA_HOME=$CUDA_HOME NCCL_HOME=${NCCL_HOME:-} NCCL=${NCCL:-auto} CJSON_HOME=${CJSON_HOME:-}" \
    "threads=$OMP_NUM_THREADS"

  for s in "${steps[@]}"; do
    case "$s" in
      build) step build 420 make -s -j"$(nproc)" "$Q" "$P" build/bench/quadconv_speed ;;
      parity) step parity 240 parity ;;
      # issue 5's sweep, Quasar's bf16 kernels beside SDPA's FlashAttention backend; then
      # SDPA's math backend (T x T scores) at 16k, where issue 5 expects it to run out of memory
      attention)
        step attention 200 env QUASAR="$Q" QUADCONV_SPEED=build/bench/quadconv_speed \
          bench/compare.sh --device cuda --dtype bf16 --only attention --repeats 10 --retries 0 \
          --out "$out/compare-attention.json"
        step attention_profile 150 attention_profile
        step attention_naive 90 bash -c "python3 bench/peers/attention_torch.py --device cuda --dtype bf16 \
          --seq 16384 --backend math --repeats 2 >'$out/attention-math-16k.json'" ;;
      kernels)
        step kernels_fp32 120 kernels fp32
        step kernels_bf16 120 kernels bf16 ;;
      moe) step moe 150 moe_grouped ;; # its records go to device.log
      memcheck | racecheck | synccheck | initcheck) step "$s" 180 sanitize "$s" ;;
      train) step train 300 bench_train ;;
      generate) step generate 120 generate ;; # its records go to device.log
      compare) step compare 300 env QUASAR="$Q" QUADCONV_SPEED=build/bench/quadconv_speed \
        bench/compare.sh --device cuda --dtype bf16 --only quadconv,moe_a,moe_b,generate --retries 0 \
        --out "$out/compare.json" ;;
      compare_gpt2) step compare_gpt2 300 env QUASAR="$Q" QUADCONV_SPEED=build/bench/quadconv_speed \
        bench/compare.sh --device cuda --dtype bf16 --only gpt2 --train gpt2=configs/gpt2_124m_shakespeare.json \
        --steps 10 --retries 0 --out "$out/compare-gpt2.json" ;;
      # a fresh folder each time: a new run refuses one that holds a run (a warm machine keeps runs/)
      trainsh) step trainsh 240 ./train.sh --set train.max_steps=300 --out "runs/trainsh-$(date +%s)" ;;
      *) echo "## $s: no such step" && failed+=("$s") ;;
    esac
  done
  echo "# done in $((SECONDS - start)) s; failed: ${failed[*]:-none}"
  [ ${#failed[@]} -eq 0 ]
}

main 2>&1 | tee -a "$out/device.log"
exit "${PIPESTATUS[0]}"

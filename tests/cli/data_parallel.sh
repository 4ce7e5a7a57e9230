# Data and sequence parallelism over MPI ranks on the CPU: a run is the same run on any
# number of ranks. 2, 3 and 4 data-parallel ranks (plain, bucketed, ZeRO-1 and ZeRO-1
# bucketed), and 2 and 4 sequence-parallel ranks (ring attention; also 2 x 2 with bucketed
# ZeRO-1, grouped-query attention on 2; and 2 of each with activation checkpointing),
# must give 1 rank's losses, gradient norms and final weights (<= 1e-5 relative) for the
# same global batch, with dropout and MoE router noise on (their draws are keyed by
# global sample and position, not by rank); checkpoints written by N ranks resume on M; a
# batch that does not split fails on every rank.
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/cli_lib.sh"
mpi=${QS_MPI:-$(ldd "$QUASAR" | grep -q libmpi && echo 1 || echo 0)}
if [ "$mpi" != 1 ]; then
  echo "# skipped: this build has no MPI (mpicc not found, or MPI=0)"
  exit 0
fi
command -v mpirun >/dev/null || { not_ok "the build has MPI but mpirun is not on the PATH"; exit 0; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export LSAN_OPTIONS=suppressions=$here/mpi/lsan.supp:fast_unwind_on_malloc=0:print_suppressions=0
ranks() { local n=$1; shift; timeout -k 10 300 mpirun --oversubscribe -np "$n" "$@"; }

make_corpus corpus.txt
# batch 24 in micro-batches of 2 splits over 1, 2, 3 and 4 ranks
moe='"moe": {"n_experts": 4, "top_k": 2, "gating": "noisy_topk", "z_loss_coef": 0.001}'
tiny_config moe.json "$moe"
sets=(--set train.batch_size=24 --set train.max_steps=4 --set train.eval_interval=2 --set train.eval_iters=3
      --set train.checkpoint_interval=2)

# same RUN_A RUN_B: train/val losses, grad norms and every weight within 1e-5 relative
same() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys
from array import array
def metrics(run):
    return [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
def weights(run):
    step = open(f"{run}/ckpt/latest").read().strip()
    with open(f"{run}/ckpt/{step}/model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in head.items():
        if k == "__metadata__": continue
        a, b = v["data_offsets"]
        out[k] = array("f", data[a:b])
    return out
def close(x, y, what):
    if abs(x - y) > 1e-5 * max(1.0, abs(x), abs(y)):
        sys.exit(f"{what}: {x} vs {y}")
a, b = (metrics(r) for r in sys.argv[1:3])
if len(a) != len(b) or not a: sys.exit(f"{len(a)} vs {len(b)} metric lines")
for x, y in zip(a, b):
    for k in ("train_loss", "grad_norm", "val_loss"):
        if (k in x) != (k in y): sys.exit(f"step {x['step']}: {k} in one run only")
        if k in x: close(x[k], y[k], f"step {x['step']} {k}")
    if x.get("expert_tokens") != y.get("expert_tokens"): sys.exit(f"step {x['step']}: expert_tokens differ")
wa, wb = weights(sys.argv[1]), weights(sys.argv[2])
if wa.keys() != wb.keys(): sys.exit("different tensors")
for k in wa:
    scale = max(1.0, max(abs(v) for v in wa[k]))
    worst = max(abs(p - q) for p, q in zip(wa[k], wb[k]))
    if worst > 1e-5 * scale: sys.exit(f"{k}: weights differ by {worst}")
PY
}

expect_ok "1 rank" "$QUASAR" train --config moe.json --out one "${sets[@]}"
# bucketed: the gradients reduced in buckets of 2 KB (about one a layer here) while the
# backward pass computes the rest; plain: one allreduce after it. ZeRO-1's buckets are cut
# where the ranks' chunks meet, each piece reduced on its owner (3 ranks: a shared tail);
# at 10 KB on 4 ranks the last piece is reduced after the pass.
overlapped() { grep -Eq "^quasar: gradients reduced in [0-9]+ call\(s\) a step, [1-9][0-9]* of them during the backward" "$1"; }
# after_pass ERR: some of the step's calls came after the backward pass
after_pass() {
  sed -nE 's/^quasar: gradients reduced in ([0-9]+) call\(s\) a step, ([0-9]+) of them.*/\1 \2/p' "$1" \
    | awk '$1 > $2 { found = 1 } END { exit !found }'
}
for run in "2 plain 0" "3 plain 0" "4 plain 0" "2 bucketed 0.002" "4 bucketed 0.002" "2 zero 0" "3 zero 0" "4 zero 0" \
           "3 zero-bucketed 0.002" "4 zero-bucketed 0.01"; do
  set -- $run
  z=0; [ "${2#zero}" != "$2" ] && z=1
  mb=$3
  expect_ok "$1 ranks ($2) run" ranks "$1" "$QUASAR" train --config moe.json --out r$1_$2 "${sets[@]}" \
    --set parallel.zero=$z --set parallel.bucket_mb=$mb || continue
  if [ "$mb" != 0 ]; then
    overlapped "$WORK/err" && ok "$1 ranks ($2): buckets start during the backward pass" \
      || not_ok "$1 ranks ($2): buckets start during the backward pass" "$(grep 'gradients reduced' "$WORK/err")"
    [ "$mb" = 0.01 ] && { after_pass "$WORK/err" && ok "$1 ranks ($2): what no bucket took is reduced after the pass" \
      || not_ok "$1 ranks ($2): what no bucket took is reduced after the pass" "$(grep 'gradients reduced' "$WORK/err")"; }
  elif [ "$2" = plain ]; then
    grep -q "^quasar: gradients reduced in 1 call(s) a step, 0 of them during" "$WORK/err" \
      && ok "$1 ranks (plain): one allreduce after the backward pass" \
      || not_ok "$1 ranks (plain): one allreduce after the backward pass" "$(grep 'gradients reduced' "$WORK/err")"
  fi
  msg=$(same one r$1_$2 2>&1) && ok "$1 ranks ($2): losses, grad norms, expert counts and weights equal 1 rank's" \
    || not_ok "$1 ranks ($2): losses, grad norms, expert counts and weights equal 1 rank's" "$msg"
done
grep -q "per rank (ZeRO-1)" "$WORK/err" && ok "ZeRO-1 reports its per-rank optimizer memory" \
  || not_ok "ZeRO-1 reports its per-rank optimizer memory" "$(head -2 "$WORK/err")"
[ -f r4_zero/samples.txt ] && [ ! -e r4_zero/ckpt/step_00000004.tmp ] && [ "$(grep -c '"train_loss"' r4_zero/metrics.jsonl)" -eq 4 ] \
  && ok "4 ranks write one run folder: one metrics line per step, samples.txt" \
  || not_ok "4 ranks write one run folder: one metrics line per step, samples.txt"

# Activation checkpointing: each layer's forward runs again in the backward pass (router
# noise and dropout masks again the same), the statistics counted once, the buckets still
# reduced during the pass.
expect_ok "2 ranks, recompute_layers, bucketed" ranks 2 "$QUASAR" train --config moe.json --out r2_rl "${sets[@]}" \
  --set model.recompute_layers=true --set parallel.bucket_mb=0.002 \
  && { t="2 ranks, recompute_layers: buckets start during the backward pass"
    overlapped "$WORK/err" && ok "$t" || not_ok "$t" "$(grep 'gradients reduced' "$WORK/err")"
    t="2 ranks, recompute_layers: losses, grad norms, expert counts and weights equal 1 rank's"
    msg=$(same one r2_rl 2>&1) && ok "$t" || not_ok "$t" "$msg"; }

# Without a micro-batch size each rank runs its whole share in one pass (24, 12, 8, 6
# rows): a dense model's dropout masks follow the samples, so the steps still agree.
tiny_config dense.json
expect_ok "dense, 1 rank" "$QUASAR" train --config dense.json --out dense1 "${sets[@]}"
expect_ok "dense, 1 rank, one pass of 24" "$QUASAR" train --config dense.json --out d1 "${sets[@]}" --set train.micro_batch_size=0
expect_ok "dense, 4 ranks, one pass of 6 each" ranks 4 "$QUASAR" train --config dense.json --out d4 "${sets[@]}" \
  --set train.micro_batch_size=0 && { msg=$(same d1 d4 2>&1) && ok "dense: 4 ranks of 6 equal 1 rank of 24" \
  || not_ok "dense: 4 ranks of 6 equal 1 rank of 24" "$msg"; }

# Sequence parallel: each sequence of 16 split over 2 or 4 ranks in zig-zag blocks, the
# attention a ring; dense (the MoE balance loss would be taken per block).
for run in "2 1 0" "4 1 0" "4 2 1"; do
  set -- $run
  sp=$(( $1 / $2 )); label="$2 data x $sp sequence-parallel ranks"; [ "$3" = 1 ] && label="$label, ZeRO-1"
  mb=0; [ "$1" = 2 ] || [ "$3" = 1 ] && { mb=0.002; label="$label, bucketed"; }
  expect_ok "$label run" ranks "$1" "$QUASAR" train --config dense.json --out sp$1_$2 "${sets[@]}" \
    --set parallel.sp=$sp --set parallel.zero=$3 --set parallel.bucket_mb=$mb || continue
  if [ "$mb" != 0 ]; then
    overlapped "$WORK/err" && ok "$label: buckets start during the backward pass (beside the ring)" \
      || not_ok "$label: buckets start during the backward pass (beside the ring)" "$(grep 'gradients reduced' "$WORK/err")"
  fi
  msg=$(same dense1 sp$1_$2 2>&1) && ok "$label: losses, grad norms and weights equal 1 rank's" \
    || not_ok "$label: losses, grad norms and weights equal 1 rank's" "$msg"
  cmp -s dense1/samples.txt sp$1_$2/samples.txt && ok "$label: samples.txt as 1 rank's" \
    || not_ok "$label: samples.txt as 1 rank's"
done
grep -q "(2 data-parallel rank(s) x 2 sequence-parallel of 8 tokens" "$WORK/err" \
  && ok "the run reports its data x sequence-parallel layout" || not_ok "the run reports its data x sequence-parallel layout" "$(head -2 "$WORK/err")"
# Grouped-query attention (4 query heads over 1 K/V head): the ring passes K/V blocks a
# quarter as wide, and the run is still 1 rank's.
gqa=(--set model.n_head=4 --set model.n_kv_head=1)
expect_ok "grouped-query, 1 rank" "$QUASAR" train --config dense.json --out gqa1 "${sets[@]}" "${gqa[@]}" \
  && expect_ok "grouped-query, 2 sequence-parallel ranks" ranks 2 "$QUASAR" train --config dense.json --out gqa2 \
    "${sets[@]}" "${gqa[@]}" --set parallel.sp=2 \
  && { msg=$(same gqa1 gqa2 2>&1) && ok "grouped-query: 2 sequence-parallel ranks equal 1 rank" \
    || not_ok "grouped-query: 2 sequence-parallel ranks equal 1 rank" "$msg"; }
# ... and with activation checkpointing, whose backward runs each layer's ring again
expect_ok "grouped-query, 2 sequence-parallel ranks, recompute_layers" ranks 2 "$QUASAR" train --config dense.json \
  --out gqa2rl "${sets[@]}" "${gqa[@]}" --set parallel.sp=2 --set model.recompute_layers=true \
  && { msg=$(same gqa1 gqa2rl 2>&1) && ok "grouped-query, recompute_layers: 2 sequence-parallel ranks equal 1 rank" \
    || not_ok "grouped-query, recompute_layers: 2 sequence-parallel ranks equal 1 rank" "$msg"; }
ranks 3 "$QUASAR" train --config dense.json --out bad_sp "${sets[@]}" --set parallel.sp=2 >out 2>err
[ $? -ne 0 ] && grep -q "^error: parallel.sp 2 does not divide the 3 rank(s)" err && ! sanitizer_report err \
  && ok "parallel.sp must divide the ranks" || not_ok "parallel.sp must divide the ranks" "$(head -3 err)"
ranks 2 "$QUASAR" train --config dense.json --out bad_sp2 "${sets[@]}" --set parallel.sp=2 --set model.seq_len=18 >out 2>err
[ $? -ne 0 ] && grep -q "^error: parallel.sp 2: model.seq_len 18 must be a multiple of 2 x sp" err && ! sanitizer_report err \
  && ok "a sequence that does not cut into 2 x sp blocks is refused" \
  || not_ok "a sequence that does not cut into 2 x sp blocks is refused" "$(head -3 err)"

# GPU ranks: the emulated CUDA build (tests/emu/include) links the NCCL backend over an
# emulated NCCL, so its ranks run comm_nccl.c (the id's broadcast, device-buffer
# collectives, the ring's grouped send/recv) on the CPU. Short runs: the emulator is slow.
emu=$(dirname "$QUASAR")/emu/quasar
short=(--config dense.json --set train.batch_size=4 --set train.max_steps=3 --set train.eval_interval=3
       --set train.sample_tokens=0)
if [ -x "$emu" ]; then
  export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_stack_use_after_return=0
  expect_ok "short run, 1 CPU rank" "$QUASAR" train "${short[@]}" --out g_cpu
  for run in "bucketed 0 1" "ZeRO-1 1 1" "sequence-parallel 0 2"; do
    set -- $run
    expect_ok "2 emulated GPU ranks ($1) run" ranks 2 "$emu" train "${short[@]}" --device cuda --out g_$1 \
      --set parallel.zero=$2 --set parallel.sp=$3 --set parallel.bucket_mb=0.002 || continue
    if [ "$3" = 1 ]; then
      overlapped "$WORK/err" && ok "2 emulated GPU ranks ($1): buckets started during the backward pass" \
        || not_ok "2 emulated GPU ranks ($1): buckets started during the backward pass" \
                  "$(grep 'gradients reduced' "$WORK/err")"
    fi
    grep -q "rank(s).*, over nccl;.* on cuda$" "$WORK/err" && ok "2 emulated GPU ranks ($1) talk over nccl" \
      || not_ok "2 emulated GPU ranks ($1) talk over nccl" "$(grep 'rank(s)' "$WORK/err")"
    msg=$(same g_cpu g_$1 2>&1) && ok "2 emulated GPU ranks ($1): losses, grad norms and weights equal 1 CPU rank's" \
      || not_ok "2 emulated GPU ranks ($1): losses, grad norms and weights equal 1 CPU rank's" "$msg"
  done
fi
ranks 2 "$QUASAR" train "${short[@]}" --device cuda --out g_bad >out 2>err
[ $? -ne 0 ] && [ "$(grep -c '^error: --device cuda' err)" -ge 1 ] && ! grep -v '^error: --device cuda' err | grep -q '^error' \
  && ! sanitizer_report err && [ ! -e g_bad/metrics.jsonl ] \
  && ok "--device cuda over ranks without CUDA or NCCL in the build: one clear error" \
  || not_ok "--device cuda over ranks without CUDA or NCCL in the build: one clear error" "$(head -3 err)"

# Checkpoints are whole (a ZeRO-1 run gathers its optimizer shards), so N ranks resume on M.
expect_ok "2 ranks (ZeRO-1) stop at step 2" ranks 2 "$QUASAR" train --config moe.json --out n2m "${sets[@]}" \
  --set parallel.zero=1 --until 2
expect_ok "...resume on 1 rank" "$QUASAR" train --resume n2m && { msg=$(same one n2m 2>&1) \
  && ok "2-rank checkpoint resumed on 1 rank equals the 1-rank run" || not_ok "2-rank checkpoint resumed on 1 rank equals the 1-rank run" "$msg"; }
expect_ok "1 rank stops at step 2" "$QUASAR" train --config moe.json --out m2n "${sets[@]}" --until 2
expect_ok "...resume on 3 ranks (ZeRO-1)" ranks 3 "$QUASAR" train --resume m2n --set parallel.zero=1 && { msg=$(same one m2n 2>&1) \
  && ok "1-rank checkpoint resumed on 3 ranks (ZeRO-1) equals the 1-rank run" \
  || not_ok "1-rank checkpoint resumed on 3 ranks (ZeRO-1) equals the 1-rank run" "$msg"; }

# A global batch that does not split: a clear error (the launcher may stop the other
# ranks before they print theirs), non-zero exit, no run.
ranks 4 "$QUASAR" train --config moe.json --out bad "${sets[@]}" --set train.batch_size=6 >out 2>err; rc=$?
if [ $rc -ne 0 ] && [ "$(grep -c '^error: ' err)" -ge 1 ] \
   && [ "$(grep -c '^error: train.batch_size 6 must be a multiple of the 4 data-parallel' err)" -eq "$(grep -c '^error: ' err)" ] \
   && ! sanitizer_report err && [ ! -e bad/metrics.jsonl ]; then
  ok "an unsplittable batch fails on every rank with one clear error"
else
  not_ok "an unsplittable batch fails on every rank with one clear error" "exit $rc" "$(head -5 err)"
fi

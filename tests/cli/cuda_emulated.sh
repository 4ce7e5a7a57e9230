# The CUDA backend on the CPU (tests/emu/include: an emulated CUDA runtime, cuBLAS and
# CUB; the kernels compiled by the host compiler under ASan/UBSan, each block's threads
# run as coroutines in a random order): tests/gpu/parity.c's whole harness, its two
# halves in the background beside the rest (every op against the CPU on awkward sizes,
# three GPTs and a QuadraNet, a short AdamW run); `quasar train --device cuda` against
# the same run on the CPU (per-step losses and the validation loss to 1e-4), whose
# checkpoint the CPU build then evaluates alike; `eval` and `generate --device cuda`
# (with and without an adapter) against the CPU; the same run with train.precision bf16
# (bf16 products; losses to 2e-2), a MoE GPT's with Quasar's grouped kernel, and `bench
# attention` on the tensor-core kernels at one small point. Checks the kernels' logic and
# the host plumbing; the device itself waits for `make test-gpu`.
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/tests/cli_lib.sh"
emu=$(dirname "$QUASAR")/emu
if [ ! -x "$emu/parity" ] || [ ! -x "$emu/quasar" ]; then
  not_ok "emulated CUDA build" "no $emu/parity or $emu/quasar (make test builds them)"
  exit 0
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_stack_use_after_return=0

# The harness prints TAP. Its halves (~5 minutes each, one thread apiece) run in the
# background while the commands below are checked; their reports come at the end.
parity_pids=()
for half in ops models; do
  QS_PARITY_STEPS=${QS_PARITY_STEPS:-3} "$emu/parity" "$half" >"$WORK/parity_$half.tap" 2>"$WORK/parity_$half.err" &
  parity_pids+=($!)
done
parity_report() {
  local i=0 half rc
  for half in ops models; do
    wait "${parity_pids[$i]}"; rc=$?; i=$((i + 1))
    cat "$WORK/parity_$half.tap"
    if [ $rc -ne 0 ] || sanitizer_report "$WORK/parity_$half.err"; then
      not_ok "emulated parity harness ($half) exits cleanly" "exit $rc" \
        "$(grep -v WARNING "$WORK/parity_$half.err" | tail -5)"
    else
      ok "emulated parity harness ($half) exits cleanly"
    fi
  done
}

make_corpus corpus.txt
tiny_config tiny.json
args=(--config tiny.json --set train.max_steps=3 --set train.eval_interval=3 --set train.sample_tokens=0)
"$QUASAR" train "${args[@]}" --out cpu >cpu.log 2>&1 || not_ok "cpu run" "$(tail -3 cpu.log)"
if "$emu/quasar" train "${args[@]}" --device cuda --out cuda >cuda.log 2>&1 && ! sanitizer_report cuda.log; then
  ok "quasar train --device cuda runs (emulated)"
else
  not_ok "quasar train --device cuda runs (emulated)" "$(grep -v WARNING cuda.log | tail -5)"
fi
# close A B TOL: every logged loss within TOL relative, the same lines in the same order
close() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
tol = float(sys.argv[3])
assert len(a) == len(b) and a, (len(a), len(b))
for x, y in zip(a, b):
    for k in ("train_loss", "val_loss", "grad_norm"):
        if k in x:
            assert abs(x[k] - y[k]) <= tol * abs(x[k]), (k, x, y)
PY
}
if out=$(close cpu/metrics.jsonl cuda/metrics.jsonl 1e-4 2>&1); then
  ok "--device cuda: losses and gradient norms match the CPU run's"
else
  not_ok "--device cuda: losses and gradient norms match the CPU run's" "$out"
fi
"$QUASAR" eval --model cpu >eval_cpu.txt 2>&1
"$QUASAR" eval --model cuda >eval_cuda.txt 2>&1
if [ -s eval_cpu.txt ] && cmp -s eval_cpu.txt eval_cuda.txt; then
  ok "the CUDA run's checkpoint evaluates on the CPU as the CPU run's does"
else
  not_ok "the CUDA run's checkpoint evaluates on the CPU as the CPU run's does" "$(cat eval_cpu.txt eval_cuda.txt)"
fi

# Inference on the device: a model trained on the CPU until its attention matters (a
# 3-step model's text does not change when the decode's scores do) evaluates there as
# on the CPU, and generates the same text, greedy (one prompt, streamed) and sampled (a
# batch of two prompts of different lengths, each in its own KV-cache slot)
"$QUASAR" train --config tiny.json --out lm --set train.max_steps=150 --set train.lr=1e-2 --set model.dropout=0 \
  --set train.sample_tokens=0 --set train.eval_interval=150 --set train.checkpoint_interval=150 >lm.log 2>&1 ||
  not_ok "cpu run to decode from" "$(tail -3 lm.log)"
"$QUASAR" eval --model lm >eval_lm.txt 2>&1
"$emu/quasar" eval --model lm --device cuda >eval_dev.txt 2>eval_dev.err
gen=(generate --model lm --max-tokens 24)
"$QUASAR" "${gen[@]}" --prompt "First" --temperature 0 >gen_cpu.txt 2>&1
"$emu/quasar" "${gen[@]}" --prompt "First" --temperature 0 --device cuda >gen_dev.txt 2>gen_dev.err
"$QUASAR" "${gen[@]}" --prompt "Fi" --prompt "All: Speak" --seed 3 >genb_cpu.txt 2>&1
"$emu/quasar" "${gen[@]}" --prompt "Fi" --prompt "All: Speak" --seed 3 --device cuda >genb_dev.txt 2>genb_dev.err
if python3 - eval_lm.txt eval_dev.txt <<'PY' && [ "$(wc -c <gen_cpu.txt)" -gt 24 ] && [ "$(wc -l <genb_cpu.txt)" -eq 2 ] &&
import json, sys
a, b = (json.loads(open(f).read())["val_loss"] for f in sys.argv[1:3])
assert abs(a - b) <= 1e-5 * a, (a, b)
PY
  cmp -s gen_cpu.txt gen_dev.txt && cmp -s genb_cpu.txt genb_dev.txt &&
  ! sanitizer_report eval_dev.err && ! sanitizer_report gen_dev.err && ! sanitizer_report genb_dev.err; then
  ok "eval and generate --device cuda: the CPU's validation loss and the same text, greedy and sampled"
else
  not_ok "eval and generate --device cuda: the CPU's validation loss and the same text, greedy and sampled" \
    "$(cat eval_lm.txt eval_dev.txt gen_cpu.txt gen_dev.txt genb_cpu.txt genb_dev.txt 2>/dev/null | head -8)" \
    "$(grep -v WARNING eval_dev.err gen_dev.err genb_dev.err | tail -3)"
fi

# bf16 weights on the device (kernels/matmul_bf16.cu): the evaluation's products widen
# panels (many rows), generation's decode takes the panel kernel (one row); both as on
# the CPU from the same bf16 weights
"$QUASAR" eval --model lm --weights bf16 >eval_lm16.txt 2>&1
"$emu/quasar" eval --model lm --weights bf16 --device cuda >eval_dev16.txt 2>eval_dev16.err
"$QUASAR" "${gen[@]}" --prompt "First" --temperature 0 --weights bf16 >gen16_cpu.txt 2>&1
"$emu/quasar" "${gen[@]}" --prompt "First" --temperature 0 --weights bf16 --device cuda >gen16_dev.txt \
  2>gen16_dev.err
if python3 - eval_lm16.txt eval_dev16.txt <<'PY' && [ "$(wc -c <gen16_cpu.txt)" -gt 24 ] &&
import json, sys
a, b = (json.loads(open(f).read())["val_loss"] for f in sys.argv[1:3])
assert abs(a - b) <= 1e-5 * a, (a, b)
PY
  cmp -s gen16_cpu.txt gen16_dev.txt && ! sanitizer_report eval_dev16.err && ! sanitizer_report gen16_dev.err; then
  ok "eval and generate --device cuda --weights bf16: the CPU's validation loss and text from bf16 weights"
else
  not_ok "eval and generate --device cuda --weights bf16: the CPU's validation loss and text from bf16 weights" \
    "$(cat eval_lm16.txt eval_dev16.txt gen16_cpu.txt gen16_dev.txt 2>/dev/null | head -6)" \
    "$(grep -v WARNING eval_dev16.err gen16_dev.err | tail -3)"
fi

# LoRA on the device: adapters over the CPU run's checkpoint (frozen there too) give the
# CPU finetune's losses, and adapter weights the CPU build reads alike
cat >ft.json <<JSON
{"train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "eval_interval": 3,
           "eval_iters": 2, "sample_tokens": 0, "seed": 5},
 "data": {"path": "$WORK/corpus.txt"},
 "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "q,v,proj,fc,fc_proj"}}
JSON
"$QUASAR" finetune --config ft.json --base cpu --out ft_cpu >ft_cpu.log 2>&1 || not_ok "cpu finetune" "$(tail -3 ft_cpu.log)"
if "$emu/quasar" finetune --config ft.json --base cpu --device cuda --out ft_cuda >ft_cuda.log 2>&1 &&
  ! sanitizer_report ft_cuda.log && grep -q " on cuda$" ft_cuda.log &&
  out=$(close ft_cpu/metrics.jsonl ft_cuda/metrics.jsonl 1e-4 2>&1) &&
  "$QUASAR" eval --model cpu --adapter ft_cpu >ev_ft_cpu.txt 2>&1 &&
  "$QUASAR" eval --model cpu --adapter ft_cuda >ev_ft_cuda.txt 2>&1 &&
  python3 - ev_ft_cpu.txt ev_ft_cuda.txt <<'PY' &&
import json, sys
a, b = ([json.loads(l) for l in open(f) if l.startswith("{")][-1]["val_loss"] for f in sys.argv[1:3])
assert abs(a - b) <= 1e-4 * a, (a, b)
PY
  "$QUASAR" generate --model cpu --adapter ft_cuda --max-tokens 16 --seed 4 >gen_ft_cpu.txt 2>&1 &&
  "$emu/quasar" generate --model cpu --adapter ft_cuda --max-tokens 16 --seed 4 --device cuda >gen_ft_dev.txt \
    2>gen_ft_dev.err && cmp -s gen_ft_cpu.txt gen_ft_dev.txt && ! sanitizer_report gen_ft_dev.err
then
  ok "quasar finetune --device cuda: LoRA losses match the CPU finetune's; its adapter evaluates and generates alike"
else
  not_ok "quasar finetune --device cuda: LoRA losses match the CPU finetune's; its adapter evaluates and generates alike" \
    "$(grep -v WARNING ft_cuda.log | tail -3) ${out:-} $(cat ev_ft_cpu.txt ev_ft_cuda.txt 2>/dev/null | head -4)"
fi

# bf16 products: the same run within bf16's 2e-2, on a backend that says what it computes in
bf=(--set train.precision=bf16)
if "$emu/quasar" train "${args[@]}" "${bf[@]}" --device cuda --out bf16 >bf16.log 2>&1 && ! sanitizer_report bf16.log &&
  out=$(close cpu/metrics.jsonl bf16/metrics.jsonl 2e-2 2>&1); then
  ok "--device cuda with train.precision bf16: losses within 2e-2 of the fp32 CPU run's"
else
  not_ok "--device cuda with train.precision bf16: losses within 2e-2 of the fp32 CPU run's" \
    "$(grep -v WARNING bf16.log | tail -3) ${out:-}"
fi
# a MoE GPT's experts through Quasar's grouped kernel (all three products), bf16
moe=(--set model.moe.n_experts=4 --set model.moe.top_k=2)
"$QUASAR" train "${args[@]}" "${moe[@]}" --out moe_cpu >moe_cpu.log 2>&1 || not_ok "cpu MoE run" "$(tail -3 moe_cpu.log)"
if QS_CUDA_GROUPED=quasar "$emu/quasar" train "${args[@]}" "${moe[@]}" "${bf[@]}" --device cuda --out moe_own \
  >moe_own.log 2>&1 && ! sanitizer_report moe_own.log && out=$(close moe_cpu/metrics.jsonl moe_own/metrics.jsonl 2e-2 2>&1); then
  ok "a MoE GPT trains with QS_CUDA_GROUPED=quasar (bf16): losses within 2e-2 of the CPU run's"
else
  not_ok "a MoE GPT trains with QS_CUDA_GROUPED=quasar (bf16): losses within 2e-2 of the CPU run's" \
    "$(grep -v WARNING moe_own.log | tail -3) ${out:-}"
fi
"$QUASAR" train "${args[@]}" "${bf[@]}" --out cpu_bf16 >cpu_bf16.log 2>&1
if grep -q "train.precision bf16 applies to --device cuda; the CPU computes in fp32" cpu_bf16.log &&
  close cpu/metrics.jsonl cpu_bf16/metrics.jsonl 0 >/dev/null 2>&1; then
  ok "train.precision bf16 on the CPU says it computes in fp32, and does"
else
  not_ok "train.precision bf16 on the CPU says it computes in fp32, and does" "$(tail -3 cpu_bf16.log)"
fi

# The memory plan: a run too big for the device fails with one line naming what it needs
# and what is free, before taking any memory, and a resume that no longer fits loses
# nothing. The emulated device has QS_EMU_GPU_MIB of memory; 16 MiB is less than
# cuBLAS's workspace alone.
ls -R cuda/ckpt >ckpt_before.txt
if QS_EMU_GPU_MIB=16 "$emu/quasar" train --resume cuda --device cuda >oom.log 2>&1; then
  not_ok "a run too big for the device fails at the start" "it ran: $(tail -2 oom.log)"
elif grep -Eq "^error: not enough memory on cuda: the run needs [0-9.]+ MiB = parameters [0-9.]+ \+ gradients [0-9.]+ \+ optimizer [0-9.]+ \+ activations [0-9.]+ \+ workspace [0-9.]+ MiB, but [0-9.]+ MiB of 16.0 MiB is free; lower train.micro_batch_size" oom.log &&
  ! sanitizer_report oom.log && ls -R cuda/ckpt | cmp -s - ckpt_before.txt &&
  "$QUASAR" eval --model cuda 2>&1 | cmp -s - eval_cuda.txt; then
  ok "a run too big for the device fails at the start with the plan and the free memory; its checkpoints are intact"
else
  not_ok "a run too big for the device fails at the start with the plan and the free memory; its checkpoints are intact" \
    "$(grep -v WARNING oom.log | tail -3)"
fi
if "$emu/quasar" train --resume cuda --device cuda --set train.max_steps=4 >fits.log 2>&1 &&
  grep -Eq "^quasar: memory plan [0-9.]+ MiB = parameters .* workspace 32\.[0-9] MiB; cuda has [0-9.]+ of 81920\.0 MiB left" fits.log; then
  ok "the start prints the memory plan and what the device has left"
else
  not_ok "the start prints the memory plan and what the device has left" "$(grep -v WARNING fits.log | head -3)"
fi

# `quasar bench` on the device (tests/cli/bench.sh checks the same records on the CPU),
# timed with events: every kernel on both precisions' backends, the MoE layer (its
# routing of the same random inputs is the CPU's); the training record's
# memory figure is the device memory the run holds (cuBLAS's 32 MiB workspace on the
# emulated H100 and the tiny model's few MiB), and its first loss is the CPU's.
if "$QUASAR" bench train --config tiny.json --quick --steps 1 --warmup 1 --json >bench_cpu.json 2>bench_cpu.err &&
  "$emu/quasar" bench train --config tiny.json --quick --steps 2 --warmup 1 --device cuda --json \
    >bench_train.json 2>bench_train.err && ! sanitizer_report bench_train.err; then
  json_check "bench train --device cuda: device memory, not RSS; the first loss is the CPU's" bench_train.json '
cpu = json.load(open("bench_cpu.json"))
assert r["backend"] == "cuda" and r["device"] == "emulated CUDA device", (r["backend"], r["device"])
assert set(v) == {"train_tokens_per_s", "train_ms_per_step", "train_gflop_per_s", "train_mfu",
                  "train_peak_gpu_mem_mib"}, v
assert 32 <= v["train_peak_gpu_mem_mib"] < 48, v
assert abs(r["loss_first"] - cpu["loss_first"]) <= 1e-4 * abs(cpu["loss_first"]), (r["loss_first"], cpu["loss_first"])'
else
  not_ok "bench train --device cuda runs (emulated)" "$(grep -v WARNING bench_cpu.err bench_train.err | tail -3)"
fi
if "$emu/quasar" bench kernels --device cuda --quick --repeats 2 --json >bench_kernels.json 2>bench_kernels.err &&
  ! sanitizer_report bench_kernels.err; then
  json_check "bench kernels --device cuda: every op timed on the device" bench_kernels.json '
assert r["backend"] == "cuda" and r["cache_mib"] == 50, (r["backend"], r.get("cache_mib"))
assert len(r["kernels"]) == 23 and len(v) == 3 * 23, [k["name"] for k in r["kernels"]]
assert "on cuda" in r["ceilings"]["gemm"] and "on cuda" in r["ceilings"]["copy"], r["ceilings"]'
else
  not_ok "bench kernels --device cuda runs (emulated)" "$(grep -v WARNING bench_kernels.err | tail -3)"
fi
if "$emu/quasar" bench kernels --device cuda --precision bf16 --only gemm,moe_experts --quick --repeats 2 --json \
  >bench_bf16.json 2>bench_bf16.err && ! sanitizer_report bench_bf16.err; then
  json_check "bench kernels --precision bf16: the GEMMs on the bf16 backend" bench_bf16.json '
assert r["backend"] == "cuda-bf16", r["backend"]
assert [k["name"] for k in r["kernels"]] == ["gemm_fwd", "gemm_bwd", "moe_experts_fwd"], r["kernels"]'
else
  not_ok "bench kernels --precision bf16 runs (emulated)" "$(grep -v WARNING bench_bf16.err | tail -3)"
fi
if "$QUASAR" bench moe --quick --repeats 1 --json >moe_cpu.json 2>moe_cpu.err &&
  "$emu/quasar" bench moe --device cuda --quick --repeats 2 --json >bench_moe.json 2>bench_moe.err &&
  ! sanitizer_report bench_moe.err; then
  json_check "bench moe --device cuda: the layer on the device, routed as on the CPU" bench_moe.json '
cpu = json.load(open("moe_cpu.json"))
assert r["backend"] == "cuda" and r["shape"] == cpu["shape"], (r["backend"], r["shape"])
assert r["expert_rows"] == cpu["expert_rows"], (r["expert_rows"], cpu["expert_rows"])'
else
  not_ok "bench moe --device cuda runs (emulated)" "$(grep -v WARNING moe_cpu.err bench_moe.err | tail -3)"
fi
if "$emu/quasar" bench moe --device cuda --precision bf16 --shape b --quick --repeats 1 --json >moe_bf16.json \
  2>moe_bf16.err && ! sanitizer_report moe_bf16.err; then
  json_check "bench moe --precision bf16 --shape b: 64 experts, top-8, on the bf16 backend" moe_bf16.json '
assert r["backend"] == "cuda-bf16" and r["shape"]["E"] == 64 and sum(r["expert_rows"]) == 64 * 8, r["shape"]'
else
  not_ok "bench moe --precision bf16 runs (emulated)" "$(grep -v WARNING moe_bf16.err | tail -3)"
fi
if "$emu/quasar" bench moe --device cuda --precision bf16 --grouped quasar --quick --repeats 1 --json >moe_own.json \
  2>moe_own.err && ! sanitizer_report moe_own.err; then
  json_check "bench moe --grouped quasar: the experts through Quasar's grouped kernel, routed as on the CPU" moe_own.json '
cpu = json.load(open("moe_cpu.json"))
assert r["backend"] == "cuda-bf16" and r["grouped_gemm"] == "quasar", (r["backend"], r["grouped_gemm"])
assert r["expert_rows"] == cpu["expert_rows"], (r["expert_rows"], cpu["expert_rows"])'
else
  not_ok "bench moe --grouped quasar runs (emulated)" "$(grep -v WARNING moe_own.err | tail -3)"
fi
if "$emu/quasar" bench generate --config tiny.json --repeats 1 --batch 2 --device cuda --json >bench_gen.json \
  2>bench_gen.err && ! sanitizer_report bench_gen.err; then
  json_check "bench generate --device cuda: prefill and decode of two prompts through the device's KV cache, device memory" bench_gen.json '
assert r["backend"] == "cuda" and r["prompt_tokens"] == 8 and r["new_tokens"] == 8 and r["batch"] == 2, r
assert "generate_peak_rss_mib" not in v and 0 < v["generate_peak_gpu_mem_mib"] < 64, v'
else
  not_ok "bench generate --device cuda runs (emulated)" "$(grep -v WARNING bench_gen.err | tail -3)"
fi
# the tensor-core attention kernels behind `bench attention` (one small point, both masks)
if "$emu/quasar" bench attention --device cuda --precision bf16 --quick --repeats 1 --seq 37 --head-size 16 \
  --tokens 37 --width 32 --json >bench_att.json 2>bench_att.err && ! sanitizer_report bench_att.err; then
  json_check "bench attention --device cuda --precision bf16: both masks timed on the device, its staging counted" bench_att.json '
assert r["backend"] == "cuda-bf16" and [(p["T"], p["causal"]) for p in r["points"]] == [(37, True), (37, False)], r
assert all(pos(p["fwd_ms"]) and pos(p["fwd_bwd_ms"]) for p in r["points"]), r["points"]
# what the staging adds to the workspace: at most q, dout (2 heads) and k, v (2 heads) of
# 37 rows, bf16 rows of 32 (hs 16), in 256-byte regions; less what other ops take anyway
assert all(0 < p["scratch_mib"] * 2 ** 20 <= 37 * 8 * 32 * 2 + 4 * 256 for p in r["points"]), r["points"]'
else
  not_ok "bench attention --device cuda runs (emulated)" "$(grep -v WARNING bench_att.err | tail -3)"
fi

parity_report

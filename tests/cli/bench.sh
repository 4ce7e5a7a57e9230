# `quasar bench train|kernels|attention|moe|generate`: a short smoke of each on a tiny model whose
# --json record must parse, carry DESIGN.md's fields and positive, finite numbers (MFU
# in (0, 1], the FLOP formula's count for the tiny GPT); bad flags fail with one error
# line; bench/plot.sh turns a metrics.jsonl and a results file into PNGs (with gnuplot).
# The same commands with --device cuda run in tests/cli/cuda_emulated.sh.
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/tests/cli_lib.sh"
make_corpus corpus.txt
tiny_config tiny.json '"vocab_size": 64'

Q=$QUASAR
# 6 N + 12 L T C for 2 layers of 16, T 16, V 64, 4x MLP, tied (docs/ARCHITECTURE.md):
# N = 2 (3*256 + 256 + 2*1024) + 64*16 = 7168 -> 43008 + 6144
expect_ok "bench train: tiny GPT, --json" $Q bench train --config tiny.json --steps 3 --warmup 1 --json
cp "$WORK/out" train.json
json_check "bench train: the record parses; MFU in (0, 1]; FLOP formula gives 49152 per token" train.json '
assert 0 < v["train_mfu"] <= 1, v
assert r["flops_per_item"] == 49152, r["flops_per_item"]
assert r["flops_per_step"] == 49152 * 4 * 16, r["flops_per_step"]
assert set(v) == {"train_tokens_per_s", "train_ms_per_step", "train_gflop_per_s", "train_mfu", "train_peak_rss_mib"}, v
s = r["step_ms"]
assert 0 < s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"], s
assert abs(v["train_tokens_per_s"] - 64 / (s["median"] / 1e3)) < 1e-3 * v["train_tokens_per_s"], v
assert r["ceilings"]["gemm_gflop_per_s"] > 0 and math.isfinite(r["loss_last"])
assert r["backend"] == "cpu" and r["device"].startswith("cpu-") and r["peak_mem_excludes_ceiling"] in (True, False)'

expect_ok "bench train: table output" $Q bench train --config tiny.json --steps 2 --warmup 0 \
  --set model.recompute_layers=auto
grep -q 'MFU' "$WORK/out" && ok "bench train: the table reports MFU" || not_ok "bench train: the table reports MFU" "$(cat "$WORK/out")"
grep -q '^  recompute   ffn true, layers false$' "$WORK/out" \
  && ok "bench train: the table says how activations were kept, \"auto\" resolved (it all fits)" \
  || not_ok "bench train: the table says how activations were kept, \"auto\" resolved (it all fits)" "$(cat "$WORK/out")"

# LoRA over a frozen base: the base is the full run's random init and B starts at zero, so
# the first loss is the full run's; only the adapters train (r 4 on q and v of 2 layers:
# 2 x 2 x 4 x (16 + 16) = 512 parameters); no weight gradients, so 4 N + 12 L T C FLOPs
expect_ok "bench train --lora: --json" $Q bench train --config tiny.json --steps 3 --warmup 1 --lora --set lora.r=4 --json
cp "$WORK/out" lora.json
json_check "bench train --lora: adapters only, the full run's first loss, 4 N + 12 L T C = 34816 FLOPs" lora.json '
full = json.load(open("train.json"))
assert r["lora"] == {"r": 4, "alpha": 16, "targets": "q,v", "rslora": False}, r["lora"]
assert full["lora"] is None, full["lora"]
assert r["model"]["params"] == 512, r["model"]
assert r["model"]["recompute_layers"] is False and full["model"]["recompute_ffn"] is True, r["model"]
assert r["loss_first"] == full["loss_first"], (r["loss_first"], full["loss_first"])
assert r["flops_per_item"] == 4 * 7168 + 6144, r["flops_per_item"]
assert set(v) == {e["name"] for e in full["results"]}, v'

expect_ok "bench kernels: --quick --json" $Q bench kernels --quick --repeats 3 --json
cp "$WORK/out" kernels.json
json_check "bench kernels: every op has positive FLOP/s, bytes/s and fractions of the ceilings" kernels.json '
names = [k["name"] for k in r["kernels"]]
for op in ("gemm_fwd", "decode_fp32", "decode_bf16", "decode_batch_fp32", "decode_batch_bf16",
           "ffn_gelu_fwd", "ffn_gelu_fwd_unfused", "ffn_gelu_bwd", "ffn_gelu_bwd_unfused",
           "attention_fwd", "attention_bwd", "attention_mqa_fwd", "attention_mqa_bwd", "moe_route_dispatch",
           "moe_experts_fwd", "quadconv_fwd", "quadconv_bwd",
           "layernorm_fwd", "residual_layernorm_fwd", "xent_fwd", "xent_bwd"):
    assert op in names, op
for k in r["kernels"]:
    for f in ("ms_median", "gflop_per_s", "gb_per_s", "frac_gemm", "frac_copy"):
        assert pos(k[f]), (k["name"], f, k[f])
assert set(v) == {f"kernel_{n}_{m}" for n in names for m in ("ms", "gflop_per_s", "gb_per_s")}, sorted(v)
for k in r["kernels"]:
    assert v["kernel_" + k["name"] + "_ms"] == k["ms_median"], k
assert r["quick"] is True and pos(r["ceilings"]["copy_gb_per_s"]) and r["backend"] == "cpu"'

expect_ok "bench kernels: --only two prefixes" $Q bench kernels --quick --repeats 2 --only quadconv,gemm_fwd --json
cp "$WORK/out" only.json
json_check "bench kernels: --only times exactly the ops it names" only.json '
assert [k["name"] for k in r["kernels"]] == ["gemm_fwd", "quadconv_fwd", "quadconv_bwd"], r["kernels"]'

# OpenBLAS's kernels: AVX2 or wider wherever the CPU has them, even when the library
# does not know the CPU model (csrc/cpu/blas.c re-executes quasar), and the user's
# OPENBLAS_CORETYPE stands when set.
expect_ok "bench kernels: OpenBLAS's own choice" env -u OPENBLAS_CORETYPE $Q bench kernels --quick --repeats 1 \
  --only gemm_fwd --json
cp "$WORK/out" blas.json
json_check "bench kernels: the device names OpenBLAS's kernels, AVX2 or wider on a CPU with AVX2 and FMA" blas.json '
core = r["device"].rsplit("OpenBLAS ", 1)[1].rstrip(")")
flags = next((l.split(":")[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
if "avx2" in flags and "fma" in flags:
    assert core in ("Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"), r["device"]'
expect_ok "bench kernels: OPENBLAS_CORETYPE set by the user" env OPENBLAS_CORETYPE=Prescott $Q bench kernels \
  --quick --repeats 1 --only gemm_fwd --json
cp "$WORK/out" prescott.json
json_check "bench kernels: OPENBLAS_CORETYPE=Prescott is what runs" prescott.json '
assert r["device"].endswith("; OpenBLAS Prescott)"), r["device"]'

expect_ok "bench attention: --quick --json" $Q bench attention --quick --repeats 2 --json
cp "$WORK/out" attention.json
json_check "bench attention: every length x head size x mask, B = tokens / T, FlashAttention's FLOP count" attention.json '
pts = r["points"]
assert [(p["T"], p["hs"], p["causal"]) for p in pts] == [
    (T, hs, c) for T in (1, 70) for hs in (16, 64) for c in (True, False)], pts
for p in pts:
    assert p["B"] == max(1, 140 // p["T"]) and p["NH"] == 128 // p["hs"], p
    rows = p["B"] * p["T"]  # qkv, dqkv [rows, 3 C]; out, dout [rows, C]; lse, delta [B NH T]; 64-byte pieces
    floats = sum(2 * ((n + 15) // 16 * 16) for n in (rows * 3 * 128, rows * 128, p["B"] * p["NH"] * p["T"]))
    assert abs(p["buffers_mib"] - 4 * floats / 2 ** 20) < 1e-5 and p["scratch_mib"] == 0, (p, floats)
    fwd = 4.0 * p["B"] * p["NH"] * p["T"] ** 2 * p["hs"] * (0.5 if p["causal"] else 1.0)
    T, hs, mask = p["T"], p["hs"], "causal" if p["causal"] else "full"
    name = f"attention_T{T}_hs{hs}_{mask}"
    for pas, flops, ms in (("fwd", fwd, p["fwd_ms"]), ("fwd_bwd", 3.5 * fwd, p["fwd_bwd_ms"])):
        assert pos(ms), p
        got = v[f"{name}_{pas}_tflop_per_s"]
        assert abs(got - flops / (ms / 1e3) / 1e12) <= 1e-5 * got, (name, pas, got, flops, ms)
assert len(v) == 2 * len(pts), sorted(v)'
expect_ok "bench attention: table output, a sweep of its own" $Q bench attention --quick --repeats 1 --seq 33 \
  --head-size 8 --tokens 66 --width 16
name="bench attention: the table has the point asked for"
grep -Eq "^  33 +8 +2 +2 causal" "$WORK/out" && ok "$name" || not_ok "$name" "$(cat "$WORK/out")"

expect_ok "bench moe: --quick --json (shape a)" $Q bench moe --quick --repeats 3 --json
cp "$WORK/out" moe.json
json_check "bench moe: shape a's sizes, every token routed twice, the parts and the dense FFN timed" moe.json '
assert r["shape"] == {"N": 64, "C": 32, "F": 128, "E": 8, "K": 2}, r["shape"]
assert len(r["expert_rows"]) == 8 and sum(r["expert_rows"]) == 128, r["expert_rows"]
parts = {f"moe_{p}_ms" for p in ("route", "permute", "experts", "combine")}
assert set(v) == parts | {"moe_layer_fwd_bwd_ms", "moe_ffn_dense_fwd_bwd_ms", "moe_layer_over_dense",
                          "moe_layer_tokens_per_s", "moe_experts_gflop_per_s", "moe_ffn_dense_gflop_per_s"}, sorted(v)
ratio = v["moe_layer_fwd_bwd_ms"] / v["moe_ffn_dense_fwd_bwd_ms"]
assert abs(v["moe_layer_over_dense"] - ratio) < 1e-4 * ratio, v
assert abs(v["moe_layer_tokens_per_s"] * v["moe_layer_fwd_bwd_ms"] - 64e3) < 1e-3 * 64e3, v'
expect_ok "bench moe: --shape b with k = E over 50 tokens" $Q bench moe --quick --repeats 2 --shape b --tokens 50 \
  --experts 5 --top-k 5 --json
cp "$WORK/out" moe_b.json
json_check "bench moe: the overrides apply, F = C for shape b, k = E sends every token to every expert" moe_b.json '
assert r["shape"] == {"N": 50, "C": 32, "F": 32, "E": 5, "K": 5}, r["shape"]
assert r["expert_rows"] == [50] * 5, r["expert_rows"]'
expect_ok "bench moe: table output" $Q bench moe --quick --repeats 2 --shape b
name="bench moe: the table has the split and the ratio"
grep -q 'MoE layer / dense FFN of the same active FLOPs' "$WORK/out" && grep -q '^  experts ' "$WORK/out" \
  && ok "$name" || not_ok "$name" "$(cat "$WORK/out")"

expect_ok "bench generate: random weights from --config" $Q bench generate --config tiny.json --repeats 2 --json
cp "$WORK/out" gen.json
json_check "bench generate: prefill and decode tokens/s, latency per token, peak RSS" gen.json '
assert r["prompt_tokens"] == 8 and r["new_tokens"] == 8 and r["batch"] == 1, r
assert r["sampling"] == {"temperature": 0, "top_k": 0, "top_p": 1}, r["sampling"]
assert set(v) == {"generate_prefill_tokens_per_s", "generate_decode_tokens_per_s", "generate_decode_ms_per_token",
                  "generate_peak_rss_mib"}, v
assert 0 < v["generate_peak_rss_mib"] < 4096, v
assert abs(v["generate_decode_tokens_per_s"] * v["generate_decode_ms_per_token"] - 1e3) < 1e-4 * 1e3, v'
expect_ok "a checkpoint to generate from" $Q train --config tiny.json --out run
expect_ok "bench generate: --ckpt" $Q bench generate --ckpt run --prompt-tokens 4 --new-tokens 12 --repeats 1 --json
cp "$WORK/out" gen_ckpt.json
json_check "bench generate: --ckpt record" gen_ckpt.json 'assert r["prompt_tokens"] == 4 and r["new_tokens"] == 12, r'
expect_ok "bench generate: a batch of 3 prompts" $Q bench generate --config tiny.json --repeats 1 --batch 3 --json
cp "$WORK/out" gen_batch.json
json_check "bench generate: tokens/s count the batch's tokens, the latency a step's" gen_batch.json '
assert r["batch"] == 3, r["batch"]
assert abs(v["generate_decode_tokens_per_s"] * v["generate_decode_ms_per_token"] - 3e3) < 1e-4 * 3e3, v'
expect_ok "bench generate: sampled with top-k and top-p" $Q bench generate --config tiny.json --repeats 1 \
  --temperature 0.8 --top-k 5 --top-p 0.9 --json
cp "$WORK/out" gen_top.json
json_check "bench generate: the record says how tokens were picked" gen_top.json '
assert r["sampling"] == {"temperature": 0.8, "top_k": 5, "top_p": 0.9}, r["sampling"]'
expect_ok "bench generate: bf16 weights" $Q bench generate --config tiny.json --repeats 1 --weights bf16 --json
cp "$WORK/out" gen_bf16.json
json_check "bench generate: the record says the weights were bf16" gen_bf16.json '
assert r["weights"] == "bf16", r.get("weights")
assert pos(v["generate_decode_tokens_per_s"]), v'

# bad input: one error line each
expect_error "bench generate: weights neither fp32 nor bf16" "--weights: expected fp32 or bf16, got 'fp16'" \
  $Q bench generate --config tiny.json --weights fp16
expect_error "bench moe: Quasar's grouped kernel is for cuda bf16" "--grouped quasar is a bf16 kernel" \
  $Q bench moe --quick --grouped quasar
expect_error "bench moe: an unknown grouped kernel" "--grouped: expected cublas or quasar, got 'cutlass'" \
  $Q bench moe --quick --grouped cutlass
expect_error "bench generate: top-p out of range" "--top-p: invalid value '0' .expected a number in .1e-06, 1.." \
  $Q bench generate --config tiny.json --top-p 0
expect_error "bench generate: a temperature that is not a number" "--temperature: invalid value 'hot'" \
  $Q bench generate --config tiny.json --temperature hot
expect_error "bench: no benchmark named" "bench needs train, kernels, attention, moe or generate" $Q bench
expect_error "bench attention: a zero length" "--seq: expected up to 16 comma-separated sizes" \
  $Q bench attention --quick --seq 0
expect_error "bench attention: a list with a gap" "--head-size: expected up to 16 comma-separated sizes" \
  $Q bench attention --quick --head-size 64,,128
expect_error "bench attention: width not a multiple of the head size" "--width 100 is not a multiple of head size 64" \
  $Q bench attention --quick --width 100 --head-size 64
expect_error "bench attention: past 2^31 floats" "must stay under 2\^31 floats" \
  $Q bench attention --quick --seq 1048576 --width 1024 --head-size 64
expect_error "bench moe: unknown --shape" "--shape: expected a or b, got 'c'" $Q bench moe --quick --shape c
expect_error "bench moe: top-k over the experts" "--top-k must be <= --experts" \
  $Q bench moe --quick --experts 4 --top-k 5
expect_error "bench moe: --tokens 0" "--tokens: invalid value '0'" $Q bench moe --quick --tokens 0
expect_error "bench moe: past 2^31 elements" "must stay under 2\^31 elements" $Q bench moe --tokens 16777216 --top-k 8 \
  --experts 8
expect_error "bench moe: unknown --precision" "--precision: expected fp32 or bf16, got 'fp8'" \
  $Q bench moe --precision fp8
expect_error "bench: unknown benchmark" "unknown benchmark 'fly'" $Q bench fly
expect_error "bench train: no config" "bench train needs --config" $Q bench train --steps 2
expect_error "bench train: --steps 0" "--steps: invalid value '0'" $Q bench train --config tiny.json --steps 0
expect_error "bench train: --warmup not a number" "--warmup: invalid value 'x'" $Q bench train --config tiny.json --warmup x
expect_error "bench train: flag without value" "--steps needs a value" $Q bench train --config tiny.json --steps
expect_error "bench train: missing config file" "nope.json" $Q bench train --config nope.json
expect_error "bench train: bad --set" "unknown key 'train.stepz'" $Q bench train --config tiny.json --set train.stepz=1
expect_error "bench kernels: unknown flag" "unknown option '--fast'" $Q bench kernels --fast
expect_error "bench kernels: --only names no op" "--only: no op's name starts with 'conv'" \
  $Q bench kernels --quick --only quadconv,conv
expect_error "bench kernels: unknown --precision" "--precision: expected fp32 or bf16, got 'fp16'" \
  $Q bench kernels --quick --precision fp16
expect_error "bench kernels: unknown --device" "--device: expected cpu or cuda, got 'tpu'" $Q bench kernels --device tpu
expect_error "bench train: --device cuda in a build without CUDA" "--device cuda: this build has no CUDA" \
  $Q bench train --config tiny.json --device cuda
expect_error "bench generate: --device cuda in a build without CUDA" "--device cuda: this build has no CUDA" \
  $Q bench generate --config tiny.json --device cuda
expect_error "bench generate: neither --ckpt nor --config" "one of --ckpt DIR or --config FILE" $Q bench generate
expect_error "bench generate: both --ckpt and --config" "one of --ckpt DIR or --config FILE" \
  $Q bench generate --ckpt run --config tiny.json
expect_error "bench generate: past the window" "must fit model.seq_len \(16\)" \
  $Q bench generate --config tiny.json --prompt-tokens 10 --new-tokens 10
expect_error "bench generate: no checkpoint" "no checkpoint in 'nowhere'" $Q bench generate --ckpt nowhere
expect_ok "bench --help" $Q bench --help
expect_ok "bench generate --help" $Q bench generate --help

# Every committed record in bench/results/ has DESIGN.md's shape (plot.sh and the
# comparison tables read them by these fields)
if out=$(python3 - "$root"/bench/results/*.json <<'PY' 2>&1
import json, sys
for f in sys.argv[1:]:
    r = json.load(open(f))
    for x in r if isinstance(r, list) else [r]:
        missing = {"device", "date", "commit", "results"} - set(x)
        assert not missing, (f, missing)
        for e in x["results"]:
            assert {"name", "metric", "quasar", "peer", "peer_value", "ratio"} <= set(e), (f, e.get("name"))
PY
); then
  ok "bench/results: every record carries device, date, commit and results rows with DESIGN.md's fields"
else
  not_ok "bench/results: every record carries device, date, commit and results rows with DESIGN.md's fields" "$out"
fi

# plots
if ! command -v gnuplot >/dev/null; then
  echo "# bench/plot.sh: gnuplot not installed, plot checks skipped"
  exit 0
fi
is_png() { [ -s "$1" ] && [ "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; }
mkdir plotrun
cp "$root/tests/fixtures/bench/metrics.jsonl" plotrun/
expect_ok "plot: loss curve from a metrics.jsonl" "$root/bench/plot.sh" loss plotrun
is_png plotrun/loss.png && grep -qx "plotrun/loss.png" "$WORK/out" && ok "plot: loss.png is a PNG, its path printed" \
  || not_ok "plot: loss.png is a PNG, its path printed" "$(cat "$WORK/out")"
expect_ok "plot: bars from a results file" "$root/bench/plot.sh" bars -o bars.png "$root/tests/fixtures/bench/results.json"
is_png bars.png && ok "plot: bars.png is a PNG" || not_ok "plot: bars.png is a PNG"
mkdir empty
expect_error "plot: no metrics.jsonl" "empty/metrics.jsonl: no such file" "$root/bench/plot.sh" loss empty
echo '{"results": [{"name": "x", "ratio": null}]}' >noratio.json
expect_error "plot: no numeric ratio" "no result with a numeric ratio" "$root/bench/plot.sh" bars -o n.png noratio.json

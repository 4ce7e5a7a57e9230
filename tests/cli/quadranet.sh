# QuadraNet end to end on a tiny synthetic IDX dataset: train, exact resume, eval with
# val_acc, and the errors of a classifier run (bad data, too few classes, LM-only
# commands). Also the hybrid LM (quadconv mixer) trains, resumes and generates.
. "$(dirname "$0")/../cli_lib.sh"

# 40 training and 20 test images of 8 x 8 in 3 classes, gzip'd IDX as Debian ships them.
mkdir data
python3 - <<'PY'
import gzip, random, struct
random.seed(5)
def write(name, n, classes):
    labels = [random.randrange(classes) for _ in range(n)]
    px = bytes(min(255, 40 * l + random.randrange(100)) for l in labels for _ in range(64))
    with gzip.open(f"data/{name}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 8, 8) + px)
    with gzip.open(f"data/{name}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + bytes(labels))
write("train", 40, 3)
write("t10k", 20, 3)
PY

cat >qn.json <<JSON
{
  "model": {"type": "quadranet", "ffn_mult": 2,
            "quadra": {"image_size": 8, "stem_patch": 1, "num_classes": 3, "widths": [4, 6, 6, 8],
                       "depths": [1, 0, 1, 1], "kernel_size": 3, "layer_scale_init": 0.1, "drop_path": 0.2}},
  "train": {"max_steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
            "eval_interval": 3, "log_interval": 1, "checkpoint_interval": 3, "seed": 9},
  "data": {"path": "$WORK/data", "augment_shift": 1, "augment_flip": true}
}
JSON
expect_ok "quadranet: 6 steps in one go" "$QUASAR" train --config qn.json --out one
expect_ok "quadranet: 3 steps, then resume for 3" "$QUASAR" train --config qn.json --out two --until 3
expect_ok "quadranet: resume" "$QUASAR" train --resume two
cmp -s one/ckpt/step_00000006/model.safetensors two/ckpt/step_00000006/model.safetensors \
  && cmp -s one/ckpt/step_00000006/optim.safetensors two/ckpt/step_00000006/optim.safetensors \
  && ok "quadranet: resumed weights and optimizer state are bit-identical" \
  || not_ok "quadranet: resumed weights and optimizer state are bit-identical"
# activation checkpointing changes memory, not the run: resumed with it, the same tensors
# (the weights file's metadata carries the config)
expect_ok "quadranet: 3 steps, then resume for 3 with recompute_layers" "$QUASAR" train --config qn.json --out three \
  --until 3
expect_ok "quadranet: resume with model.recompute_layers" "$QUASAR" train --resume three \
  --set model.recompute_layers=true
same_tensors one/ckpt/step_00000006/model.safetensors three/ckpt/step_00000006/model.safetensors \
  && cmp -s one/ckpt/step_00000006/optim.safetensors three/ckpt/step_00000006/optim.safetensors \
  && ok "quadranet: steps with recompute_layers end with the same weights and optimizer state, bit for bit" \
  || not_ok "quadranet: steps with recompute_layers end with the same weights and optimizer state, bit for bit"
# "auto" checkpoints only when the plan would not fit otherwise: here it fits, and the
# run folder records what ran
expect_ok "quadranet: resume with model.recompute_layers auto" "$QUASAR" train --resume three \
  --set train.max_steps=7 --set model.recompute_layers=auto \
  && { grep -q "^quasar: model.recompute_layers auto: no block checkpointed (everything fits)$" "$WORK/err" \
    && grep -q '"recompute_layers":.false' three/config.json \
    && ok "quadranet: auto chose none and config.json says so" \
    || not_ok "quadranet: auto chose none and config.json says so" "$(grep recompute "$WORK/err" three/config.json)"; }
if grep -q '"step": 6, "val_loss": [0-9.]*, "val_acc": [01]\.[0-9]*}' one/metrics.jsonl \
   && grep -q '"images_per_s"' one/metrics.jsonl && [ ! -e one/samples.txt ]; then
  ok "quadranet: metrics.jsonl logs val_acc and images_per_s; no samples.txt"
else
  not_ok "quadranet: metrics.jsonl logs val_acc and images_per_s; no samples.txt" "$(tail -2 one/metrics.jsonl)"
fi
expect_ok "quadranet: eval" "$QUASAR" eval --model one
acc=$(grep -o '"val_acc": [0-9.]*' "$WORK/out" | cut -d' ' -f2)
python3 -c "import sys; a = float(sys.argv[1]); assert 0 <= a <= 1 and abs(a * 20 - round(a * 20)) < 1e-6" "$acc" \
  && grep -q "\"val_acc\": $acc}" one/metrics.jsonl \
  && ok "quadranet: eval's val_acc is a count over the 20 test images, as logged at step 6" \
  || not_ok "quadranet: eval's val_acc is a count over the 20 test images, as logged at step 6" "$(cat "$WORK/out")"

expect_error "quadranet: eval from bf16 weights" "--weights bf16: for language models" "$QUASAR" eval --model one \
  --weights bf16

expect_error "quadranet: missing dataset" "data/nowhere/train-images-idx3-ubyte.gz" \
  "$QUASAR" train --config qn.json --out bad1 --set data.path=data/nowhere
expect_error "quadranet: fewer classes than the data" "num_classes \(2\) is smaller than the 3 classes" \
  "$QUASAR" train --config qn.json --out bad2 --set model.quadra.num_classes=2
expect_error "quadranet: image_size not divisible by the downsampling" "image_size \(12\) must be divisible by 8" \
  "$QUASAR" train --config qn.json --out bad3 --set model.quadra.image_size=12
expect_error "quadranet: stem_patch out of range" "model.quadra.stem_patch: must be in \[1, 64\], got 0" \
  "$QUASAR" train --config qn.json --out bad4 --set model.quadra.stem_patch=0
expect_error "quadranet: widths must be 4 integers" "model.quadra.widths: expected an array of 4 integers" \
  "$QUASAR" train --config qn.json --out bad5 --set "model.quadra.widths=[4,4]"
expect_error "quadranet: generate refuses a classifier" "not a language model" \
  "$QUASAR" generate --model one --prompt x
expect_error "quadranet: no Hugging Face export" "only GPT models" "$QUASAR" convert --to-hf one --out hf
[ ! -e bad1 ] && [ ! -e bad2 ] && [ ! -e hf ] && ok "quadranet: failed commands wrote nothing" \
  || not_ok "quadranet: failed commands wrote nothing"

# The hybrid LM: causal quadconv token mixer.
make_corpus corpus.txt
tiny_config lm.json '"mixer": "quadconv", "quadra": {"kernel_size": 5}'
expect_ok "quadconv mixer: 6 steps in one go" "$QUASAR" train --config lm.json --out lm1
expect_ok "quadconv mixer: 3 steps then resume" "$QUASAR" train --config lm.json --out lm2 --until 3
expect_ok "quadconv mixer: resume" "$QUASAR" train --resume lm2
cmp -s lm1/ckpt/step_00000006/model.safetensors lm2/ckpt/step_00000006/model.safetensors \
  && ok "quadconv mixer: resumed weights are bit-identical" || not_ok "quadconv mixer: resumed weights are bit-identical"
expect_ok "quadconv mixer: generate (cached decoding)" "$QUASAR" generate --model lm1 --prompt First --max-tokens 40 --temperature 0
cp "$WORK/out" g1
expect_ok "quadconv mixer: generate again" "$QUASAR" generate --model lm1 --prompt First --max-tokens 40 --temperature 0
cmp -s g1 "$WORK/out" && [ "$(wc -c <g1)" -gt 40 ] && ok "quadconv mixer: greedy generation is reproducible" \
  || not_ok "quadconv mixer: greedy generation is reproducible"
expect_error "quadconv mixer: no Hugging Face export" "quadconv token mixer" "$QUASAR" convert --to-hf lm1 --out hf2

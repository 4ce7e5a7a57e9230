# Token shards: `quasar shard` writes llm.c's format (checked independently here), the
# shards hold exactly <|endoftext|> + the tokenizer's ids, bad shards are refused, and a
# GPT-2-vocabulary model trains from shard globs, samples, evaluates and resumes exactly.
VOCAB=$(cd "$(dirname "$0")/../.." && pwd)/../shared/data/gpt2
. "$(dirname "$0")/../cli_lib.sh"
make_corpus corpus.txt
expect_ok "shard: text into shards of 500 tokens" "$QUASAR" shard --vocab-dir "$VOCAB" --out sh/train --shard-tokens 500 <corpus.txt
head -c 1500 corpus.txt | "$QUASAR" shard --vocab-dir "$VOCAB" --out sh/val 2>/dev/null
"$QUASAR" tokenize --vocab-dir "$VOCAB" <corpus.txt >ids.txt 2>/dev/null
if python3 - ids.txt sh/train_*.bin <<'PY'
import struct, sys
want = [50256] + [int(x) for x in open(sys.argv[1]).read().split()]
got = []
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    header = struct.unpack("<256i", data[:1024])
    assert header[0] == 20240520 and header[1] == 1 and not any(header[3:]), path
    assert len(data) == 1024 + 2 * header[2], path
    assert header[2] == 500 or path == sys.argv[-1], (path, header[2])
    got += struct.unpack(f"<{header[2]}H", data[1024:])
assert got == want, (len(got), len(want))
PY
then ok "shard: llm.c header, 500 per shard, tokens = <|endoftext|> + tokenize"; else not_ok "shard: llm.c header, 500 per shard, tokens = <|endoftext|> + tokenize"; fi
expect_error "shard without --out" "needs --out" "$QUASAR" shard --vocab-dir "$VOCAB"
expect_error "shard with a bad --shard-tokens" "--shard-tokens" "$QUASAR" shard --vocab-dir "$VOCAB" --out x --shard-tokens 0

cat >g.json <<JSON
{"model": {"seq_len": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
 "train": {"max_steps": 4, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_interval": 2, "eval_iters": 1,
           "log_interval": 1, "checkpoint_interval": 2, "sample_tokens": 8, "seed": 3},
 "data": {"tokenizer": "gpt2", "train_shards": "$WORK/sh/train_*.bin", "val_shards": "$WORK/sh/val_*.bin",
          "vocab_dir": "$VOCAB"}}
JSON
expect_ok "train a GPT-2-vocabulary model from shard globs" "$QUASAR" train --config g.json --out g1
grep -qE '"vocab_size":[[:space:]]*50257' g1/config.json && [ -s g1/samples.txt ] && ok "shards run: vocab 50257 and samples decoded" \
  || not_ok "shards run: vocab 50257 and samples decoded"
expect_ok "generate from it with a text prompt" "$QUASAR" generate --model g1 --prompt "First Citizen:" --max-tokens 5
grep -q "^First Citizen:" "$WORK/out" && ok "generate: decoded text follows the prompt" || not_ok "generate: decoded text follows the prompt"
expect_ok "eval on the validation shards" "$QUASAR" eval --model g1
expect_ok "shards run: stop at 2" "$QUASAR" train --config g.json --out g2 --until 2
expect_ok "shards run: resume" "$QUASAR" train --resume g2
cmp -s g1/ckpt/step_00000004/model.safetensors g2/ckpt/step_00000004/model.safetensors \
  && ok "shards run: resume is bit-identical" || not_ok "shards run: resume is bit-identical"

# damaged shards
cp sh/val_000000.bin bad.bin && printf '\x00' | dd of=bad.bin bs=1 seek=0 conv=notrunc 2>/dev/null
expect_error "shard with a bad magic" "bad magic" "$QUASAR" train --config g.json --out b1 --set data.val_shards=$WORK/bad.bin
cp sh/val_000000.bin bad.bin && printf '\x02' | dd of=bad.bin bs=1 seek=4 conv=notrunc 2>/dev/null
expect_error "shard with another version" "unsupported version 2" "$QUASAR" train --config g.json --out b2 --set data.val_shards=$WORK/bad.bin
head -c 1100 sh/val_000000.bin >bad.bin
expect_error "truncated shard" "header says" "$QUASAR" train --config g.json --out b3 --set data.val_shards=$WORK/bad.bin
cp sh/val_000000.bin bad.bin && printf '\xff\xff' | dd of=bad.bin bs=1 seek=1030 conv=notrunc 2>/dev/null
expect_error "token id outside the vocabulary" "token id 65535 .*outside the vocabulary \(50257\)" \
  "$QUASAR" train --config g.json --out b4 --set data.val_shards=$WORK/bad.bin
expect_error "no shard matches" "no shard matches" "$QUASAR" train --config g.json --out b5 --set "data.train_shards=$WORK/none_*.bin"

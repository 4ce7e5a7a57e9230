# quasar bpe-train: the files it writes load as a tokenizer that round-trips any text,
# compress the text they were learnt from, come out byte-identical on a second run,
# encode like tiktoken built from them, and hold the merges a plain Python trainer
# picks; bad input is refused.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/tests/cli_lib.sh"
Q=$QUASAR

stdin_from() { local f=$1; shift; "$@" <"$f"; }

# Training text: English (the start of the tokenizer corpus) and seeded synthetic lines
# (emoji, CJK, other scripts, white-space and digit runs, <|endoftext|>).
seed=${QS_TEST_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
echo "# bpe_train.sh: seed $seed (QS_TEST_SEED=$seed reproduces)"
python3 - "$ROOT/tests" "$seed" corpus.txt <<'PY' && ok "training text of $(wc -c <corpus.txt) bytes" ||
import random, sys
sys.path.insert(0, sys.argv[1])
import tokenizer_corpus as tc
r = random.Random(int(sys.argv[2]))
text = tc.corpus(1, 1)[:150000] + "".join(tc.synthetic_line(r) for _ in range(300))
open(sys.argv[3], "w", encoding="utf-8").write(text)
PY
  not_ok "training text" "tests/tokenizer_corpus.py failed"

expect_ok "bpe-train to 400 tokens" stdin_from corpus.txt $Q bpe-train --vocab-size 400 --out v1
expect_ok "bpe-train again" stdin_from corpus.txt $Q bpe-train --vocab-size 400 --out v2
if cmp -s v1/encoder.json v2/encoder.json && cmp -s v1/vocab.bpe v2/vocab.bpe; then
  ok "the same text and size give byte-identical files"
else
  not_ok "deterministic files" "$(cmp v1/encoder.json v2/encoder.json; cmp v1/vocab.bpe v2/vocab.bpe)"
fi
[ "$(head -n1 v1/vocab.bpe)" = "#version: 0.2" ] && [ "$(wc -l <v1/vocab.bpe)" -ge 144 ] &&
  ok "vocab.bpe: version line and the merges" || not_ok "vocab.bpe" "$(head -3 v1/vocab.bpe)"

if expect_ok "tokenize the training text with the new files" stdin_from corpus.txt $Q tokenize --vocab-dir v1; then
  mv "$WORK/out" ids.txt
  bytes=$(wc -c <corpus.txt) tokens=$(wc -w <ids.txt)
  [ $((tokens * 10)) -lt $((bytes * 7)) ] && ok "$tokens tokens for $bytes bytes (under 70%)" ||
    not_ok "compression" "$tokens tokens for $bytes bytes"
  expect_ok "detokenize" stdin_from ids.txt $Q detokenize --vocab-dir v1
  cmp -s "$WORK/out" corpus.txt && ok "detokenize(tokenize(x)) == x" || not_ok "round trip" "$(cmp "$WORK/out" corpus.txt)"
  python3 "$ROOT/tests/tokenizer_corpus.py" compare v1 corpus.txt ids.txt >cmp.txt 2>&1; rc=$?
  case $rc in
    0) ok "same ids as tiktoken built from the trained files: $(cat cmp.txt)" ;;
    3) not_ok "tiktoken comparison" "$(cat cmp.txt)" ;;
    *) not_ok "same ids as tiktoken" "$(tail -3 cmp.txt)" ;;
  esac
fi

# Text the vocabulary never saw round-trips through byte tokens.
printf 'Unseen: \xf0\x9f\xa6\x84\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x9a\x80 \xe6\xbc\xa2\xe5\xad\x97\xe3\x81\x8b\xe3\x81\xaa \xce\xb6\xcf\x89\xce\xae\t\x01 <|endoftext|>zzz\n' >unseen.txt
if expect_ok "tokenize unseen text" stdin_from unseen.txt $Q tokenize --vocab-dir v1; then
  mv "$WORK/out" unseen_ids.txt
  expect_ok "detokenize unseen text" stdin_from unseen_ids.txt $Q detokenize --vocab-dir v1
  cmp -s "$WORK/out" unseen.txt && ok "unseen emoji/CJK text round-trips" || not_ok "unseen round trip" "$(od -c "$WORK/out" | head -3)"
  grep -qw 399 unseen_ids.txt && ok "<|endoftext|> is the last id" || not_ok "eot id" "$(cat unseen_ids.txt)"
fi

# A plain trainer: recount every pair each step, merge the most frequent (ties: merged
# bytes, then ids), reuse the id of a token made before. Its merges must be ours.
python3 - "$ROOT/tests" corpus.txt v1 >ref.txt 2>&1 <<'PY'; rc=$?
import collections, json, os, sys
sys.path.insert(0, sys.argv[1])
import regex
from tokenizer_corpus import GPT2_PATTERN, EOT, byte_alphabet
text, vdir = open(sys.argv[2], encoding="utf-8", newline="").read(), sys.argv[3]
words = collections.Counter()
for part in text.split(EOT):
    words.update(m.encode() for m in regex.findall(GPT2_PATTERN, part))
alpha = byte_alphabet()
order = sorted(range(256), key=lambda b: ord(alpha[b]))
tokens = [bytes([b]) for b in order]
tok_id = {t: i for i, t in enumerate(tokens)}
seqs = {w: [tok_id[bytes([b])] for b in w] for w in words}
merges = []
while len(tokens) < 399:
    pairs = collections.Counter()
    for w, s in seqs.items():
        for a, b in zip(s, s[1:]):
            pairs[a, b] += words[w]
    a, b = min(pairs, key=lambda p: (-pairs[p], tokens[p[0]] + tokens[p[1]], p))
    merges.append((a, b))
    z = tok_id.get(tokens[a] + tokens[b])
    if z is None:
        z = tok_id[tokens[a] + tokens[b]] = len(tokens)
        tokens.append(tokens[a] + tokens[b])
    for w, s in seqs.items():
        out, i = [], 0
        while i < len(s):
            if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                out.append(z); i += 2
            else:
                out.append(s[i]); i += 1
        seqs[w] = out
show = lambda t: "".join(alpha[c] for c in t)
want_bpe = "#version: 0.2\n" + "".join(f"{show(tokens[a])} {show(tokens[b])}\n" for a, b in merges)
want_enc = {show(t): i for i, t in enumerate(tokens)} | {EOT: 399}
got_bpe = open(os.path.join(vdir, "vocab.bpe"), encoding="utf-8").read()
got_enc = json.load(open(os.path.join(vdir, "encoder.json"), encoding="utf-8"))
if got_bpe != want_bpe or got_enc != want_enc:
    sys.exit(f"differs: {len(merges)} merges expected, first difference at line "
             f"{next((i for i, (x, y) in enumerate(zip(got_bpe.splitlines(), want_bpe.splitlines())) if x != y), '?')}")
print(f"{len(merges)} merges")
PY
[ $rc -eq 0 ] && ok "same merges and ids as a plain Python trainer: $(cat ref.txt)" ||
  not_ok "reference trainer" "$(tail -3 ref.txt)"

# bad input
printf 'ok\n\xff\xfe' >bad_utf8.txt
printf 'ab ab' >tiny.txt
printf '' >empty.txt
expect_error "vocab size 10" "vocab size 10 is out of range \[257, 65536\]" \
  stdin_from corpus.txt $Q bpe-train --vocab-size 10 --out bad
expect_error "vocab size 65537" "vocab size 65537 is out of range" \
  stdin_from corpus.txt $Q bpe-train --vocab-size 65537 --out bad
expect_error "vocab size not a number" "--vocab-size: expected a whole number, got '4k'" \
  $Q bpe-train --vocab-size 4k --out bad
expect_error "missing --out" "bpe-train needs --out DIR" $Q bpe-train --vocab-size 400
expect_error "missing --vocab-size" "bpe-train needs --vocab-size N" $Q bpe-train --out bad
expect_error "unknown option" "unknown option '--vocab-dir'" $Q bpe-train --vocab-dir v1
expect_error "invalid UTF-8" "invalid UTF-8 at byte 3" stdin_from bad_utf8.txt $Q bpe-train --vocab-size 400 --out bad
expect_error "empty input" "no text to train on" stdin_from empty.txt $Q bpe-train --vocab-size 400 --out bad
expect_error "text too small" "text is too small for 400 tokens" \
  stdin_from tiny.txt $Q bpe-train --vocab-size 400 --out bad
[ ! -e bad ] && ok "failed runs write nothing" || not_ok "failed runs write nothing" "$(ls bad)"
expect_ok "bpe-train --help" $Q bpe-train --help

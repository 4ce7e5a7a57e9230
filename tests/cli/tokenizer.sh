# quasar tokenize / detokenize: identical ids to tiktoken's gpt2 (built from the same
# vocabulary files) over a >= 5 MB varied corpus, exact byte round trip, and bad input.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/tests/cli_lib.sh"
Q=$QUASAR
V=$ROOT/../shared/data/gpt2

if [ ! -f "$V/encoder.json" ] || [ ! -f "$V/vocab.bpe" ]; then
  not_ok "GPT-2 vocabulary" "missing $V/encoder.json or vocab.bpe"
  exit 1
fi

# stdin_from FILE CMD...: runs CMD with FILE on stdin (for expect_ok / expect_error).
stdin_from() { local f=$1; shift; "$@" <"$f"; }

if python3 "$ROOT/tests/tokenizer_corpus.py" corpus corpus.txt; then
  ok "corpus of $(wc -c <corpus.txt) bytes"
else
  not_ok "corpus" "tests/tokenizer_corpus.py failed"
fi

if expect_ok "tokenize the corpus" stdin_from corpus.txt $Q tokenize --tokenizer gpt2 --vocab-dir "$V"; then
  mv "$WORK/out" ids.txt
  if [ "$(wc -l <ids.txt)" -eq 1 ] && grep -qE '^[0-9]+( [0-9]+)*$' ids.txt; then
    ok "ids are one line of single-space-separated decimals"
  else
    not_ok "ids format" "$(head -c 200 ids.txt)"
  fi
  python3 "$ROOT/tests/tokenizer_corpus.py" compare "$V" corpus.txt ids.txt >cmp.txt 2>&1; rc=$?
  case $rc in
    0) ok "same ids as tiktoken: $(cat cmp.txt)" ;;
    3) not_ok "tiktoken comparison" "$(cat cmp.txt)" ;;
    *) not_ok "same ids as tiktoken" "$(tail -3 cmp.txt)" ;;
  esac
  if expect_ok "detokenize the ids" stdin_from ids.txt $Q detokenize --vocab-dir "$V"; then
    if cmp -s "$WORK/out" corpus.txt; then ok "detokenize(tokenize(x)) == x byte for byte"
    else not_ok "round trip" "$(cmp "$WORK/out" corpus.txt)"; fi
  fi
fi

# small cases: empty input, special token, exact ids
printf '' >empty.txt
expect_ok "tokenize empty input" stdin_from empty.txt $Q tokenize --vocab-dir "$V"
[ "$(od -An -c "$WORK/out" | tr -d ' ')" = '\n' ] && ok "empty input gives an empty line" ||
  not_ok "empty input" "got: $(od -c "$WORK/out" | head -2)"
printf 'Hello world<|endoftext|>' >hello.txt
expect_ok "tokenize hello" stdin_from hello.txt $Q tokenize --vocab-dir "$V"
[ "$(cat "$WORK/out")" = "15496 995 50256" ] && ok "Hello world<|endoftext|> -> 15496 995 50256" ||
  not_ok "hello ids" "got: $(cat "$WORK/out")"

# bad input
printf 'ok\n\xff\xfe' >bad_utf8.txt
printf '15496 50257\n' >range.txt
printf '15496 12x\n' >word.txt
printf '15496 -3\n' >neg.txt
printf '99999999999999999999\n' >huge.txt
expect_error "tokenize without --vocab-dir" "tokenize needs --vocab-dir DIR" $Q tokenize
expect_error "detokenize without --vocab-dir" "detokenize needs --vocab-dir DIR" $Q detokenize --tokenizer gpt2
expect_error "unknown tokenizer" "--tokenizer: only gpt2 is supported, got 'llama'" \
  $Q tokenize --tokenizer llama --vocab-dir "$V"
expect_error "unknown option" "unknown option '--vocab'" $Q tokenize --vocab "$V"
expect_error "option without value" "--vocab-dir needs a value" $Q detokenize --vocab-dir
expect_error "missing vocabulary folder" "cannot open '$WORK/nowhere/encoder.json'" \
  $Q tokenize --vocab-dir "$WORK/nowhere"
expect_error "invalid UTF-8 on stdin" "stdin: invalid UTF-8 at byte 3" \
  stdin_from bad_utf8.txt $Q tokenize --vocab-dir "$V"
expect_error "out-of-range id" "token id 50257 \(at position 1\) is out of range \[0, 50257\)" \
  stdin_from range.txt $Q detokenize --vocab-dir "$V"
expect_error "non-numeric id" "'12x' is not a token id" stdin_from word.txt $Q detokenize --vocab-dir "$V"
expect_error "negative id" "'-3' is not a token id" stdin_from neg.txt $Q detokenize --vocab-dir "$V"
expect_error "id past int" "'99999999999999999999' is not a token id" stdin_from huge.txt $Q detokenize --vocab-dir "$V"
mkdir -p badvocab && cp "$V/vocab.bpe" badvocab/ && printf '{"a": 1,' >badvocab/encoder.json
expect_error "malformed encoder.json" "encoder.json: not valid JSON" $Q tokenize --vocab-dir badvocab
expect_ok "tokenize --help" $Q tokenize --help
expect_ok "detokenize --help" $Q detokenize --help

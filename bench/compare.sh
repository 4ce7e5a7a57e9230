#!/usr/bin/env bash
# Quasar against its PyTorch peers (bench/peers/) in one call on this machine: for each
# row, Quasar's measurement and then the peer's, back to back with the same threads:
#   train: default GPT, makeMoE recipe, hybrid quadconv LM (`quasar bench train` against
#          bench/peers/gpt_torch.py on the same config);
#   quadconv op forward + backward against quadconv_torch.py (Quasar's side: on a CPU
#          bench/quadconv_speed, on a GPU `quasar bench kernels --only quadconv` at issue
#          7's shape);
#   MoE layer forward + backward at issue 6's shapes a and b, and a dense FFN of the same
#          active FLOPs (`quasar bench moe` against moe_torch.py, makeMoE's expert loop);
#   attention forward and forward + backward over lengths x head sizes, causal and not
#          (`quasar bench attention` against attention_torch.py, SDPA; on a GPU in bf16 its
#          FlashAttention backend, issue 5's sweep);
#   generate (`quasar bench generate` against transformers' GPT2LMHeadModel.generate).
# Writes bench/results/<date>-<device>-compare.json (DESIGN.md's format; each result
# {name, metric, quasar, peer, peer_value, ratio}, ratio > 1: Quasar better, plus the
# load other processes put on the machine during each side) and prints a markdown table.
#   bench/compare.sh [--device cpu|cuda] [--dtype fp32|bf16] [--steps N] [--repeats N]
#                    [--rounds N] [--compile] [--only ROW,...] [--threads N] [--out FILE]
#                    [--train NAME=CONFIG]...   (more training rows, e.g. GPT-2 124M on a GPU)
#                    [--peers-only]             (the PyTorch side alone)
#                    [--max-others SHARE] [--retries N] [--wait S]   (rerun a side that ran under load)
#   BUILD=dir bench/compare.sh     build and time dir/quasar (default build/)
#   QUASAR=path bench/compare.sh   time that binary (and QUADCONV_SPEED=path the op's)
# Needs python3 with torch (and transformers for the generate row); the timings of a
# shared machine are indicative only: read them with their others_cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in *" -h "* | *" --help "*) exec python3 bench/peers/compare.py --help ;; esac
build=${BUILD:-build}
q=${QUASAR:-$build/quasar}
qs=${QUADCONV_SPEED:-$build/bench/quadconv_speed}
targets=()
[ -n "${QUASAR:-}" ] || targets+=("$q")
[ -n "${QUADCONV_SPEED:-}" ] || targets+=("$qs")
[ ${#targets[@]} -eq 0 ] || make -s -j"$(nproc)" BUILD="$build" "${targets[@]}"
./data/prepare_shakespeare.sh >/dev/null
python3 -c 'import torch' 2>/dev/null || echo "compare: warning: python3 has no torch; the peers' figures will be null" >&2
exec python3 bench/peers/compare.py --quasar "$q" --quadconv-speed "$qs" \
  --command "bench/compare.sh $*" "$@"

#!/usr/bin/env python3
"""The tokenizer's test corpus and its tiktoken reference.

  tokenizer_corpus.py corpus OUT [--mb 5] [--seed 1]
      Writes a deterministic UTF-8 corpus of at least --mb MiB: tiny Shakespeare, the
      licenses and C headers every Debian build machine has, then seeded synthetic text
      (emoji with ZWJ sequences and skin tones, CJK, Arabic, Hindi, Cyrillic, Greek,
      combining marks, white-space runs, digit runs, contractions, <|endoftext|>).
  tokenizer_corpus.py compare VOCAB_DIR TEXT IDS
      Encodes TEXT with tiktoken built from VOCAB_DIR's encoder.json (no download) and
      compares with IDS (`quasar tokenize` output). Exit 0 same, 1 different,
      3 tiktoken missing.
"""
import argparse
import glob
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def byte_alphabet():
    """GPT-2's byte -> printable character map (as in its encoder.json)."""
    printable = [b for b in range(256) if ord("!") <= b <= ord("~") or 0xA1 <= b <= 0xAC or b >= 0xAE]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def local_gpt2(vocab_dir):
    """tiktoken's gpt2 encoding, built from the files on disk."""
    import tiktoken

    to_byte = {c: b for b, c in byte_alphabet().items()}
    with open(os.path.join(vocab_dir, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    ranks = {bytes(to_byte[c] for c in tok): i for tok, i in encoder.items() if tok != EOT}
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: encoder[EOT]})


# ---- corpus ----

WORDS = ("the of and to in is that it was for on are with as his they be at one have this from "
         "or had by hot word but what some we can out other were all there when up use your how "
         "said an each she which do their time if will way about many then them write would like "
         "so these her long make thing see him two has look more day could go come did number "
         "sound no most people my over know water than call first who may down side been now find").split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'M", "'LL", "'D",
                "'Re", "'vE", "'Ll"]
SKIN = [chr(c) for c in range(0x1F3FB, 0x1F400)]
EMOJI = ["\U0001F600", "\U0001F602", "\U0001F44D", "\U0001F44B", "\U0001F680", "\u2764\ufe0f", "\U0001F525",
         "\U0001F389", "\U0001F40D", "\u2615", "\U0001F308", "\U0001F1EF\U0001F1F5", "\U0001F1FA\U0001F1F8",
         "1\ufe0f\u20e3", "#\ufe0f\u20e3", "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466",
         "\U0001F3F3\ufe0f\u200d\U0001F308", "\U0001F469\U0001F3FD\u200d\U0001F4BB",
         "\U0001F9D1\U0001F3FF\u200d\U0001F91D\u200d\U0001F9D1\U0001F3FB", "\U0001F441\ufe0f\u200d\U0001F5E8\ufe0f"]
SKIN_BASES = ["\U0001F44D", "\U0001F44B", "\U0001F64F", "\U0001F9D1", "\u270C", "\U0001F590"]
# Old, stable blocks only: PCRE2 and tiktoken's regex engine may follow different
# Unicode versions, and only letters and numbers assigned long ago agree everywhere.
SCRIPTS = {
    "cjk": [(0x4E00, 0x9FA5), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xAC00, 0xD7A3)],
    "arabic": [(0x0621, 0x063A), (0x0641, 0x064A)],
    "hindi": [(0x0915, 0x0939)],
    "cyrillic": [(0x0410, 0x044F)],
    "greek": [(0x0391, 0x03A1), (0x03A3, 0x03A9), (0x03B1, 0x03C9)],
}
MARKS = {"arabic": (0x064B, 0x0652), "hindi": (0x093E, 0x094D), "latin": (0x0300, 0x036F)}
SPACES = [" ", " ", " ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\u0085", "\x0b", "\x0c",
          "\u2003", "\u202f"]
ODD = ["\x1c", "\x1f", "\x00", "\x07", "\u200b", "\u200d", "\ufeff", "\u180e", "\u2060", "\ufffd", "\u00ad",
       "\U0001D400", "\u00bd", "\u00b2", "\u2167", "\u0669", "\u096f", "\uff11", "—", "…", "«", "»", "“", "”"]
PUNCT = ["!", "?", ".", ",", ";", ":", "...", "?!", "--", "(", ")", "[", "]", "{", "}", "\"", "'", "`", "*",
         "&&", "||", "->", "=>", "/*", "*/", "#", "@", "$", "%", "^", "~", "<", ">", "<|", "|>"]


def script_word(r, script, n):
    ranges = SCRIPTS[script]
    chars = []
    for _ in range(n):
        lo, hi = r.choice(ranges)
        chars.append(chr(r.randint(lo, hi)))
        if script in MARKS and r.random() < 0.3:
            lo, hi = MARKS[script]
            chars.append(chr(r.randint(lo, hi)))
    return "".join(chars)


def english_word(r):
    w = r.choice(WORDS)
    roll = r.random()
    if roll < 0.1:
        w = w.upper()
    elif roll < 0.3:
        w = w.capitalize()
    if r.random() < 0.15:
        w += r.choice(CONTRACTIONS)
    if r.random() < 0.05:
        lo, hi = MARKS["latin"]
        w += "".join(chr(r.randint(lo, hi)) for _ in range(r.randint(1, 3)))
    return w


def synthetic_piece(r):
    kind = r.choices(["en", "script", "emoji", "space", "digits", "punct", "odd", "eot"],
                     [40, 20, 8, 10, 8, 8, 4, 2])[0]
    if kind == "en":
        return english_word(r)
    if kind == "script":
        return script_word(r, r.choice(list(SCRIPTS)), r.randint(1, 12))
    if kind == "emoji":
        e = r.choice(EMOJI) if r.random() < 0.6 else r.choice(SKIN_BASES) + r.choice(SKIN)
        return e * r.choice([1, 1, 1, 2, 3])
    if kind == "space":
        n = r.choice([1, 1, 2, 3, 4, 8, 17, 40])
        return "".join(r.choice(SPACES) for _ in range(n))
    if kind == "digits":
        d = "".join(r.choice("0123456789") for _ in range(r.choice([1, 2, 3, 4, 7, 12, 30])))
        return d if r.random() < 0.7 else d + r.choice([",", ".", "e", "%"]) + str(r.randint(0, 999))
    if kind == "punct":
        return "".join(r.choice(PUNCT) for _ in range(r.randint(1, 4)))
    if kind == "odd":
        return r.choice(ODD)
    return r.choice([EOT, EOT, " " + EOT + " ", EOT + "\n", "<|endoftext", "<|endoftext|", "<|" + EOT])


def synthetic_line(r):
    parts = []
    for _ in range(r.randint(0, 25)):
        parts.append(synthetic_piece(r))
        parts.append(" " if r.random() < 0.8 else "")
    line = "".join(parts)
    return line + r.choice(["\n", "\n", "\n", "  \n", "\t\n", "\r\n", "\n\n", " \n \n"])


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def corpus(mb, seed):
    parts = []
    for src in (os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"),
                os.path.join(ROOT, "data", "shakespeare_char", "input.txt")):
        if os.path.exists(src):
            parts.append(read_text(src))
            break
    else:
        sys.exit("error: tiny Shakespeare not found (../shared/data or data/prepare_shakespeare.sh)")
    parts += [read_text(p) for p in sorted(glob.glob("/usr/share/common-licenses/*")) if os.path.isfile(p)]
    headers, size = [], 0
    for p in sorted(glob.glob("/usr/include/*.h")):
        if size > 1_500_000:
            break
        headers.append(read_text(p))
        size += len(headers[-1])
    parts += headers
    r = random.Random(seed)
    need = mb * 2**20 + 65536
    size = sum(len(p.encode("utf-8")) for p in parts)
    while size < need:
        line = synthetic_line(r)
        parts.append(line)
        size += len(line.encode("utf-8"))
    return "".join(parts)


def compare(vocab_dir, text_path, ids_path):
    try:
        enc = local_gpt2(vocab_dir)
    except ImportError:
        print("tiktoken is not importable (python3 -m pip install tiktoken)")
        return 3
    with open(text_path, "rb") as f:
        text = f.read().decode("utf-8")
    with open(ids_path) as f:
        got = [int(x) for x in f.read().split()]
    want = enc.encode(text, allowed_special="all")
    if got == want:
        print(f"{len(want)} tokens identical to tiktoken over {len(text.encode())} bytes")
        return 0
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    at = len(enc.decode_bytes(want[:i]))
    print(f"first difference at token {i} (byte {at}): quasar {got[i:i + 8]} tiktoken {want[i:i + 8]}; "
          f"text there: {text.encode()[at:at + 40]!r}")
    return 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("out")
    c.add_argument("--mb", type=int, default=5)
    c.add_argument("--seed", type=int, default=1)
    k = sub.add_parser("compare")
    k.add_argument("vocab_dir")
    k.add_argument("text")
    k.add_argument("ids")
    a = ap.parse_args()
    if a.cmd == "compare":
        return compare(a.vocab_dir, a.text, a.ids)
    with open(a.out, "wb") as f:
        f.write(corpus(a.mb, a.seed).encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

/* `quasar tokenize` and `quasar detokenize`: stdin -> stdout through the GPT-2
 * tokenizer. Ids travel as one line of decimals separated by single spaces;
 * detokenize writes the exact bytes back, with no newline added. `quasar shard` writes
 * llm.c shards; `quasar bpe-train` learns a vocabulary in the same format. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/shards.h"
#include "quasar/tokenizer.h"

static const char *TOKENIZE_HELP =
    "usage: quasar tokenize --tokenizer gpt2 --vocab-dir DIR\n"
    "  Reads UTF-8 text on stdin and prints its token ids on one line, separated by single\n"
    "  spaces. Each literal <|endoftext|> becomes that special token.\n"
    "  --tokenizer gpt2  GPT-2's byte-level BPE (the default and only choice)\n"
    "  --vocab-dir DIR   the folder holding encoder.json and vocab.bpe\n";

static const char *DETOKENIZE_HELP =
    "usage: quasar detokenize --tokenizer gpt2 --vocab-dir DIR\n"
    "  Reads token ids (decimal, separated by white space) on stdin and writes the text\n"
    "  they stand for, byte for byte, to stdout.\n"
    "  --tokenizer gpt2  GPT-2's byte-level BPE (the default and only choice)\n"
    "  --vocab-dir DIR   the folder holding encoder.json and vocab.bpe\n";

static const char *SHARD_HELP =
    "usage: quasar shard --tokenizer gpt2 --vocab-dir DIR --out PREFIX [--shard-tokens N]\n"
    "  Tokenizes UTF-8 text on stdin (one document, preceded by <|endoftext|> as in llm.c)\n"
    "  into PREFIX_000000.bin, PREFIX_000001.bin, ...: llm.c's shard format (256 int32\n"
    "  header: magic 20240520, version 1, token count; then uint16 tokens).\n"
    "  --shard-tokens N  tokens per shard (default 100000000)\n";

static const char *BPE_TRAIN_HELP =
    "usage: quasar bpe-train --vocab-size N --out DIR\n"
    "  Learns a byte-level BPE vocabulary from UTF-8 text on stdin and writes GPT-2's\n"
    "  DIR/encoder.json and DIR/vocab.bpe, for --vocab-dir DIR. The text is cut into\n"
    "  pre-tokens as tokenize cuts it; the most frequent pair is merged first.\n"
    "  --vocab-size N  tokens in all, 257..65536: 256 bytes, the merges, <|endoftext|>\n"
    "  --out DIR       the folder to write (made if missing)\n";

/* A string option of a command. */
typedef struct extra_opt {
    const char *flag;
    const char **value;
} extra_opt;

/* Reads argv's options into opts. Returns -1 to go on, else the exit code (0 after
 * --help). */
static int parse_options(int argc, char **argv, const char *help, const extra_opt *opts, int n_opts) {
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(help, stdout);
            return 0;
        }
        const char **dst = NULL;
        for (int o = 0; o < n_opts && !dst; o++)
            if (!strcmp(argv[i], opts[o].flag)) dst = opts[o].value;
        if (!dst) return qs_cli_usage_error("unknown option '%s'", argv[i]);
        if (i + 1 >= argc) return qs_cli_usage_error("%s needs a value", argv[i]);
        *dst = argv[++i];
    }
    return -1;
}

/* Reads the options (--tokenizer, --vocab-dir and up to 2 extra) and loads the
 * tokenizer. Returns 0 with *t set, or the exit code (0 after --help, with *t NULL). */
static int open_tokenizer(int argc, char **argv, const char *cmd, const char *help, const extra_opt *extra,
                          int n_extra, qs_tokenizer **t) {
    const char *vocab_dir = NULL, *name = "gpt2";
    *t = NULL;
    extra_opt opts[4] = {{"--vocab-dir", &vocab_dir}, {"--tokenizer", &name}};
    for (int e = 0; e < n_extra; e++) opts[2 + e] = extra[e];
    int code = parse_options(argc, argv, help, opts, 2 + n_extra);
    if (code >= 0) return code;
    if (strcmp(name, "gpt2")) return qs_cli_usage_error("--tokenizer: only gpt2 is supported, got '%s'", name);
    if (!vocab_dir) return qs_cli_usage_error("%s needs --vocab-dir DIR", cmd);
    return qs_tokenizer_load(t, vocab_dir) ? qs_cli_fail() : 0;
}

/* Writes the rest of the output; stdio's error flag covers the earlier writes too. */
static int write_stdout(const void *data, size_t n) {
    if ((n && fwrite(data, 1, n, stdout) != n) || fflush(stdout) || ferror(stdout))
        return qs_error("cannot write to stdout");
    return 0;
}

int qs_cli_tokenize(int argc, char **argv) {
    qs_tokenizer *t;
    int code = open_tokenizer(argc, argv, "tokenize", TOKENIZE_HELP, NULL, 0, &t);
    if (!t) return code;
    char *text = NULL;
    int *ids = NULL;
    size_t n, n_ids = 0;
    int rc = qs_file_read("/dev/stdin", &text, &n);
    if (!rc && !(ids = malloc((n + 1) * sizeof *ids))) rc = qs_error("out of memory for %zu bytes of text", n);
    if (!rc && qs_tokenizer_encode(t, text, n, ids, &n_ids)) rc = qs_error("stdin: %s", qs_error_last());
    for (size_t i = 0; !rc && i < n_ids; i++) printf(i ? " %d" : "%d", ids[i]);
    if (!rc) rc = write_stdout("\n", 1);
    free(ids);
    free(text);
    qs_tokenizer_free(t);
    return rc ? qs_cli_fail() : 0;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

/* White-space separated decimal ids; anything else names the offending word. */
static int parse_ids(const char *s, size_t n, int *ids, size_t *n_ids, int vocab) {
    size_t i = 0, k = 0;
    while (i < n) {
        if (is_space(s[i])) {
            i++;
            continue;
        }
        size_t start = i;
        long long v = 0;
        int ok = 1;
        for (; i < n && !is_space(s[i]); i++)
            ok = ok && s[i] >= '0' && s[i] <= '9' && (v = v * 10 + (s[i] - '0')) <= INT_MAX;
        if (!ok)
            return qs_error("stdin: '%.*s' is not a token id (expected decimals in [0, %d))",
                            (int)(i - start > 40 ? 40 : i - start), s + start, vocab);
        ids[k++] = (int)v;
    }
    *n_ids = k;
    return 0;
}

int qs_cli_detokenize(int argc, char **argv) {
    qs_tokenizer *t;
    int code = open_tokenizer(argc, argv, "detokenize", DETOKENIZE_HELP, NULL, 0, &t);
    if (!t) return code;
    char *in = NULL, *text = NULL;
    int *ids = NULL;
    size_t n, n_ids = 0, len;
    int rc = qs_file_read("/dev/stdin", &in, &n);
    /* each id takes a digit and a separator */
    if (!rc && !(ids = malloc((n / 2 + 1) * sizeof *ids))) rc = qs_error("out of memory for %zu bytes of ids", n);
    if (!rc) rc = parse_ids(in, n, ids, &n_ids, qs_tokenizer_vocab_size(t));
    if (!rc && qs_tokenizer_decode(t, ids, n_ids, &text, &len)) rc = qs_error("stdin: %s", qs_error_last());
    if (!rc) rc = write_stdout(text, len);
    free(text);
    free(ids);
    free(in);
    qs_tokenizer_free(t);
    return rc ? qs_cli_fail() : 0;
}

int qs_cli_shard(int argc, char **argv) {
    const char *out = NULL, *per_s = "100000000";
    extra_opt extra[] = {{"--out", &out}, {"--shard-tokens", &per_s}};
    qs_tokenizer *t;
    int code = open_tokenizer(argc, argv, "shard", SHARD_HELP, extra, 2, &t);
    if (!t) return code;
    char *end;
    long long per = strtoll(per_s, &end, 10);
    if (!out || *end || per < 1 || per > 0xffffffffLL) {
        qs_tokenizer_free(t);
        return out ? qs_cli_usage_error("--shard-tokens: expected a whole number in [1, 4294967295], got '%s'", per_s)
                   : qs_cli_usage_error("%s", "shard needs --out PREFIX");
    }
    char *text = NULL, dir[4096];
    int *ids = NULL;
    size_t n, n_ids = 0, shards = 0;
    snprintf(dir, sizeof dir, "%s", out); /* the prefix's folder, made like train's --out */
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    int rc = slash && slash != dir ? qs_mkdirs(dir) : 0;
    if (!rc) rc = qs_file_read("/dev/stdin", &text, &n);
    if (!rc && !(ids = malloc((n + 2) * sizeof *ids))) rc = qs_error("out of memory for %zu bytes of text", n);
    if (!rc) {
        ids[0] = qs_tokenizer_eot(t);
        if (qs_tokenizer_encode(t, text, n, ids + 1, &n_ids)) rc = qs_error("stdin: %s", qs_error_last());
        n_ids++;
    }
    for (size_t at = 0; !rc && at < n_ids; at += (size_t)per, shards++) {
        char path[4096];
        size_t count = n_ids - at < (size_t)per ? n_ids - at : (size_t)per;
        snprintf(path, sizeof path, "%s_%06zu.bin", out, shards);
        rc = qs_shard_write(path, ids + at, count);
    }
    if (!rc) fprintf(stderr, "quasar: wrote %zu tokens in %zu shard(s) %s_*.bin\n", n_ids, shards, out);
    free(ids);
    free(text);
    qs_tokenizer_free(t);
    return rc ? qs_cli_fail() : 0;
}

int qs_cli_bpe_train(int argc, char **argv) {
    const char *size_s = NULL, *out = NULL;
    extra_opt opts[] = {{"--vocab-size", &size_s}, {"--out", &out}};
    int code = parse_options(argc, argv, BPE_TRAIN_HELP, opts, 2);
    if (code >= 0) return code;
    if (!size_s) return qs_cli_usage_error("%s", "bpe-train needs --vocab-size N");
    if (!out) return qs_cli_usage_error("%s", "bpe-train needs --out DIR");
    char *end;
    long long size = strtoll(size_s, &end, 10);
    /* the range itself is qs_bpe_train's to check */
    if (!*size_s || *end || size < INT_MIN || size > INT_MAX)
        return qs_cli_usage_error("--vocab-size: expected a whole number, got '%s'", size_s);
    char *text = NULL;
    size_t n;
    int rc = qs_file_read("/dev/stdin", &text, &n) || qs_bpe_train(text, n, (int)size, out);
    if (!rc) fprintf(stderr, "quasar: wrote %s/encoder.json and %s/vocab.bpe (%lld tokens)\n", out, out, size);
    free(text);
    return rc ? qs_cli_fail() : 0;
}

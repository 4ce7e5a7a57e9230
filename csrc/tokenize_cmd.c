/* `quasar tokenize` and `quasar detokenize`: stdin -> stdout through the GPT-2
 * tokenizer. Ids travel as one line of decimals separated by single spaces;
 * detokenize writes the exact bytes back, with no newline added. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/tokenizer.h"

#define EXIT_USAGE 2

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

static int usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see --help)\n");
    return EXIT_USAGE;
}

static int fail(void) {
    fprintf(stderr, "error: %s\n", qs_error_last());
    return 1;
}

/* Reads the options and loads the tokenizer. Returns 0 with *t set, or the exit code
 * (0 after --help, with *t NULL). */
static int open_tokenizer(int argc, char **argv, const char *cmd, const char *help, qs_tokenizer **t) {
    const char *vocab_dir = NULL, *name = "gpt2";
    *t = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(help, stdout);
            return 0;
        }
        const char **dst = !strcmp(argv[i], "--vocab-dir")   ? &vocab_dir
                           : !strcmp(argv[i], "--tokenizer") ? &name
                                                             : NULL;
        if (!dst) return usage_error("unknown option '%s'", argv[i]);
        if (i + 1 >= argc) return usage_error("%s needs a value", argv[i]);
        *dst = argv[++i];
    }
    if (strcmp(name, "gpt2")) return usage_error("--tokenizer: only gpt2 is supported, got '%s'", name);
    if (!vocab_dir) return usage_error("%s needs --vocab-dir DIR", cmd);
    return qs_tokenizer_load(t, vocab_dir) ? fail() : 0;
}

/* Writes the rest of the output; stdio's error flag covers the earlier writes too. */
static int write_stdout(const void *data, size_t n) {
    if ((n && fwrite(data, 1, n, stdout) != n) || fflush(stdout) || ferror(stdout))
        return qs_error("cannot write to stdout");
    return 0;
}

int qs_cli_tokenize(int argc, char **argv) {
    qs_tokenizer *t;
    int code = open_tokenizer(argc, argv, "tokenize", TOKENIZE_HELP, &t);
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
    return rc ? fail() : 0;
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
    int code = open_tokenizer(argc, argv, "detokenize", DETOKENIZE_HELP, &t);
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
    return rc ? fail() : 0;
}

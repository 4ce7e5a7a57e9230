/* GPT-2 tokenizer: fixed cases whose ids came from tiktoken's gpt2 encoding, decode
 * inverting encode on fresh random UTF-8, and every kind of bad input: broken
 * vocabulary files, invalid UTF-8, out-of-range ids. The vocabulary is read from
 * ../shared/data/gpt2 (tests run from the repository root). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quasar/error.h"
#include "quasar/rng.h"
#include "quasar/tokenizer.h"
#include "test_seed.h"

#define GPT2_DIR "../shared/data/gpt2"

static uint64_t seed;
static qs_tokenizer *gpt2_tok;
static char dir[64];

static qs_tokenizer *gpt2(void) {
    if (!gpt2_tok && qs_tokenizer_load(&gpt2_tok, GPT2_DIR))
        fail_msg("GPT-2 vocabulary missing or unreadable (run from the repo root; expects " GPT2_DIR
                 "/encoder.json and vocab.bpe): %s",
                 qs_error_last());
    return gpt2_tok;
}

/* Encodes text, checks the ids against want (if given) and that decoding gives the
 * text back byte for byte. */
static void check_encode(const char *name, const char *text, size_t n, const int *want, size_t n_want) {
    qs_tokenizer *t = gpt2();
    int *ids = malloc((n + 1) * sizeof *ids);
    size_t n_ids;
    if (qs_tokenizer_encode(t, text, n, ids, &n_ids)) fail_msg("%s: %s", name, qs_error_last());
    if (want) {
        if (n_ids != n_want) fail_msg("%s: %zu ids, tiktoken gives %zu", name, n_ids, n_want);
        for (size_t i = 0; i < n_ids; i++)
            if (ids[i] != want[i]) fail_msg("%s: id %zu is %d, tiktoken gives %d", name, i, ids[i], want[i]);
    }
    char *back;
    size_t n_back;
    assert_int_equal(qs_tokenizer_decode(t, ids, n_ids, &back, &n_back), 0);
    if (n_back != n || memcmp(back, text, n)) fail_msg("%s: decode(encode(x)) != x", name);
    free(back);
    free(ids);
}

/* ---- fixed cases (ids from tiktoken 0.14, gpt2 built from the same files) ---- */

typedef struct fixed_case {
    const char *name, *text;
    int n;
    int ids[40];
} fixed_case;

static const fixed_case CASES[] = {
    {"plain", "Hello world", 2, {15496, 995}},
    {"contractions",
     "I'm sure they're here; we'll see what you've done, she'd said. IT'S HE'LL don't 'tis",
     29,
     {40,  1101, 1654, 484, 821,  994, 26, 356,   1183, 766,  644, 345, 1053, 1760, 11,
      673, 1549, 531,  13,  7283, 6,   50, 11179, 6,    3069, 836, 470, 705,  48010}},
    {"digits",
     "In 2024, 1234567890 people paid $3.14159 for 007 items (x10).",
     22,
     {818, 48609, 11,    17031, 2231, 30924, 3829, 661, 3432, 720, 18,
      13,  1415,  19707, 329,   3571, 22,    3709, 357, 87,   940, 737}},
    {"whitespace", "a  b\011\011c\012\012\012d   \012  e\015\012  f   ", 22, {64,  220, 275, 197, 197, 66,  628, 198,
                                                                              67,  220, 220, 220, 198, 220, 304, 201,
                                                                              198, 220, 277, 220, 220, 220}},
    {"only spaces", "    ", 4, {220, 220, 220, 220}},
    {"emoji",
     "Hi \360\237\221\213\360\237\217\275 family "
     "\360\237\221\250\342\200\215\360\237\221\251\342\200\215\360\237\221\247\342\200\215\360\237\221\246 "
     "\360\237\217\263\357\270\217\342\200\215\360\237\214\210!",
     31,
     {17250, 50169, 233, 8582,  237, 121,   1641, 50169, 101,   447, 235, 41840, 102, 447, 235, 41840,
      100,   447,   235, 41840, 99,  12520, 237,  111,   37929, 447, 235, 8582,  234, 230, 0}},
    {"cjk",
     "\346\227\245\346\234\254\350\252\236\343\201\256\343\203\206\343\202\255\343\202\271\343\203\210\343\201\250\344"
     "\270\255\346\226\207\345\255\227\347\254\246\357\274\214\355\225\234\352\265\255\354\226\264\353\217\204\343\200"
     "\202",
     34,
     {33768, 98, 17312, 105, 45739, 252,   5641, 24336, 25084, 43302, 30201, 40792, 23877, 229, 27764, 245, 163,
      105,   99, 171,   120, 234,   47991, 250,  166,   113,   255,   168,   244,   112,   167, 237,   226, 16764}},
    {"combining marks",
     "e\314\201cole cafe\314\201 n\314\203 Z\315\221\315\222a "
     "\340\244\225\340\244\277\340\244\244\340\244\276\340\244\254",
     26,
     {68,  136, 223, 1073, 293,   26725, 136,   223, 299,   136, 225,   1168,  137,
      239, 137, 240, 64,   28225, 243,   11976, 123, 11976, 97,  48077, 11976, 105}},
    {"endoftext inside",
     "end.<|endoftext|>Start <|endoftext|><|endoftext|> x<|endoftext",
     13,
     {437, 13, 50256, 10434, 220, 50256, 50256, 2124, 27, 91, 437, 1659, 5239}},
    {"unicode white space",
     "a\302\205b  \302\205x  \341\240\216x\302\240\343\200\200y",
     18,
     {64, 126, 227, 65, 220, 220, 126, 227, 87, 220, 28053, 254, 236, 87, 1849, 5099, 222, 88}},
    {"empty", "", 0, {}},
};

static void test_fixed_cases(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof CASES / sizeof *CASES; i++)
        check_encode(CASES[i].name, CASES[i].text, strlen(CASES[i].text), CASES[i].ids, (size_t)CASES[i].n);
    assert_int_equal(qs_tokenizer_vocab_size(gpt2()), 50257);
    assert_int_equal(qs_tokenizer_eot(gpt2()), 50256);
}

/* The whole input is kept as given: a NUL byte is text like any other. */
static void test_nul_byte(void **state) {
    (void)state;
    const int want[] = {64, 188, 188, 275, 188};
    check_encode("NUL", "a\0\0 b\0", 6, want, 5);
}

/* Pre-tokens past the cache's limit, up to a million bytes: the merge must stay
 * O(n log n). Ids from tiktoken: "1111" is 26259, "aaaa" 24794, "aa" 7252, " x" 2124. */
static void check_run(const char *name, char fill, size_t n_fill, const char *tail, int id, size_t n_id,
                      const int *tail_ids, size_t n_tail) {
    size_t n = n_fill + strlen(tail);
    char *text = malloc(n + 1);
    int *want = malloc((n_id + n_tail) * sizeof *want);
    memset(text, fill, n_fill);
    strcpy(text + n_fill, tail);
    for (size_t i = 0; i < n_id; i++) want[i] = id;
    if (n_tail) memcpy(want + n_id, tail_ids, n_tail * sizeof *want);
    check_encode(name, text, n, want, n_id + n_tail);
    free(want);
    free(text);
}

static void test_long_pretokens(void **state) {
    (void)state;
    const int aa = 7252, space_x = 2124;
    check_run("100 digits", '1', 100, "", 26259, 25, NULL, 0);
    check_run("a million digits", '1', 1000000, "", 26259, 250000, NULL, 0);
    check_run("150 letters", 'a', 150, "", 24794, 37, &aa, 1);
    check_run("70 spaces", ' ', 70, "x", 220, 69, &space_x, 1);
}

/* ---- random valid UTF-8 ---- */

static size_t put_utf8(char *s, uint32_t cp) {
    if (cp < 0x80) return s[0] = (char)cp, 1;
    if (cp < 0x800) return s[0] = (char)(0xC0 | cp >> 6), s[1] = (char)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000) {
        s[0] = (char)(0xE0 | cp >> 12);
        s[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        s[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    s[0] = (char)(0xF0 | cp >> 18);
    s[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    s[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    s[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* A random code point: mostly ASCII (letters, digits, space, apostrophes, controls),
 * then combining marks, the rest of the BMP and the astral planes; never a surrogate. */
static uint32_t random_cp(uint64_t stream, uint64_t *ctr) {
    static const char ascii[] = "aeiou tnrsTNRS   ''0123456789\t\n\r.,!?<|>";
    uint64_t kind = qs_rng_below(seed, stream, (*ctr)++, 10);
    uint64_t r = qs_rng_u64(seed, stream, (*ctr)++);
    if (kind < 4) return (uint32_t)ascii[r % (sizeof ascii - 1)];
    if (kind == 4) return (uint32_t)(r % 0x80);
    if (kind == 5) return 0x300 + (uint32_t)(r % 0x70);
    if (kind == 6) return 0x80 + (uint32_t)(r % (0x800 - 0x80));
    if (kind == 7) {
        uint32_t cp = 0x800 + (uint32_t)(r % (0x10000 - 0x800 - 0x800));
        return cp >= 0xD800 ? cp + 0x800 : cp;
    }
    return 0x10000 + (uint32_t)(r % 0x100000);
}

static void test_roundtrip_random(void **state) {
    (void)state;
    char *text = malloc(4 * 20000 + 16);
    uint64_t ctr = 0;
    for (int s = 0; s < 1000; s++) {
        int len = s == 0 ? 20000 : (int)qs_rng_below(seed, (uint64_t)s, ctr++, 200);
        size_t n = 0;
        for (int k = 0; k < len; k++) {
            if (qs_rng_below(seed, (uint64_t)s, ctr++, 100) == 0) {
                memcpy(text + n, "<|endoftext|>", 13);
                n += 13;
                continue;
            }
            n += put_utf8(text + n, random_cp((uint64_t)s, &ctr));
        }
        char name[64];
        snprintf(name, sizeof name, "random string %d (%zu bytes)", s, n);
        check_encode(name, text, n, NULL, 0);
    }
    free(text);
}

/* ---- bad input ---- */

static void expect_encode_error(const char *text, size_t n, const char *want) {
    int ids[16];
    size_t n_ids;
    assert_true(n <= 16);
    assert_int_equal(qs_tokenizer_encode(gpt2(), text, n, ids, &n_ids), -1);
    if (!strstr(qs_error_last(), want)) fail_msg("error '%s' lacks '%s'", qs_error_last(), want);
}

static void test_invalid_utf8(void **state) {
    (void)state;
    expect_encode_error("ab\xff", 3, "invalid UTF-8 at byte 2");
    expect_encode_error("\xc0\xaf", 2, "at byte 0");         /* overlong '/' */
    expect_encode_error("ok\xed\xa0\x80", 5, "at byte 2");   /* surrogate */
    expect_encode_error("\xf4\x90\x80\x80", 4, "at byte 0"); /* past U+10FFFF */
    expect_encode_error("abc\xe2\x82", 5, "at byte 3");      /* truncated */
    expect_encode_error("x\x80y", 3, "at byte 1");           /* stray continuation */
    expect_encode_error("\xc3\xa9\xe9", 3, "at byte 2");     /* Latin-1, not UTF-8 */
    expect_encode_error("aaaaaaaaaa\xfe", 11, "at byte 10"); /* after the ASCII fast path */
}

static void test_decode_out_of_range(void **state) {
    (void)state;
    char *text;
    size_t n;
    const int high[] = {15496, 50257}, low[] = {-1};
    assert_int_equal(qs_tokenizer_decode(gpt2(), high, 2, &text, &n), -1);
    assert_non_null(strstr(qs_error_last(), "token id 50257 (at position 1) is out of range [0, 50257)"));
    assert_int_equal(qs_tokenizer_decode(gpt2(), low, 1, &text, &n), -1);
    assert_non_null(strstr(qs_error_last(), "token id -1"));
    assert_int_equal(qs_tokenizer_decode(gpt2(), high, 0, &text, &n), 0);
    assert_int_equal(n, 0);
    free(text);
}

/* ---- a miniature vocabulary in GPT-2's file format, and broken variants ----
 * Bytes are ids 0..255, "he" 256, "hel" 257, <|endoftext|> 258; merges "h e", "he l". */

static void write_file(const char *name, const char *text) {
    char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* encoder.json with byte `dropped` (if >= 0) written as a two-byte token instead, the
 * end-of-text token only if with_eot, and tail appended inside the object. */
static void write_encoder(int dropped, int with_eot, const char *tail) {
    static char json[16384];
    int next = 256, n = sprintf(json, "{");
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        int cp = printable ? b : next++;
        n += sprintf(json + n, b == dropped ? "\"\\u%04x\\u%04x\": %d, " : "\"\\u%04x\": %d, ", cp,
                     b == dropped ? cp : b, b);
    }
    n += sprintf(json + n, "\"he\": 256, \"hel\": 257%s%s}", with_eot ? ", \"<|endoftext|>\": 258" : "", tail);
    write_file("encoder.json", json);
}

static const char GOOD_MERGES[] = "#version: 0.2\nh e\nhe l\n";

static void expect_load_error(const char *want) {
    qs_tokenizer *t = NULL;
    assert_int_equal(qs_tokenizer_load(&t, dir), -1);
    assert_null(t);
    if (!strstr(qs_error_last(), want)) fail_msg("error '%s' lacks '%s'", qs_error_last(), want);
}

static void test_small_vocab(void **state) {
    (void)state;
    write_encoder(-1, 1, "");
    write_file("vocab.bpe", GOOD_MERGES);
    qs_tokenizer *t;
    if (qs_tokenizer_load(&t, dir)) fail_msg("%s", qs_error_last());
    int ids[32];
    size_t n;
    assert_int_equal(qs_tokenizer_encode(t, "hello<|endoftext|>", 18, ids, &n), 0);
    assert_int_equal(n, 4);
    assert_int_equal(ids[0], 257);
    assert_int_equal(ids[1], 'l');
    assert_int_equal(ids[2], 'o');
    assert_int_equal(ids[3], 258);
    qs_tokenizer_free(t);
}

static void test_malformed_encoder(void **state) {
    (void)state;
    write_file("vocab.bpe", GOOD_MERGES);
    write_file("encoder.json", "{\"a\": 1,");
    expect_load_error("encoder.json: not valid JSON");
    write_file("encoder.json", "[1, 2]");
    expect_load_error("expected a non-empty JSON object");
    write_encoder(-1, 1, ", \"xy\": \"259\"");
    expect_load_error("token 'xy' needs an integer id in [0, 260)");
    write_encoder(-1, 1, ", \"xy\": 259.5");
    expect_load_error("token 'xy' needs an integer id");
    write_encoder(-1, 1, ", \"xy\": 300");
    expect_load_error("token 'xy' needs an integer id in [0, 260)");
    write_encoder(-1, 1, ", \"xy\": -1");
    expect_load_error("needs an integer id");
    write_encoder(-1, 1, ", \"xy\": 3");
    expect_load_error("id 3 is given to both");
    write_encoder(-1, 1, ", \"he\": 259");
    expect_load_error("token 'he' appears twice (ids 256 and 259)");
    write_encoder(-1, 1, ", \"a\\u00ad\": 259"); /* U+00AD is not in the byte alphabet */
    expect_load_error("is not a string over GPT-2's byte alphabet");
    write_encoder(-1, 1, ", \"\": 259");
    expect_load_error("is not a string over GPT-2's byte alphabet");
    write_encoder('A', 1, "");
    expect_load_error("no token for byte 0x41");
    write_encoder(-1, 0, "");
    expect_load_error("no <|endoftext|> token");
}

static void test_malformed_merges(void **state) {
    (void)state;
    write_encoder(-1, 1, "");
    write_file("vocab.bpe", "h e\nhe l\n");
    expect_load_error("vocab.bpe: line 1 is not the '#version' header");
    write_file("vocab.bpe", "#version: 0.2\nh e\nhe zz\n");
    expect_load_error("vocab.bpe line 3: 'zz' is not a token of encoder.json");
    write_file("vocab.bpe", "#version: 0.2\nh e\nhe l\nl o\n");
    expect_load_error("vocab.bpe line 4: the merge of 'l o' makes a token encoder.json lacks");
    write_file("vocab.bpe", "#version: 0.2\nh e l\n");
    expect_load_error("vocab.bpe line 2: expected two tokens separated by one space");
    write_file("vocab.bpe", "#version: 0.2\nhe\n");
    expect_load_error("line 2: expected two tokens");
    write_file("vocab.bpe", "#version: 0.2\nh e\n\nh e\n");
    expect_load_error("vocab.bpe line 4: merge 'h e' is listed twice");
    write_file("vocab.bpe", "#version: 0.2\nh e\r\n");
    expect_load_error("line 2: 'h e\r' is not over GPT-2's byte alphabet");
}

static void test_missing_files(void **state) {
    (void)state;
    char path[128], want[160];
    write_encoder(-1, 1, "");
    snprintf(path, sizeof path, "%s/vocab.bpe", dir);
    unlink(path);
    snprintf(want, sizeof want, "cannot open '%s'", path);
    expect_load_error(want);
    snprintf(path, sizeof path, "%s/encoder.json", dir);
    unlink(path);
    snprintf(want, sizeof want, "cannot open '%s'", path);
    expect_load_error(want);
}

static int setup(void **state) {
    (void)state;
    seed = qs_test_seed("test_tokenizer");
    snprintf(dir, sizeof dir, "/tmp/qs_test_tok_XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char path[128];
    const char *names[] = {"encoder.json", "vocab.bpe"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
    qs_tokenizer_free(gpt2_tok);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixed_cases),      cmocka_unit_test(test_nul_byte),
        cmocka_unit_test(test_long_pretokens),   cmocka_unit_test(test_roundtrip_random),
        cmocka_unit_test(test_invalid_utf8),     cmocka_unit_test(test_decode_out_of_range),
        cmocka_unit_test(test_small_vocab),      cmocka_unit_test(test_malformed_encoder),
        cmocka_unit_test(test_malformed_merges), cmocka_unit_test(test_missing_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

/* GPT-2 byte-level BPE: loading and checking encoder.json + vocab.bpe, encoding
 * (UTF-8 check, special-token split, PCRE2 pre-tokenizer, rank-ordered merges with a
 * pre-token cache) and decoding. The pre-tokenizer and byte alphabet are shared with
 * the trainer through pretokenize.h. */
#include "quasar/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <limits.h>
#include <pcre2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_maps.h"
#include "pretokenize.h"
#include "quasar/error.h"
#include "quasar/fileio.h"

/* GPT-2's pre-tokenizer. White space is spelled out as Unicode's White_Space property,
 * [\t-\r\x{85}\p{Z}], which is what tiktoken's regex engine means by \s; PCRE2's \s in
 * UCP mode also takes U+180E, which tiktoken treats as punctuation. Letters and numbers
 * follow PCRE2's Unicode tables (14.0 in PCRE2 10.42); code points assigned since then
 * can split differently from a tiktoken built on newer tables. */
#define WS "\\t-\\r\\x{85}\\p{Z}"
static const char PRETOKEN_RE[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+"
                                  "|[" WS "]+(?![^" WS "])|[" WS "]+";

typedef struct bpe_rule {
    int left, right, result;
} bpe_rule;

struct qs_tokenizer {
    int n_tokens, eot;
    char *bytes; /* token id -> bytes[off[id], off[id + 1]) */
    uint32_t *off;
    int byte_id[256];
    int n_merges;
    bpe_rule *merges; /* by rank */
    qs_pair_map ranks;
    qs_piece_cache cache;
    qs_pretokenizer *pre;
    /* merge scratch for one pre-token of up to scratch_cap bytes */
    int *nodes;     /* token, next, prev: scratch_cap each */
    uint64_t *heap; /* 3 * scratch_cap */
    size_t scratch_cap;
};

/* ---- UTF-8 and GPT-2's byte alphabet ---- */

/* The code point at s[0] (n bytes available) and its length, or -1 if s does not start
 * with well-formed UTF-8 (RFC 3629: no overlong forms, surrogates or values past
 * U+10FFFF). */
static int32_t utf8_decode(const unsigned char *s, size_t n, int *len) {
    unsigned c = s[0];
    if (c < 0x80) {
        *len = 1;
        return (int32_t)c;
    }
    if (c < 0xC2 || c > 0xF4) return -1; /* a continuation byte, an overlong lead, or past U+10FFFF */
    int k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    uint32_t cp = c & (0x7Fu >> k);
    if (n < (size_t)k) return -1;
    for (int i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return -1;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if ((k == 3 && cp < 0x800) || (k == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
        return -1;
    *len = k;
    return (int32_t)cp;
}

/* Offset of the first byte that is not part of well-formed UTF-8, or n. */
static size_t utf8_invalid_at(const char *text, size_t n) {
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0;
    while (i < n) {
        uint64_t w;
        if (n - i >= 8 && (memcpy(&w, s + i, 8), !(w & 0x8080808080808080ull))) {
            i += 8; /* ASCII fast path */
            continue;
        }
        int len;
        if (utf8_decode(s + i, n - i, &len) < 0) return i;
        i += (size_t)len;
    }
    return n;
}

/* Printable Latin-1 bytes ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) stand for themselves, the
 * other 68 bytes become U+0100, U+0101, ... in byte order. */
void qs_byte_alphabet(int byte_of_cp[QS_ALPHABET_CPS]) {
    int next = 256;
    for (int cp = 0; cp < QS_ALPHABET_CPS; cp++) byte_of_cp[cp] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        byte_of_cp[printable ? b : next++] = b;
    }
}

/* A token as written in the files -> its bytes (out has room for n). */
static int unmap_token(const int byte_of_cp[QS_ALPHABET_CPS], const char *s, size_t n, char *out, size_t *out_n) {
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        int len;
        int32_t cp = utf8_decode((const unsigned char *)s + i, n - i, &len);
        if (cp < 0 || cp >= QS_ALPHABET_CPS || byte_of_cp[cp] < 0) return -1;
        out[k++] = (char)byte_of_cp[cp];
        i += (size_t)len;
    }
    *out_n = k;
    return 0;
}

/* ---- pre-tokenizing ---- */

struct qs_pretokenizer {
    pcre2_code *re;
    pcre2_match_data *match;
};

int qs_pretokenizer_new(qs_pretokenizer **out) {
    qs_pretokenizer *p = *out = calloc(1, sizeof *p);
    if (!p) return qs_error("out of memory");
    int err, rc = 0;
    PCRE2_SIZE at;
    p->re = pcre2_compile((PCRE2_SPTR)PRETOKEN_RE, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &at, NULL);
    if (!p->re || (err = pcre2_jit_compile(p->re, PCRE2_JIT_COMPLETE)) != 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        rc = qs_error("cannot compile the pre-tokenizer with PCRE2's JIT: %s", (const char *)msg);
    } else if (!(p->match = pcre2_match_data_create_from_pattern(p->re, NULL))) {
        rc = qs_error("out of memory");
    }
    if (rc) {
        qs_pretokenizer_free(p);
        *out = NULL;
    }
    return rc;
}

void qs_pretokenizer_free(qs_pretokenizer *p) {
    if (!p) return;
    pcre2_match_data_free(p->match);
    pcre2_code_free(p->re);
    free(p);
}

/* Text without special tokens: pre-tokens one regex match at a time. The subject
 * ends where the text does, so the look-ahead cannot see past a special token. */
static int split_ordinary(qs_pretokenizer *p, const char *s, size_t n, qs_piece_fn piece, void *ctx) {
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(p->match);
    for (size_t pos = 0; pos < n;) {
        int rc = pcre2_jit_match(p->re, (PCRE2_SPTR)s, n, pos, 0, p->match, NULL);
        if (rc < 0 || ov[0] != pos || ov[1] <= pos)
            return qs_error("pre-tokenizer failed %zu bytes into a text segment (PCRE2 code %d)", pos, rc);
        if ((rc = piece(ctx, s + pos, ov[1] - pos, 0))) return rc;
        pos = ov[1];
    }
    return 0;
}

static const char *find_eot(const char *s, size_t n) {
    for (const char *p = s, *end = s + n; (size_t)(end - p) >= QS_EOT_LEN; p++) {
        p = memchr(p, '<', (size_t)(end - p) - QS_EOT_LEN + 1);
        if (!p) break;
        if (!memcmp(p, QS_EOT_TEXT, QS_EOT_LEN)) return p;
    }
    return NULL;
}

int qs_pretokenize(qs_pretokenizer *p, const char *text, size_t n, qs_piece_fn piece, void *ctx) {
    size_t bad = utf8_invalid_at(text, n);
    if (bad < n) return qs_error("invalid UTF-8 at byte %zu", bad);
    for (const char *s = text, *end = text + n; s < end;) {
        const char *eot = find_eot(s, (size_t)(end - s));
        int rc = split_ordinary(p, s, (size_t)((eot ? eot : end) - s), piece, ctx);
        if (rc || !eot) return rc;
        if ((rc = piece(ctx, eot, QS_EOT_LEN, 1))) return rc;
        s = eot + QS_EOT_LEN;
    }
    return 0;
}

/* ---- loading ---- */

/* encoder.json: {"token": id, ...}, ids exactly 0..n-1. Fills the token table and the
 * index over it. */
static int load_encoder(qs_tokenizer *t, const char *path, const int byte_of_cp[QS_ALPHABET_CPS],
                        qs_token_index *index) {
    char *data;
    size_t size;
    if (qs_file_read(path, &data, &size)) return -1;
    cJSON *root = cJSON_ParseWithLength(data, size);
    const cJSON **by_id = NULL;
    int rc = 0;
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        rc = qs_error("%s: not valid JSON (near byte %td)", path, at ? at - data : (ptrdiff_t)0);
    } else if (!cJSON_IsObject(root) || cJSON_GetArraySize(root) == 0) {
        rc = qs_error("%s: expected a non-empty JSON object of token -> id", path);
    }
    int n = rc ? 0 : cJSON_GetArraySize(root);
    size_t total = 0;
    if (!rc) {
        by_id = calloc((size_t)n, sizeof *by_id);
        if (!by_id) rc = qs_error("out of memory reading %s", path);
    }
    for (const cJSON *it = rc ? NULL : root->child; it; it = it->next) {
        double v = it->valuedouble;
        if (!cJSON_IsNumber(it) || !(v >= 0 && v < n) || v != (double)(int)v) {
            rc = qs_error("%s: token '%.40s' needs an integer id in [0, %d)", path, it->string, n);
            break;
        }
        if (by_id[(int)v]) {
            rc = qs_error("%s: id %d is given to both '%.40s' and '%.40s'", path, (int)v, by_id[(int)v]->string,
                          it->string);
            break;
        }
        by_id[(int)v] = it;
        total += strlen(it->string);
    }
    if (!rc) {
        t->n_tokens = n;
        t->bytes = malloc(total + 1);
        t->off = malloc(((size_t)n + 1) * sizeof *t->off);
        if (!t->bytes || !t->off) rc = qs_error("out of memory reading %s", path);
    }
    if (!rc && total > UINT32_MAX) rc = qs_error("%s: too large", path);
    size_t used = 0;
    for (int id = 0; !rc && id < n; id++) {
        const char *s = by_id[id]->string;
        size_t len;
        t->off[id] = (uint32_t)used;
        if (!*s || unmap_token(byte_of_cp, s, strlen(s), t->bytes + used, &len))
            rc = qs_error("%s: token '%.40s' is not a string over GPT-2's byte alphabet", path, s);
        else
            used += len;
    }
    if (!rc) {
        t->off[n] = (uint32_t)used;
        rc = qs_token_index_init(index, t->bytes, t->off, n);
    }
    for (int id = 0; !rc && id < n; id++) {
        int other = qs_token_index_put(index, id);
        if (other >= 0)
            rc = qs_error("%s: token '%.40s' appears twice (ids %d and %d)", path, by_id[id]->string, other, id);
    }
    free(by_id);
    cJSON_Delete(root);
    free(data);
    return rc;
}

/* vocab.bpe: a "#version" line, then one merge "left right" per line; rank = order. */
static int load_merges(qs_tokenizer *t, const char *path, const int byte_of_cp[QS_ALPHABET_CPS],
                       const qs_token_index *index) {
    char *data;
    size_t size;
    if (qs_file_read(path, &data, &size)) return -1;
    const char *eof = data + size, *nl = memchr(data, '\n', size);
    size_t max_merges = 1;
    for (const char *p = nl; p; p = memchr(p + 1, '\n', (size_t)(eof - p - 1))) max_merges++;
    char *buf = malloc(size + 1);
    t->merges = malloc(max_merges * sizeof *t->merges);
    int rc = 0;
    if (!buf || !t->merges || qs_pair_map_init(&t->ranks, max_merges))
        rc = qs_error("out of memory reading %s", path);
    else if (strncmp(data, "#version", 8))
        rc = qs_error("%s: line 1 is not the '#version' header", path);
    for (int ln = 2; !rc && nl && nl + 1 < eof; ln++) {
        const char *line = nl + 1;
        nl = memchr(line, '\n', (size_t)(eof - line));
        int len = (int)((nl ? nl : eof) - line);
        const char *sp = memchr(line, ' ', (size_t)len);
        if (len == 0) continue;
        if (!sp || sp == line || sp == line + len - 1 || memchr(sp + 1, ' ', (size_t)(line + len - sp - 1))) {
            rc = qs_error("%s line %d: expected two tokens separated by one space", path, ln);
            break;
        }
        size_t ll = (size_t)(sp - line), rl = (size_t)len - ll - 1, nl_bytes, nr_bytes;
        if (unmap_token(byte_of_cp, line, ll, buf, &nl_bytes) ||
            unmap_token(byte_of_cp, sp + 1, rl, buf + nl_bytes, &nr_bytes)) {
            rc = qs_error("%s line %d: '%.*s' is not over GPT-2's byte alphabet", path, ln, len, line);
            break;
        }
        int a = qs_token_index_get(index, buf, nl_bytes), b = qs_token_index_get(index, buf + nl_bytes, nr_bytes);
        int ab = qs_token_index_get(index, buf, nl_bytes + nr_bytes);
        if (a < 0 || b < 0)
            rc = qs_error("%s line %d: '%.*s' is not a token of encoder.json", path, ln, a < 0 ? (int)ll : (int)rl,
                          a < 0 ? line : sp + 1);
        else if (ab < 0)
            rc = qs_error("%s line %d: the merge of '%.*s' makes a token encoder.json lacks", path, ln, len, line);
        else if (qs_pair_map_put(&t->ranks, a, b, (uint32_t)t->n_merges) != QS_NO_RANK)
            rc = qs_error("%s line %d: merge '%.*s' is listed twice", path, ln, len, line);
        else
            t->merges[t->n_merges++] = (bpe_rule){a, b, ab};
    }
    free(buf);
    free(data);
    return rc;
}

static int vocab_path(char *path, size_t cap, const char *dir, const char *name) {
    int len = snprintf(path, cap, "%s/%s", dir, name);
    return len < 0 || (size_t)len >= cap ? qs_error("vocabulary folder path too long: '%.60s...'", dir) : 0;
}

int qs_tokenizer_load(qs_tokenizer **out, const char *dir) {
    *out = NULL;
    qs_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return qs_error("out of memory");
    int byte_of_cp[QS_ALPHABET_CPS];
    qs_byte_alphabet(byte_of_cp);
    qs_token_index index = {0};
    char path[4096];
    int rc = vocab_path(path, sizeof path, dir, "encoder.json") || load_encoder(t, path, byte_of_cp, &index);
    for (int b = 0; !rc && b < 256; b++) {
        char c = (char)b;
        if ((t->byte_id[b] = qs_token_index_get(&index, &c, 1)) < 0)
            rc = qs_error("%s: no token for byte 0x%02x", path, b);
    }
    if (!rc && (t->eot = qs_token_index_get(&index, QS_EOT_TEXT, QS_EOT_LEN)) < 0)
        rc = qs_error("%s: no " QS_EOT_TEXT " token", path);
    if (!rc) rc = vocab_path(path, sizeof path, dir, "vocab.bpe") || load_merges(t, path, byte_of_cp, &index);
    qs_token_index_free(&index);
    if (!rc) rc = qs_piece_cache_init(&t->cache);
    if (!rc) rc = qs_pretokenizer_new(&t->pre);
    if (rc) {
        qs_tokenizer_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

void qs_tokenizer_free(qs_tokenizer *t) {
    if (!t) return;
    free(t->bytes);
    free(t->off);
    free(t->merges);
    qs_pair_map_free(&t->ranks);
    qs_piece_cache_free(&t->cache);
    qs_pretokenizer_free(t->pre);
    free(t->nodes);
    free(t->heap);
    free(t);
}

int qs_tokenizer_vocab_size(const qs_tokenizer *t) { return t->n_tokens; }
int qs_tokenizer_eot(const qs_tokenizer *t) { return t->eot; }

/* ---- encoding ---- */

static void heap_push(uint64_t *h, size_t *n, uint64_t x) {
    size_t i = (*n)++;
    for (; i && h[(i - 1) / 2] > x; i = (i - 1) / 2) h[i] = h[(i - 1) / 2];
    h[i] = x;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], x = h[--*n];
    size_t i = 0, m = *n;
    for (size_t c = 1; c < m; i = c, c = 2 * c + 1) {
        if (c + 1 < m && h[c + 1] < h[c]) c++;
        if (h[c] >= x) break;
        h[i] = h[c];
    }
    h[i] = x;
    return top;
}

static int grow_scratch(qs_tokenizer *t, size_t n) {
    if (n <= t->scratch_cap) return 0;
    size_t cap = n > 2 * t->scratch_cap ? n : 2 * t->scratch_cap;
    int *nodes = realloc(t->nodes, 3 * cap * sizeof *nodes);
    if (nodes) t->nodes = nodes;
    uint64_t *heap = realloc(t->heap, 3 * cap * sizeof *heap);
    if (heap) t->heap = heap;
    if (!nodes || !heap) return qs_error("out of memory encoding a %zu-byte pre-token", n);
    t->scratch_cap = cap;
    return 0;
}

/* Pushes the pair of neighbouring nodes i, j if it merges. Heap keys are
 * rank << 32 | position, so the lowest rank pops first and, among repeats of one pair
 * (ranks are unique per pair), the leftmost. */
static void push_pair(const qs_tokenizer *t, const int *tok, int i, int j, uint64_t *heap, size_t *hn) {
    uint32_t r = qs_pair_map_get(&t->ranks, tok[i], tok[j]);
    if (r != QS_NO_RANK) heap_push(heap, hn, (uint64_t)r << 32 | (uint32_t)i);
}

/* Merges one pre-token's byte tokens by rank. The tokens form a linked list over byte
 * positions (a merge keeps the left node); a popped heap entry whose pair has changed
 * since it was pushed is skipped. Returns the number of ids written. */
static int bpe_merge(qs_tokenizer *t, const unsigned char *p, int n, int *out) {
    if (grow_scratch(t, (size_t)n)) return -1;
    int *tok = t->nodes, *next = tok + t->scratch_cap, *prev = next + t->scratch_cap;
    uint64_t *heap = t->heap;
    size_t hn = 0;
    for (int i = 0; i < n; i++) {
        tok[i] = t->byte_id[p[i]];
        next[i] = i + 1;
        prev[i] = i - 1;
    }
    for (int i = 0; i + 1 < n; i++) push_pair(t, tok, i, i + 1, heap, &hn);
    while (hn) {
        uint64_t top = heap_pop(heap, &hn);
        int r = (int)(top >> 32), i = (int)(uint32_t)top, j = next[i];
        const bpe_rule *m = &t->merges[r];
        if (tok[i] != m->left || j == n || tok[j] != m->right) continue;
        tok[i] = m->result;
        tok[j] = -1;
        next[i] = next[j];
        if (next[i] < n) prev[next[i]] = i;
        if (prev[i] >= 0) push_pair(t, tok, prev[i], i, heap, &hn);
        if (next[i] < n) push_pair(t, tok, i, next[i], heap, &hn);
    }
    int k = 0;
    for (int i = 0; i < n; i = next[i]) out[k++] = tok[i];
    return k;
}

/* One pre-token -> ids (returns their count, or -1). */
static int encode_piece(qs_tokenizer *t, const char *p, size_t n, int *out) {
    if (n == 1) {
        out[0] = t->byte_id[(unsigned char)p[0]];
        return 1;
    }
    if (n > QS_CACHE_MAX_PIECE) return bpe_merge(t, (const unsigned char *)p, (int)n, out);
    uint64_t h = qs_bpe_hash(p, n);
    int k;
    const int *hit = qs_piece_cache_get(&t->cache, p, n, h, &k);
    if (hit) {
        memcpy(out, hit, (size_t)k * sizeof *out);
        return k;
    }
    k = bpe_merge(t, (const unsigned char *)p, (int)n, out);
    if (k > 0) qs_piece_cache_put(&t->cache, p, n, h, out, k);
    return k;
}

typedef struct encode_ctx {
    qs_tokenizer *t;
    int *ids;
    size_t n_ids;
} encode_ctx;

static int encode_cb(void *ctx, const char *s, size_t n, int is_eot) {
    encode_ctx *c = ctx;
    int k = 1;
    if (is_eot)
        c->ids[c->n_ids] = c->t->eot;
    else if ((k = encode_piece(c->t, s, n, c->ids + c->n_ids)) < 0)
        return -1;
    c->n_ids += (size_t)k;
    return 0;
}

int qs_tokenizer_encode(qs_tokenizer *t, const char *text, size_t n, int *ids, size_t *n_ids) {
    *n_ids = 0;
    if (n > INT_MAX) return qs_error("text too long to encode (%zu bytes; at most 2 GiB at once)", n);
    encode_ctx c = {t, ids, 0};
    int rc = qs_pretokenize(t->pre, text, n, encode_cb, &c);
    *n_ids = c.n_ids;
    return rc;
}

/* ---- decoding ---- */

int qs_tokenizer_decode(const qs_tokenizer *t, const int *ids, size_t n_ids, char **text, size_t *n) {
    *text = NULL;
    *n = 0;
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_tokens)
            return qs_error("token id %d (at position %zu) is out of range [0, %d)", ids[i], i, t->n_tokens);
        total += t->off[ids[i] + 1] - t->off[ids[i]];
    }
    char *out = malloc(total + 1);
    if (!out) return qs_error("out of memory decoding %zu tokens", n_ids);
    char *w = out;
    for (size_t i = 0; i < n_ids; i++) {
        size_t len = t->off[ids[i] + 1] - t->off[ids[i]];
        memcpy(w, t->bytes + t->off[ids[i]], len);
        w += len;
    }
    *w = '\0';
    *text = out;
    *n = total;
    return 0;
}

/* Byte-level BPE training in GPT-2's format. The text is cut exactly as the encoder
 * cuts it (pretokenize.h); distinct pre-tokens ("words") are counted once, then the most
 * frequent adjacent pair is merged until the vocabulary is full. Pair counts are kept
 * incrementally: each pair lists the words it occurs in, so a merge only rewrites the
 * words that hold it, and a max-heap with lazy deletion finds the next best pair. */
#include <cjson/cJSON.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_maps.h"
#include "pretokenize.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/tokenizer.h"

typedef struct pair_rec {
    int left, right;
    int64_t count;
    int64_t step_count; /* count when merge step `step` first touched it */
    int step;
    int last_word; /* the word appended last to words, so a word goes in once per visit */
    int *words;    /* may hold words that lost the pair since: merging skips them */
    int n_words, cap_words;
} pair_rec;

typedef struct heap_entry {
    int64_t count; /* the pair's count when pushed; stale once the pair's count moves */
    int pair;
} heap_entry;

typedef struct trainer {
    /* tokens: id -> tok_bytes[tok_off[id], tok_off[id + 1]) */
    char *tok_bytes;
    size_t tok_cap;
    uint32_t *tok_off;
    int n_tokens, max_tokens;
    qs_token_index tok_index;
    int byte_id[256];
    int (*merges)[2];
    int n_merges, cap_merges;
    /* words: bytes at word_bytes[word_off[w], word_off[w + 1]); the same offsets hold
     * the word's current tokens, sym[word_off[w], + word_len[w]) */
    char *word_bytes;
    uint32_t *word_off;
    int *sym, *word_len, *word_step;
    int64_t *word_count;
    int n_words, cap_words, cap_counts, max_word_len;
    qs_token_index word_index;
    /* pairs: (left, right) -> pairs[map value] */
    pair_rec *pairs;
    int n_pairs, cap_pairs;
    qs_pair_map pair_map;
    int *touched; /* pairs touched in this step */
    int n_touched, cap_touched;
    heap_entry *heap;
    size_t n_heap, cap_heap;
    int step;
} trainer;

/* Grows the array that *array_ptr points to (*cap elements of size) to hold at least
 * need elements. The pointer is moved with memcpy, which any pointer type allows. */
static int grow(void *array_ptr, size_t size, int *cap, size_t need) {
    if (need <= (size_t)*cap) return 0;
    size_t n = *cap ? 2 * (size_t)*cap : 16;
    if (n < need) n = need;
    if (n > INT_MAX) return qs_error("BPE training: table too large");
    void *old, *p;
    memcpy(&old, array_ptr, sizeof old);
    if (!(p = realloc(old, n * size))) return qs_error("out of memory training BPE");
    memcpy(array_ptr, &p, sizeof p);
    *cap = (int)n;
    return 0;
}

/* ---- counting words ---- */

static int word_piece(void *ctx, const char *s, size_t n, int is_eot) {
    trainer *t = ctx;
    if (is_eot) return 0; /* <|endoftext|> is its own token, never merged */
    int w = qs_token_index_get(&t->word_index, s, n);
    if (w < 0) {
        w = t->n_words;
        if (w + 2 > t->cap_words) {
            /* the index keeps its table at most half full: rebuild it twice as large */
            if (grow(&t->word_off, sizeof *t->word_off, &t->cap_words, (size_t)w + 2)) return -1;
            qs_token_index_free(&t->word_index);
            if (qs_token_index_init(&t->word_index, t->word_bytes, t->word_off, t->cap_words)) return -1;
            for (int v = 0; v < w; v++) qs_token_index_put(&t->word_index, v);
        }
        if (grow(&t->word_count, sizeof *t->word_count, &t->cap_counts, (size_t)w + 1)) return -1;
        memcpy(t->word_bytes + t->word_off[w], s, n);
        t->word_off[w + 1] = t->word_off[w] + (uint32_t)n;
        qs_token_index_put(&t->word_index, w);
        t->word_count[w] = 0;
        t->n_words++;
        if ((int)n > t->max_word_len) t->max_word_len = (int)n;
    }
    t->word_count[w]++;
    return 0;
}

/* ---- pairs and the heap ---- */

static int pair_index(trainer *t, int left, int right) {
    uint32_t r = qs_pair_map_get(&t->pair_map, left, right);
    if (r != QS_NO_RANK) return (int)r;
    if (t->n_pairs == t->cap_pairs) {
        if (grow(&t->pairs, sizeof *t->pairs, &t->cap_pairs, (size_t)t->n_pairs + 1)) return -1;
        qs_pair_map_free(&t->pair_map);
        if (qs_pair_map_init(&t->pair_map, (size_t)t->cap_pairs)) return -1;
        for (int p = 0; p < t->n_pairs; p++)
            qs_pair_map_put(&t->pair_map, t->pairs[p].left, t->pairs[p].right, (uint32_t)p);
    }
    qs_pair_map_put(&t->pair_map, left, right, (uint32_t)t->n_pairs);
    t->pairs[t->n_pairs] = (pair_rec){.left = left, .right = right, .step = -1, .last_word = -1};
    return t->n_pairs++;
}

/* Adds delta occurrences of (left, right); word w >= 0 now holds the pair. */
static int pair_add(trainer *t, int left, int right, int64_t delta, int w) {
    int p = pair_index(t, left, right);
    if (p < 0) return -1;
    pair_rec *r = &t->pairs[p];
    if (r->step != t->step) {
        if (grow(&t->touched, sizeof *t->touched, &t->cap_touched, (size_t)t->n_touched + 1)) return -1;
        t->touched[t->n_touched++] = p;
        r->step = t->step;
        r->step_count = r->count;
    }
    r->count += delta;
    if (w >= 0 && r->last_word != w) {
        if (grow(&r->words, sizeof *r->words, &r->cap_words, (size_t)r->n_words + 1)) return -1;
        r->words[r->n_words++] = w;
        r->last_word = w;
    }
    return 0;
}

/* Orders pairs by the bytes of their merge, then by ids (two pairs can merge into the
 * same bytes, as "ab"+"c" and "a"+"bc"). */
static int cmp_merged(const trainer *t, const pair_rec *x, const pair_rec *y) {
    const uint32_t *off = t->tok_off;
    size_t xi = off[x->left], xe = off[x->left + 1], yi = off[y->left], ye = off[y->left + 1];
    int xs = 0, ys = 0; /* which half each cursor is in */
    for (;;) {
        if (xi == xe && !xs) xi = off[x->right], xe = off[x->right + 1], xs = 1;
        if (yi == ye && !ys) yi = off[y->right], ye = off[y->right + 1], ys = 1;
        size_t k = xe - xi < ye - yi ? xe - xi : ye - yi;
        if (k == 0) break;
        int c = memcmp(t->tok_bytes + xi, t->tok_bytes + yi, k);
        if (c) return c;
        xi += k;
        yi += k;
    }
    if (xi != xe || !xs) return 1; /* x is longer */
    if (yi != ye || !ys) return -1;
    if (x->left != y->left) return x->left < y->left ? -1 : 1;
    return (x->right > y->right) - (x->right < y->right);
}

/* Whether a pops before b: higher count, then the merge that sorts first. */
static int heap_before(const trainer *t, heap_entry a, heap_entry b) {
    if (a.count != b.count) return a.count > b.count;
    return cmp_merged(t, &t->pairs[a.pair], &t->pairs[b.pair]) < 0;
}

static int heap_push(trainer *t, int64_t count, int pair) {
    if (t->n_heap == t->cap_heap) {
        size_t cap = t->cap_heap ? 2 * t->cap_heap : 1024;
        heap_entry *h = realloc(t->heap, cap * sizeof *h);
        if (!h) return qs_error("out of memory training BPE");
        t->heap = h;
        t->cap_heap = cap;
    }
    heap_entry x = {count, pair};
    size_t i = t->n_heap++;
    for (; i && heap_before(t, x, t->heap[(i - 1) / 2]); i = (i - 1) / 2) t->heap[i] = t->heap[(i - 1) / 2];
    t->heap[i] = x;
    return 0;
}

static heap_entry heap_pop(trainer *t) {
    heap_entry top = t->heap[0], x = t->heap[--t->n_heap];
    size_t i = 0, m = t->n_heap;
    for (size_t c = 1; c < m; i = c, c = 2 * c + 1) {
        if (c + 1 < m && heap_before(t, t->heap[c + 1], t->heap[c])) c++;
        if (!heap_before(t, t->heap[c], x)) break;
        t->heap[i] = t->heap[c];
    }
    t->heap[i] = x;
    return top;
}

/* The best pair to merge (-1 if none is left). Entries are pushed whenever a count
 * grows, so each live pair has one whose count is >= its own; an entry above the
 * pair's count goes back in with the true count, one below it is a leftover. */
static int best_pair(trainer *t, int *best) {
    while (t->n_heap) {
        heap_entry e = heap_pop(t);
        int64_t c = t->pairs[e.pair].count;
        if (c > 0 && c == e.count) {
            *best = e.pair;
            return 0;
        }
        if (c > 0 && c < e.count && heap_push(t, c, e.pair)) return -1;
    }
    *best = -1;
    return 0;
}

/* Ends a step: pairs whose count grew go into the heap. */
static int push_grown(trainer *t) {
    for (int i = 0; i < t->n_touched; i++) {
        pair_rec *r = &t->pairs[t->touched[i]];
        if (r->count > r->step_count && heap_push(t, r->count, t->touched[i])) return -1;
    }
    t->n_touched = 0;
    return 0;
}

/* ---- merging ---- */

/* The id of token bytes a + b (-1 if out of memory), adding it if new (a merge can rebuild a token an
 * earlier merge made from other parts; then the id is shared). */
static int merged_token(trainer *t, int a, int b) {
    uint32_t *off = t->tok_off;
    size_t la = off[a + 1] - off[a], lb = off[b + 1] - off[b];
    if (off[t->n_tokens] + la + lb > t->tok_cap) {
        size_t cap = 2 * (off[t->n_tokens] + la + lb);
        char *p = cap <= UINT32_MAX ? realloc(t->tok_bytes, cap) : NULL;
        if (!p) return qs_error("out of memory for the tokens' bytes");
        t->tok_bytes = p;
        t->tok_index.bytes = p;
        t->tok_cap = cap;
    }
    char *end = t->tok_bytes + off[t->n_tokens];
    memcpy(end, t->tok_bytes + off[a], la);
    memcpy(end + la, t->tok_bytes + off[b], lb);
    int z = qs_token_index_get(&t->tok_index, end, la + lb);
    if (z >= 0) return z;
    z = t->n_tokens++;
    off[z + 1] = off[z] + (uint32_t)(la + lb);
    qs_token_index_put(&t->tok_index, z);
    return z;
}

/* Rewrites word w with a b -> z (left to right, as the encoder does) and moves its
 * pair counts from the old tokens to the new. */
static int merge_word(trainer *t, int w, int a, int b, int z, int *tmp) {
    int *s = t->sym + t->word_off[w], n = t->word_len[w], k = 0;
    int64_t c = t->word_count[w];
    for (int i = 0; i < n;) {
        if (i + 1 < n && s[i] == a && s[i + 1] == b) {
            tmp[k++] = z;
            i += 2;
        } else {
            tmp[k++] = s[i++];
        }
    }
    if (k == n) return 0; /* the word lost the pair to an earlier merge */
    for (int i = 0; i + 1 < n; i++)
        if (pair_add(t, s[i], s[i + 1], -c, -1)) return -1;
    for (int i = 0; i + 1 < k; i++)
        if (pair_add(t, tmp[i], tmp[i + 1], c, tmp[i] == z || tmp[i + 1] == z ? w : -1)) return -1;
    memcpy(s, tmp, (size_t)k * sizeof *s);
    t->word_len[w] = k;
    return 0;
}

static int merge_step(trainer *t, int p, int *tmp) {
    int a = t->pairs[p].left, b = t->pairs[p].right, z = merged_token(t, a, b);
    if (z < 0 || grow(&t->merges, sizeof *t->merges, &t->cap_merges, (size_t)t->n_merges + 1)) return -1;
    t->merges[t->n_merges][0] = a;
    t->merges[t->n_merges++][1] = b;
    /* the pair never comes back (new neighbours all hold z), so its list goes */
    int *words = t->pairs[p].words, n = t->pairs[p].n_words, rc = 0;
    t->pairs[p].words = NULL;
    t->pairs[p].n_words = t->pairs[p].cap_words = 0;
    t->step++;
    for (int i = 0; !rc && i < n; i++) {
        int w = words[i];
        if (t->word_step[w] == t->step) continue;
        t->word_step[w] = t->step;
        rc = merge_word(t, w, a, b, z, tmp);
    }
    free(words);
    return rc ? rc : push_grown(t);
}

/* ---- writing GPT-2's files ---- */

/* Token id's bytes in GPT-2's alphabet, as a NUL-terminated UTF-8 string in out (room
 * for 2 bytes per byte + 1: every alphabet code point is below U+0800). */
static void token_text(const trainer *t, const int cp_of_byte[256], int id, char *out) {
    for (uint32_t i = t->tok_off[id]; i < t->tok_off[id + 1]; i++) {
        int cp = cp_of_byte[(unsigned char)t->tok_bytes[i]];
        if (cp < 0x80) {
            *out++ = (char)cp;
        } else {
            *out++ = (char)(0xC0 | cp >> 6);
            *out++ = (char)(0x80 | (cp & 0x3F));
        }
    }
    *out = '\0';
}

static int write_files(const trainer *t, const char *dir, const int cp_of_byte[256]) {
    char path[4096];
    size_t max_len = 0;
    for (int id = 0; id < t->n_tokens; id++)
        if (t->tok_off[id + 1] - t->tok_off[id] > max_len) max_len = t->tok_off[id + 1] - t->tok_off[id];
    /* vocab.bpe lines: two token texts, a space and a newline each */
    size_t cap = 16 + (size_t)t->n_merges * (4 * max_len + 2);
    char *text = malloc(2 * max_len + 1), *bpe = malloc(cap);
    cJSON *root = cJSON_CreateObject();
    char *json = NULL;
    int rc = !text || !bpe || !root ? qs_error("out of memory writing the vocabulary") : 0;
    for (int id = 0; !rc && id < t->n_tokens; id++) {
        token_text(t, cp_of_byte, id, text);
        if (!cJSON_AddNumberToObject(root, text, id)) rc = qs_error("out of memory writing the vocabulary");
    }
    if (!rc && !cJSON_AddNumberToObject(root, QS_EOT_TEXT, t->n_tokens))
        rc = qs_error("out of memory writing the vocabulary");
    if (!rc && !(json = cJSON_PrintUnformatted(root))) rc = qs_error("out of memory writing the vocabulary");
    size_t used = rc ? 0 : (size_t)sprintf(bpe, "#version: 0.2\n");
    for (int m = 0; !rc && m < t->n_merges; m++) {
        token_text(t, cp_of_byte, t->merges[m][0], bpe + used);
        used += strlen(bpe + used);
        bpe[used++] = ' ';
        token_text(t, cp_of_byte, t->merges[m][1], bpe + used);
        used += strlen(bpe + used);
        bpe[used++] = '\n';
    }
    if (!rc && snprintf(path, sizeof path, "%s/encoder.json", dir) >= (int)sizeof path)
        rc = qs_error("output folder path too long: '%.60s...'", dir);
    if (!rc) rc = qs_mkdirs(dir) || qs_file_write_atomic(path, json, strlen(json));
    if (!rc) {
        snprintf(path, sizeof path, "%s/vocab.bpe", dir);
        rc = qs_file_write_atomic(path, bpe, used);
    }
    free(json);
    cJSON_Delete(root);
    free(bpe);
    free(text);
    return rc;
}

/* ---- training ---- */

static void trainer_free(trainer *t) {
    free(t->tok_bytes);
    free(t->tok_off);
    qs_token_index_free(&t->tok_index);
    free(t->merges);
    free(t->word_bytes);
    free(t->word_off);
    free(t->sym);
    free(t->word_len);
    free(t->word_step);
    free(t->word_count);
    qs_token_index_free(&t->word_index);
    for (int p = 0; p < t->n_pairs; p++) free(t->pairs[p].words);
    free(t->pairs);
    qs_pair_map_free(&t->pair_map);
    free(t->touched);
    free(t->heap);
}

/* The 256 byte tokens, numbered in the order of their code points as GPT-2 does. */
static int init_tokens(trainer *t, int vocab_size, int cp_of_byte[256]) {
    int byte_of_cp[QS_ALPHABET_CPS];
    qs_byte_alphabet(byte_of_cp);
    t->max_tokens = vocab_size - 1;
    t->tok_cap = 4096;
    t->tok_bytes = malloc(t->tok_cap);
    t->tok_off = malloc(((size_t)t->max_tokens + 2) * sizeof *t->tok_off);
    if (!t->tok_bytes || !t->tok_off ||
        qs_token_index_init(&t->tok_index, t->tok_bytes, t->tok_off, t->max_tokens + 1))
        return qs_error("out of memory training BPE");
    t->tok_off[0] = 0;
    for (int cp = 0; cp < QS_ALPHABET_CPS; cp++) {
        int b = byte_of_cp[cp];
        if (b < 0) continue;
        int id = t->n_tokens++;
        t->tok_bytes[id] = (char)b;
        t->tok_off[id + 1] = (uint32_t)id + 1;
        t->byte_id[b] = id;
        cp_of_byte[b] = cp;
        qs_token_index_put(&t->tok_index, id);
    }
    return 0;
}

/* Counts the distinct pre-tokens of text. */
static int count_words(trainer *t, const char *text, size_t n) {
    qs_pretokenizer *pre = NULL;
    t->word_bytes = malloc(n);
    int rc = t->word_bytes ? 0 : qs_error("out of memory for %zu bytes of text", n);
    if (!rc) rc = grow(&t->word_off, sizeof *t->word_off, &t->cap_words, 1024);
    if (!rc) rc = qs_token_index_init(&t->word_index, t->word_bytes, t->word_off, t->cap_words);
    if (!rc) rc = qs_pretokenizer_new(&pre);
    if (!rc) t->word_off[0] = 0;
    if (!rc) rc = qs_pretokenize(pre, text, n, word_piece, t);
    qs_pretokenizer_free(pre);
    return rc;
}

/* Splits every word into its byte tokens and counts the pairs they make. */
static int count_pairs(trainer *t) {
    size_t n_bytes = t->word_off[t->n_words];
    t->sym = malloc((n_bytes ? n_bytes : 1) * sizeof *t->sym);
    t->word_len = malloc(((size_t)t->n_words + 1) * sizeof *t->word_len);
    t->word_step = calloc((size_t)t->n_words + 1, sizeof *t->word_step);
    if (!t->sym || !t->word_len || !t->word_step) return qs_error("out of memory training BPE");
    if (grow(&t->pairs, sizeof *t->pairs, &t->cap_pairs, 1024) || qs_pair_map_init(&t->pair_map, 1024)) return -1;
    for (size_t i = 0; i < n_bytes; i++) t->sym[i] = t->byte_id[(unsigned char)t->word_bytes[i]];
    for (int w = 0; w < t->n_words; w++) {
        int *s = t->sym + t->word_off[w];
        t->word_len[w] = (int)(t->word_off[w + 1] - t->word_off[w]);
        for (int i = 0; i + 1 < t->word_len[w]; i++)
            if (pair_add(t, s[i], s[i + 1], t->word_count[w], w)) return -1;
    }
    return push_grown(t);
}

int qs_bpe_train(const char *text, size_t n, int vocab_size, const char *out_dir) {
    if (vocab_size < 257 || vocab_size > 65536)
        return qs_error("vocab size %d is out of range [257, 65536] (256 bytes and " QS_EOT_TEXT
                        " at least; ids must fit in 16 bits)", vocab_size);
    if (n == 0) return qs_error("no text to train on");
    if (n > INT_MAX) return qs_error("text too long to train on (%zu bytes; at most 2 GiB)", n);
    trainer t = {0};
    int cp_of_byte[256], *tmp = NULL;
    int rc = init_tokens(&t, vocab_size, cp_of_byte) || count_words(&t, text, n) || count_pairs(&t);
    if (!rc && !(tmp = malloc(((size_t)t.max_word_len + 1) * sizeof *tmp))) rc = qs_error("out of memory training BPE");
    while (!rc && t.n_tokens < t.max_tokens) {
        int p;
        if ((rc = best_pair(&t, &p))) break;
        if (p < 0) {
            rc = qs_error("the text is too small for %d tokens: it has no pair left to merge after %d", vocab_size,
                          t.n_tokens + 1);
            break;
        }
        rc = merge_step(&t, p, tmp);
    }
    if (!rc) rc = write_files(&t, out_dir, cp_of_byte);
    free(tmp);
    trainer_free(&t);
    return rc ? -1 : 0;
}

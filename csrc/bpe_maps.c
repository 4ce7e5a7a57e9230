#include "bpe_maps.h"

#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"

#define GOLDEN 0x9E3779B97F4A7C15ull

static uint64_t mix(uint64_t h) {
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    return h;
}

/* Eight bytes per multiply: pre-tokens are short, so the loop is the whole cost. */
uint64_t qs_bpe_hash(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = GOLDEN ^ n, w;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&w, p, 8);
        h = mix(h ^ w) * GOLDEN;
    }
    if (n) {
        w = 0;
        memcpy(&w, p, n);
        h = mix(h ^ w) * GOLDEN;
    }
    return mix(h);
}

/* Smallest power of two >= 2 * n, as a bit count. */
static int table_bits(size_t n) {
    int bits = 4;
    while (((size_t)1 << bits) < 2 * n) bits++;
    return bits;
}

int qs_pair_map_init(qs_pair_map *m, size_t max_entries) {
    int bits = table_bits(max_entries);
    size_t cap = (size_t)1 << bits;
    m->shift = 64 - bits;
    m->slots = malloc(cap * sizeof *m->slots);
    if (!m->slots) return qs_error("out of memory for the merge table");
    memset(m->slots, 0xff, cap * sizeof *m->slots);
    return 0;
}

void qs_pair_map_free(qs_pair_map *m) {
    free(m->slots);
    m->slots = NULL;
}

uint32_t qs_pair_map_put(qs_pair_map *m, int left, int right, uint32_t rank) {
    uint64_t key = qs_pair_key(left, right);
    size_t mask = ((size_t)1 << (64 - m->shift)) - 1;
    size_t i = qs_pair_home(m, key);
    for (; m->slots[i].key != UINT64_MAX; i = (i + 1) & mask)
        if (m->slots[i].key == key) return m->slots[i].rank;
    m->slots[i] = (qs_pair_slot){key, rank};
    return QS_NO_RANK;
}

int qs_token_index_init(qs_token_index *x, const char *bytes, const uint32_t *off, int n_tokens) {
    size_t cap = (size_t)1 << table_bits((size_t)n_tokens);
    x->mask = cap - 1;
    x->bytes = bytes;
    x->off = off;
    x->ids = malloc(cap * sizeof *x->ids);
    if (!x->ids) return qs_error("out of memory for the token index");
    memset(x->ids, 0xff, cap * sizeof *x->ids);
    return 0;
}

void qs_token_index_free(qs_token_index *x) {
    free(x->ids);
    x->ids = NULL;
}

/* The slot holding s[0, n), or the empty slot where it belongs. */
static size_t index_slot(const qs_token_index *x, const char *s, size_t n) {
    size_t i = (size_t)qs_bpe_hash(s, n) & x->mask;
    for (; x->ids[i] >= 0; i = (i + 1) & x->mask) {
        int id = x->ids[i];
        if (x->off[id + 1] - x->off[id] == n && !memcmp(x->bytes + x->off[id], s, n)) break;
    }
    return i;
}

int qs_token_index_put(qs_token_index *x, int id) {
    size_t i = index_slot(x, x->bytes + x->off[id], x->off[id + 1] - x->off[id]);
    if (x->ids[i] >= 0) return x->ids[i];
    x->ids[i] = id;
    return -1;
}

int qs_token_index_get(const qs_token_index *x, const char *s, size_t n) {
    return x->ids[index_slot(x, s, n)];
}

/* Sized so that natural text keeps most of its frequent pre-tokens between resets. */
#define CACHE_SLOTS ((size_t)1 << 17)
#define CACHE_MAX_ENTRIES (CACHE_SLOTS / 2)
#define CACHE_KEY_BYTES (CACHE_MAX_ENTRIES * 16)
#define CACHE_IDS (CACHE_MAX_ENTRIES * 4)

int qs_piece_cache_init(qs_piece_cache *c) {
    c->slots = calloc(CACHE_SLOTS, sizeof *c->slots);
    c->keys = malloc(CACHE_KEY_BYTES);
    c->ids = malloc(CACHE_IDS * sizeof *c->ids);
    c->n_entries = c->keys_used = c->ids_used = 0;
    if (!c->slots || !c->keys || !c->ids) {
        qs_piece_cache_free(c);
        return qs_error("out of memory for the pre-token cache");
    }
    return 0;
}

void qs_piece_cache_free(qs_piece_cache *c) {
    free(c->slots);
    free(c->keys);
    free(c->ids);
    c->slots = NULL;
    c->keys = NULL;
    c->ids = NULL;
}

/* Hash 0 marks an empty slot, so stored hashes have their low bit set. */
static size_t cache_slot(const qs_piece_cache *c, const char *s, size_t n, uint64_t hash) {
    uint64_t h = hash | 1;
    size_t i = (size_t)(hash >> 32) & (CACHE_SLOTS - 1);
    for (; c->slots[i].hash; i = (i + 1) & (CACHE_SLOTS - 1)) {
        const qs_cache_slot *e = &c->slots[i];
        if (e->hash == h && e->key_len == n && !memcmp(c->keys + e->key_off, s, n)) break;
    }
    return i;
}

const int *qs_piece_cache_get(const qs_piece_cache *c, const char *s, size_t n, uint64_t hash, int *n_ids) {
    const qs_cache_slot *e = &c->slots[cache_slot(c, s, n, hash)];
    if (!e->hash) return NULL;
    *n_ids = e->n_ids;
    return c->ids + e->ids_off;
}

void qs_piece_cache_put(qs_piece_cache *c, const char *s, size_t n, uint64_t hash, const int *ids, int n_ids) {
    if (c->n_entries == CACHE_MAX_ENTRIES || c->keys_used + n > CACHE_KEY_BYTES ||
        c->ids_used + (size_t)n_ids > CACHE_IDS) {
        memset(c->slots, 0, CACHE_SLOTS * sizeof *c->slots);
        c->n_entries = c->keys_used = c->ids_used = 0;
    }
    qs_cache_slot *e = &c->slots[cache_slot(c, s, n, hash)];
    if (e->hash) return;
    *e = (qs_cache_slot){.hash = hash | 1, .key_off = (uint32_t)c->keys_used, .ids_off = (uint32_t)c->ids_used,
                         .key_len = (uint8_t)n, .n_ids = (uint8_t)n_ids};
    memcpy(c->keys + c->keys_used, s, n);
    memcpy(c->ids + c->ids_used, ids, (size_t)n_ids * sizeof *ids);
    c->keys_used += n;
    c->ids_used += (size_t)n_ids;
    c->n_entries++;
}

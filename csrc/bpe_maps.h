/* The hash tables behind the GPT-2 tokenizer (internal to csrc/): merge ranks keyed by
 * a pair of token ids, token ids keyed by their bytes, and a bounded cache from a
 * pre-token's bytes to its ids. All use open addressing with linear probing over a
 * power-of-two table kept at most half full. */
#ifndef QUASAR_BPE_MAPS_H
#define QUASAR_BPE_MAPS_H

#include <stddef.h>
#include <stdint.h>

#define QS_NO_RANK UINT32_MAX

uint64_t qs_bpe_hash(const void *data, size_t n);

/* (left id, right id) -> merge rank. Key and rank share a slot, so a probe touches one
 * cache line. */
typedef struct qs_pair_slot {
    uint64_t key; /* left << 32 | right; UINT64_MAX = empty */
    uint32_t rank;
} qs_pair_slot;

typedef struct qs_pair_map {
    qs_pair_slot *slots;
    int shift; /* slot = (key * golden) >> shift */
} qs_pair_map;

int qs_pair_map_init(qs_pair_map *m, size_t max_entries);
void qs_pair_map_free(qs_pair_map *m);
/* Returns the rank already stored for the pair, or stores rank and returns QS_NO_RANK. */
uint32_t qs_pair_map_put(qs_pair_map *m, int left, int right, uint32_t rank);

static inline uint64_t qs_pair_key(int left, int right) { return (uint64_t)(uint32_t)left << 32 | (uint32_t)right; }
static inline size_t qs_pair_home(const qs_pair_map *m, uint64_t key) {
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> m->shift);
}

static inline uint32_t qs_pair_map_get(const qs_pair_map *m, int left, int right) {
    uint64_t key = qs_pair_key(left, right);
    size_t mask = ((size_t)1 << (64 - m->shift)) - 1;
    for (size_t i = qs_pair_home(m, key);; i = (i + 1) & mask) {
        if (m->slots[i].key == key) return m->slots[i].rank;
        if (m->slots[i].key == UINT64_MAX) return QS_NO_RANK;
    }
}

/* Token bytes -> id over a token table that it does not own: token id's bytes are
 * bytes[off[id], off[id + 1]). */
typedef struct qs_token_index {
    int *ids; /* -1 = empty */
    size_t mask;
    const char *bytes;
    const uint32_t *off;
} qs_token_index;

int qs_token_index_init(qs_token_index *x, const char *bytes, const uint32_t *off, int n_tokens);
void qs_token_index_free(qs_token_index *x);
/* Adds id; returns -1 if it is new, else the id already holding the same bytes. */
int qs_token_index_put(qs_token_index *x, int id);
/* The id whose bytes are s[0, n), or -1. */
int qs_token_index_get(const qs_token_index *x, const char *s, size_t n);

/* Pre-token bytes -> ids, for pre-tokens up to QS_CACHE_MAX_PIECE bytes. Bounded: when
 * it fills it starts over empty, which keeps the cost of a miss flat. */
#define QS_CACHE_MAX_PIECE 64

typedef struct qs_cache_slot {
    uint64_t hash; /* 0 = empty */
    uint32_t key_off, ids_off;
    uint8_t key_len, n_ids;
} qs_cache_slot;

typedef struct qs_piece_cache {
    qs_cache_slot *slots;
    char *keys;
    int *ids;
    size_t n_entries, keys_used, ids_used;
} qs_piece_cache;

int qs_piece_cache_init(qs_piece_cache *c);
void qs_piece_cache_free(qs_piece_cache *c);
/* The cached ids of s[0, n) (hash = qs_bpe_hash(s, n)) and their count, or NULL. */
const int *qs_piece_cache_get(const qs_piece_cache *c, const char *s, size_t n, uint64_t hash, int *n_ids);
/* Remembers ids[0, n_ids) for s[0, n) (n <= QS_CACHE_MAX_PIECE, n_ids <= n). */
void qs_piece_cache_put(qs_piece_cache *c, const char *s, size_t n, uint64_t hash, const int *ids, int n_ids);

#endif

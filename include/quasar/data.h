/* Token data: a char-level (byte) vocabulary, a text corpus split 90/10 into train
 * and validation, and random-window batches drawn by counter (seed, step, row). */
#ifndef QUASAR_DATA_H
#define QUASAR_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "quasar/config.h"
#include "quasar/shards.h"

typedef struct qs_char_vocab {
    int size;
    unsigned char bytes[256]; /* id -> byte */
    int16_t id[256];          /* byte -> id, -1 if absent */
} qs_char_vocab;

/* The sorted set of distinct bytes in text. */
void qs_vocab_build(qs_char_vocab *v, const unsigned char *text, size_t n);
/* As a JSON array of byte values, e.g. "[10,32,33]" (malloc'd), and back. */
char *qs_vocab_to_json(const qs_char_vocab *v);
int qs_vocab_from_json(qs_char_vocab *v, const char *json);
/* Text -> ids; an unknown byte is an error naming it and its position. */
int qs_vocab_encode(const qs_char_vocab *v, const unsigned char *text, size_t n, int *ids);

typedef enum { QS_SPLIT_TRAIN = 0, QS_SPLIT_VAL = 1 } qs_split;

typedef struct qs_dataset {
    int *tokens;              /* a text corpus's ids, train then val */
    qs_shard_set shards[2];   /* or each split's token shards (qs_split order), mapped */
    size_t n_tokens, n_train; /* train = [0, n_train), val = [n_train, n_tokens) */
} qs_dataset;

/* Loads data->path. If v->size == 0 the vocabulary is built from the corpus; else the
 * corpus must fit it. Both splits must hold at least seq_len + 1 tokens. */
int qs_dataset_load(qs_dataset *d, qs_char_vocab *v, const qs_data_config *dc, int seq_len);
/* Loads data.train_shards then data.val_shards (globs of token shards) as the two
 * splits; every id must be below vocab_size, and each split must hold seq_len + 1. */
int qs_dataset_load_shards(qs_dataset *d, const qs_data_config *dc, int seq_len, int vocab_size);
void qs_dataset_free(qs_dataset *d);
/* B windows of T+1 tokens: row b starts at a position drawn from (seed, split, counter0 + b). */
void qs_dataset_batch(const qs_dataset *d, qs_split split, uint64_t seed, uint64_t counter0, int B,
                      int T, int *x, int *y);

#endif

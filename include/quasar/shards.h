/* Token shards in llm.c's format: a header of 256 little-endian int32 (magic 20240520,
 * version 1, token count, the rest 0), then that many uint16 tokens. */
#ifndef QUASAR_SHARDS_H
#define QUASAR_SHARDS_H

#include <stddef.h>
#include <stdint.h>

#define QS_SHARD_MAGIC 20240520
#define QS_SHARD_VERSION 1
#define QS_SHARD_HEADER_INTS 256

/* Validates a shard image (header and exact size); *count is its token count. `what`
 * names the source in errors. */
int qs_shard_check(const void *data, size_t size, const char *what, size_t *count);
/* Validates a shard image and appends its tokens to (*tokens, *n) (realloc'd). */
int qs_shard_parse(const void *data, size_t size, const char *what, int **tokens, size_t *n);
/* Writes one shard atomically. Tokens must be in [0, 65535]. */
int qs_shard_write(const char *path, const int *tokens, size_t n);

/* Every file matching a glob, in sorted order, as one token stream: each file checked
 * and mapped read-only, never copied, so a corpus of any size costs the page cache what
 * training reads of it (shared by the ranks of a node), not 4 bytes a token of RSS. */
typedef struct qs_shard_set {
    int n_files;
    char **path;
    const void **map;
    size_t *map_size;
    size_t *first; /* [n_files + 1]: the stream index of each file's first token, then the total */
} qs_shard_set;

/* At least one file must match. */
int qs_shards_open(qs_shard_set *s, const char *pattern);
void qs_shards_close(qs_shard_set *s);
static inline size_t qs_shards_tokens(const qs_shard_set *s) { return s->first[s->n_files]; }
/* Tokens [start, start + n) of the stream into out (across files). */
void qs_shards_read(const qs_shard_set *s, size_t start, size_t n, int *out);
/* Fails, naming the token, its file and position, unless every token is below
 * vocab_size. Reads each file once, giving its pages back as it goes. */
int qs_shards_check_vocab(const qs_shard_set *s, int vocab_size);

#endif

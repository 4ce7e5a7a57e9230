/* Token shards in llm.c's format: a header of 256 little-endian int32 (magic 20240520,
 * version 1, token count, the rest 0), then that many uint16 tokens. */
#ifndef QUASAR_SHARDS_H
#define QUASAR_SHARDS_H

#include <stddef.h>
#include <stdint.h>

#define QS_SHARD_MAGIC 20240520
#define QS_SHARD_VERSION 1
#define QS_SHARD_HEADER_INTS 256

/* Validates a shard image (header and exact size) and appends its tokens to
 * (*tokens, *n) (realloc'd). `what` names the source in errors. */
int qs_shard_parse(const void *data, size_t size, const char *what, int **tokens, size_t *n);
/* Writes one shard atomically. Tokens must be in [0, 65535]. */
int qs_shard_write(const char *path, const int *tokens, size_t n);
/* Loads every file matching the glob pattern, in sorted order, into one token stream
 * (malloc'd); at least one file must match. */
int qs_shards_load(const char *pattern, int **tokens, size_t *n);

#endif

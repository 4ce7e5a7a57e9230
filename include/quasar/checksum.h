/* CRC-32C (Castagnoli), for detecting truncated or corrupted checkpoint files; SHA-256,
 * for identities (a LoRA adapter records the digest of its base model's weights). */
#ifndef QUASAR_CHECKSUM_H
#define QUASAR_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

/* Extends crc (start from 0) over n bytes. */
uint32_t qs_crc32c(uint32_t crc, const void *data, size_t n);
/* The CRC-32C and size of a whole file, read a chunk at a time (a checkpoint's files
 * are as large as the model's state: never held whole to be checked). Errors name the
 * path. */
int qs_crc32c_file(const char *path, uint32_t *crc, size_t *size);

typedef struct qs_sha256 {
    uint32_t h[8];
    uint64_t len;           /* bytes hashed so far */
    unsigned char buf[64];  /* a partial block */
    size_t n;
} qs_sha256;
void qs_sha256_init(qs_sha256 *s);
void qs_sha256_update(qs_sha256 *s, const void *data, size_t n);
/* Finishes the digest as 64 lowercase hex digits (s is then spent). */
void qs_sha256_hex(qs_sha256 *s, char hex[65]);

#endif

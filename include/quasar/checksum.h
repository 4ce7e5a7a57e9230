/* CRC-32C (Castagnoli), for detecting truncated or corrupted checkpoint files. */
#ifndef QUASAR_CHECKSUM_H
#define QUASAR_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

/* Extends crc (start from 0) over n bytes. */
uint32_t qs_crc32c(uint32_t crc, const void *data, size_t n);

#endif

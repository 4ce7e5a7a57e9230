/* bfloat16: the top 16 bits of an IEEE fp32 (same exponent range, 8 significant bits). */
#ifndef QUASAR_BF16_H
#define QUASAR_BF16_H

#include <stdint.h>
#include <string.h>

static inline float qs_bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* x rounded to the nearest bf16, ties to even (as PyTorch's .to(torch.bfloat16));
 * infinities stay, NaN stays a (quiet) NaN. */
static inline uint16_t qs_bf16_from_float(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(bits >> 16 | 0x0040u);
    bits += 0x7fffu + (bits >> 16 & 1u);
    return (uint16_t)(bits >> 16);
}

#endif

/* IDX parsing (unsigned bytes, 1 to 4 dimensions). A file that parses must hold
 * exactly the product of its dimensions after its header, each dimension in
 * [1, 2^31 - 1], and the copied data must read back as those bytes. */
#include "fuzz.h"

#include "quasar/idx.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qs_idx x;
    if (qs_idx_parse(&x, data, size, "idx") == 0) {
        FUZZ_CHECK(x.ndim >= 1 && x.ndim <= 4);
        size_t n = 1;
        for (int i = 0; i < x.ndim; i++) {
            FUZZ_CHECK(x.dims[i] >= 1 && x.dims[i] <= INT32_MAX);
            n *= (size_t)x.dims[i];
        }
        FUZZ_CHECK(x.n == n);
        FUZZ_CHECK(size == 4 + 4 * (size_t)x.ndim + x.n);
        FUZZ_CHECK(memcmp(x.data, data + 4 + 4 * x.ndim, x.n) == 0);
    } else {
        FUZZ_CHECK(x.data == NULL && x.n == 0);
    }
    qs_idx_free(&x);
    return 0;
}

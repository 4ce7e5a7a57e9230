/* Token shard parsing (llm.c format). A valid image must yield exactly its header's
 * token count, each a uint16. */
#include "fuzz.h"

#include "quasar/shards.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int *tokens = NULL;
    size_t n = 0;
    if (qs_shard_parse(data, size, "shard", &tokens, &n) == 0) {
        FUZZ_CHECK(size == QS_SHARD_HEADER_INTS * 4 + 2 * n);
        for (size_t i = 0; i < n; i++) FUZZ_CHECK(tokens[i] >= 0 && tokens[i] <= 65535);
    }
    free(tokens);
    return 0;
}

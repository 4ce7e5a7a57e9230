/* Char vocabulary: the first part of the input goes to qs_vocab_from_json; a vocabulary
 * that loads must survive qs_vocab_to_json unchanged, and qs_vocab_encode then runs over
 * the bytes after the first NUL (the whole input when there is none). */
#include "fuzz.h"

#include "quasar/data.h"

static void check_round_trip(const qs_char_vocab *v) {
    char *json = qs_vocab_to_json(v);
    FUZZ_CHECK(json != NULL);
    qs_char_vocab back;
    FUZZ_CHECK(qs_vocab_from_json(&back, json) == 0);
    FUZZ_CHECK(back.size == v->size && memcmp(back.bytes, v->bytes, (size_t)v->size) == 0 &&
               memcmp(back.id, v->id, sizeof v->id) == 0);
    free(json);
}

/* Encodes the raw (unterminated) bytes, so reads past the end are caught. */
static void check_encode(const qs_char_vocab *v, const uint8_t *text, size_t n) {
    int *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids)
        return;
    if (qs_vocab_encode(v, text, n, ids) == 0)
        for (size_t i = 0; i < n; i++)
            FUZZ_CHECK(ids[i] >= 0 && ids[i] < v->size && v->bytes[ids[i]] == text[i]);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_parts in;
    const char *json = fuzz_parts_init(&in, data, size);
    if (!json)
        return 0;
    qs_char_vocab v;
    if (qs_vocab_from_json(&v, json) == 0) {
        check_round_trip(&v);
        size_t skip = strlen(json) < size ? strlen(json) + 1 : 0;
        check_encode(&v, data + skip, size - skip);
    }
    free(in.buf);
    return 0;
}

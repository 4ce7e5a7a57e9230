/* Config parsing: the first part of the input goes to qs_config_load_string, each later
 * NUL-separated part to qs_config_set ("model.n_layer=3"). Checks: a failed call leaves
 * the config's bytes untouched, and the result serialises to JSON that loads back to the
 * same JSON. */
#include "fuzz.h"

#include "quasar/config.h"

static char *to_json(const qs_config *c) {
    char *json = qs_config_to_json(c);
    FUZZ_CHECK(json != NULL);
    return json;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_parts in;
    const char *s = fuzz_parts_init(&in, data, size);
    if (!s)
        return 0;
    qs_config c, before;
    qs_config_defaults(&c);
    for (; s; s = fuzz_parts_next(&in, s)) {
        memcpy(&before, &c, sizeof c);
        int rc = s == in.buf ? qs_config_load_string(&c, s, "fuzz.json") : qs_config_set(&c, s);
        FUZZ_CHECK(rc == 0 || memcmp(&before, &c, sizeof c) == 0); /* all or nothing */
    }
    qs_config_validate(&c);

    char *json = to_json(&c);
    qs_config back;
    qs_config_defaults(&back);
    FUZZ_CHECK(qs_config_load_string(&back, json, "round trip") == 0);
    char *again = to_json(&back);
    FUZZ_CHECK(strcmp(json, again) == 0);
    free(again);
    free(json);
    free(in.buf);
    return 0;
}

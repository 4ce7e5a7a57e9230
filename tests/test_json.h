/* A JSON file for a cmocka test to inspect (reading it or parsing it fails the test). */
#ifndef QUASAR_TEST_JSON_H
#define QUASAR_TEST_JSON_H

#include <cjson/cJSON.h>
#include <stdlib.h>

#include "quasar/fileio.h"

static inline cJSON *read_json(const char *path) {
    char *text;
    size_t n;
    assert_int_equal(qs_file_read(path, &text, &n), 0);
    cJSON *j = cJSON_ParseWithLength(text, n);
    free(text);
    assert_non_null(j);
    return j;
}

#endif

/* Step guards (non-finite and outlier steps) and the CRC-32C behind checkpoint checksums. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/checksum.h"
#include "quasar/guard.h"
#include "quasar/rng.h"
#include "test_seed.h"

static uint64_t seed;

static void test_nonfinite_and_stop(void **state) {
    (void)state;
    qs_guard g;
    qs_guard_init(&g, 0.0f, 3);
    assert_int_equal(qs_guard_check(&g, 2.0, 1.0), QS_STEP_OK);
    assert_int_equal(qs_guard_check(&g, NAN, 1.0), QS_STEP_NONFINITE);
    assert_int_equal(qs_guard_check(&g, 2.0, INFINITY), QS_STEP_NONFINITE);
    assert_false(qs_guard_should_stop(&g));
    assert_int_equal(qs_guard_check(&g, 2.0, 1.0), QS_STEP_OK); /* a good step resets the run */
    for (int i = 0; i < 3; i++) qs_guard_check(&g, -INFINITY, 1.0);
    assert_true(qs_guard_should_stop(&g));
    assert_int_equal(g.skipped_nonfinite, 5);
    qs_guard_init(&g, 0.0f, 0); /* 0 = never stop */
    for (int i = 0; i < 100; i++) qs_guard_check(&g, NAN, NAN);
    assert_false(qs_guard_should_stop(&g));
}

/* Noisy but steady losses pass; a spike far above them is skipped and stays out of
 * the window; dips are never outliers; nothing is judged before QS_GUARD_MIN steps. */
static void test_outliers(void **state) {
    (void)state;
    qs_guard g;
    qs_guard_init(&g, 6.0f, 0);
    assert_int_equal(qs_guard_check(&g, 100.0, 1.0), QS_STEP_OK); /* too early to judge */
    qs_guard_init(&g, 6.0f, 0);
    for (int i = 0; i < 200; i++) {
        double loss = 2.0 + 0.05 * qs_rng_normal(seed, 1, (uint64_t)i);
        double norm = 1.0 + 0.1 * qs_rng_normal(seed, 2, (uint64_t)i);
        assert_int_equal(qs_guard_check(&g, loss, norm), QS_STEP_OK);
    }
    assert_int_equal(qs_guard_check(&g, 3.0, 1.0), QS_STEP_OUTLIER);  /* 20 sd up */
    assert_int_equal(qs_guard_check(&g, 2.0, 5.0), QS_STEP_OUTLIER);  /* norm spike */
    assert_int_equal(qs_guard_check(&g, 1.0, 0.1), QS_STEP_OK);       /* dips pass */
    assert_int_equal(g.skipped_outlier, 2);
    assert_int_equal(g.n, QS_GUARD_WINDOW);
}

/* The state survives JSON exactly, so a resumed run judges steps as the original. */
static void test_json_round_trip(void **state) {
    (void)state;
    qs_guard g, h;
    qs_guard_init(&g, 3.0f, 5);
    for (int i = 0; i < 80; i++) qs_guard_check(&g, qs_rng_normal(seed, 3, (uint64_t)i), 1.0 / (i + 1));
    qs_guard_check(&g, NAN, 1.0);
    char *json = qs_guard_to_json(&g);
    qs_guard_init(&h, 3.0f, 5);
    assert_int_equal(qs_guard_from_json(&h, json, "test"), 0);
    free(json);
    assert_int_equal(h.n, g.n);
    assert_int_equal(h.bad_in_row, 1);
    assert_int_equal(h.skipped_nonfinite, 1);
    for (int i = 0; i < 40; i++) {
        double x = qs_rng_normal(seed, 4, (uint64_t)i) * 3;
        assert_int_equal(qs_guard_check(&g, x, 0.5), qs_guard_check(&h, x, 0.5));
    }
    assert_int_equal(qs_guard_from_json(&h, "{\"bad_in_row\": 0}", "state.json"), -1);
    assert_int_equal(qs_guard_from_json(&h, "[1, 2]", "state.json"), -1);
}

static void test_crc32c(void **state) {
    (void)state;
    assert_int_equal(qs_crc32c(0, "123456789", 9), 0xE3069283u); /* the standard check value */
    assert_int_equal(qs_crc32c(0, "", 0), 0u);
    unsigned char buf[1000];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)qs_rng_u64(seed, 5, i);
    uint32_t whole = qs_crc32c(0, buf, sizeof buf);
    for (int t = 0; t < 50; t++) { /* any split gives the same CRC */
        size_t cut = qs_rng_below(seed, 6, (uint64_t)t, sizeof buf);
        assert_int_equal(qs_crc32c(qs_crc32c(0, buf, cut), buf + cut, sizeof buf - cut), whole);
    }
    buf[qs_rng_below(seed, 7, 0, sizeof buf)] ^= (unsigned char)(1u << qs_rng_below(seed, 8, 0, 8));
    assert_int_not_equal(qs_crc32c(0, buf, sizeof buf), whole); /* any single bit flip shows */
}

int main(void) {
    seed = qs_test_seed("test_guard");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nonfinite_and_stop),
        cmocka_unit_test(test_outliers),
        cmocka_unit_test(test_json_round_trip),
        cmocka_unit_test(test_crc32c),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

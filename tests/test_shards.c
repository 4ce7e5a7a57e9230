/* Token shards read in place: a glob of random shards (empty ones among them) opened as
 * one mapped stream must give any range of tokens exactly as decoding every file into
 * one array does (qs_shard_parse, the reference), across file boundaries; the dataset's
 * batches from shards must be the windows its sampler names; a vocabulary check must
 * name the first token outside it; bad sets fail with one line. Random cases draw from
 * a seed printed at start; QS_TEST_SEED=<n> reproduces a run. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quasar/data.h"
#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/rng.h"
#include "quasar/shards.h"
#include "test_seed.h"

static uint64_t seed, draws;
static char dir[64];

static size_t draw(size_t n) { return (size_t)(qs_rng_u64(seed, 9, draws++) % n); }

static int setup_dir(void **state) {
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/qs_test_shards_XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown_dir(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* n_files shards named <prefix>_NNNNNN.bin of random lengths (some empty unless min_len)
 * and tokens below limit; returns the reference stream (every file decoded, in name
 * order). */
static int *write_set(const char *prefix, int n_files, int limit, size_t min_len, size_t *total) {
    int *all = NULL;
    *total = 0;
    for (int f = 0; f < n_files; f++) {
        const size_t n = !min_len && draw(4) == 0 ? 0 : min_len + 1 + draw(3000);
        int *t = malloc((n + 1) * sizeof *t);
        assert_non_null(t);
        for (size_t i = 0; i < n; i++) t[i] = (int)draw((size_t)limit);
        char path[160];
        snprintf(path, sizeof path, "%s/%s_%06d.bin", dir, prefix, f);
        assert_int_equal(qs_shard_write(path, t, n), 0);
        free(t);
        char *bytes;
        size_t size;
        assert_int_equal(qs_file_read(path, &bytes, &size), 0);
        assert_int_equal(qs_shard_parse(bytes, size, path, &all, total), 0);
        free(bytes);
    }
    return all;
}

static void pattern_of(char *buf, size_t cap, const char *prefix) { snprintf(buf, cap, "%s/%s_*.bin", dir, prefix); }

static void test_stream_reads_across_files(void **state) {
    (void)state;
    size_t total;
    int *ref = write_set("s", 2 + (int)draw(5), 65536, 0, &total);
    char pattern[160];
    pattern_of(pattern, sizeof pattern, "s");
    qs_shard_set s;
    assert_int_equal(qs_shards_open(&s, pattern), 0);
    assert_int_equal(qs_shards_tokens(&s), total);
    int *got = malloc((total + 1) * sizeof *got);
    assert_non_null(got);
    if (total) {
        qs_shards_read(&s, 0, total, got);
        assert_memory_equal(got, ref, total * sizeof *got);
    }
    for (int k = 0; k < 200 && total; k++) {
        const size_t start = draw(total), n = 1 + draw(total - start);
        memset(got, 0xff, n * sizeof *got);
        qs_shards_read(&s, start, n, got);
        assert_memory_equal(got, ref + start, n * sizeof *got);
    }
    free(got);
    qs_shards_close(&s);
    free(ref);
}

/* The first token at or above the limit is named with its file and position. */
static void test_vocab_check_names_the_token(void **state) {
    (void)state;
    size_t total;
    int *ref = write_set("v", 3, 1000, 0, &total);
    char pattern[160];
    pattern_of(pattern, sizeof pattern, "v");
    qs_shard_set s;
    assert_int_equal(qs_shards_open(&s, pattern), 0);
    assert_int_equal(qs_shards_check_vocab(&s, 1000), 0);
    int worst = 0;
    for (size_t i = 0; i < total; i++) worst = ref[i] > worst ? ref[i] : worst;
    if (total) {
        size_t first = 0;
        while (ref[first] < worst) first++;
        int f = 0;
        while (s.first[f + 1] <= first) f++;
        char want[256];
        snprintf(want, sizeof want, "token id %d at position %zu of '%s' is outside the vocabulary (%d)", worst,
                 first - s.first[f], s.path[f], worst);
        assert_int_equal(qs_shards_check_vocab(&s, worst), -1);
        assert_string_equal(qs_error_last(), want);
        /* checked pages were given back, and read again the same */
        int *again = malloc(total * sizeof *again);
        assert_non_null(again);
        qs_shards_read(&s, 0, total, again);
        assert_memory_equal(again, ref, total * sizeof *again);
        free(again);
    }
    qs_shards_close(&s);
    free(ref);

    /* one id of 100 among ids below it: first, last or anywhere in the stream */
    for (int k = 0; k < 3; k++) {
        char prefix[16];
        snprintf(prefix, sizeof prefix, "p%d", k);
        const int n_files = 1 + (int)draw(3);
        char path[160];
        size_t lens[4], sum = 0;
        for (int f = 0; f < n_files; f++) sum += lens[f] = 1 + draw(2000);
        const size_t at = k == 0 ? 0 : k == 1 ? sum - 1 : draw(sum);
        size_t base = 0, in_file = 0;
        int bad_file = 0;
        for (int f = 0; f < n_files; f++) {
            int *t = malloc(lens[f] * sizeof *t);
            assert_non_null(t);
            for (size_t i = 0; i < lens[f]; i++) t[i] = base + i == at ? 100 : (int)draw(100);
            if (at >= base && at < base + lens[f]) bad_file = f, in_file = at - base;
            snprintf(path, sizeof path, "%s/%s_%06d.bin", dir, prefix, f);
            assert_int_equal(qs_shard_write(path, t, lens[f]), 0);
            free(t);
            base += lens[f];
        }
        pattern_of(pattern, sizeof pattern, prefix);
        assert_int_equal(qs_shards_open(&s, pattern), 0);
        char want[256];
        snprintf(want, sizeof want, "token id 100 at position %zu of '%s/%s_%06d.bin' is outside the vocabulary (100)",
                 in_file, dir, prefix, bad_file);
        assert_int_equal(qs_shards_check_vocab(&s, 100), -1);
        assert_string_equal(qs_error_last(), want);
        assert_int_equal(qs_shards_check_vocab(&s, 101), 0);
        qs_shards_close(&s);
    }
}

/* Batches from shards are the sampler's windows of the train and validation streams. */
static void test_dataset_batches_are_windows(void **state) {
    (void)state;
    size_t n_train, n_val;
    int *train = write_set("train", 2 + (int)draw(3), 50257, 33, &n_train); /* each split needs T + 1 */
    int *val = write_set("val", 1 + (int)draw(2), 50257, 33, &n_val);
    qs_data_config dc = {0};
    pattern_of(dc.train_shards, sizeof dc.train_shards, "train");
    pattern_of(dc.val_shards, sizeof dc.val_shards, "val");
    qs_dataset d;
    const int T = 1 + (int)draw(32), B = 1 + (int)draw(6);
    assert_int_equal(qs_dataset_load_shards(&d, &dc, T, 50257), 0);
    assert_int_equal(d.n_train, n_train);
    assert_int_equal(d.n_tokens, n_train + n_val);
    int x[6 * 32], y[6 * 32];
    for (int split = 0; split < 2; split++) {
        const int *ref = split ? val : train;
        const size_t len = split ? n_val : n_train;
        const uint64_t counter0 = draw(1000);
        qs_dataset_batch(&d, (qs_split)split, seed, counter0, B, T, x, y);
        for (int b = 0; b < B; b++) {
            const size_t start = qs_rng_below(seed, 0x5eed0000u + (uint64_t)split, counter0 + (uint64_t)b, len - T);
            assert_memory_equal(x + b * T, ref + start, (size_t)T * sizeof(int));
            assert_memory_equal(y + b * T, ref + start + 1, (size_t)T * sizeof(int));
        }
    }
    qs_dataset_free(&d);
    /* a vocabulary smaller than the ids fails with the token named */
    assert_int_equal(qs_dataset_load_shards(&d, &dc, T, 1), -1);
    assert_non_null(strstr(qs_error_last(), "is outside the vocabulary (1)"));
    free(train);
    free(val);
}

static void test_bad_sets(void **state) {
    (void)state;
    char pattern[160], path[160];
    qs_shard_set s;
    pattern_of(pattern, sizeof pattern, "none");
    assert_int_equal(qs_shards_open(&s, pattern), -1);
    assert_non_null(strstr(qs_error_last(), "no shard matches"));
    snprintf(path, sizeof path, "%s/bad_000000.bin", dir);
    assert_int_equal(qs_file_write_atomic(path, "", 0), 0);
    pattern_of(pattern, sizeof pattern, "bad");
    assert_int_equal(qs_shards_open(&s, pattern), -1);
    assert_non_null(strstr(qs_error_last(), "0 bytes is shorter than a shard header"));
    char junk[1100] = {1};
    assert_int_equal(qs_file_write_atomic(path, junk, sizeof junk), 0);
    assert_int_equal(qs_shards_open(&s, pattern), -1);
    assert_non_null(strstr(qs_error_last(), "bad magic"));
    assert_null(s.map); /* a failed open holds nothing */
}

int main(void) {
    seed = qs_test_seed("test_shards");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stream_reads_across_files),
        cmocka_unit_test(test_vocab_check_names_the_token),
        cmocka_unit_test(test_dataset_batches_are_windows),
        cmocka_unit_test(test_bad_sets),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}

/* safetensors reader/writer and the atomic file layer under it. Random cases draw from
 * a seed printed at start; QS_TEST_SEED=<n> reproduces a run. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "quasar/error.h"
#include "quasar/fileio.h"
#include "quasar/rng.h"
#include "quasar/safetensors.h"
#include "test_seed.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static uint64_t seed, draws;
static char dir[64];

static uint64_t rnd(void) { return qs_rng_u64(seed, 7, draws++); }
static uint64_t rnd_below(uint64_t n) { return rnd() % n; }

/* Fails unless rc is -1 and the last error contains fragment. */
#define assert_error(rc, fragment)                                                                 \
    do {                                                                                           \
        assert_int_equal((rc), -1);                                                                \
        if (!strstr(qs_error_last(), (fragment)))                                                  \
            fail_msg("error \"%s\" lacks \"%s\"", qs_error_last(), (fragment));                    \
    } while (0)

static void path_in_dir(char *buf, size_t n, const char *name) { snprintf(buf, n, "%s/%s", dir, name); }

static void write_text(const char *path, const char *text) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fputs(text, fp);
    assert_int_equal(fclose(fp), 0);
}

static char *read_all(const char *path, size_t *size) {
    char *data;
    assert_int_equal(qs_file_read(path, &data, size), 0);
    return data;
}

/* Number of entries in the temp dir whose name contains ".tmp.". */
static int count_temp_files(void) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += strstr(e->d_name, ".tmp.") != NULL;
    closedir(d);
    return n;
}

static void remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    for (struct dirent *e; (e = readdir(d));) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char sub[512];
        snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
        remove_tree(sub);
    }
    closedir(d);
    rmdir(path);
}

static int setup_dir(void **state) {
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/qs_test_st_XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown_dir(void **state) {
    (void)state;
    remove_tree(dir);
    return 0;
}

/* ---- random tensor sets ---- */

typedef struct tensor_set {
    qs_st_entry entries[16];
    char names[16][32];
    unsigned char *data[16];
    size_t nbytes[16];
    int n;
} tensor_set;

static void make_tensor_set(tensor_set *s) {
    memset(s, 0, sizeof *s);
    s->n = 1 + (int)rnd_below(12);
    for (int i = 0; i < s->n; i++) {
        qs_st_entry *e = &s->entries[i];
        /* Unique names, some non-ASCII, some needing JSON escapes. */
        static const char *const stems[] = {"w", "blocks.0.attn.q", "ünïcode", "quote\"d", "back\\slash"};
        snprintf(s->names[i], sizeof s->names[i], "%s.%d", stems[rnd_below(5)], i);
        e->name = s->names[i];
        e->dtype = (qs_dtype)rnd_below(QS_DT_BOOL + 1);
        e->ndim = (int)rnd_below(5); /* 0 = scalar */
        size_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            e->shape[d] = (int64_t)rnd_below(6); /* zeros give empty tensors */
            numel *= (size_t)e->shape[d];
        }
        s->nbytes[i] = numel * qs_dtype_size(e->dtype);
        s->data[i] = malloc(s->nbytes[i] + 1);
        assert_non_null(s->data[i]);
        for (size_t b = 0; b < s->nbytes[i]; b++)
            s->data[i][b] = (unsigned char)rnd();
        e->data = s->data[i];
    }
}

static void free_tensor_set(tensor_set *s) {
    for (int i = 0; i < s->n; i++)
        free(s->data[i]);
}

static void assert_matches(const qs_st_file *f, const tensor_set *s) {
    assert_int_equal(f->n_tensors, s->n);
    for (int i = 0; i < s->n; i++) {
        const qs_st_tensor *t = &f->tensors[i]; /* file order is the order written */
        const qs_st_entry *e = &s->entries[i];
        assert_string_equal(t->name, e->name);
        assert_ptr_equal(qs_st_find(f, e->name), t);
        assert_int_equal(t->dtype, e->dtype);
        assert_int_equal(t->ndim, e->ndim);
        for (int d = 0; d < e->ndim; d++)
            assert_int_equal(t->shape[d], e->shape[d]);
        assert_int_equal(t->nbytes, s->nbytes[i]);
        assert_true((const char *)t->data >= f->buf &&
                    (const char *)t->data + t->nbytes <= f->buf + f->buf_size);
        if (t->nbytes)
            assert_memory_equal(t->data, e->data, t->nbytes);
    }
}

/* A valid file's bytes (malloc'd), written through qs_st_write. */
static char *valid_file(size_t *size) {
    tensor_set s;
    make_tensor_set(&s);
    qs_st_meta meta[] = {{"format", "pt"}, {"step", "42"}};
    char path[128];
    path_in_dir(path, sizeof path, "valid.safetensors");
    assert_int_equal(qs_st_write(path, s.entries, s.n, meta, 2), 0);
    free_tensor_set(&s);
    char *data = read_all(path, size);
    unlink(path);
    return data;
}

static uint64_t header_len(const char *data) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | (unsigned char)data[i];
    return n;
}

/* ---- tests ---- */

static void test_dtypes(void **state) {
    (void)state;
    static const struct {
        qs_dtype dt;
        const char *name;
        size_t size;
    } want[] = {{QS_DT_F32, "F32", 4}, {QS_DT_F16, "F16", 2}, {QS_DT_BF16, "BF16", 2},
                {QS_DT_F64, "F64", 8}, {QS_DT_I64, "I64", 8}, {QS_DT_I32, "I32", 4},
                {QS_DT_I16, "I16", 2}, {QS_DT_I8, "I8", 1},   {QS_DT_U8, "U8", 1},
                {QS_DT_BOOL, "BOOL", 1}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        assert_string_equal(qs_dtype_name(want[i].dt), want[i].name);
        assert_int_equal(qs_dtype_size(want[i].dt), want[i].size);
    }
}

static void test_round_trip(void **state) {
    (void)state;
    char path[128];
    path_in_dir(path, sizeof path, "rt.safetensors");
    for (int iter = 0; iter < 50; iter++) {
        tensor_set s;
        make_tensor_set(&s);
        qs_st_meta meta[] = {{"format", "pt"}, {"note", "line1\nline2 \"quoted\" ü"}, {"empty", ""}};
        int n_meta = (int)rnd_below(4);
        assert_int_equal(qs_st_write(path, s.entries, s.n, meta, n_meta), 0);

        size_t size;
        char *raw = read_all(path, &size);
        uint64_t n = header_len(raw);
        assert_int_equal((8 + n) % 8, 0);
        assert_true(8 + n <= size);
        /* "__metadata__" appears only when there is metadata. */
        char *header = malloc(n + 1);
        assert_non_null(header);
        memcpy(header, raw + 8, n);
        header[n] = '\0';
        assert_int_equal(strstr(header, "__metadata__") != NULL, n_meta > 0);
        assert_null(strchr(header, '\n')); /* compact */
        free(header);
        free(raw);

        qs_st_file f;
        assert_int_equal(qs_st_read(&f, path), 0);
        assert_matches(&f, &s);
        assert_int_equal(f.n_meta, n_meta);
        for (int i = 0; i < n_meta; i++)
            assert_string_equal(qs_st_meta_get(&f, meta[i].key), meta[i].value);
        assert_null(qs_st_meta_get(&f, "absent"));
        assert_null(qs_st_find(&f, "absent"));
        qs_st_free(&f);
        qs_st_free(&f); /* freeing twice is harmless */
        free_tensor_set(&s);
    }
    assert_int_equal(count_temp_files(), 0);
    unlink(path);
}

/* ---- fetched tensors, mapped files ---- */

typedef struct fetch_src {
    const unsigned char *bytes;
    size_t next, calls;
} fetch_src;

/* qs_st_entry.fetch: must be asked for the bytes in order, a bounded chunk at a time. */
static void fetch_bytes(const void *ctx, size_t offset, void *dst, size_t n) {
    fetch_src *s = (fetch_src *)ctx;
    assert_int_equal(offset, s->next);
    assert_true(n > 0 && n <= (4u << 20));
    memcpy(dst, s->bytes + offset, n);
    s->next += n;
    s->calls++;
}

/* Resident pages of this process (/proc/self/statm), or 0 where there is none. */
static size_t resident_pages(void) {
    FILE *fp = fopen("/proc/self/statm", "r");
    size_t size = 0, resident = 0;
    if (fp && fscanf(fp, "%zu %zu", &size, &resident) != 2) resident = 0;
    if (fp) fclose(fp);
    return resident;
}

/* A tensor fetched a chunk at a time (as checkpoints write backend memory) is written as
 * its data would be, across chunk boundaries; qs_st_read maps the file, and a released
 * tensor leaves the resident set yet reads back the same, from the file. */
static void test_fetch_and_map(void **state) {
    (void)state;
    char path[128];
    path_in_dir(path, sizeof path, "fetch.safetensors");
    const size_t numel = (5u << 18) + rnd_below(5000), nbytes = numel * sizeof(float); /* over 5 MiB */
    unsigned char *bytes = malloc(nbytes);
    assert_non_null(bytes);
    for (size_t i = 0; i < nbytes; i++)
        bytes[i] = (unsigned char)rnd();
    fetch_src src = {bytes, 0, 0};
    const float small[3] = {1, 2, 3};
    qs_st_entry e[2] = {{.name = "small", .dtype = QS_DT_F32, .ndim = 1, .shape = {3}, .data = small},
                        {.name = "big", .dtype = QS_DT_F32, .ndim = 1, .shape = {(int64_t)numel},
                         .fetch = fetch_bytes, .ctx = &src}};
    assert_int_equal(qs_st_write(path, e, 2, NULL, 0), 0);
    assert_int_equal(src.next, nbytes);
    assert_int_equal(src.calls, 2); /* 4 MiB, then the rest */

    qs_st_file f;
    assert_int_equal(qs_st_read(&f, path), 0);
    assert_int_equal(f.mapped, 1);
    const qs_st_tensor *t = qs_st_find(&f, "big");
    assert_non_null(t);
    assert_memory_equal(t->data, bytes, nbytes);
    const size_t before = resident_pages();
    qs_st_release(&f, t->data, t->nbytes);
    const size_t after = resident_pages(), page = (size_t)sysconf(_SC_PAGESIZE);
    printf("# resident pages before and after releasing a tensor of %zu: %zu, %zu\n", nbytes / page, before, after);
    if (before) assert_true(before - after >= nbytes / page * 9 / 10); /* statm counts what else moved too */
    assert_memory_equal(t->data, bytes, nbytes);
    assert_memory_equal(qs_st_find(&f, "small")->data, small, sizeof small);
    qs_st_free(&f);

    /* a parsed copy is malloc'd: releasing it does nothing */
    size_t size;
    char *raw = read_all(path, &size);
    assert_int_equal(qs_st_parse(&f, raw, size, "copy"), 0);
    free(raw);
    assert_int_equal(f.mapped, 0);
    t = qs_st_find(&f, "big");
    qs_st_release(&f, t->data, t->nbytes);
    assert_memory_equal(t->data, bytes, nbytes);
    qs_st_free(&f);
    free(bytes);
    unlink(path);
}

static void test_empty_file(void **state) {
    (void)state;
    char path[128];
    path_in_dir(path, sizeof path, "empty.safetensors");
    assert_int_equal(qs_st_write(path, NULL, 0, NULL, 0), 0);
    qs_st_file f;
    assert_int_equal(qs_st_read(&f, path), 0);
    assert_int_equal(f.n_tensors, 0);
    assert_int_equal(f.n_meta, 0);
    assert_int_equal(f.buf_size % 8, 0);
    qs_st_free(&f);
    unlink(path);
}

static void test_every_truncation_rejected(void **state) {
    (void)state;
    size_t size;
    char *data = valid_file(&size);
    qs_st_file f;
    assert_int_equal(qs_st_parse(&f, data, size, "t.st"), 0);
    qs_st_free(&f);
    for (size_t len = 0; len < size; len++) {
        char *cut = malloc(len + 1); /* exact size, so ASan sees any overread */
        assert_non_null(cut);
        memcpy(cut, data, len);
        int rc = qs_st_parse(&f, cut, len, "t.st");
        if (rc != -1)
            fail_msg("truncation to %zu of %zu bytes was accepted", len, size);
        assert_non_null(strstr(qs_error_last(), "t.st: "));
        assert_null(f.buf);
        free(cut);
    }
    char *longer = malloc(size + 1);
    assert_non_null(longer);
    memcpy(longer, data, size);
    longer[size] = 0;
    assert_error(qs_st_parse(&f, longer, size + 1, "t.st"), "trailing garbage");
    free(longer);
    free(data);
}

static void test_random_corruption_never_crashes(void **state) {
    (void)state;
    size_t size;
    char *data = valid_file(&size);
    size_t header_end = 8 + (size_t)header_len(data);
    int accepted = 0;
    for (int iter = 0; iter < 2000; iter++) {
        char *bad = malloc(size);
        assert_non_null(bad);
        memcpy(bad, data, size);
        int n_flips = 1 + (int)rnd_below(3);
        for (int k = 0; k < n_flips; k++) {
            /* Mostly the header, where the parsing happens. */
            size_t at = rnd_below(4) ? rnd_below(header_end) : rnd_below(size);
            if (rnd_below(2))
                bad[at] ^= (char)(1u << rnd_below(8));
            else
                bad[at] = (char)rnd();
        }
        qs_st_file f;
        if (qs_st_parse(&f, bad, size, "fuzz.st") == 0) {
            accepted++;
            /* Accepted: the layout must hold. */
            const char *data_start = f.buf + 8 + header_len(f.buf);
            size_t expect = 0;
            for (int i = 0; i < f.n_tensors; i++) {
                const qs_st_tensor *t = &f.tensors[i];
                size_t numel = 1;
                for (int d = 0; d < t->ndim; d++)
                    numel *= (size_t)t->shape[d];
                assert_int_equal(t->nbytes, numel * qs_dtype_size(t->dtype));
                assert_true((const char *)t->data >= data_start &&
                            (const char *)t->data + t->nbytes <= f.buf + f.buf_size);
                expect += t->nbytes;
            }
            assert_int_equal(expect, f.buf + f.buf_size - data_start);
            qs_st_free(&f);
        } else {
            assert_non_null(strstr(qs_error_last(), "fuzz.st: "));
            assert_null(f.tensors);
        }
        free(bad);
    }
    print_message("corruption: %d of 2000 variants still valid\n", accepted);
    free(data);
}

/* File bytes for a hand-written header followed by data_len zero bytes. */
static char *make_file(const char *header, size_t data_len, size_t *size) {
    size_t n = strlen(header);
    *size = 8 + n + data_len;
    char *buf = calloc(*size, 1);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (char)((uint64_t)n >> (8 * i));
    memcpy(buf + 8, header, n);
    return buf;
}

static void test_bad_headers(void **state) {
    (void)state;
    static const struct {
        const char *header;
        size_t data_len;
        const char *word;
    } cases[] = {
        {"[]", 0, "not a JSON object"},
        {"{\"a\": 1}", 0, "tensor 'a': entry is not an object"},
        {"{\"a\": {\"shape\": [], \"data_offsets\": [0, 4]}}", 4, "dtype is missing"},
        {"{\"a\": {\"dtype\": \"F8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1, "unknown dtype 'F8'"},
        {"{\"a\": {\"dtype\": 32, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "dtype"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4, "shape is missing or not an array"},
        {"{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "shape"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, "shape[0] is not a non-negative integer"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1, 1.5], \"data_offsets\": [0, 4]}}", 4, "shape[1]"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [\"1\"], \"data_offsets\": [0, 4]}}", 4, "shape[0]"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4, "more than 8 dims"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 4294967296], \"data_offsets\": [0, 4]}}", 4, "overflow"},
        {"{\"a\": {\"dtype\": \"F64\", \"shape\": [4294967296, 4294967295], \"data_offsets\": [0, 4]}}", 4, "overflow"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1e300], \"data_offsets\": [0, 4]}}", 4, "shape[0]"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, "data_offsets must be two"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}", 4, "data_offsets must be two"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4, "data_offsets must be two"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4.5]}}", 4, "data_offsets must be two"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": \"0-4\"}}", 4, "data_offsets must be two"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "data_offsets"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 0]}}", 4, "end before begin"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 4, "size mismatch"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
         " \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "duplicate tensor name 'a'"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "leave a gap"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
         " \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 12]}}", 12, "tensor 'b' data_offsets [8, 12] leave a gap"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
         " \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "overlap"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
         " \"b\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 4]}}", 8, "overlap"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 4, "truncated"},
        {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 9, "trailing garbage"},
        {"{}", 1, "trailing garbage"},
        {"{\"__metadata__\": {\"k\": 1}}", 0, "metadata value for 'k' is not a string"},
        {"{\"__metadata__\": [\"k\"]}", 0, "__metadata__ is not an object"},
        {"{\"__metadata__\": {}, \"__metadata__\": {}}", 0, "duplicate __metadata__"},
        {"{\"__metadata__\": {\"k\": \"1\", \"k\": \"2\"}}", 0, "duplicate metadata key 'k'"},
        {"{\"a\": {\"dtype\": \"F32\",", 0, "not valid JSON"},
        {"", 0, "not valid JSON"},
        {"{} {}", 0, "trailing bytes"},
        {"{}\x01", 0, "UTF-8"},
        {"{\"a\xff\": 1}", 0, "UTF-8"},
        {"{\"\xc0\xaf\": 1}", 0, "UTF-8"}, /* overlong '/' */
        {"{\"\xed\xa0\x80\": 1}", 0, "UTF-8"}, /* surrogate */
        {"{\"\xe2\x82\": 1}", 0, "UTF-8"}, /* cut sequence */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t size;
        char *buf = make_file(cases[i].header, cases[i].data_len, &size);
        qs_st_file f;
        int rc = qs_st_parse(&f, buf, size, "bad.st");
        if (rc != -1 || !strstr(qs_error_last(), cases[i].word) || strncmp(qs_error_last(), "bad.st: ", 8))
            fail_msg("case %zu (%s): rc %d, error \"%s\", want \"%s\"", i, cases[i].header, rc,
                     qs_error_last(), cases[i].word);
        free(buf);
    }
}

static void test_bad_lengths_and_names(void **state) {
    (void)state;
    qs_st_file f;
    assert_error(qs_st_parse(&f, "abc", 3, "short.st"), "short.st: file too short");
    assert_error(qs_st_parse(&f, "", 0, "short.st"), "too short");

    char huge[16];
    memset(huge, 0xff, sizeof huge);
    assert_error(qs_st_parse(&f, huge, sizeof huge, "h.st"), "is absurd");
    char over[16] = {9, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    assert_error(qs_st_parse(&f, over, 10, "h.st"), "exceeds");

    char header[QS_ST_MAX_NAME + 128];
    char name[QS_ST_MAX_NAME + 1];
    memset(name, 'x', QS_ST_MAX_NAME);
    name[QS_ST_MAX_NAME] = '\0';
    snprintf(header, sizeof header, "{\"%s\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [0, 0]}}", name);
    size_t size;
    char *buf = make_file(header, 0, &size);
    assert_error(qs_st_parse(&f, buf, size, "n.st"), "too long");
    free(buf);
    name[QS_ST_MAX_NAME - 1] = '\0'; /* the longest name that fits */
    snprintf(header, sizeof header, "{\"%s\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [0, 0]}}", name);
    buf = make_file(header, 0, &size);
    assert_int_equal(qs_st_parse(&f, buf, size, "n.st"), 0);
    assert_non_null(qs_st_find(&f, name));
    qs_st_free(&f);
    free(buf);
}

static void test_hand_written_valid(void **state) {
    (void)state;
    /* Header order differs from offset order; a scalar; empty tensors at shared offsets;
     * extra whitespace and a trailing newline in the padding. */
    const char *header =
        "{ \"b\": {\"dtype\": \"I16\", \"shape\": [2], \"data_offsets\": [8, 12]},\n"
        "  \"s\": {\"dtype\": \"F64\", \"shape\": [], \"data_offsets\": [0, 8]},\n"
        "  \"e1\": {\"dtype\": \"F32\", \"shape\": [0, 3], \"data_offsets\": [8, 8]},\n"
        "  \"e2\": {\"dtype\": \"BOOL\", \"shape\": [4, 0], \"data_offsets\": [12, 12]},\n"
        "  \"__metadata__\": {\"k\": \"v\"} }   \n";
    size_t size;
    char *buf = make_file(header, 12, &size);
    double one = 1.0;
    memcpy(buf + size - 12, &one, 8);
    qs_st_file f;
    assert_int_equal(qs_st_parse(&f, buf, size, "ok.st"), 0);
    free(buf); /* parse copied it */
    assert_int_equal(f.n_tensors, 4);
    assert_string_equal(f.tensors[0].name, "s");
    assert_string_equal(f.tensors[1].name, "e1");
    assert_string_equal(f.tensors[2].name, "b");
    assert_string_equal(f.tensors[3].name, "e2");
    const qs_st_tensor *s = qs_st_find(&f, "s");
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->nbytes, 8);
    double got;
    memcpy(&got, s->data, 8);
    assert_true(got == 1.0);
    assert_int_equal(qs_st_find(&f, "e2")->nbytes, 0);
    assert_int_equal(qs_st_find(&f, "e2")->shape[0], 4);
    assert_string_equal(qs_st_meta_get(&f, "k"), "v");
    qs_st_free(&f);
}

static void test_writer_rejects(void **state) {
    (void)state;
    char path[128];
    path_in_dir(path, sizeof path, "w.safetensors");
    float x[4] = {0};
    qs_st_entry e[2] = {{.name = "a", .dtype = QS_DT_F32, .ndim = 1, .shape = {4}, .data = x},
                        {.name = "a", .dtype = QS_DT_F32, .ndim = 1, .shape = {4}, .data = x}};
    assert_error(qs_st_write(path, e, 2, NULL, 0), "duplicate tensor name 'a'");
    e[1].name = "__metadata__";
    assert_error(qs_st_write(path, e, 2, NULL, 0), "invalid tensor name");
    e[1] = (qs_st_entry){.name = "b", .dtype = (qs_dtype)99, .ndim = 1, .shape = {4}, .data = x};
    assert_error(qs_st_write(path, e, 2, NULL, 0), "invalid dtype");
    e[1] = (qs_st_entry){.name = "b", .dtype = QS_DT_F32, .ndim = 1, .shape = {-1}, .data = x};
    assert_error(qs_st_write(path, e, 2, NULL, 0), "shape[0]");
    e[1] = (qs_st_entry){.name = "b", .dtype = QS_DT_F32, .ndim = 9, .shape = {1}, .data = x};
    assert_error(qs_st_write(path, e, 2, NULL, 0), "ndim 9");
    e[1] = (qs_st_entry){.name = "b", .dtype = QS_DT_F32, .ndim = 1, .shape = {4}, .data = NULL};
    assert_error(qs_st_write(path, e, 2, NULL, 0), "data is NULL");
    e[1] = (qs_st_entry){.name = "b", .dtype = QS_DT_F32, .ndim = 1, .shape = {4}, .data = x};
    qs_st_meta meta[2] = {{"k", "1"}, {"k", "2"}};
    assert_error(qs_st_write(path, e, 2, meta, 2), "duplicate metadata key 'k'");
    meta[1].key = "bad\xff";
    assert_error(qs_st_write(path, e, 2, meta, 2), "UTF-8");
    assert_int_equal(access(path, F_OK), -1); /* nothing was written */
    assert_int_equal(count_temp_files(), 0);
}

static void test_missing_directory(void **state) {
    (void)state;
    char path[128];
    path_in_dir(path, sizeof path, "no/such/dir/x.safetensors");
    float x = 1;
    qs_st_entry e = {.name = "x", .dtype = QS_DT_F32, .ndim = 0, .shape = {0}, .data = &x};
    assert_error(qs_st_write(path, &e, 1, NULL, 0), path);
    assert_error(qs_st_write(path, &e, 1, NULL, 0), "No such file or directory");
    qs_st_file f;
    assert_error(qs_st_read(&f, path), path);
    char *data;
    size_t size;
    char msg[256];
    snprintf(msg, sizeof msg, "cannot open '%s': No such file or directory", path);
    assert_int_equal(qs_file_read(path, &data, &size), -1);
    assert_string_equal(qs_error_last(), msg);
}

static void test_atomic_commit_and_abort(void **state) {
    (void)state;
    char path[128];
    path_in_dir(path, sizeof path, "atomic.txt");
    write_text(path, "old");

    qs_atomic_file af;
    assert_int_equal(qs_atomic_open(&af, path), 0);
    assert_int_equal(qs_atomic_write(&af, "new contents", 12), 0);
    assert_int_equal(count_temp_files(), 1);
    qs_atomic_abort(&af);
    qs_atomic_abort(&af); /* idempotent */
    size_t size;
    char *data = read_all(path, &size);
    assert_string_equal(data, "old");
    free(data);
    assert_int_equal(count_temp_files(), 0);

    assert_int_equal(qs_atomic_open(&af, path), 0);
    assert_int_equal(qs_atomic_write(&af, "new ", 4), 0);
    assert_int_equal(qs_atomic_write(&af, "contents", 8), 0);
    data = read_all(path, &size);
    assert_string_equal(data, "old"); /* untouched until commit */
    free(data);
    assert_int_equal(qs_atomic_commit(&af), 0);
    qs_atomic_abort(&af); /* after commit: must not disturb the result */
    data = read_all(path, &size);
    assert_int_equal(size, 12);
    assert_string_equal(data, "new contents");
    free(data);
    assert_int_equal(count_temp_files(), 0);

    assert_int_equal(qs_file_write_atomic(path, "", 0), 0);
    data = read_all(path, &size);
    assert_int_equal(size, 0);
    assert_string_equal(data, "");
    free(data);
    unlink(path);
}

static void test_atomic_failed_write_refused(void **state) {
    (void)state;
    char path[128];
    path_in_dir(path, sizeof path, "full.bin");
    write_text(path, "old");

    /* A real write error: a small file-size limit makes writes fail with EFBIG. */
    struct rlimit saved, small;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    small = saved;
    small.rlim_cur = 4096;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &small), 0);
    static char big[1 << 16];
    memset(big, 'x', sizeof big);
    qs_atomic_file af;
    int rc_open = qs_atomic_open(&af, path);
    int rc_write = rc_open ? -1 : qs_atomic_write(&af, big, sizeof big);
    int rc_commit = rc_open ? -1 : qs_atomic_commit(&af);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", qs_error_last());
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
    signal(SIGXFSZ, old_handler);

    assert_int_equal(rc_open, 0);
    assert_int_equal(rc_commit, -1);
    (void)rc_write; /* stdio may buffer: the error shows at write or at commit */
    assert_non_null(strstr(msg, path));
    assert_non_null(strstr(msg, strerror(EFBIG)));
    size_t size;
    char *data = read_all(path, &size);
    assert_string_equal(data, "old");
    free(data);
    assert_int_equal(count_temp_files(), 0);

    /* The recorded failure alone is enough for commit to refuse. */
    assert_int_equal(qs_atomic_open(&af, path), 0);
    af.failed = ENOSPC;
    assert_error(qs_atomic_write(&af, "x", 1), "No space left on device");
    assert_error(qs_atomic_commit(&af), "No space left on device");
    data = read_all(path, &size);
    assert_string_equal(data, "old");
    free(data);
    assert_int_equal(count_temp_files(), 0);
    unlink(path);
}

static void test_file_read_and_dirs(void **state) {
    (void)state;
    char path[256];
    path_in_dir(path, sizeof path, "a/b//c/");
    assert_int_equal(qs_mkdirs(path), 0);
    assert_int_equal(qs_mkdirs(path), 0); /* already there */
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(qs_dir_sync(path), 0);

    path_in_dir(path, sizeof path, "a/file");
    write_text(path, "x");
    char sub[300];
    snprintf(sub, sizeof sub, "%s/sub", path);
    assert_error(qs_mkdirs(sub), path);
    assert_error(qs_mkdirs(sub), "Not a directory");
    assert_error(qs_dir_sync(sub), sub);

    char *data;
    size_t size;
    path_in_dir(path, sizeof path, "a");
    assert_error(qs_file_read(path, &data, &size), "Is a directory");

    /* Larger than any initial buffer guess, read exactly. */
    path_in_dir(path, sizeof path, "big.bin");
    size_t n = 100000;
    char *big = malloc(n);
    assert_non_null(big);
    for (size_t i = 0; i < n; i++)
        big[i] = (char)rnd();
    assert_int_equal(qs_file_write_atomic(path, big, n), 0);
    data = read_all(path, &size);
    assert_int_equal(size, n);
    assert_memory_equal(data, big, n);
    assert_int_equal(data[n], '\0');
    free(data);
    free(big);
}

int main(void) {
    seed = qs_test_seed("test_safetensors");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtypes),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_fetch_and_map),
        cmocka_unit_test(test_empty_file),
        cmocka_unit_test(test_every_truncation_rejected),
        cmocka_unit_test(test_random_corruption_never_crashes),
        cmocka_unit_test(test_bad_headers),
        cmocka_unit_test(test_bad_lengths_and_names),
        cmocka_unit_test(test_hand_written_valid),
        cmocka_unit_test(test_writer_rejects),
        cmocka_unit_test(test_missing_directory),
        cmocka_unit_test(test_atomic_commit_and_abort),
        cmocka_unit_test(test_atomic_failed_write_refused),
        cmocka_unit_test(test_file_read_and_dirs),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}

/* Image data: IDX parsing (valid files and every kind of malformed one, each refused
 * with the right message), gzip'd and plain files through zlib, the dataset loader's
 * checks, and the batch sampler: each epoch's order is a bijection, batches do not
 * depend on how the sample stream is cut, and augmentation (padding, shift, flip) is
 * checked against a reference that places the source pixels forward. With
 * /usr/share/datasets/fashion-mnist present, the real dataset normalises to mean 0, std 1. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zlib.h>

#include "quasar/error.h"
#include "quasar/idx.h"
#include "quasar/images.h"
#include "quasar/rng.h"
#include "test_seed.h"

#define FASHION_DIR "/usr/share/datasets/fashion-mnist"

static uint64_t seed;
static char tmp[64];

static int setup(void **state) {
    (void)state;
    snprintf(tmp, sizeof tmp, "/tmp/qs_test_images_XXXXXX");
    return mkdtemp(tmp) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    return system(cmd);
}

/* ---- IDX ---- */

/* An IDX file: magic 00 00 08 ndim, big-endian dims, then n_data bytes of data (which
 * tests may make disagree with the dims). malloc'd; *size gets its length. */
static uint8_t *idx_file(int ndim, const uint32_t *dims, const uint8_t *data, size_t n_data, size_t *size) {
    *size = 4 + 4 * (size_t)ndim + n_data;
    uint8_t *buf = malloc(*size), *p = buf;
    *p++ = 0, *p++ = 0, *p++ = 0x08, *p++ = (uint8_t)ndim;
    for (int i = 0; i < ndim; i++) {
        *p++ = (uint8_t)(dims[i] >> 24), *p++ = (uint8_t)(dims[i] >> 16);
        *p++ = (uint8_t)(dims[i] >> 8), *p++ = (uint8_t)dims[i];
    }
    if (n_data) memcpy(p, data, n_data);
    return buf;
}

static uint8_t *random_bytes(size_t n, uint64_t stream) {
    uint8_t *b = malloc(n ? n : 1);
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)qs_rng_u64(seed, stream, i);
    return b;
}

static void check_parses(int ndim, const uint32_t *dims) {
    size_t n = 1, size;
    for (int i = 0; i < ndim; i++) n *= dims[i];
    uint8_t *data = random_bytes(n, 100 + (uint64_t)ndim);
    uint8_t *file = idx_file(ndim, dims, data, n, &size);
    qs_idx x;
    if (qs_idx_parse(&x, file, size, "test.idx")) fail_msg("%d-D: %s", ndim, qs_error_last());
    assert_int_equal(x.ndim, ndim);
    for (int i = 0; i < ndim; i++) assert_int_equal(x.dims[i], dims[i]);
    assert_int_equal(x.n, n);
    assert_memory_equal(x.data, data, n);
    qs_idx_free(&x);
    assert_null(x.data);
    qs_idx_free(&x); /* a second free is harmless */
    free(file);
    free(data);
}

static void test_idx_parse_valid(void **state) {
    (void)state;
    check_parses(1, (uint32_t[]){7});
    check_parses(3, (uint32_t[]){4, 5, 3}); /* images x rows x columns, not square */
    check_parses(4, (uint32_t[]){2, 1, 3, 2});
    check_parses(1, (uint32_t[]){1});
}

/* Parsing buf fails with a one-line message naming "bad.idx" and containing needle,
 * and leaves the result zeroed. */
static void expect_parse_error(const uint8_t *buf, size_t n, const char *needle) {
    qs_idx x;
    memset(&x, 0x5a, sizeof x);
    if (qs_idx_parse(&x, buf, n, "bad.idx") != -1) fail_msg("parsed despite expecting '%s'", needle);
    const char *msg = qs_error_last();
    if (!strstr(msg, needle)) fail_msg("error '%s' lacks '%s'", msg, needle);
    if (strncmp(msg, "bad.idx: ", 9) || strchr(msg, '\n')) fail_msg("error '%s' is not one line naming bad.idx", msg);
    assert_null(x.data);
    assert_int_equal(x.ndim, 0);
    assert_int_equal(x.n, 0);
}

static void test_idx_parse_errors(void **state) {
    (void)state;
    uint8_t data[25] = {0};
    size_t size;
    uint8_t *f = idx_file(3, (uint32_t[]){2, 3, 4}, data, 24, &size); /* valid: 16 + 24 bytes */

    expect_parse_error(f, 0, "0 bytes is shorter than an IDX header");
    expect_parse_error(f, 3, "3 bytes is shorter than an IDX header");
    expect_parse_error(f, 12, "12 bytes is shorter than its 16-byte header");
    expect_parse_error(f, size - 1, "shorter than its header says (24 data bytes, the file has 23)");
    expect_parse_error(f, 16, "shorter than its header says (24 data bytes, the file has 0)");
    free(f);
    f = idx_file(3, (uint32_t[]){2, 3, 4}, data, 25, &size);
    expect_parse_error(f, size, "longer than its header says (24 data bytes)");

    const uint8_t magic[] = {0x1f, 0x8b, 0x08, 0x00, 1, 2, 3, 4}; /* a gzip stream handed over unpacked */
    expect_parse_error(magic, sizeof magic, "bad magic 1f 8b 08 00: not an IDX file");
    const uint8_t magic2[] = {0, 1, 0x08, 1, 0, 0, 0, 1, 9};
    expect_parse_error(magic2, sizeof magic2, "bad magic 00 01 08 01");
    const uint8_t f32[] = {0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0};
    expect_parse_error(f32, sizeof f32, "unsupported element type 0x0d (float32)");
    const uint8_t i8[] = {0, 0, 0x09, 1, 0, 0, 0, 1, 0};
    expect_parse_error(i8, sizeof i8, "unsupported element type 0x09 (signed byte)");
    const uint8_t junk[] = {0, 0, 0x42, 1, 0, 0, 0, 1, 0};
    expect_parse_error(junk, sizeof junk, "unsupported element type 0x42 (not an IDX type)");
    const uint8_t nd0[] = {0, 0, 0x08, 0, 7};
    expect_parse_error(nd0, sizeof nd0, "0 dimensions (1 to 4 are read)");
    const uint8_t nd5[28] = {0, 0, 0x08, 5};
    expect_parse_error(nd5, sizeof nd5, "5 dimensions (1 to 4 are read)");
    free(f);

    f = idx_file(3, (uint32_t[]){2, 0, 4}, data, 0, &size);
    expect_parse_error(f, size, "dimension 1 is zero");
    free(f);
    f = idx_file(2, (uint32_t[]){1, 0x80000000u}, data, 1, &size);
    expect_parse_error(f, size, "dimension 1 is 2147483648, over 2^31 - 1");
    free(f);
    f = idx_file(4, (uint32_t[]){0x7fffffff, 0x7fffffff, 0x7fffffff, 2}, data, 4, &size);
    expect_parse_error(f, size, "the product of the 4 dimensions overflows");
    free(f);
    /* Large but representable: refused by size before anything is allocated. */
    f = idx_file(2, (uint32_t[]){0x7fffffff, 0x7fffffff}, data, 4, &size);
    expect_parse_error(f, size, "shorter than its header says (4611686014132420609 data bytes, the file has 4)");
    free(f);
}

static void join(char *out, size_t cap, const char *dir, const char *name) { snprintf(out, cap, "%s/%s", dir, name); }

static void write_gz(const char *path, const uint8_t *data, size_t n) {
    gzFile f = gzopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(gzwrite(f, data, (unsigned)n), (int)n);
    assert_int_equal(gzclose(f), Z_OK);
}

static void write_plain(const char *path, const uint8_t *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

static void expect_read_error(const char *path, const char *needle) {
    qs_idx x;
    if (qs_idx_read(&x, path) != -1) fail_msg("%s: read despite expecting '%s'", path, needle);
    const char *msg = qs_error_last();
    if (!strstr(msg, needle) || !strstr(msg, path) || strchr(msg, '\n'))
        fail_msg("error '%s' is not one line naming %s with '%s'", msg, path, needle);
    assert_null(x.data);
}

static void test_idx_read_files(void **state) {
    (void)state;
    const uint32_t dims[3] = {3, 28, 28};
    const size_t n = 3 * 28 * 28;
    uint8_t *data = random_bytes(n, 200);
    size_t size;
    uint8_t *file = idx_file(3, dims, data, n, &size);
    char gz[128], plain[128], path[128];
    join(gz, sizeof gz, tmp, "round.idx.gz");
    join(plain, sizeof plain, tmp, "round.idx");
    write_gz(gz, file, size);
    write_plain(plain, file, size);
    const char *paths[] = {gz, plain};
    for (int k = 0; k < 2; k++) {
        qs_idx x;
        if (qs_idx_read(&x, paths[k])) fail_msg("%s", qs_error_last());
        assert_int_equal(x.ndim, 3);
        assert_int_equal(x.dims[0], 3);
        assert_int_equal(x.dims[2], 28);
        assert_int_equal(x.n, n);
        assert_memory_equal(x.data, data, n);
        qs_idx_free(&x);
    }

    join(path, sizeof path, tmp, "missing.gz");
    expect_read_error(path, "cannot open");
    expect_read_error(tmp, "cannot read"); /* a directory */

    /* Damage to the gzip stream: cut short, or one byte inverted past the 10-byte
     * header. A whole byte, since a single bit may be a stored block's padding; what
     * notices depends on where it lands (inflate, the CRC-32, the length), so any
     * one-line error naming the file will do. */
    FILE *fp = fopen(gz, "rb");
    uint8_t packed[8192];
    size_t n_packed = fread(packed, 1, sizeof packed, fp);
    fclose(fp);
    assert_true(n_packed > 40 && n_packed < sizeof packed);
    join(path, sizeof path, tmp, "cut.gz");
    write_plain(path, packed, n_packed - 12);
    expect_read_error(path, "cannot read");
    join(path, sizeof path, tmp, "flipped.gz");
    packed[10 + qs_rng_below(seed, 201, 0, n_packed - 10)] ^= 0xff;
    write_plain(path, packed, n_packed);
    expect_read_error(path, "");

    /* More bytes than the header says, and a gzip'd file shorter than it says. */
    join(path, sizeof path, tmp, "long.gz");
    write_gz(path, file, size);
    gzFile g = gzopen(path, "ab"); /* a second gzip member: zlib reads on into it */
    gzputc(g, 7);
    gzclose(g);
    expect_read_error(path, "longer than its header says (2352 data bytes)");
    join(path, sizeof path, tmp, "short.gz");
    write_gz(path, file, size - 5);
    expect_read_error(path, "shorter than its header says (2352 data bytes, the file has 2347)");
    join(path, sizeof path, tmp, "tiny.gz");
    write_gz(path, file, 2);
    expect_read_error(path, "2 bytes is shorter than an IDX header");
    join(path, sizeof path, tmp, "one_extra.gz"); /* longer already within the header read */
    uint8_t one[10] = {0, 0, 8, 1, 0, 0, 0, 1, 5, 6};
    write_gz(path, one, sizeof one);
    expect_read_error(path, "longer than its header says (1 data bytes)");

    /* A header promising more than 1 GiB is refused before anything is read. */
    uint8_t *big = idx_file(3, (uint32_t[]){1025, 1024, 1024}, data, 16, &size);
    join(path, sizeof path, tmp, "big.gz");
    write_gz(path, big, size);
    expect_read_error(path, "the header promises 1074790400 data bytes, over the 1073741808-byte limit");
    free(big);
    free(file);
    free(data);
}

/* ---- the dataset loader ---- */

static void write_idx(const char *dir, const char *name, int ndim, const uint32_t *dims, const uint8_t *data,
                      size_t n) {
    char path[256];
    join(path, sizeof path, dir, name);
    size_t size;
    uint8_t *f = idx_file(ndim, dims, data, n, &size);
    write_gz(path, f, size);
    free(f);
}

/* A dataset folder of n_train + n_test random h x w images with labels below classes. */
static void write_dataset(const char *dir, int n_train, int n_test, int h, int w, int classes) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    assert_int_equal(system(cmd), 0);
    const char *prefix[2] = {"train", "t10k"};
    int n[2] = {n_train, n_test};
    for (int s = 0; s < 2; s++) {
        size_t np = (size_t)n[s] * h * w;
        uint8_t *pix = random_bytes(np, 300 + (uint64_t)s);
        uint8_t *lab = malloc((size_t)n[s]);
        for (int i = 0; i < n[s]; i++) lab[i] = (uint8_t)qs_rng_below(seed, 310 + (uint64_t)s, (uint64_t)i, (uint64_t)classes);
        lab[0] = (uint8_t)(classes - 1); /* the largest label is present */
        char name[64];
        snprintf(name, sizeof name, "%s-images-idx3-ubyte.gz", prefix[s]);
        write_idx(dir, name, 3, (uint32_t[]){(uint32_t)n[s], (uint32_t)h, (uint32_t)w}, pix, np);
        snprintf(name, sizeof name, "%s-labels-idx1-ubyte.gz", prefix[s]);
        write_idx(dir, name, 1, (uint32_t[]){(uint32_t)n[s]}, lab, (size_t)n[s]);
        free(pix);
        free(lab);
    }
}

static void expect_load_error(const char *dir, const char *file, const char *needle) {
    qs_image_dataset d;
    if (qs_image_dataset_load(&d, dir) != -1) fail_msg("loaded despite expecting '%s'", needle);
    const char *msg = qs_error_last();
    if (!strstr(msg, needle) || !strstr(msg, file) || strchr(msg, '\n'))
        fail_msg("error '%s' is not one line naming %s with '%s'", msg, file, needle);
    assert_null(d.pixels[0]);
    assert_null(d.labels[0]);
    assert_int_equal(d.n[0], 0);
}

static void test_dataset_load(void **state) {
    (void)state;
    char dir[128], path[256];
    join(dir, sizeof dir, tmp, "ds");
    write_dataset(dir, 9, 4, 5, 7, 6);
    qs_image_dataset d;
    if (qs_image_dataset_load(&d, dir)) fail_msg("%s", qs_error_last());
    assert_int_equal(d.n[QS_IMG_TRAIN], 9);
    assert_int_equal(d.n[QS_IMG_TEST], 4);
    assert_int_equal(d.h, 5);
    assert_int_equal(d.w, 7);
    assert_int_equal(d.n_classes, 6);
    /* mean and std of the training pixels, recomputed plainly */
    double sum = 0, sq = 0;
    size_t np = 9 * 5 * 7;
    uint8_t *pix = random_bytes(np, 300);
    assert_memory_equal(d.pixels[0], pix, np);
    for (size_t i = 0; i < np; i++) sum += pix[i] / 255.0;
    double mean = sum / (double)np;
    for (size_t i = 0; i < np; i++) sq += (pix[i] / 255.0 - mean) * (pix[i] / 255.0 - mean);
    double std = sqrt(sq / (double)np);
    assert_float_equal(d.mean, mean, 1e-6);
    assert_float_equal(d.std, std, 1e-6);
    free(pix);
    qs_image_dataset_free(&d);
    assert_null(d.pixels[0]);

    join(path, sizeof path, dir, "t10k-labels-idx1-ubyte.gz");
    unlink(path);
    expect_load_error(dir, path, "cannot open");
    write_idx(dir, "t10k-labels-idx1-ubyte.gz", 1, (uint32_t[]){3}, (uint8_t[]){1, 2, 3}, 3);
    expect_load_error(dir, path, "3 labels for the 4 images of");
    write_idx(dir, "t10k-labels-idx1-ubyte.gz", 2, (uint32_t[]){4, 1}, (uint8_t[]){1, 2, 3, 4}, 4);
    expect_load_error(dir, path, "2 dimensions, expected 1");

    write_dataset(dir, 9, 4, 5, 7, 6);
    join(path, sizeof path, dir, "t10k-images-idx3-ubyte.gz");
    uint8_t zeros[4 * 35] = {0};
    write_idx(dir, "t10k-images-idx3-ubyte.gz", 3, (uint32_t[]){4, 5, 6}, zeros, 4 * 5 * 6);
    expect_load_error(dir, path, "images are 5 x 6, the training images 5 x 7");
    write_idx(dir, "t10k-images-idx3-ubyte.gz", 2, (uint32_t[]){4, 35}, zeros, 4 * 35);
    expect_load_error(dir, path, "2 dimensions, expected 3");

    write_dataset(dir, 9, 4, 5, 7, 6);
    join(path, sizeof path, dir, "train-images-idx3-ubyte.gz");
    uint8_t flat[9 * 5 * 7];
    memset(flat, 17, sizeof flat);
    write_idx(dir, "train-images-idx3-ubyte.gz", 3, (uint32_t[]){9, 5, 7}, flat, sizeof flat);
    expect_load_error(dir, path, "every pixel has the same value");
    write_plain(path, (const uint8_t *)"\0\0\x0d\x03", 4);
    expect_load_error(dir, path, "unsupported element type 0x0d (float32)");
}

/* ---- batches ---- */

/* n images of h x w; image k has label k % 256 and random pixels in [1, 255], so that
 * padding (raw 0) never looks like image content. */
static qs_image_dataset random_dataset(int n, int h, int w, float mean, float std) {
    qs_image_dataset d = {.n = {n, n}, .h = h, .w = w, .n_classes = n < 256 ? n : 256, .mean = mean, .std = std};
    size_t np = (size_t)n * h * w;
    for (int s = 0; s < 2; s++) {
        d.pixels[s] = malloc(np);
        d.labels[s] = malloc((size_t)n);
        for (size_t i = 0; i < np; i++) d.pixels[s][i] = (uint8_t)(1 + qs_rng_below(seed, 400 + (uint64_t)s, i, 255));
        for (int k = 0; k < n; k++) d.labels[s][k] = (uint8_t)k;
    }
    return d;
}

static float norm(const qs_image_dataset *d, int p) { return ((float)p / 255.0f - d->mean) / d->std; }

/* The reference: image k of split s on an S x S canvas, flipped (mirrored left-right)
 * then moved by (dy, dx) from the centred position, drawn forward from the source;
 * what lands off the canvas is cut off. */
static void reference(const qs_image_dataset *d, int s, int k, int S, int dy, int dx, bool flip, float *out) {
    for (int i = 0; i < S * S; i++) out[i] = norm(d, 0);
    const uint8_t *img = d->pixels[s] + (size_t)k * d->h * d->w;
    for (int r = 0; r < d->h; r++)
        for (int c = 0; c < d->w; c++) {
            int R = (S - d->h) / 2 + dy + r, C = (S - d->w) / 2 + dx + (flip ? d->w - 1 - c : c);
            if (R >= 0 && R < S && C >= 0 && C < S) out[R * S + C] = norm(d, img[r * d->w + c]);
        }
}

/* Which (dy, dx, flip) within max_shift makes the reference equal to x; -1 if none. */
static int find_placement(const qs_image_dataset *d, int k, const qs_augment *a, const float *x, int *dy, int *dx,
                          bool *flip) {
    int S = a->size, m = a->max_shift;
    float *ref = malloc((size_t)S * S * sizeof *ref);
    int found = -1;
    for (int f = 0; f < (a->flip ? 2 : 1) && found < 0; f++)
        for (int y = -m; y <= m && found < 0; y++)
            for (int z = -m; z <= m && found < 0; z++) {
                reference(d, QS_IMG_TRAIN, k, S, y, z, f, ref);
                if (!memcmp(ref, x, (size_t)S * S * sizeof *ref)) *dy = y, *dx = z, *flip = f, found = 0;
            }
    free(ref);
    return found;
}

/* Index k is stored in image k's three pixels (base 256), so with mean 0 and std 1 the
 * batch tells which image each sample is. */
static qs_image_dataset index_dataset(int n) {
    qs_image_dataset d = {.n = {n, n}, .h = 1, .w = 3, .n_classes = 256, .mean = 0, .std = 1};
    d.pixels[0] = malloc((size_t)n * 3);
    d.labels[0] = malloc((size_t)n);
    for (int k = 0; k < n; k++) {
        for (int j = 0; j < 3; j++) d.pixels[0][3 * k + j] = (uint8_t)(k >> (8 * j));
        d.labels[0][k] = (uint8_t)(k * 7);
    }
    return d;
}

/* The images epoch `epoch` visits, in order, decoded from one batch of n samples. */
static void epoch_order(const qs_image_dataset *d, uint64_t s, uint64_t epoch, int *order) {
    int n = d->n[0];
    const qs_augment plain = {.size = 3};
    float *x = malloc((size_t)n * 9 * sizeof *x);
    int *y = malloc((size_t)n * sizeof *y);
    qs_image_batch(d, QS_IMG_TRAIN, &plain, s, epoch * (uint64_t)n, n, x, y);
    for (int b = 0; b < n; b++) {
        const float *row = x + (size_t)b * 9 + 3; /* the image is the canvas's middle row */
        int k = 0;
        for (int j = 0; j < 3; j++) k |= (int)lrintf(row[j] * 255.0f) << (8 * j);
        if (k < 0 || k >= n) fail_msg("n %d: sample %d decodes to image %d", n, b, k);
        assert_int_equal(y[b], (uint8_t)(k * 7));
        order[b] = k;
    }
    free(x);
    free(y);
}

static void check_bijection(const int *order, int n) {
    char *seen = calloc((size_t)n, 1);
    for (int b = 0; b < n; b++) {
        if (seen[order[b]]) fail_msg("n %d: image %d drawn twice in one epoch", n, order[b]);
        seen[order[b]] = 1;
    }
    free(seen);
}

static int differing(const int *a, const int *b, int n) {
    int diff = 0;
    for (int i = 0; i < n; i++) diff += a[i] != b[i];
    return diff;
}

static void test_epoch_permutation(void **state) {
    (void)state;
    const int sizes[] = {1, 2, 7, 1000, 60000};
    for (size_t t = 0; t < sizeof sizes / sizeof *sizes; t++) {
        int n = sizes[t];
        qs_image_dataset d = index_dataset(n);
        int *a = malloc((size_t)n * sizeof *a), *b = malloc((size_t)n * sizeof *b);
        uint64_t epoch = qs_rng_below(seed, 500, (uint64_t)n, 1000);
        epoch_order(&d, seed, epoch, a);
        check_bijection(a, n);
        epoch_order(&d, seed, epoch + 1, b);
        check_bijection(b, n);
        if (n >= 1000) {
            if (differing(a, b, n) < n / 2) fail_msg("n %d: epochs %llu and %llu share most of their order", n,
                                                     (unsigned long long)epoch, (unsigned long long)epoch + 1);
            epoch_order(&d, seed + 1, epoch, b);
            if (differing(a, b, n) < n / 2) fail_msg("n %d: seeds %llu and %llu share most of their order", n,
                                                     (unsigned long long)seed, (unsigned long long)seed + 1);
            /* Shuffled like a random order: few images stay in place, and the order goes
             * up from one position to the next about half the time (a random
             * permutation has (n - 1) / 2 ascents, sd sqrt((n + 1) / 12)). */
            int fixed = 0, ascents = 0;
            for (int i = 0; i < n; i++) fixed += a[i] == i;
            for (int i = 0; i + 1 < n; i++) ascents += a[i + 1] > a[i];
            if (fixed > n / 100) fail_msg("n %d: %d images stay in place: hardly shuffled", n, fixed);
            if (fabs(ascents - (n - 1) / 2.0) > 6 * sqrt((n + 1) / 12.0))
                fail_msg("n %d: %d ascents in the order, a random one has %.0f", n, ascents, (n - 1) / 2.0);
        } else if (n == 7) { /* only 5040 orders: ask for variety over 16 epochs */
            int distinct = 0;
            for (int e = 1; e <= 16; e++) {
                epoch_order(&d, seed, epoch + (uint64_t)e, b);
                check_bijection(b, n);
                distinct += differing(a, b, n) > 0;
            }
            if (distinct < 8) fail_msg("n 7: only %d of 16 epochs differ from the first", distinct);
        }
        free(a);
        free(b);
        qs_image_dataset_free(&d);
    }
}

static void test_batches_independent_of_cut(void **state) {
    (void)state;
    qs_image_dataset d = random_dataset(50, 5, 7, 0.3f, 0.4f);
    const qs_augment aug = {.size = 11, .max_shift = 2, .flip = true};
    const int B = 64, S = 11;
    const uint64_t first = qs_rng_below(seed, 600, 0, 1000); /* 64 samples of n = 50: crosses an epoch */
    float *x1 = malloc((size_t)B * S * S * sizeof(float)), *x2 = malloc((size_t)B * S * S * sizeof(float));
    int y1[64], y2[64];
    for (int split = 0; split < 2; split++) {
        qs_image_batch(&d, (qs_image_split)split, &aug, seed, first, B, x1, y1);
        for (int b = 0; b < B; b++) qs_image_batch(&d, (qs_image_split)split, &aug, seed, first + (uint64_t)b, 1,
                                                   x2 + (size_t)b * S * S, y2 + b);
        assert_memory_equal(x1, x2, (size_t)B * S * S * sizeof(float));
        assert_memory_equal(y1, y2, sizeof y1);
        /* and an uneven cut: 13 + 40 + 11 */
        memset(x2, 0, (size_t)B * S * S * sizeof(float));
        int at = 0;
        for (int piece = 0; piece < 3; piece++) {
            int len = (int[]){13, 40, 11}[piece];
            qs_image_batch(&d, (qs_image_split)split, &aug, seed, first + (uint64_t)at, len,
                           x2 + (size_t)at * S * S, y2 + at);
            at += len;
        }
        assert_memory_equal(x1, x2, (size_t)B * S * S * sizeof(float));
        assert_memory_equal(y1, y2, sizeof y1);
    }
    free(x1);
    free(x2);
    qs_image_dataset_free(&d);
}

/* size == h == w, no shift, no flip: exactly the normalised image. */
static void test_augment_off_is_identity(void **state) {
    (void)state;
    qs_image_dataset d = random_dataset(5, 6, 6, 0.25f, 0.5f);
    const qs_augment plain = {.size = 6};
    float x[20 * 36];
    int y[20];
    qs_image_batch(&d, QS_IMG_TRAIN, &plain, seed, 0, 20, x, y);
    for (int b = 0; b < 20; b++)
        for (int i = 0; i < 36; i++) assert_true(x[b * 36 + i] == norm(&d, d.pixels[0][y[b] * 36 + i]));
    qs_image_dataset_free(&d);
}

/* Every sample is the reference placement for some shift within max_shift and some
 * flip; both flips occur about equally and every shift occurs. */
static void check_augment(const qs_augment *a, int h, int w, int samples) {
    qs_image_dataset d = random_dataset(4, h, w, 0.3f, 0.4f);
    int S = a->size, m = a->max_shift, flips = 0;
    int seen[11][11] = {{0}};
    float *x = malloc((size_t)samples * S * S * sizeof *x);
    int *y = malloc((size_t)samples * sizeof *y);
    qs_image_batch(&d, QS_IMG_TRAIN, a, seed, seed >> 40, samples, x, y);
    for (int b = 0; b < samples; b++) {
        int dy, dx;
        bool flip;
        if (find_placement(&d, y[b], a, x + (size_t)b * S * S, &dy, &dx, &flip))
            fail_msg("size %d shift %d flip %d: sample %d is no shifted/flipped copy of image %d", S, m, a->flip, b,
                     y[b]);
        flips += flip;
        seen[dy + m][dx + m]++;
    }
    for (int i = 0; i <= 2 * m; i++)
        for (int j = 0; j <= 2 * m; j++)
            if (!seen[i][j]) fail_msg("shift (%d, %d) never drawn in %d samples", i - m, j - m, samples);
    if (a->flip && (flips < samples * 4 / 10 || flips > samples * 6 / 10))
        fail_msg("%d of %d samples flipped, expected about half", flips, samples);
    free(x);
    free(y);
    qs_image_dataset_free(&d);
}

static void test_augment_flip(void **state) {
    (void)state;
    check_augment(&(qs_augment){.size = 7, .flip = true}, 5, 7, 2000);
    /* a flipped image mirrored back is the unflipped one, pixel for pixel */
    qs_image_dataset d = random_dataset(1, 5, 7, 0.3f, 0.4f);
    float a[49], b[49];
    reference(&d, 0, 0, 7, 0, 0, true, a);
    for (int r = 0; r < 7; r++)
        for (int c = 0; c < 7; c++) b[r * 7 + c] = a[r * 7 + 6 - c];
    float plain[49];
    int y;
    qs_image_batch(&d, QS_IMG_TRAIN, &(qs_augment){.size = 7}, seed, 0, 1, plain, &y);
    assert_memory_equal(b, plain, sizeof b);
    qs_image_dataset_free(&d);
}

static void test_augment_shift(void **state) {
    (void)state;
    /* canvas = widest side + 2 * max_shift: every shift keeps the whole image */
    check_augment(&(qs_augment){.size = 11, .max_shift = 2}, 5, 7, 1000);
    check_augment(&(qs_augment){.size = 13, .max_shift = 3, .flip = true}, 5, 7, 2000);
    /* a canvas too small for the shift cuts the image off at its edge, never past it */
    check_augment(&(qs_augment){.size = 7, .max_shift = 3, .flip = true}, 5, 7, 2000);
    /* whole image kept: the canvas holds every source pixel once */
    qs_image_dataset d = random_dataset(3, 5, 7, 0.3f, 0.4f);
    const qs_augment a = {.size = 11, .max_shift = 2, .flip = true};
    float x[8 * 121];
    int y[8];
    qs_image_batch(&d, QS_IMG_TRAIN, &a, seed, 0, 8, x, y);
    for (int b = 0; b < 8; b++) {
        double got = 0, want = 0;
        int content = 0;
        for (int i = 0; i < 121; i++) {
            content += x[b * 121 + i] != norm(&d, 0);
            got += x[b * 121 + i];
        }
        for (int i = 0; i < 35; i++) want += norm(&d, d.pixels[0][y[b] * 35 + i]);
        want += (121 - 35) * norm(&d, 0);
        assert_int_equal(content, 35);
        assert_float_equal(got, want, 1e-3);
    }
    qs_image_dataset_free(&d);
}

/* Padding is raw pixel 0 normalised: -mean/std. The test split ignores shift and flip. */
static void test_padding_and_test_split(void **state) {
    (void)state;
    qs_image_dataset d = random_dataset(6, 5, 7, 0.3f, 0.4f);
    const qs_augment a = {.size = 10, .max_shift = 3, .flip = true};
    float x[15 * 100], ref[100];
    int y[15];
    qs_image_batch(&d, QS_IMG_TRAIN, &a, seed, 0, 15, x, y);
    for (int b = 0; b < 15; b++) assert_true(x[b * 100] == -d.mean / d.std || x[b * 100 + 99] == -d.mean / d.std);
    const uint64_t first = qs_rng_below(seed, 700, 0, 1000);
    qs_image_batch(&d, QS_IMG_TEST, &a, seed, first, 15, x, y);
    for (int b = 0; b < 15; b++) {
        int k = (int)((first + (uint64_t)b) % 6);
        assert_int_equal(y[b], k);
        reference(&d, QS_IMG_TEST, k, 10, 0, 0, false, ref);
        assert_memory_equal(x + b * 100, ref, sizeof ref);
        for (int c = 0; c < 10; c++) assert_true(x[b * 100 + c] == -d.mean / d.std); /* row 0 is padding */
    }
    qs_image_dataset_free(&d);
}

/* ---- the real dataset ---- */

static void test_fashion_mnist(void **state) {
    (void)state;
    if (access(FASHION_DIR "/train-images-idx3-ubyte.gz", R_OK) != 0) {
        printf("# " FASHION_DIR " missing (Debian: dataset-fashion-mnist): skipped\n");
        skip();
    }
    qs_image_dataset d;
    if (qs_image_dataset_load(&d, FASHION_DIR)) fail_msg("%s", qs_error_last());
    assert_int_equal(d.n[QS_IMG_TRAIN], 60000);
    assert_int_equal(d.n[QS_IMG_TEST], 10000);
    assert_int_equal(d.h, 28);
    assert_int_equal(d.w, 28);
    assert_int_equal(d.n_classes, 10);
    assert_float_equal(d.mean, 0.2860, 1e-4); /* the published statistics */
    assert_float_equal(d.std, 0.3530, 1e-4);
    /* One training epoch, normalised: mean 0, std 1, each class 6000 times. */
    const int B = 1000;
    const qs_augment plain = {.size = 28};
    float *x = malloc((size_t)B * 784 * sizeof *x);
    int y[1000], count[10] = {0};
    double sum = 0, sq = 0;
    for (int start = 0; start < 60000; start += B) {
        qs_image_batch(&d, QS_IMG_TRAIN, &plain, seed, 60000 * 3 + (uint64_t)start, B, x, y);
        for (size_t i = 0; i < (size_t)B * 784; i++) sum += x[i], sq += (double)x[i] * x[i];
        for (int b = 0; b < B; b++) count[y[b]]++;
    }
    double mean = sum / (60000.0 * 784), var = sq / (60000.0 * 784) - mean * mean;
    assert_float_equal(mean, 0, 1e-5);
    assert_float_equal(sqrt(var), 1, 1e-5);
    for (int c = 0; c < 10; c++) assert_int_equal(count[c], 6000);
    free(x);
    qs_image_dataset_free(&d);
}

int main(void) {
    seed = qs_test_seed("test_images");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idx_parse_valid),
        cmocka_unit_test(test_idx_parse_errors),
        cmocka_unit_test(test_idx_read_files),
        cmocka_unit_test(test_dataset_load),
        cmocka_unit_test(test_epoch_permutation),
        cmocka_unit_test(test_batches_independent_of_cut),
        cmocka_unit_test(test_augment_off_is_identity),
        cmocka_unit_test(test_augment_flip),
        cmocka_unit_test(test_augment_shift),
        cmocka_unit_test(test_padding_and_test_split),
        cmocka_unit_test(test_fashion_mnist),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

/* GPT-2 BPE tokenizer. Input: two little-endian u16 lengths, then encoder.json and
 * vocab.bpe of those lengths (clamped to what is there), then the text to encode.
 * Lengths rather than NUL separators, so the files may hold NUL bytes too. The files
 * are written to a private temporary folder, as qs_tokenizer_load reads a folder. A
 * tokenizer that loads must encode valid UTF-8 into ids in range that decode to the
 * exact text. */
#include "fuzz.h"

#include "quasar/tokenizer.h"

#include <unistd.h>

static char dir[32];

static void remove_dir(void) {
    char path[64];
    snprintf(path, sizeof path, "%s/encoder.json", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/vocab.bpe", dir);
    unlink(path);
    rmdir(dir);
}

static void write_file(const char *name, const uint8_t *data, size_t n) {
    if (!*dir) {
        snprintf(dir, sizeof dir, "/tmp/qs_fuzz_XXXXXX");
        FUZZ_CHECK(mkdtemp(dir) != NULL);
        atexit(remove_dir);
    }
    char path[64];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "wb");
    FUZZ_CHECK(fp != NULL);
    FUZZ_CHECK(fwrite(data, 1, n, fp) == n && fclose(fp) == 0);
}

static void check_round_trip(qs_tokenizer *t, const char *text, size_t n) {
    int *ids = malloc((n ? n : 1) * sizeof *ids);
    FUZZ_CHECK(ids != NULL);
    size_t n_ids;
    if (qs_tokenizer_encode(t, text, n, ids, &n_ids) == 0) {
        FUZZ_CHECK(n_ids <= n);
        for (size_t i = 0; i < n_ids; i++)
            FUZZ_CHECK(ids[i] >= 0 && ids[i] < qs_tokenizer_vocab_size(t));
        char *back;
        size_t n_back;
        FUZZ_CHECK(qs_tokenizer_decode(t, ids, n_ids, &back, &n_back) == 0);
        FUZZ_CHECK(n_back == n && memcmp(back, text, n) == 0);
        free(back);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 4)
        return 0;
    size_t n_encoder = data[0] | (size_t)data[1] << 8, n_merges = data[2] | (size_t)data[3] << 8;
    data += 4;
    size -= 4;
    if (n_encoder > size)
        n_encoder = size;
    if (n_merges > size - n_encoder)
        n_merges = size - n_encoder;
    write_file("encoder.json", data, n_encoder);
    write_file("vocab.bpe", data + n_encoder, n_merges);

    qs_tokenizer *t;
    if (qs_tokenizer_load(&t, dir) == 0) {
        size_t skip = n_encoder + n_merges;
        check_round_trip(t, (const char *)data + skip, size - skip);
        qs_tokenizer_free(t);
    }
    return 0;
}

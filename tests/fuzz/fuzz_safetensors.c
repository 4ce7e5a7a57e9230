/* safetensors reading. A file that parses must keep the reader's promises: tensors in
 * offset order, contiguous, exactly filling the data after the header, each nbytes =
 * dtype size x shape, and every tensor and metadata key found again by name. */
#include "fuzz.h"

#include "quasar/safetensors.h"

static void check_tensors(const qs_st_file *f) {
    uint64_t header = 0;
    for (int i = 7; i >= 0; i--)
        header = header << 8 | (uint8_t)f->buf[i];
    const char *next = f->buf + 8 + header; /* where the next tensor's data must begin */
    for (int i = 0; i < f->n_tensors; i++) {
        const qs_st_tensor *t = &f->tensors[i];
        FUZZ_CHECK(t->ndim >= 0 && t->ndim <= QS_ST_MAX_DIMS);
        size_t nbytes = qs_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++)
            nbytes *= (size_t)t->shape[d]; /* a wrapped partial product still ends exact */
        FUZZ_CHECK(nbytes == t->nbytes && t->data == next);
        next += t->nbytes;
        FUZZ_CHECK(qs_st_find(f, t->name) == t);
    }
    FUZZ_CHECK(next == f->buf + f->buf_size);
}

static void check_meta(const qs_st_file *f) {
    for (int i = 0; i < f->n_meta; i++)
        FUZZ_CHECK(qs_st_meta_get(f, f->meta[i].key) == f->meta[i].value);
    /* The keys a checkpoint reads, present or not. */
    qs_st_meta_get(f, "quasar.config");
    qs_st_meta_get(f, "quasar.vocab");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qs_st_file f;
    if (qs_st_parse(&f, data, size, "fuzz.safetensors") != 0) {
        FUZZ_CHECK(f.buf == NULL && f.tensors == NULL && f.meta == NULL); /* nothing to free */
        return 0;
    }
    check_tensors(&f);
    check_meta(&f);
    qs_st_free(&f);
    return 0;
}

/* safetensors: u64 little-endian header length N, N bytes of JSON header
 * {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}},
 * then the raw little-endian data. Offsets are relative to the data start. We pad the
 * header with spaces to a multiple of 8 bytes and require, when reading, that the
 * tensors' byte ranges are contiguous, non-overlapping, match dtype x shape and
 * exactly fill the rest of the file. */
#ifndef QUASAR_SAFETENSORS_H
#define QUASAR_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define QS_ST_MAX_DIMS 8
#define QS_ST_MAX_NAME 256

typedef enum {
    QS_DT_F32, QS_DT_F16, QS_DT_BF16, QS_DT_F64, QS_DT_I64, QS_DT_I32, QS_DT_I16, QS_DT_I8,
    QS_DT_U8, QS_DT_BOOL
} qs_dtype;

size_t qs_dtype_size(qs_dtype dt);
const char *qs_dtype_name(qs_dtype dt); /* "F32", "BF16", ... */

typedef struct qs_st_tensor {
    char name[QS_ST_MAX_NAME];
    qs_dtype dtype;
    int ndim;
    int64_t shape[QS_ST_MAX_DIMS];
    size_t nbytes;
    const void *data; /* points into the file's buffer */
} qs_st_tensor;

typedef struct qs_st_meta {
    char *key;
    char *value;
} qs_st_meta;

typedef struct qs_st_file {
    qs_st_tensor *tensors; /* in file-offset order */
    int n_tensors;
    qs_st_meta *meta;
    int n_meta;
    char *buf; /* the whole file */
    size_t buf_size;
    int mapped; /* buf is the file mapped read-only, not a malloc'd copy */
} qs_st_file;

/* Opens and validates a file, mapped read-only where the system can (else read whole),
 * so its tensors' pages come in as they are read; on error nothing needs freeing and
 * the message names the path and the problem (e.g. "x.safetensors: tensor 'a'
 * data_offsets overlap"). */
int qs_st_read(qs_st_file *f, const char *path);
/* Same, from a buffer (copied). `what` names the source in error messages. */
int qs_st_parse(qs_st_file *f, const void *data, size_t size, const char *what);
void qs_st_free(qs_st_file *f);
/* The caller is done with n bytes at p (a tensor's data): a mapped file gives back
 * their whole pages, so that loading a file tensor by tensor keeps about one tensor
 * of it resident. Read again, they come back from the file. */
void qs_st_release(const qs_st_file *f, const void *p, size_t n);
const qs_st_tensor *qs_st_find(const qs_st_file *f, const char *name);
const char *qs_st_meta_get(const qs_st_file *f, const char *key); /* NULL if absent */

/* "[2,3]": a shape for error messages. */
void qs_st_shape_str(char *buf, size_t cap, int ndim, const int64_t *shape);
/* Widens an F32, F16 or BF16 tensor (little-endian, possibly unaligned data) into dst
 * (numel floats); other dtypes are an error naming `what` and the tensor. */
int qs_st_to_f32(const qs_st_tensor *t, float *dst, const char *what);

/* Writing: tensors are laid out in the order given. A tensor's bytes are data, or, when
 * data is NULL, what fetch(ctx, offset, dst, n) copies into dst a chunk at a time: a
 * tensor in device memory goes to the file through one bounded host buffer, not a
 * host copy of the whole state. */
typedef struct qs_st_entry {
    const char *name;
    qs_dtype dtype;
    int ndim;
    int64_t shape[QS_ST_MAX_DIMS];
    const void *data;
    void (*fetch)(const void *ctx, size_t offset, void *dst, size_t n);
    const void *ctx;
} qs_st_entry;

/* Atomic write (qs_atomic_file). meta holds n_meta key/value pairs (may be 0). */
int qs_st_write(const char *path, const qs_st_entry *entries, int n_entries,
                const qs_st_meta *meta, int n_meta);

#endif

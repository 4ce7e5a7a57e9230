/* Crash-safe file writes and whole-file reads. */
#ifndef QUASAR_FILEIO_H
#define QUASAR_FILEIO_H

#include <stdio.h>
#include <stddef.h>

/* An atomic file: data goes to "<path>.tmp.<pid>", and commit fsyncs it, renames it
 * over <path> and fsyncs the directory. Until commit, <path> is untouched; abort
 * (or a crash) leaves at most a stray temp file. */
typedef struct qs_atomic_file {
    FILE *fp;
    char path[4096];
    char tmp_path[4096];
    int failed; /* a write failed: commit will refuse */
} qs_atomic_file;

int qs_atomic_open(qs_atomic_file *f, const char *path);
int qs_atomic_write(qs_atomic_file *f, const void *data, size_t n);
int qs_atomic_commit(qs_atomic_file *f);
void qs_atomic_abort(qs_atomic_file *f);
/* One-shot: write the whole buffer atomically. */
int qs_file_write_atomic(const char *path, const void *data, size_t n);

/* Reads a whole file into a malloc'd buffer with a terminating NUL (not counted in
 * *size). Errors name the path and the reason. */
int qs_file_read(const char *path, char **data, size_t *size);

/* Maps a regular file read-only: its pages come in from the page cache (which processes
 * reading the same file share) as they are read, and nothing is copied. An empty file
 * gives NULL and 0. Errors name the path and the reason. */
int qs_file_map(const char *path, const void **data, size_t *size);
void qs_file_unmap(const void *data, size_t size);
/* Done with n bytes at p of a mapping, for now: its whole pages leave the resident set;
 * read again, they come back from the file. */
void qs_file_release(const void *p, size_t n);

/* fsync a directory (after creating or renaming entries in it). */
int qs_dir_sync(const char *dir);
/* mkdir -p. */
int qs_mkdirs(const char *path);

#endif

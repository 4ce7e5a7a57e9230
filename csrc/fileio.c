#define _DEFAULT_SOURCE /* madvise */
#include "quasar/fileio.h"

#include "quasar/error.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int qs_atomic_open(qs_atomic_file *f, const char *path) {
    f->fp = NULL;
    f->failed = 0;
    f->path[0] = f->tmp_path[0] = '\0';
    size_t len = strlen(path);
    int n = snprintf(f->tmp_path, sizeof f->tmp_path, "%s.tmp.%ld", path, (long)getpid());
    if (len == 0 || len >= sizeof f->path || n < 0 || (size_t)n >= sizeof f->tmp_path) {
        f->tmp_path[0] = '\0';
        return qs_error("cannot write '%s': %s", path, strerror(len ? ENAMETOOLONG : ENOENT));
    }
    memcpy(f->path, path, len + 1);
    f->fp = fopen(f->tmp_path, "wb");
    if (!f->fp)
        return qs_error("cannot write '%s': %s", path, strerror(errno));
    return 0;
}

int qs_atomic_write(qs_atomic_file *f, const void *data, size_t n) {
    if (!f->fp)
        return qs_error("cannot write '%s': file is not open", f->path);
    if (f->failed)
        return qs_error("cannot write '%s': %s", f->path, strerror(f->failed));
    errno = 0;
    if (n && fwrite(data, 1, n, f->fp) != n) {
        /* Remember why: stdio keeps only a sticky flag, commit needs the reason. */
        f->failed = errno ? errno : EIO;
        return qs_error("cannot write '%s': %s", f->path, strerror(f->failed));
    }
    return 0;
}

/* Closes and removes the temp file after a failure; err is the reason reported. */
static int fail_and_discard(qs_atomic_file *f, int err, const char *what) {
    if (f->fp)
        fclose(f->fp);
    f->fp = NULL;
    unlink(f->tmp_path);
    return qs_error("cannot %s '%s': %s", what, f->path, strerror(err));
}

/* "a/b/c" -> "a/b", "c" -> ".", "/c" -> "/". */
static void parent_dir(const char *path, char *dir, size_t cap) {
    const char *slash = strrchr(path, '/');
    size_t len = !slash ? 0 : slash == path ? 1 : (size_t)(slash - path);
    if (len == 0 || len >= cap)
        snprintf(dir, cap, ".");
    else
        snprintf(dir, cap, "%.*s", (int)len, path);
}

int qs_atomic_commit(qs_atomic_file *f) {
    if (!f->fp)
        return qs_error("cannot commit '%s': file is not open", f->path);
    if (f->failed)
        return fail_and_discard(f, f->failed, "write");
    /* Write-back errors such as ENOSPC or EIO often surface only here. */
    if (fflush(f->fp) != 0 || fsync(fileno(f->fp)) != 0)
        return fail_and_discard(f, errno, "write");
    FILE *fp = f->fp;
    f->fp = NULL;
    if (fclose(fp) != 0)
        return fail_and_discard(f, errno, "write");
    if (rename(f->tmp_path, f->path) != 0)
        return fail_and_discard(f, errno, "replace");
    /* The rename is only durable once the directory is; a failure here means the new
     * file is in place but might not survive a crash. */
    char dir[sizeof f->path];
    parent_dir(f->path, dir, sizeof dir);
    return qs_dir_sync(dir);
}

void qs_atomic_abort(qs_atomic_file *f) {
    if (!f->fp)
        return; /* never opened, or already committed/aborted: the temp is not ours */
    fclose(f->fp);
    f->fp = NULL;
    unlink(f->tmp_path);
}

int qs_file_write_atomic(const char *path, const void *data, size_t n) {
    qs_atomic_file f;
    if (qs_atomic_open(&f, path) != 0)
        return -1;
    if (qs_atomic_write(&f, data, n) != 0) {
        qs_atomic_abort(&f);
        return -1;
    }
    return qs_atomic_commit(&f);
}

int qs_file_read(const char *path, char **data, size_t *size) {
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return qs_error("cannot open '%s': %s", path, strerror(errno));
    /* Grow as we go rather than trusting st_size: pipes and /proc files report 0. */
    size_t len = 0, cap = 4096;
    struct stat st;
    if (fstat(fileno(fp), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 &&
        (unsigned long long)st.st_size < (unsigned long long)SIZE_MAX - 2)
        cap = (size_t)st.st_size + 2; /* +1 for the NUL, +1 so the EOF probe needs no realloc */
    char *buf = malloc(cap);
    int err = buf ? 0 : ENOMEM;
    while (!err) {
        if (len + 1 >= cap) {
            char *grown = cap <= SIZE_MAX / 2 ? realloc(buf, cap * 2) : NULL;
            if (!grown) {
                err = ENOMEM;
                break;
            }
            buf = grown;
            cap *= 2;
        }
        errno = 0;
        size_t got = fread(buf + len, 1, cap - 1 - len, fp);
        len += got;
        if (got == 0) {
            if (ferror(fp))
                err = errno ? errno : EIO;
            break;
        }
    }
    fclose(fp);
    if (err) {
        free(buf);
        return qs_error("cannot read '%s': %s", path, strerror(err));
    }
    buf[len] = '\0';
    *data = buf;
    *size = len;
    return 0;
}

int qs_dir_sync(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return qs_error("cannot open directory '%s': %s", dir, strerror(errno));
    int rc = fsync(fd);
    int err = errno;
    close(fd);
    /* Some filesystems cannot fsync directories (EINVAL); there is nothing more to do. */
    if (rc != 0 && err != EINVAL)
        return qs_error("cannot sync directory '%s': %s", dir, strerror(err));
    return 0;
}

int qs_mkdirs(const char *path) {
    char buf[4096];
    size_t len = strlen(path);
    if (len == 0)
        return qs_error("cannot create directory '': %s", strerror(ENOENT));
    if (len >= sizeof buf)
        return qs_error("cannot create directory '%s': %s", path, strerror(ENAMETOOLONG));
    memcpy(buf, path, len + 1);
    /* Create each prefix ending before a '/', then the whole path. */
    for (size_t i = 1; i <= len; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char saved = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0777) != 0) {
            int err = errno;
            struct stat st;
            if (err != EEXIST)
                return qs_error("cannot create directory '%s': %s", buf, strerror(err));
            if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))
                return qs_error("cannot create directory '%s': %s", buf, strerror(ENOTDIR));
        }
        buf[i] = saved;
    }
    return 0;
}

int qs_file_map(const char *path, const void **data, size_t *size) {
    *data = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return qs_error("cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    int err = fstat(fd, &st) ? errno : !S_ISREG(st.st_mode) ? EINVAL : 0;
    if (!err && st.st_size > 0) {
        void *p = (uintmax_t)st.st_size <= SIZE_MAX ? mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0)
                                                    : MAP_FAILED;
        if (p == MAP_FAILED) err = errno ? errno : ENOMEM;
        else *data = p, *size = (size_t)st.st_size;
    }
    close(fd);
    return err ? qs_error("cannot map '%s': %s", path, err == EINVAL ? "not a regular file" : strerror(err)) : 0;
}

void qs_file_unmap(const void *data, size_t size) {
    if (data && size) munmap((void *)data, size);
}

void qs_file_release(const void *p, size_t n) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p;
    const uintptr_t begin = (a + page - 1) / page * page, end = (a + n) / page * page;
    if (end > begin) madvise((void *)begin, end - begin, MADV_DONTNEED);
}

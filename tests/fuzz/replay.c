/* Replays inputs through a fuzz target without libFuzzer, so corpora and crash
 * regressions run under gcc + ASan/UBSan in `make test`. Arguments are files or
 * directories (their regular files, in name order). Each input is handed over in a
 * buffer of exactly its size, as libFuzzer does, so a read past its end is caught. */
#include "fuzz.h"

#include <dirent.h>
#include <sys/stat.h>

static int replay_file(const char *path) {
    FILE *fp = fopen(path, "rb");
    struct stat st;
    if (!fp || fstat(fileno(fp), &st) != 0) {
        perror(path);
        if (fp)
            fclose(fp);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    uint8_t *data = malloc(size ? size : 1);
    int rc = data && fread(data, 1, size, fp) == size ? 0 : -1;
    fclose(fp);
    if (rc == 0) {
        fprintf(stderr, "Running: %s\n", path); /* names the input if it crashes */
        LLVMFuzzerTestOneInput(data, size);
    } else {
        fprintf(stderr, "%s: cannot read\n", path);
    }
    free(data);
    return rc;
}

/* Returns the number of inputs replayed, or -1. */
static int replay_path(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) {
        perror(path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode))
        return replay_file(path) == 0 ? 1 : -1;
    struct dirent **names;
    int n = scandir(path, &names, NULL, alphasort);
    if (n < 0) {
        perror(path);
        return -1;
    }
    int count = 0;
    for (int i = 0; i < n; i++) {
        char file[4096];
        snprintf(file, sizeof file, "%s/%s", path, names[i]->d_name);
        if (count >= 0 && stat(file, &st) == 0 && S_ISREG(st.st_mode))
            count = replay_file(file) == 0 ? count + 1 : -1;
        free(names[i]);
    }
    free(names);
    return count;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_OR_DIR...\n", argv[0]);
        return 2;
    }
    int total = 0;
    for (int i = 1; i < argc; i++) {
        int n = replay_path(argv[i]);
        if (n < 0)
            return 1;
        total += n;
    }
    printf("replayed %d inputs\n", total);
    return 0;
}

/* Which OpenBLAS kernels run, and how many threads they take.
 *
 * A DYNAMIC_ARCH OpenBLAS picks its kernels by CPU model when it loads. A model newer
 * than the library (Emerald Rapids, family 6 model 207, under Debian 12's 0.3.21) gets
 * the generic SSE3 "Prescott" kernels: 48 GFLOP/s on a 2048^3 SGEMM on two cores where
 * the AVX-512 ones give 274, and a CPU training step 3.2x slower (bench/NOTES.md). The
 * choice can only be made before the library loads, through OPENBLAS_CORETYPE, so
 * quasar re-executes itself with it set when that happened. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cpu_ops.h"
#include "quasar/backend.h"

char *openblas_get_corename(void); /* OpenBLAS's own, not in cblas.h */

void qs_cpu_blas_init(void) { openblas_set_num_threads(1); }

const char *qs_cpu_blas_core(void) { return openblas_get_corename(); }

/* The widest OpenBLAS kernels this CPU's instruction set runs (NULL: none wider than
 * OpenBLAS's SSE3 baseline). */
static const char *best_core(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return "SkylakeX";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
    return NULL;
}

/* Whether OpenBLAS's kernels `core` use AVX2 or wider: then its own choice stands. */
static int has_wide_kernels(const char *core) {
    static const char *const wide[] = {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids", NULL};
    for (int i = 0; wide[i]; i++)
        if (!strcmp(core, wide[i])) return 1;
    return 0;
}

void qs_backend_cpu_pick_blas(char **argv) {
    const char *best = best_core(), *core = openblas_get_corename();
    if (!best || getenv("OPENBLAS_CORETYPE") || !core || has_wide_kernels(core)) return;
    if (setenv("OPENBLAS_CORETYPE", best, 1) != 0) return;
    execv("/proc/self/exe", argv);
    /* no re-exec (no /proc): go on with the kernels loaded, but say so */
    unsetenv("OPENBLAS_CORETYPE");
    fprintf(stderr, "quasar: OpenBLAS runs its %s kernels on this CPU; OPENBLAS_CORETYPE=%s is faster\n", core,
            best);
}

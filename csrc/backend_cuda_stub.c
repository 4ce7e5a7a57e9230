/* qs_backend_cuda (and its queries) in a build without the CUDA backend (CUDA=0, or no nvcc): the ASan and
 * fuzz trees always, the release tree when kernels/ is not compiled. */
#include "quasar/backend.h"
#include "quasar/error.h"

const qs_backend *qs_backend_cuda(qs_precision precision) {
    (void)precision;
    qs_error("this build has no CUDA (build with nvcc present, or make CUDA=1 CUDA_HOME=...)");
    return NULL;
}

long qs_backend_cuda_unfused(void) { return 0; }

const char *qs_backend_cuda_grouped_gemm(qs_precision precision) {
    (void)precision;
    return "cublas";
}

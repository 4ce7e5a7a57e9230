#include "cli.h"

#include <stdio.h>
#include <string.h>

#include "quasar/error.h"

int qs_cli_fail(void) {
    fprintf(stderr, "error: %s\n", qs_error_last());
    return QS_EXIT_FAILURE;
}

int qs_cli_usage_error(const char *fmt, const char *arg) {
    fprintf(stderr, "error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see --help)\n");
    return QS_EXIT_USAGE;
}

const qs_backend *qs_cli_backend(const char *device, qs_precision precision) {
    if (!strcmp(device, "cpu")) {
        if (precision != QS_PRECISION_FP32)
            fprintf(stderr, "quasar: train.precision bf16 applies to --device cuda; the CPU computes in fp32\n");
        return qs_backend_cpu();
    }
    if (!strcmp(device, "cuda")) {
        const qs_backend *be = qs_backend_cuda(precision);
        if (!be) qs_error("--device cuda: %s", qs_error_last());
        return be;
    }
    qs_error("--device: expected cpu or cuda, got '%s'", device);
    return NULL;
}

int qs_cli_weights_check(const char *weights) {
    if (!strcmp(weights, "fp32") || !strcmp(weights, "bf16")) return 0;
    return qs_cli_usage_error("--weights: expected fp32 or bf16, got '%s'", weights);
}

qs_gpt_use qs_cli_weights_use(const char *weights) { return strcmp(weights, "bf16") ? QS_GPT_INFER : QS_GPT_INFER_BF16; }

int qs_cli_weights_apply(qs_gpt *m, const char *weights) {
    return strcmp(weights, "bf16") ? 0 : qs_gpt_use_bf16_weights(m);
}

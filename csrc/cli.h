/* What every quasar subcommand shares: how failures are reported and the exit codes. */
#ifndef QUASAR_CLI_H
#define QUASAR_CLI_H

#include "quasar/backend.h"
#include "quasar/model.h"

#define QS_EXIT_FAILURE 1
#define QS_EXIT_USAGE 2

/* Prints "error: <the last qs_error>" and returns QS_EXIT_FAILURE. */
int qs_cli_fail(void);
/* Prints "error: <fmt with arg> (see --help)" and returns QS_EXIT_USAGE. */
int qs_cli_usage_error(const char *fmt, const char *arg);
/* The backend --device names ("cpu" or "cuda"), its matrix products in `precision`;
 * NULL with a one-line qs_error when there is none. */
const qs_backend *qs_cli_backend(const char *device, qs_precision precision);
/* --weights of the inference commands: "fp32" (the checkpoint's own) or "bf16". check:
 * 0, or QS_EXIT_USAGE after printing why. use: the model to make for them (bf16: the
 * panels alone, QS_GPT_INFER_BF16). apply: bf16 panels packed beside the loaded fp32
 * weights (qs_gpt_use_bf16_weights), for a LoRA base; 0, or -1 with qs_error set. */
int qs_cli_weights_check(const char *weights);
qs_gpt_use qs_cli_weights_use(const char *weights);
int qs_cli_weights_apply(qs_gpt *m, const char *weights);

#endif

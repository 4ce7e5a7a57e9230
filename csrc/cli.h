/* What every quasar subcommand shares: how failures are reported and the exit codes. */
#ifndef QUASAR_CLI_H
#define QUASAR_CLI_H

#define QS_EXIT_FAILURE 1
#define QS_EXIT_USAGE 2

/* Prints "error: <the last qs_error>" and returns QS_EXIT_FAILURE. */
int qs_cli_fail(void);
/* Prints "error: <fmt with arg> (see --help)" and returns QS_EXIT_USAGE. */
int qs_cli_usage_error(const char *fmt, const char *arg);

#endif

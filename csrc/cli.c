#include "cli.h"

#include <stdio.h>

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

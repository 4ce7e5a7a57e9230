#include "quasar/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char last_error[1024];

int qs_error(const char *fmt, ...) {
    /* Format aside first: callers often wrap the previous message, qs_error("%s: %s",
     * path, qs_error_last()), and the buffer must not be read while it is written. */
    char msg[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    memcpy(last_error, msg, sizeof msg);
    return -1;
}

const char *qs_error_last(void) { return last_error; }

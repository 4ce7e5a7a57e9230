/* Error reporting: library functions return 0 on success and -1 on failure after
 * recording a one-line message; the CLI prints it as "error: <message>". */
#ifndef QUASAR_ERROR_H
#define QUASAR_ERROR_H

#if defined(__GNUC__)
#define QS_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define QS_PRINTF(a, b)
#endif

/* Records the message (printf-style, no trailing newline). Always returns -1 so
 * callers can write `return qs_error(...)`. */
int qs_error(const char *fmt, ...) QS_PRINTF(1, 2);
/* The last recorded message ("" if none). */
const char *qs_error_last(void);

#endif

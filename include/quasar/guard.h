/* Numeric guards for the step loop: a step whose loss or gradient norm is non-finite,
 * or (optionally) an outlier against the recent steps, is skipped; too many skipped
 * steps in a row stop the run. */
#ifndef QUASAR_GUARD_H
#define QUASAR_GUARD_H

#include <stdbool.h>
#include <stdint.h>

#define QS_GUARD_WINDOW 64 /* recent accepted steps the z-score is taken against */
#define QS_GUARD_MIN 16    /* accepted steps needed before outliers are judged */

typedef enum { QS_STEP_OK, QS_STEP_NONFINITE, QS_STEP_OUTLIER } qs_step_verdict;

typedef struct qs_guard {
    float zscore;  /* 0 = outlier check off */
    int max_bad;   /* 0 = never stop */
    int bad_in_row;
    int64_t skipped_nonfinite, skipped_outlier;
    int n, head;   /* ring buffer of accepted (loss, norm) */
    double loss[QS_GUARD_WINDOW], norm[QS_GUARD_WINDOW];
} qs_guard;

void qs_guard_init(qs_guard *g, float zscore, int max_bad);
/* Judges a step and records it (accepted steps join the window). */
qs_step_verdict qs_guard_check(qs_guard *g, double loss, double norm);
bool qs_guard_should_stop(const qs_guard *g);
/* The guard's state as a JSON object (malloc'd) and back, so that resuming is exact. */
char *qs_guard_to_json(const qs_guard *g);
int qs_guard_from_json(qs_guard *g, const char *json, const char *what);

#endif

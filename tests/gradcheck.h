/* The finite-difference estimate and scoring shared by the whole-model gradient checks
 * (test_model, test_quadranet, test_lora). */
#ifndef QUASAR_TEST_GRADCHECK_H
#define QUASAR_TEST_GRADCHECK_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>

#include "quasar/params.h"

/* The loss at the current parameters; *same is cleared when the evaluation took a
 * different discrete path than the unperturbed one (MoE routing), which makes the
 * difference meaningless. */
typedef double (*gc_loss_fn)(void *ctx, bool *same);

/* A finite-difference estimate: the value, and how much its two step sizes disagree. */
typedef struct gc_fd {
    double value, spread;
} gc_fd;

/* Central differences at two step sizes (fp32 rounding limits how small) and their
 * Richardson extrapolation, which cancels the O(h^2) curvature term; the value is the one
 * of the three nearest the analytic an. A wrong gradient is wrong at every step size, so
 * scoring by the nearest stays sound while curved regions stop raising false alarms.
 * The steps shrink as |an| grows past 1, so that the loss moves by about the same amount
 * whatever the gradient: a coordinate the loss is very sensitive to often curves on a
 * scale of 1e-3 (a LoRA adapter's largest gradient, ~18, oscillated with a period of
 * 8e-4), where fixed steps measure the average slope over a wiggle. */
static inline gc_fd gc_nearest_fd(gc_loss_fn loss, void *ctx, float *p, double an, bool *same) {
    double fd[3];
    const double shrink = fmax(1.0, fabs(an));
    for (int e = 0; e < 2; e++) {
        const float eps = (float)((e == 0 ? 3e-3 : 1e-3) / shrink), orig = *p;
        *p = orig + eps;
        const double lp = loss(ctx, same);
        *p = orig - eps;
        const double lm = loss(ctx, same);
        *p = orig;
        fd[e] = (lp - lm) / (2.0 * eps);
    }
    fd[2] = (9.0 * fd[1] - fd[0]) / 8.0;
    double best = fd[0];
    for (int e = 1; e < 3; e++)
        if (fabs(fd[e] - an) < fabs(best - an)) best = fd[e];
    return (gc_fd){best, fabs(fd[0] - fd[1])};
}

/* Relative error of one coordinate. The floor is `floor`, or the two steps' disagreement
 * where that is larger: a coordinate whose gradient is as small as the loss's fp32
 * rounding noise cannot be measured to better than that, while a wrong gradient is
 * far from an estimate its two steps agree on. */
static inline double gc_rel_err(gc_fd fd, double an, double floor) {
    return fabs(fd.value - an) / (fabs(an) + fmax(floor, fd.spread));
}

/* Aggregate and worst-coordinate errors over many coordinates. */
typedef struct gc_score {
    double floor; /* of gc_rel_err; 0 means 1e-3 */
    double num, den, worst;
    int checked;
    char worst_at[2 * QS_PARAM_NAME_MAX];
} gc_score;

static inline void gc_score_add(gc_score *s, const char *name, size_t j, gc_fd fd, double an) {
    const double err = gc_rel_err(fd, an, s->floor > 0 ? s->floor : 1e-3);
    if (err > s->worst) {
        s->worst = err;
        snprintf(s->worst_at, sizeof s->worst_at, "%s[%zu] fd %.6g an %.6g", name, j, fd.value, an);
    }
    s->num += (fd.value - an) * (fd.value - an);
    s->den += an * an;
    s->checked++;
}

static inline double gc_score_rel(const gc_score *s) { return sqrt(s->num / s->den); }

#endif

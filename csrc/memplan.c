#include "quasar/memplan.h"

#include <stdlib.h>

#include "quasar/error.h"

static double mib(size_t bytes) { return (double)bytes / 1048576.0; }

size_t qs_mem_plan_total(const qs_mem_plan *p) {
    return p->params + p->grads + p->optimizer + p->activations + p->workspace;
}

void qs_mem_plan_add(qs_mem_plan *a, const qs_mem_plan *b) {
    a->params += b->params;
    a->grads += b->grads;
    a->optimizer += b->optimizer;
    a->activations += b->activations;
    a->workspace += b->workspace;
}

size_t qs_mem_plan_optimizer(size_t trainable, int shards) {
    /* ZeRO-1 (data_parallel.h): a chunk of n / shards plus the n % shards tail every
     * rank keeps; m and v, fp32 each */
    const size_t s = shards > 1 ? (size_t)shards : 1, own = trainable / s + trainable % s;
    return 2 * (own ? own : 1) * sizeof(float);
}

static void print_parts(FILE *f, const qs_mem_plan *p) {
    fprintf(f, "%.1f MiB = parameters %.1f + gradients %.1f + optimizer %.1f + activations %.1f + workspace %.1f",
            mib(qs_mem_plan_total(p)), mib(p->params), mib(p->grads), mib(p->optimizer), mib(p->activations),
            mib(p->workspace));
}

int qs_mem_plan_check(const qs_mem_plan *p, const qs_backend *be) {
    return qs_mem_plan_check_advising(p, be,
                                      "lower train.micro_batch_size, model.seq_len or the model's size, or set "
                                      "model.recompute_layers");
}

int qs_mem_plan_check_advising(const qs_mem_plan *p, const qs_backend *be, const char *lower) {
    size_t free_b, total_b;
    if (be->mem_info(&free_b, &total_b) || qs_mem_plan_total(p) <= free_b) return 0;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return qs_error("out of memory: the run needs %.1f MiB on %s", mib(qs_mem_plan_total(p)), be->name);
    print_parts(f, p);
    fclose(f);
    qs_error("not enough memory on %s: the run needs %s MiB, but %.1f MiB of %.1f MiB is free; %s", be->name, text,
             mib(free_b), mib(total_b), lower);
    free(text);
    return -1;
}

void qs_mem_plan_print(FILE *f, const qs_mem_plan *p, const qs_backend *be) {
    size_t free_b, total_b;
    print_parts(f, p);
    fputs(" MiB", f);
    if (!be->mem_info(&free_b, &total_b))
        fprintf(f, "; %s has %.1f of %.1f MiB left", be->name, mib(free_b), mib(total_b));
}

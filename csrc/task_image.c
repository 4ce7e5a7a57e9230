/* The image-classification task: QuadraNet on Fashion-MNIST-style IDX data. */
#include <math.h>
#include <stdlib.h>

#include "quasar/error.h"
#include "quasar/images.h"
#include "quasar/quadranet.h"
#include "quasar/task.h"

typedef struct image_task {
    qs_config cfg;
    qs_image_dataset data;
    qs_augment aug;
    qs_quadranet *m;
    int B;
    float *x;
    int *y;
} image_task;

static int image_init(void *self, uint64_t seed) { return qs_quadranet_init(((image_task *)self)->m, seed); }

static int image_train_micro(void *self, uint64_t sample0, uint64_t rng_seed, float grad_scale, double *loss) {
    image_task *t = self;
    qs_image_batch(&t->data, QS_IMG_TRAIN, &t->aug, t->cfg.train.seed, sample0, t->B, t->x, t->y);
    qs_forward_mode mode = {.train = true, .rng_seed = rng_seed, .sample0 = sample0};
    *loss = qs_quadranet_forward(t->m, t->x, t->y, t->B, &mode, NULL);
    qs_quadranet_backward(t->m, grad_scale);
    return 0;
}

/* The whole test split in micro-batches, part takes every parts-th; iters does not apply. */
static int image_evaluate(void *self, int iters, int part, int parts, double sums[3]) {
    (void)iters;
    image_task *t = self;
    qs_forward_mode mode = {.train = false};
    const int n = t->data.n[QS_IMG_TEST];
    for (int i = part * t->B; i < n; i += parts * t->B) {
        int b = n - i < t->B ? n - i : t->B, correct = 0;
        qs_image_batch(&t->data, QS_IMG_TEST, &t->aug, t->cfg.train.seed, (uint64_t)i, b, t->x, t->y);
        sums[0] += qs_quadranet_forward(t->m, t->x, t->y, b, &mode, &correct) * b;
        sums[1] += correct;
        sums[2] += b;
    }
    return 0;
}

static void image_free(void *self) {
    image_task *t = self;
    if (!t) return;
    qs_quadranet_free(t->m);
    qs_image_dataset_free(&t->data);
    free(t->x);
    free(t->y);
    free(t);
}

/* The model at micro-batches of *ctx images (qs_task_plan_fn). */
static int plan_image(qs_mem_plan *plan, const qs_config *cfg, const qs_task_place *place, const void *ctx) {
    return qs_quadranet_plan(&cfg->model, place->be, *(const int *)ctx, plan);
}

int qs_task_open_image(qs_task *task, qs_config *cfg, const qs_task_place *place) {
    const qs_quadra_config *q = &cfg->model.quadra;
    image_task *t = calloc(1, sizeof *t);
    if (!t) return qs_error("out of memory");
    t->B = place->micro_B;
    t->aug = (qs_augment){.size = q->image_size, .max_shift = cfg->data.augment_shift, .flip = cfg->data.augment_flip};
    int rc = qs_image_dataset_load(&t->data, cfg->data.path);
    if (!rc && q->in_channels != 1)
        rc = qs_error("model.quadra.in_channels is %d, but '%s' holds single-channel images", q->in_channels,
                      cfg->data.path);
    if (!rc && (t->data.h > q->image_size || t->data.w > q->image_size))
        rc = qs_error("model.quadra.image_size (%d) is smaller than the images in '%s' (%d x %d)", q->image_size,
                      cfg->data.path, t->data.h, t->data.w);
    if (!rc && t->data.n_classes > q->num_classes)
        rc = qs_error("model.quadra.num_classes (%d) is smaller than the %d classes in '%s'", q->num_classes,
                      t->data.n_classes, cfg->data.path);
    qs_mem_plan plan = {0};
    if (!rc) rc = qs_task_plan(&plan, cfg, place, plan_image, &t->B);
    t->cfg = *cfg; /* as planned: recompute_layers "auto" now a count */
    if (!rc) rc = qs_quadranet_create(&t->m, &cfg->model, place->be, t->B);
    if (!rc) {
        t->x = malloc((size_t)t->B * q->image_size * q->image_size * sizeof(float));
        t->y = malloc((size_t)t->B * sizeof(int));
        if (!t->x || !t->y) rc = qs_error("out of memory");
    }
    if (rc) {
        image_free(t);
        return -1;
    }
    *task = (qs_task){.self = t,
                      .params = qs_quadranet_params(t->m),
                      .codec = NULL,
                      .micro_B = t->B,
                      .items_per_sample = 1,
                      .item = "img",
                      .has_accuracy = true,
                      .plan = plan,
                      .init = image_init,
                      .train_micro = image_train_micro,
                      .evaluate = image_evaluate,
                      .free = image_free};
    return 0;
}

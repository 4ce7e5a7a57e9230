/* Image classification data (Fashion-MNIST): the IDX files of both splits in memory,
 * and batches drawn by counter: a per-epoch permutation and augmentation that depend
 * only on (seed, global sample index), so any cut of the sample stream into batches,
 * and any resume, sees the same samples. */
#ifndef QUASAR_IMAGES_H
#define QUASAR_IMAGES_H

#include <stdbool.h>
#include <stdint.h>

typedef enum { QS_IMG_TRAIN, QS_IMG_TEST } qs_image_split;

typedef struct qs_image_dataset {
    int n[2];           /* images per split */
    int h, w;           /* source size (28 x 28) */
    int n_classes;      /* 1 + the largest label over both splits (<= 256: labels are bytes) */
    uint8_t *pixels[2]; /* [n][h][w], malloc'd */
    uint8_t *labels[2]; /* [n], malloc'd */
    float mean, std;    /* of the training pixels scaled to [0, 1], computed on load */
} qs_image_dataset;

typedef struct qs_augment {
    int size;      /* output is size x size (>= h, w): the image centred, zero-padded (raw pixel 0) */
    int max_shift; /* random translation by up to +-max_shift pixels in x and y (the "random crop"); 0 = off */
    bool flip;     /* random horizontal flip with p = 0.5 */
} qs_augment;

/* Loads DIR/train-images-idx3-ubyte.gz, DIR/train-labels-idx1-ubyte.gz and the same
 * for t10k- (the test split). Images must be 3-D and labels 1-D with matching counts,
 * both splits of the same h x w, the training pixels not all equal. One-line errors
 * name the file. On error *d is zeroed. */
int qs_image_dataset_load(qs_image_dataset *d, const char *dir);
/* Frees both splits and zeroes *d; safe on a zeroed dataset. */
void qs_image_dataset_free(qs_image_dataset *d);

/* A batch of B images, channels-last x[B][size][size][1], each pixel p normalised as
 * (p / 255 - mean) / std (the padding is p = 0, normalised the same way), labels y[B].
 * TRAIN: sample i = first + b is image perm(i % n) of epoch i / n, where perm is a
 * bijection of [0, n) keyed by (seed, epoch); its shift and flip are keyed by (seed, i).
 * TEST: sample i is image i % n, in order, never augmented (aug->size still sets the
 * padding). A part of the image shifted past the canvas is cut off, so
 * size >= max(h, w) + 2 * max_shift keeps every pixel. */
void qs_image_batch(const qs_image_dataset *d, qs_image_split split, const qs_augment *aug, uint64_t seed,
                    uint64_t first, int B, float *x, int *y);

#endif

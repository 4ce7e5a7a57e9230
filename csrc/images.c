#include "quasar/images.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quasar/error.h"
#include "quasar/idx.h"
#include "quasar/rng.h"

/* qs_rng streams of the image pipeline (token batches use 0x5eed0000 + split). */
enum { STREAM_PERM = 0x1a6e0000, STREAM_SHIFT_X, STREAM_SHIFT_Y, STREAM_FLIP };
/* Feistel rounds: 4 make a pseudo-random permutation in theory; 6 mix the tiny
 * domains of small datasets better, at no measurable cost. */
#define PERM_ROUNDS 6

static const char *const split_prefix[2] = {"train", "t10k"};

/* DIR/NAME, which must be an IDX file of ndim dimensions; *path keeps its name. */
static int load_idx(qs_idx *x, const char *dir, const char *name, int ndim, char *path, size_t cap) {
    int len = snprintf(path, cap, "%s/%s", dir, name);
    if (len < 0 || (size_t)len >= cap) return qs_error("'%s/%s': path too long", dir, name);
    if (qs_idx_read(x, path)) return -1;
    if (x->ndim != ndim) {
        int got = x->ndim;
        qs_idx_free(x);
        return qs_error("%s: %d dimensions, expected %d (%s)", path, got, ndim,
                        ndim == 3 ? "images x rows x columns" : "one label per image");
    }
    return 0;
}

/* Loads one split into d; the training split (s = 0) sets h and w. */
static int load_split(qs_image_dataset *d, const char *dir, int s) {
    char img_path[4096], lab_path[4096], name[64];
    qs_idx img, lab;
    snprintf(name, sizeof name, "%s-images-idx3-ubyte.gz", split_prefix[s]);
    if (load_idx(&img, dir, name, 3, img_path, sizeof img_path)) return -1;
    d->pixels[s] = img.data; /* owned by d from here: qs_image_dataset_free releases it */
    snprintf(name, sizeof name, "%s-labels-idx1-ubyte.gz", split_prefix[s]);
    if (load_idx(&lab, dir, name, 1, lab_path, sizeof lab_path)) return -1;
    d->labels[s] = lab.data;
    if (lab.dims[0] != img.dims[0])
        return qs_error("%s: %lld labels for the %lld images of %s", lab_path, (long long)lab.dims[0],
                        (long long)img.dims[0], img_path);
    if (s == 0) {
        d->h = (int)img.dims[1]; /* dims are <= INT32_MAX */
        d->w = (int)img.dims[2];
    } else if (img.dims[1] != d->h || img.dims[2] != d->w) {
        return qs_error("%s: images are %lld x %lld, the training images %d x %d", img_path,
                        (long long)img.dims[1], (long long)img.dims[2], d->h, d->w);
    }
    d->n[s] = (int)img.dims[0];
    for (size_t i = 0; i < lab.n; i++)
        if (lab.data[i] >= d->n_classes) d->n_classes = lab.data[i] + 1;
    return 0;
}

/* Mean and standard deviation of the training pixels scaled to [0, 1], from a histogram
 * (exact counts, so the result does not depend on summation order). */
static int pixel_stats(qs_image_dataset *d, const char *dir) {
    uint64_t hist[256] = {0};
    size_t total = (size_t)d->n[0] * (size_t)d->h * (size_t)d->w;
    for (size_t i = 0; i < total; i++) hist[d->pixels[0][i]]++;
    int levels = 0;
    double mean = 0, var = 0;
    for (int v = 0; v < 256; v++) {
        levels += hist[v] > 0;
        mean += (double)hist[v] * (v / 255.0);
    }
    if (levels < 2)
        return qs_error("%s/train-images-idx3-ubyte.gz: every pixel has the same value: nothing to normalise by", dir);
    mean /= (double)total;
    for (int v = 0; v < 256; v++) var += (double)hist[v] * (v / 255.0 - mean) * (v / 255.0 - mean);
    d->mean = (float)mean;
    d->std = (float)sqrt(var / (double)total);
    return 0;
}

int qs_image_dataset_load(qs_image_dataset *d, const char *dir) {
    memset(d, 0, sizeof *d);
    if (load_split(d, dir, 0) || load_split(d, dir, 1) || pixel_stats(d, dir)) {
        qs_image_dataset_free(d);
        return -1;
    }
    return 0;
}

void qs_image_dataset_free(qs_image_dataset *d) {
    for (int s = 0; s < 2; s++) {
        free(d->pixels[s]);
        free(d->labels[s]);
    }
    memset(d, 0, sizeof *d);
}

/* Position i of epoch `epoch`'s permutation of [0, n): a Feistel network over the
 * smallest 2^(2 half) >= n, keyed by (seed, epoch), walked until it lands below n (a
 * permutation of the larger domain restricted by cycle-walking stays a bijection).
 * The domain is under 4n, so a walk takes under 4 steps on average. */
static uint64_t perm_index(uint64_t seed, uint64_t epoch, uint64_t i, uint64_t n) {
    int half = 0;
    while (((uint64_t)1 << (2 * half)) < n) half++;
    const uint64_t mask = ((uint64_t)1 << half) - 1;
    const uint64_t key = qs_rng_u64(seed, STREAM_PERM, epoch);
    do {
        uint64_t l = i >> half, r = i & mask;
        for (int round = 0; round < PERM_ROUNDS; round++) {
            uint64_t t = l ^ (qs_rng_u64(key, (uint64_t)round, r) & mask);
            l = r;
            r = t;
        }
        i = l << half | r;
    } while (i >= n);
    return i;
}

void qs_image_batch(const qs_image_dataset *d, qs_image_split split, const qs_augment *aug, uint64_t seed,
                    uint64_t first, int B, float *x, int *y) {
    const bool train = split == QS_IMG_TRAIN;
    const uint64_t n = (uint64_t)d->n[split];
    const int S = aug->size, h = d->h, w = d->w;
    const int top = (S - h) / 2, left = (S - w) / 2;
    const size_t plane = (size_t)S * (size_t)S, image = (size_t)h * (size_t)w;
    float lut[256];
    for (int p = 0; p < 256; p++) lut[p] = ((float)p / 255.0f - d->mean) / d->std;
    for (int b = 0; b < B; b++) {
        const uint64_t i = first + (uint64_t)b;
        const uint64_t k = train ? perm_index(seed, i / n, i % n, n) : i % n;
        int dx = 0, dy = 0;
        bool flip = false;
        if (train && aug->max_shift > 0) {
            const uint64_t span = 2 * (uint64_t)aug->max_shift + 1;
            dx = (int)qs_rng_below(seed, STREAM_SHIFT_X, i, span) - aug->max_shift;
            dy = (int)qs_rng_below(seed, STREAM_SHIFT_Y, i, span) - aug->max_shift;
        }
        if (train && aug->flip) flip = qs_rng_u64(seed, STREAM_FLIP, i) >> 63;
        const uint8_t *src = d->pixels[split] + k * image;
        float *dst = x + (size_t)b * plane;
        y[b] = d->labels[split][k];
        /* Output (r, c) reads source (r - top - dy, c - left - dx), mirrored first when
         * flipped; anything outside the source is padding. */
        for (int r = 0; r < S; r++) {
            const int sr = r - top - dy;
            for (int c = 0; c < S; c++) {
                int sc = c - left - dx;
                if (flip) sc = w - 1 - sc;
                dst[(size_t)r * S + c] = sr >= 0 && sr < h && sc >= 0 && sc < w ? lut[src[(size_t)sr * w + sc]] : lut[0];
            }
        }
    }
}

/* A host emulation of the CUDA that kernels/attention_block.cu uses, so its kernels run
 * (slowly) in `make test` on machines without a GPU. It stands in for kernels/cuda_ops.h,
 * the backend's boundary with the CUDA runtime: include it, then the .cu file (whose
 * common.cuh then finds cuda_ops.h's guard already defined).
 *
 * Each thread of a block is a coroutine (ucontext) with its own stack. A block's threads
 * run one at a time, each until its next synchronisation point (__syncthreads,
 * __syncwarp, a warp shuffle), in a seeded random order; a warp's shuffle completes when
 * all 32 lanes reach it, a barrier when every live thread of the block does. So a warp
 * can run ahead of the others up to the next barrier, and a missing barrier between
 * warps shows as a wrong result; a shuffle with a lane that has exited, a thread waiting
 * at a barrier the others never reach, and dynamic shared memory over the launch limit
 * (48 KiB without cudaFuncSetAttribute, 227 KiB with) abort with a message. Blocks run one
 * after another, so one static arena is every block's shared memory.
 *
 * What it does not model: the memory model beyond barriers, the device's rounding (expf
 * is the host's), timing. It checks a kernel's logic; `make test-gpu` checks the kernel. */
#ifndef QUASAR_TESTS_CUDA_EMU_H
#define QUASAR_TESTS_CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <map>
#include <vector>

extern "C" {
#include "quasar/ops.h"
#include "quasar/rng.h"
}

#define QUASAR_CUDA_OPS_H /* this file is cuda_ops.h for the emulated kernels */

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(n)
#define __shared__

/* ---- the launch geometry ---- */

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
static dim3 gridDim, blockDim, blockIdx, threadIdx;

enum {
    EMU_STACK = 256 << 10,           /* bytes per thread (sanitizers enlarge frames) */
    EMU_SMEM_DEFAULT = 48 << 10,     /* dynamic shared memory without opting in */
    EMU_SMEM_MAX = 227 << 10,        /* an H100's opt-in limit per block */
};
float smem[EMU_SMEM_MAX / sizeof(float)]; /* `extern __shared__ float smem[]` of every block */

static inline int min(int a, int b) { return a < b ? a : b; }

/* ---- errors: cuda_ops.h's, fatal ---- */

typedef enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef enum { cudaFuncAttributeMaxDynamicSharedMemorySize } cudaFuncAttribute;

[[noreturn]] static void emu_fail(const char *what) {
    fprintf(stderr, "cuda_emu: %s\n", what);
    abort();
}

static void qs_cuda_check(cudaError_t err, const char *call, const char *file, int line) {
    if (err == cudaSuccess) return;
    fprintf(stderr, "cuda_emu: %s failed (%s:%d)\n", call, file, line);
    abort();
}
#define QS_CUDA(call) qs_cuda_check((call), #call, __FILE__, __LINE__)

static std::map<const void *, int> emu_smem_allowed; /* cudaFuncSetAttribute's opt-ins */

template <class K> static cudaError_t cudaFuncSetAttribute(K *kernel, cudaFuncAttribute, int bytes) {
    if (bytes > EMU_SMEM_MAX) return cudaErrorInvalidValue;
    emu_smem_allowed[(const void *)kernel] = bytes;
    return cudaSuccess;
}

/* ---- the scheduler ---- */

typedef enum { EMU_RUNNING, EMU_AT_BARRIER, EMU_AT_WARP, EMU_EXITED } emu_state;

struct emu_thread {
    ucontext_t ctx;
    emu_state state;
    std::vector<char> stack;
};

static struct {
    std::vector<emu_thread> th;
    ucontext_t sched;
    int cur;
    std::function<void()> body;
    uint64_t seed, draws; /* the scheduling order */
    /* a warp's shuffle values [warp][lane], in two buffers used in turn: a lane writes
     * shuffle k + 1's only after every lane has passed shuffle k, so after every lane
     * has read shuffle k - 1's */
    uint64_t xchg[2][32][32];
    unsigned shuffles[1024]; /* per thread: its shuffles so far in this block */
} emu;

static void emu_set_seed(uint64_t seed) { emu.seed = seed, emu.draws = 0; }

static void emu_yield(emu_state s) {
    emu.th[emu.cur].state = s;
    swapcontext(&emu.th[emu.cur].ctx, &emu.sched);
}

static void emu_entry(void) {
    emu.body();
    emu.th[emu.cur].state = EMU_EXITED; /* uc_link returns to the scheduler */
}

static void emu_resume(int t) {
    emu.cur = t;
    threadIdx = dim3((unsigned)t, 0, 0);
    swapcontext(&emu.sched, &emu.th[t].ctx);
}

/* Runs one block of n threads to the end. */
static void emu_run_block(int n) {
    if (n % 32 || n > 1024) emu_fail("blocks must be whole warps, at most 1024 threads");
    if ((int)emu.th.size() < n) emu.th.resize((size_t)n);
    for (int t = 0; t < n; t++) {
        emu_thread *e = &emu.th[(size_t)t];
        e->stack.resize(EMU_STACK);
        getcontext(&e->ctx);
        e->ctx.uc_stack.ss_sp = e->stack.data();
        e->ctx.uc_stack.ss_size = EMU_STACK;
        e->ctx.uc_link = &emu.sched;
        makecontext(&e->ctx, emu_entry, 0);
        e->state = EMU_RUNNING;
        emu.shuffles[t] = 0;
    }
    std::vector<int> order((size_t)n);
    for (;;) {
        /* every running thread, in a random order, to its next synchronisation point */
        int m = 0;
        for (int t = 0; t < n; t++)
            if (emu.th[(size_t)t].state == EMU_RUNNING) order[(size_t)m++] = t;
        for (int i = m - 1; i > 0; i--) {
            const int j = (int)qs_rng_below(emu.seed, 0xe3u, emu.draws++, (uint64_t)i + 1), x = order[(size_t)i];
            order[(size_t)i] = order[(size_t)j], order[(size_t)j] = x;
        }
        for (int i = 0; i < m; i++) emu_resume(order[(size_t)i]);
        /* release the warps whose 32 lanes all wait at a shuffle or __syncwarp */
        bool released = false;
        int live = 0, at_barrier = 0;
        for (int w = 0; w < n / 32; w++) {
            int at_warp = 0, exited = 0;
            for (int l = 0; l < 32; l++) {
                const emu_state s = emu.th[(size_t)(w * 32 + l)].state;
                at_warp += s == EMU_AT_WARP;
                exited += s == EMU_EXITED;
            }
            if (at_warp && exited) emu_fail("a warp synchronises with lanes that have exited");
            if (at_warp == 32) {
                for (int l = 0; l < 32; l++) emu.th[(size_t)(w * 32 + l)].state = EMU_RUNNING;
                released = true;
            }
        }
        if (released) continue;
        for (int t = 0; t < n; t++) {
            live += emu.th[(size_t)t].state != EMU_EXITED;
            at_barrier += emu.th[(size_t)t].state == EMU_AT_BARRIER;
        }
        if (!live) return;
        if (at_barrier != live) emu_fail("deadlock: threads wait at a warp sync while others wait at __syncthreads");
        for (int t = 0; t < n; t++)
            if (emu.th[(size_t)t].state == EMU_AT_BARRIER) emu.th[(size_t)t].state = EMU_RUNNING;
    }
}

template <class... P, class... A> static void emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes,
                                                         A... a) {
    if (block.y != 1 || block.z != 1) emu_fail("only 1-D blocks are emulated");
    const auto it = emu_smem_allowed.find((const void *)kernel);
    const size_t limit = it != emu_smem_allowed.end() && it->second > EMU_SMEM_DEFAULT ? (size_t)it->second
                                                                                        : (size_t)EMU_SMEM_DEFAULT;
    if (smem_bytes > limit) emu_fail("dynamic shared memory over the launch limit");
    gridDim = grid, blockDim = block;
    emu.body = [&] { kernel(a...); };
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                /* each block's shared memory starts as NaN: a read before a write shows */
                for (size_t i = 0; i < smem_bytes / sizeof *smem; i++) smem[i] = NAN;
                blockIdx = dim3(x, y, z);
                emu_run_block((int)block.x);
            }
}

/* ---- cuda_ops.h's launch helpers over the emulator ---- */

#define QS_THREADS 256
#define QS_WARPS (QS_THREADS / 32)
static inline unsigned qs_cuda_blocks(size_t n, unsigned threads) {
    const size_t b = (n + threads - 1) / threads;
    return b > 1048576 ? 1048576u : (unsigned)b;
}
#define QS_LAUNCH(kernel, grid, block, smem_bytes, ...)                            \
    do {                                                                           \
        const dim3 qs_grid_ = (grid);                                              \
        if (qs_grid_.x && qs_grid_.y && qs_grid_.z)                                \
            emu_launch(kernel, qs_grid_, dim3(block), (size_t)(smem_bytes), __VA_ARGS__); \
    } while (0)
#define QS_LAUNCH_N(kernel, n, ...) QS_LAUNCH(kernel, qs_cuda_blocks((n), QS_THREADS), QS_THREADS, 0, __VA_ARGS__)
#define QS_LAUNCH_ROWS(kernel, rows, ...) \
    QS_LAUNCH(kernel, ((rows) + QS_WARPS - 1) / QS_WARPS, QS_THREADS, 0, __VA_ARGS__)

/* common.cuh's templates name these; the attention kernels do not call them */
void *qs_cuda_scratch(size_t bytes);

/* ---- device intrinsics ---- */

static inline void __syncthreads(void) { emu_yield(EMU_AT_BARRIER); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu_fail("only whole-warp __syncwarp is emulated");
    emu_yield(EMU_AT_WARP);
}

/* Lane `src` of the warp's v, once all 32 lanes have offered theirs. */
template <class T> static T __shfl_sync(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values fit 8 bytes");
    if (mask != 0xffffffffu) emu_fail("only whole-warp shuffles are emulated");
    const int w = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32, buf = emu.shuffles[threadIdx.x]++ % 2;
    memcpy(&emu.xchg[buf][w][lane], &v, sizeof v);
    emu_yield(EMU_AT_WARP); /* every lane has written */
    T r;
    memcpy(&r, &emu.xchg[buf][w][src & 31], sizeof r);
    return r;
}
template <class T> static T __shfl_xor_sync(unsigned mask, T v, int x) {
    return __shfl_sync(mask, v, ((int)threadIdx.x % 32) ^ x);
}

#endif

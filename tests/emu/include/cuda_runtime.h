/* An emulated CUDA runtime: with tests/emu/include first on the include path, the CUDA
 * backend (the files of kernels/, compiled as C++ by the host compiler) runs on the CPU, so
 * tests/gpu/parity.c checks it in `make test` on machines without a GPU. It provides
 * the part of CUDA the kernels use: device memory (host memory, fresh allocations filled
 * with 0xff bytes, so an unwritten float reads as NaN), copies, the launch and the
 * dynamic shared memory hooks of kernels/cuda_ops.h, __syncthreads / __syncwarp / warp
 * shuffles and __match_any_sync, the bf16 tensor-core product and matrix loads that
 * kernels/mma.cuh wraps (mma.sync m16n8k16, ldmatrix: warp collectives like a shuffle),
 * 16-byte vector loads (uint4, alignment checked by UBSan),
 * the asynchronous copies of kernels/async_copy.cuh (cp.async: each lands at once or
 * only when its thread waits for its group, drawn at random, so a tile read too early
 * or overwritten too early shows),
 * cudaFuncSetAttribute's shared-memory opt-in, and the
 * events and device properties `quasar bench` reads (an event is the host clock).
 *
 * Each thread of a block is a coroutine (ucontext) with its own stack. A block's threads
 * run one at a time, each until its next synchronisation point, in a seeded random order
 * (QS_EMU_SEED, else the clock; printed on stderr at the first launch); a warp's shuffle
 * or __syncwarp completes when all 32 lanes reach it, a barrier when every live thread of
 * the block does. In each round of that, a warp may sit out (drawn from the same stream).
 * So a warp can run ahead of the others up to the next barrier, and a missing barrier
 * between warps shows as a wrong result. Shuffles with a lane that has
 * exited, threads waiting at different kinds of barrier, and dynamic shared memory over
 * the launch limit (48 KiB, or 227 KiB after cudaFuncSetAttribute) abort with a message.
 * Blocks run one after another, in order, so one arena is every block's dynamic shared
 * memory (refilled with NaN per block), and a `__shared__` array is a function-local
 * static, shared by the block's threads.
 *
 * What it does not model: the memory model beyond barriers, the device's float rounding
 * (expf is the host's), concurrency between blocks, timing. It checks the kernels' logic;
 * a GPU checks the kernels. */
#ifndef QUASAR_EMU_CUDA_RUNTIME_H
#define QUASAR_EMU_CUDA_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucontext.h>

#include <functional>
#include <map>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(n)
#define __shared__ static

/* ---- errors, streams, memory ---- */

[[noreturn]] static inline void emu_fail(const char *what) {
    fprintf(stderr, "cuda emulator: %s\n", what);
    abort();
}

typedef enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 } cudaError_t;
typedef enum { cudaFuncAttributeMaxDynamicSharedMemorySize } cudaFuncAttribute;
typedef enum {
    cudaMemcpyHostToHost,
    cudaMemcpyHostToDevice,
    cudaMemcpyDeviceToHost,
    cudaMemcpyDeviceToDevice,
    cudaMemcpyDefault
} cudaMemcpyKind;
typedef struct emu_stream *cudaStream_t;

static inline const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "out of memory";
}
static inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
static inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
static inline cudaError_t cudaGetDevice(int *d) {
    *d = 0;
    return cudaSuccess;
}
typedef enum { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 } cudaDeviceAttr;
/* an H100 SXM's: 132 multiprocessors, compute capability 9.x */
static inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int) {
    *v = a == cudaDevAttrMultiProcessorCount ? 132 : 9;
    return cudaSuccess;
}
/* The device's memory: QS_EMU_GPU_MIB (default 80 GiB), so a run too big for it fails
 * as it would on a GPU. The live blocks and their sizes are kept beside them, not in a
 * header, so that ASan still sees a read just before a block. */
inline std::map<const void *, size_t> emu_blocks;
inline size_t emu_live_bytes;
static inline size_t emu_total_bytes(void) {
    const char *s = getenv("QS_EMU_GPU_MIB");
    return (size_t)(s && *s ? strtoull(s, NULL, 10) : 81920ull) << 20;
}
static inline cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    *total_bytes = emu_total_bytes();
    *free_bytes = *total_bytes > emu_live_bytes ? *total_bytes - emu_live_bytes : 0;
    return cudaSuccess;
}
static inline cudaError_t cudaMalloc(void **p, size_t bytes) {
    size_t free_bytes, total_bytes;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    *p = NULL;
    if (bytes > free_bytes || !(*p = malloc(bytes ? bytes : 1))) return cudaErrorMemoryAllocation;
    memset(*p, 0xff, bytes); /* NaN floats, -1 ints: a read before any write shows */
    emu_blocks[*p] = bytes;
    emu_live_bytes += bytes;
    return cudaSuccess;
}
static inline cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    auto b = emu_blocks.find(p);
    if (b == emu_blocks.end()) emu_fail("cudaFree of a pointer cudaMalloc did not return");
    emu_live_bytes -= b->second;
    emu_blocks.erase(b);
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaMemset(void *p, int v, size_t bytes) {
    memset(p, v, bytes);
    return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void *p, int v, size_t bytes, cudaStream_t) { return cudaMemset(p, v, bytes); }
static inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind) {
    memmove(dst, src, bytes);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind k, cudaStream_t) {
    return cudaMemcpy(dst, src, bytes, k);
}

/* ---- timing and the device's properties ---- */

/* Kernels run to completion at launch, so an event is the host clock when recorded. */
typedef struct emu_event {
    double ms;
} *cudaEvent_t;
static inline cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = (cudaEvent_t)calloc(1, sizeof **e);
    return *e ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    free(e);
    return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->ms = 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
    return cudaSuccess;
}
static inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
static inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    *ms = (float)(end->ms - start->ms);
    return cudaSuccess;
}

/* the fields of CUDA's struct that the backend reads, with an H100 SXM's values */
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    int l2CacheSize, multiProcessorCount, major, minor;
};
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    *p = cudaDeviceProp{};
    snprintf(p->name, sizeof p->name, "emulated CUDA device");
    p->totalGlobalMem = emu_total_bytes();
    p->l2CacheSize = 50 << 20;
    p->multiProcessorCount = 132;
    p->major = 9;
    return cudaSuccess;
}

/* ---- the launch geometry ---- */

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 gridDim, blockDim, blockIdx, threadIdx;

enum {
    EMU_STACK = 256 << 10,       /* bytes per thread (sanitizers enlarge frames) */
    EMU_SMEM_DEFAULT = 48 << 10, /* dynamic shared memory without opting in */
    EMU_SMEM_MAX = 227 << 10,    /* an H100's opt-in limit per block */
};

static inline int min(int a, int b) { return a < b ? a : b; }

/* The vector type of 16-byte loads, aligned as CUDA's is: UBSan reports a load through a
 * misaligned pointer, where a GPU faults. */
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- the scheduler ---- */

typedef enum { EMU_RUNNING, EMU_AT_BARRIER, EMU_AT_WARP, EMU_EXITED } emu_state;

/* A cp.async copy a thread has issued and not yet waited for, in commit group `group`. */
struct emu_copy {
    void *dst;
    const void *src;
    int bytes;
    bool full;
    unsigned group;
};

struct emu_thread {
    ucontext_t ctx;
    emu_state state;
    unsigned shuffles; /* shuffles so far in this block: picks the exchange buffer */
    std::vector<emu_copy> copies;
    unsigned groups; /* commit groups closed so far: the open one's number */
    std::vector<char> stack;
};

struct emu_scheduler {
    std::vector<emu_thread> th;
    ucontext_t sched;
    int cur = 0;
    std::function<void()> body;
    uint64_t seed = 0, draws = 0; /* the scheduling order */
    bool seeded = false;
    /* a warp's shuffle values [warp][lane], in two buffers used in turn: a lane writes
     * shuffle k + 1's only after every lane has passed shuffle k, so after every lane has
     * read shuffle k - 1's */
    uint64_t xchg[2][32][32];
    std::vector<float> smem = std::vector<float>(EMU_SMEM_MAX / sizeof(float));
    std::map<const void *, int> smem_allowed; /* cudaFuncSetAttribute's opt-ins */
};
inline emu_scheduler emu;

/* A random index below n from the scheduling stream (splitmix64 of seed + draw). */
static inline unsigned emu_below(unsigned n) {
    uint64_t z = emu.seed + 0x9e3779b97f4a7c15ull * ++emu.draws;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (unsigned)((z ^ (z >> 31)) % n);
}

static inline void emu_yield(emu_state s) {
    emu.th[(size_t)emu.cur].state = s;
    swapcontext(&emu.th[(size_t)emu.cur].ctx, &emu.sched);
}

static inline void emu_entry(void) {
    emu.body();
    emu.th[(size_t)emu.cur].state = EMU_EXITED; /* uc_link returns to the scheduler */
}

static inline void emu_resume(int t) {
    emu.cur = t;
    const unsigned bx = blockDim.x, by = blockDim.y;
    threadIdx = dim3((unsigned)t % bx, (unsigned)t / bx % by, (unsigned)t / (bx * by));
    swapcontext(&emu.sched, &emu.th[(size_t)t].ctx);
}

/* Runs one block of n threads (linear ids; warps are 32 consecutive ids) to the end. */
static inline void emu_run_block(int n) {
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
        e->shuffles = 0;
        e->copies.clear(); /* a copy never waited for was never read */
        e->groups = 0;
    }
    std::vector<int> order((size_t)n);
    std::vector<bool> sits((size_t)n / 32);
    for (;;) {
        /* every running thread, in a random order, to its next synchronisation point; each
         * warp sits a round out with probability 1/4 (unless all would), so warps drift
         * apart between barriers */
        int m = 0;
        for (int w = 0; w < n / 32; w++) sits[(size_t)w] = emu_below(4) == 0;
        for (int t = 0; t < n; t++)
            if (emu.th[(size_t)t].state == EMU_RUNNING && !sits[(size_t)t / 32]) order[(size_t)m++] = t;
        if (!m)
            for (int t = 0; t < n; t++)
                if (emu.th[(size_t)t].state == EMU_RUNNING) order[(size_t)m++] = t;
        for (int i = m - 1; i > 0; i--) {
            const int j = (int)emu_below((unsigned)i + 1), x = order[(size_t)i];
            order[(size_t)i] = order[(size_t)j], order[(size_t)j] = x;
        }
        for (int i = 0; i < m; i++) emu_resume(order[(size_t)i]);
        /* release the warps whose 32 lanes all wait at a shuffle or __syncwarp */
        bool released = false;
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
        int live = 0, at_barrier = 0, running = 0;
        for (int t = 0; t < n; t++) {
            live += emu.th[(size_t)t].state != EMU_EXITED;
            at_barrier += emu.th[(size_t)t].state == EMU_AT_BARRIER;
            running += emu.th[(size_t)t].state == EMU_RUNNING;
        }
        if (released || running) continue; /* running: warps that sat this round out */
        if (!live) return;
        if (at_barrier != live) emu_fail("deadlock: some threads wait at a warp sync, others at __syncthreads");
        for (int t = 0; t < n; t++)
            if (emu.th[(size_t)t].state == EMU_AT_BARRIER) emu.th[(size_t)t].state = EMU_RUNNING;
    }
}

template <class K> static inline cudaError_t cudaFuncSetAttribute(K *kernel, cudaFuncAttribute, int bytes) {
    if (bytes > EMU_SMEM_MAX) return cudaErrorInvalidValue;
    emu.smem_allowed[(const void *)kernel] = bytes;
    return cudaSuccess;
}

template <class... P, class... A>
static inline void emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A... a) {
    if (!emu.seeded) {
        const char *env = getenv("QS_EMU_SEED");
        emu.seed = env && *env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL);
        emu.seeded = true;
        fprintf(stderr, "# cuda emulator: thread order seed %llu (QS_EMU_SEED=%llu reproduces)\n",
                (unsigned long long)emu.seed, (unsigned long long)emu.seed);
    }
    const auto it = emu.smem_allowed.find((const void *)kernel);
    const size_t limit = it != emu.smem_allowed.end() && it->second > EMU_SMEM_DEFAULT ? (size_t)it->second
                                                                                        : (size_t)EMU_SMEM_DEFAULT;
    if (smem_bytes > limit) emu_fail("dynamic shared memory over the launch limit");
    gridDim = grid, blockDim = block;
    emu.body = [&] { kernel(a...); };
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                for (size_t i = 0; i < smem_bytes / sizeof(float); i++) emu.smem[i] = NAN;
                blockIdx = dim3(x, y, z);
                emu_run_block((int)(block.x * block.y * block.z));
            }
}

/* kernels/cuda_ops.h's hooks */
#define QS_LAUNCH_KERNEL(kernel, grid, block, smem, ...) \
    emu_launch(kernel, dim3(grid), dim3(block), (size_t)(smem), __VA_ARGS__)
#define QS_DYNAMIC_SMEM(type, name) type *name = (type *)emu.smem.data()

/* ---- device intrinsics ---- */

static inline unsigned emu_linear_tid(void) {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

static inline void __syncthreads(void) { emu_yield(EMU_AT_BARRIER); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu_fail("only whole-warp __syncwarp is emulated");
    emu_yield(EMU_AT_WARP);
}

/* Lane `src` of the warp's v, once all 32 lanes have offered theirs. */
template <class T> static inline T __shfl_sync(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values fit 8 bytes");
    if (mask != 0xffffffffu) emu_fail("only whole-warp shuffles are emulated");
    const unsigned tid = emu_linear_tid(), w = tid / 32, lane = tid % 32;
    const unsigned buf = emu.th[tid].shuffles++ % 2;
    memcpy(&emu.xchg[buf][w][lane], &v, sizeof v);
    emu_yield(EMU_AT_WARP); /* every lane has written */
    T r;
    memcpy(&r, &emu.xchg[buf][w][src & 31], sizeof r);
    return r;
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int x) {
    return __shfl_sync(mask, v, (int)(emu_linear_tid() % 32) ^ x);
}
/* The lanes whose v equals this lane's, once all 32 lanes have offered theirs. */
static inline unsigned __match_any_sync(unsigned mask, int v) {
    unsigned peers = 0;
    for (int l = 0; l < 32; l++) peers |= (unsigned)(__shfl_sync(mask, v, l) == v) << l;
    return peers;
}
/* ---- bf16 tensor-core products (kernels/mma.cuh's hooks) ----
 * A float rounded to bf16 (to nearest, ties to even; NaN stays NaN), two to a word, the
 * first in the low half, as __floats2bfloat162_rn packs them. */
static inline uint32_t emu_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u; /* a quiet NaN */
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
static inline float emu_bf16_value(uint32_t h) {
    const uint32_t u = (h & 0xffffu) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#define QS_EMU_MMA 1
static inline uint32_t qs_bf16x2(float lo, float hi) { return emu_bf16_bits(lo) | emu_bf16_bits(hi) << 16; }

/* mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, d += A B, as PTX's ISA lays the
 * fragments out over the warp (groupID g = lane / 4, t = lane % 4): A (16 x 16) a[0] holds
 * row g, columns 2t and 2t + 1 (low half first), a[1] row g + 8, a[2] row g columns
 * 2t + 8 and 2t + 9, a[3] row g + 8 of those; B (16 x 8) b[0] rows 2t and 2t + 1 of
 * column g, b[1] rows 2t + 8 and 2t + 9; D (16 x 8) d[0], d[1] row g, columns 2t and
 * 2t + 1, d[2], d[3] row g + 8. A collective: each lane offers its fragments and waits
 * for the warp's 32 (as a shuffle does), then sums its four outputs over k in order in
 * fp32 (the products of two bf16 are exact in fp32). */
inline uint32_t emu_mma_xchg[2][32][32][6];
static inline float emu_mma_a(unsigned buf, unsigned w, int row, int col) {
    const int lane = (row % 8) * 4 + (col % 8) / 2, reg = (row >= 8) + 2 * (col >= 8);
    return emu_bf16_value(emu_mma_xchg[buf][w][lane][reg] >> (16 * (col % 2)));
}
static inline float emu_mma_b(unsigned buf, unsigned w, int row, int col) {
    const int lane = col * 4 + (row % 8) / 2, reg = row >= 8;
    return emu_bf16_value(emu_mma_xchg[buf][w][lane][4 + reg] >> (16 * (row % 2)));
}
static inline void qs_mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    const unsigned tid = emu_linear_tid(), w = tid / 32, lane = tid % 32;
    const unsigned buf = emu.th[tid].shuffles++ % 2; /* shuffles' double buffering, same counter */
    memcpy(emu_mma_xchg[buf][w][lane], a, 4 * sizeof *a);
    memcpy(emu_mma_xchg[buf][w][lane] + 4, b, 2 * sizeof *b);
    emu_yield(EMU_AT_WARP);
    const int g = (int)lane / 4, t = (int)lane % 4;
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float s = d[i];
        for (int k = 0; k < 16; k++) s += emu_mma_a(buf, w, row, k) * emu_mma_b(buf, w, k, col);
        d[i] = s;
    }
}

/* ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8 x 8 matrices of 16-bit
 * elements, lanes 8i .. 8i + 7 giving the addresses of matrix i's rows (16 bytes each,
 * which must be 16-byte aligned and in shared memory); r[i] gets row lane / 4, elements
 * 2 (lane % 4) and the next, of matrix i, or of its transpose with trans (the first in the
 * low half). A collective like the product above. */
inline const uint16_t *emu_ldm_xchg[2][32][32];
/* Whether [p, p + bytes) lies in the block's shared memory. */
static inline bool emu_in_smem(const void *p, size_t bytes) {
    const char *smem = (const char *)emu.smem.data();
    return (const char *)p >= smem && (const char *)p + bytes <= smem + emu.smem.size() * sizeof(float);
}
static inline void emu_ldmatrix_x4(uint32_t r[4], const void *row, bool trans) {
    const unsigned tid = emu_linear_tid(), w = tid / 32, lane = tid % 32;
    if ((uintptr_t)row % 16 || !emu_in_smem(row, 16))
        emu_fail("ldmatrix: a row address not 16-byte aligned in shared memory");
    const unsigned buf = emu.th[tid].shuffles++ % 2;
    emu_ldm_xchg[buf][w][lane] = (const uint16_t *)row;
    emu_yield(EMU_AT_WARP);
    const int g = (int)lane / 4, t = (int)lane % 4;
    for (int i = 0; i < 4; i++) {
        const uint16_t *const *rows = emu_ldm_xchg[buf][w] + 8 * i;
        const uint16_t lo = trans ? rows[2 * t][g] : rows[g][2 * t];
        const uint16_t hi = trans ? rows[2 * t + 1][g] : rows[g][2 * t + 1];
        r[i] = lo | (uint32_t)hi << 16;
    }
}
static inline void qs_ldmatrix_x4(uint32_t r[4], const uint32_t *row) { emu_ldmatrix_x4(r, row, false); }
static inline void qs_ldmatrix_x4_trans(uint32_t r[4], const uint32_t *row) { emu_ldmatrix_x4(r, row, true); }

/* ---- asynchronous copies (kernels/async_copy.cuh's hooks) ---- */
#define QS_EMU_ASYNC_COPY 1
/* A copy lands at once or when its thread waits for it, as the scheduling stream draws:
 * one that lands late shows a read before the wait (and the barrier after it), one that
 * lands early a copy issued into a tile that other warps still read. */
static inline void emu_copy_land(const emu_copy &c) {
    if (c.full) memcpy(c.dst, c.src, (size_t)c.bytes);
    else memset(c.dst, 0, (size_t)c.bytes);
}
template <int BYTES> static inline void qs_cp_async(void *dst, const void *src, bool full) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    if ((uintptr_t)dst % BYTES || (uintptr_t)src % BYTES || !emu_in_smem(dst, BYTES))
        emu_fail("cp.async: a destination outside shared memory, or an address not aligned to the copy");
    emu_thread *e = &emu.th[emu_linear_tid()];
    const emu_copy c{dst, src, BYTES, full, e->groups};
    if (emu_below(2)) emu_copy_land(c);
    else e->copies.push_back(c);
}
static inline void qs_cp_async_commit(void) { emu.th[emu_linear_tid()].groups++; }
template <int N> static inline void qs_cp_async_wait(void) {
    emu_thread *e = &emu.th[emu_linear_tid()];
    size_t kept = 0;
    for (const emu_copy &c : e->copies)
        if (c.group + N < e->groups) emu_copy_land(c); /* committed, and not among the newest N groups */
        else e->copies[kept++] = c;
    e->copies.resize(kept);
}

static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }

#endif

/* The CUDA runtime calls the NCCL backend (csrc/comm_nccl.c, C) makes, for the emulated
 * build (see cuda_runtime.h here, the kernels' C++ side of the same emulation). Work
 * runs to completion when it is queued, so streams and events only have to exist: they
 * are allocations (ASan reports one never destroyed) checked on every use. One device. */
#ifndef QUASAR_EMU_CUDA_RUNTIME_API_H
#define QUASAR_EMU_CUDA_RUNTIME_API_H

#ifdef __cplusplus
#error "tests/emu/include/cuda_runtime_api.h is the C side; C++ files include cuda_runtime.h"
#endif

#include <stdlib.h>

typedef enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
               cudaErrorInvalidDevice = 101, cudaErrorInvalidResourceHandle = 400 } cudaError_t;
typedef struct emu_stream *cudaStream_t;
typedef struct emu_api_event *cudaEvent_t;
struct emu_stream { int magic; };
struct emu_api_event { int magic; };
enum { cudaStreamNonBlocking = 1, cudaEventDisableTiming = 2 };
#define EMU_STREAM_MAGIC 0x57ea
#define EMU_EVENT_MAGIC 0xe7e7
/* the legacy default stream: a handle no allocation returns */
static struct emu_stream emu_legacy_stream = {EMU_STREAM_MAGIC};
#define cudaStreamLegacy (&emu_legacy_stream)

static inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    }
    return "unknown error";
}
static inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
static inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    (void)flags;
    if (!(*s = malloc(sizeof **s))) return cudaErrorMemoryAllocation;
    (*s)->magic = EMU_STREAM_MAGIC;
    return cudaSuccess;
}
static inline cudaError_t emu_stream_check(cudaStream_t s) {
    return s && s->magic == EMU_STREAM_MAGIC ? cudaSuccess : cudaErrorInvalidResourceHandle;
}
static inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (emu_stream_check(s) || s == cudaStreamLegacy) return cudaErrorInvalidResourceHandle;
    s->magic = 0;
    free(s);
    return cudaSuccess;
}
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { return emu_stream_check(s); }

static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
    (void)flags;
    if (!(*e = malloc(sizeof **e))) return cudaErrorMemoryAllocation;
    (*e)->magic = EMU_EVENT_MAGIC;
    return cudaSuccess;
}
static inline cudaError_t emu_event_check(cudaEvent_t e) {
    return e && e->magic == EMU_EVENT_MAGIC ? cudaSuccess : cudaErrorInvalidResourceHandle;
}
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    if (emu_event_check(e)) return cudaErrorInvalidResourceHandle;
    e->magic = 0;
    free(e);
    return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    return emu_event_check(e) ? cudaErrorInvalidResourceHandle : emu_stream_check(s);
}
static inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { return emu_event_check(e); }
static inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
    (void)flags;
    return emu_stream_check(s) ? cudaErrorInvalidResourceHandle : emu_event_check(e);
}

#endif

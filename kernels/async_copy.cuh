/* Asynchronous copies from global to shared memory (cp.async, sm_80 and later): a
 * thread issues copies that land while it computes, closes them into a group, and later
 * waits for all but its newest n groups. A copy is the thread's own: others see it only
 * after the thread has waited for it and the block has met at a barrier. So a tile for
 * the next step is loaded during this step's products without registers to hold it.
 * The emulated runtime (tests/emu/include/cuda_runtime.h) defines these functions
 * itself and lands each copy either at once or only at its wait, drawn at random, so a
 * tile read before its wait and barrier, or overwritten while other warps still read it,
 * gives wrong results there too. */
#ifndef QUASAR_KERNELS_ASYNC_COPY_CUH
#define QUASAR_KERNELS_ASYNC_COPY_CUH

#include "cuda_ops.h"

#ifndef QS_EMU_ASYNC_COPY
/* BYTES (4, 8 or 16; dst and src aligned to it) from global src to shared dst, or zeros
 * when !full (src is then not read, but must be an address of the tensor). 16-byte copies
 * bypass L1 (.cg): tiles are read once per block and live in L2. */
template <int BYTES> __device__ static inline void qs_cp_async(void *dst, const void *src, bool full) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst), n = full ? BYTES : 0;
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES), "r"(n));
}

/* Closes the copies issued since the last commit into a group. */
__device__ static inline void qs_cp_async_commit(void) { asm volatile("cp.async.commit_group;\n" ::); }

/* Waits until at most the newest N committed groups of this thread are still in flight. */
template <int N> __device__ static inline void qs_cp_async_wait(void) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

#endif

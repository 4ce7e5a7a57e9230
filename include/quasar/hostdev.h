/* QS_HD marks the inline rules that every backend must follow exactly (counter RNG,
 * routing ties): host functions in C, __host__ __device__ ones in CUDA kernels. */
#ifndef QUASAR_HOSTDEV_H
#define QUASAR_HOSTDEV_H

#ifdef __CUDACC__
#define QS_HD __host__ __device__
#else
#define QS_HD
#endif

#endif

/* An emulated cub::DeviceRadixSort::SortPairs for the CUDA backend on the CPU (see
 * cuda_runtime.h two levels up): a stable sort of (key, value) pairs by key, which is
 * what a radix sort gives; the temporary-storage query answers one byte. */
#ifndef QUASAR_EMU_CUB_DEVICE_RADIX_SORT_CUH
#define QUASAR_EMU_CUB_DEVICE_RADIX_SORT_CUH

#include <algorithm>
#include <numeric>
#include <vector>

#include "../../cuda_runtime.h"

namespace cub {
struct DeviceRadixSort {
    template <class K, class V>
    static cudaError_t SortPairs(void *temp, size_t &temp_bytes, const K *keys_in, K *keys_out, const V *vals_in,
                                 V *vals_out, int n, int begin_bit = 0, int end_bit = (int)sizeof(K) * 8,
                                 cudaStream_t stream = 0) {
        (void)begin_bit, (void)end_bit, (void)stream;
        if (!temp) {
            temp_bytes = 1;
            return cudaSuccess;
        }
        std::vector<int> order((size_t)n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return keys_in[a] < keys_in[b]; });
        std::vector<K> k((size_t)n);
        std::vector<V> v((size_t)n);
        for (int i = 0; i < n; i++) k[(size_t)i] = keys_in[order[(size_t)i]], v[(size_t)i] = vals_in[order[(size_t)i]];
        std::copy(k.begin(), k.end(), keys_out);
        std::copy(v.begin(), v.end(), vals_out);
        return cudaSuccess;
    }
};
} // namespace cub

#endif

/* What the attention kernels share (attention_block.cu, fp32 on the CUDA cores, and
 * attention_block_bf16.cu, bf16 on the tensor cores): where a head's rows lie in the
 * block's tensors, the softmax scale, and the choice of a kernel instance by head size. */
#ifndef QUASAR_KERNELS_ATTENTION_BLOCK_CUH
#define QUASAR_KERNELS_ATTENTION_BLOCK_CUH

#include "common.cuh"

enum { FA_MAX_HEAD = 256 }; /* the widest head a kernel takes (the backend's max_head_size) */

/* The first query row that sees key row j; all later rows see it too. */
__device__ static inline int first_query(const qs_attn_block &k, int j) {
    if (!k.causal) return 0;
    const long long i = (long long)k.k_pos0 + j - k.q_pos0;
    return i < 0 ? 0 : i > k.Tq ? k.Tq : (int)i;
}

static float scale_of(const qs_attn_block *k) { return 1.0f / sqrtf((float)(k->C / k->NH)); }

/* Where query head h of sequence b starts in each tensor, in floats: q and dq; kv and
 * dkv at its kv head h / (NH / NKV) (v floats further for v); out and dout; lse and
 * delta. */
struct fa_head {
    size_t q, kv, o, s;
    int hs, v;
};

__device__ static inline fa_head head_of(const qs_attn_block &k, int b, int h) {
    const int hs = k.C / k.NH, g = h / (k.NH / k.NKV);
    return fa_head{(size_t)b * k.q_len * k.q_stride + (size_t)h * hs, (size_t)b * k.kv_len * k.kv_stride + (size_t)g * hs,
                   (size_t)b * k.q_len * k.C + (size_t)h * hs, ((size_t)b * k.NH + h) * k.q_len, hs,
                   qs_attn_kv_width(&k)};
}

/* The forward's and dq's grid: blockIdx.x is (sequence, query head). */
__device__ static inline fa_head head_at(const qs_attn_block &k) {
    return head_of(k, blockIdx.x / k.NH, blockIdx.x % k.NH);
}

/* Dynamic shared memory beyond the default 48 KiB needs the kernel's consent: asked once
 * per kernel instance (each launches with one size), not at every launch. */
template <auto Kernel> static void allow_smem(size_t bytes) {
    static const bool asked =
        bytes <= 48 * 1024 ||
        (QS_CUDA(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes)), true);
    (void)asked;
}

/* The smallest tile width (32, 64, 128, 256) that holds a head of hs columns. */
static inline int fa_tile_width(int hs) { return hs <= 32 ? 32 : hs <= 64 ? 64 : hs <= 128 ? 128 : 256; }

/* F::run<D>(args) for D = fa_tile_width(head size). */
template <class F, class... A> static void at_head_size(const qs_attn_block *k, A... a) {
    const int hs = k->C / k->NH;
    if (hs > FA_MAX_HEAD) /* the model refuses such heads on this backend (max_head_size) */
        qs_cuda_check(cudaErrorInvalidValue, "attention: a head size over 256", __FILE__, __LINE__);
    switch (fa_tile_width(hs)) {
    case 32: F::template run<32>(a...); break;
    case 64: F::template run<64>(a...); break;
    case 128: F::template run<128>(a...); break;
    default: F::template run<256>(a...);
    }
}

#endif

/* One warp's bf16 tensor-core product, mma.sync m16n8k16 with fp32 accumulation (sm_80
 * and later), the packing of its operands, and their loads from shared memory. The
 * fragments are PTX's (ISA, "Matrix Fragments for mma.m16n8k16"), with groupID
 * g = lane / 4 and t = lane % 4:
 *   A 16 x 16, four words of two bf16 (low half the lower column):
 *     a[0] row g, columns 2t, 2t+1;  a[1] row g+8, the same columns;
 *     a[2] row g, columns 2t+8, 2t+9; a[3] row g+8, those columns;
 *   B 16 x 8, two words: b[0] rows 2t, 2t+1 of column g; b[1] rows 2t+8, 2t+9;
 *   D 16 x 8 fp32: d[0], d[1] row g, columns 2t, 2t+1; d[2], d[3] row g+8.
 * So an accumulator's two 16 x 8 tiles side by side are, packed pairwise, the A operand of
 * the next product over those 16 columns: attention's P goes from S to P V in registers.
 * The emulated runtime (tests/emu/include/cuda_runtime.h) defines these functions itself,
 * as warp collectives that lay the fragments out as above. */
#ifndef QUASAR_KERNELS_MMA_CUH
#define QUASAR_KERNELS_MMA_CUH

#include "cuda_ops.h"

#ifndef QS_EMU_MMA
#include <cuda_bf16.h>

/* lo and hi rounded to bf16 (to nearest even), lo in the low half. */
__device__ static inline uint32_t qs_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}

/* Four 8 x 8 bf16 matrices from shared memory into fragment words (ldmatrix .x4): lanes
 * 8i .. 8i + 7 give the addresses of matrix i's 8 rows (16 bytes each, 16-byte aligned),
 * and r[i] gets row lane / 4, elements 2 (lane % 4) and the next, of matrix i: an A or B
 * fragment word as above. _trans gives matrix i's transpose instead, so a matrix stored
 * with k along its rows yields B fragments directly. */
__device__ static inline void qs_ldmatrix_x4(uint32_t r[4], const uint32_t *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)));
}
__device__ static inline void qs_ldmatrix_x4_trans(uint32_t r[4], const uint32_t *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(row)));
}

/* d += A B over the warp (every lane must call it, with its fragments). */
__device__ static inline void qs_mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

/* acc += A B for MT 16-row tiles of A over KT 16-deep steps, into NT tiles of 8 columns
 * (NT even), all in shared memory as bf16 pairs. A: row-major (row tile m at
 * a + 16 m a_pitch, words), its fragments by ldmatrix, four 8 x 8 quarters a step (rows
 * 0-7, then 8-15, of columns 0-7, then of 8-15: a[0..3] above). B: row-major as it is
 * (B_KN: its sum runs along the tile's rows), its fragments by ldmatrix's transpose; or
 * given as its transpose, B's columns as the rows of a row-major tile, by plain
 * ldmatrix. One B load gives two column tiles' fragments for a step, and each feeds all
 * MT row tiles. */
template <int MT, int NT, int KT, bool B_KN>
__device__ static inline void qs_mma_tiles(float (*acc)[NT][4], const uint32_t *a, int a_pitch, const uint32_t *b,
                                           int b_pitch, int lane) {
    const uint32_t *arow = a + (lane % 16) * a_pitch + 4 * (lane / 16);
    const uint32_t *brow = B_KN ? b + (lane % 16) * b_pitch + 4 * (lane / 16)
                                : b + (lane % 8 + 8 * (lane / 16)) * b_pitch + 4 * (lane / 8 % 2);
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
        uint32_t af[MT][4];
#pragma unroll
        for (int m = 0; m < MT; m++) qs_ldmatrix_x4(af[m], arow + 16 * m * a_pitch + 8 * kk);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            uint32_t f[4];
            if (B_KN) qs_ldmatrix_x4_trans(f, brow + 16 * kk * b_pitch + 4 * n);
            else qs_ldmatrix_x4(f, brow + 8 * n * b_pitch + 8 * kk);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                qs_mma_bf16_16816(acc[m][n], af[m], f);
                qs_mma_bf16_16816(acc[m][n + 1], af[m], f + 2);
            }
        }
    }
}

#endif

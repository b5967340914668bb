/*
 * nz_gemm.h — the row-invariant fp32 matmul of decoded weight tiles.
 *
 * y[m * ldy + r] = sum_k x[m * ldx + k] * w[r * ldw + k] for m < M, r < N:
 * M input rows times N weight rows, both along K (the nn.Linear layout:
 * y = x W^T). Unlike a BLAS sgemm, whose kernels block M and K so that a
 * row's rounding depends on its batch, every output element here is the
 * same fixed sequence of fp32 operations, which depends only on K:
 *
 *   acc[l] = +0                                   for the 8 lanes l = 0..7
 *   acc[l] = fma(x[8c + l], w[8c + l], acc[l])    for c = 0 .. K/8 - 1, in order
 *   s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
 *   s = fma(x[k], w[k], s)                         for k = 8 (K/8) .. K - 1, in order
 *   y = s
 *
 * so a row of x gets bit-identical results whatever M is, whatever the other
 * rows hold and however the kernel blocks the work (the server's "same tokens
 * as alone"). Kernels: AVX2+FMA (nz_gemm_avx2.c, register-blocked 4 input
 * rows x 3 weight rows, edges one accumulator at a time) and portable C (the
 * 8 lanes emulated with fmaf), bit-identical; chosen at run time with the
 * codec's kernels (NZ_SIMD=scalar or nz_rans_set_kernel(NZ_RANS_SCALAR)
 * selects the portable one).
 */
#ifndef NZ_GEMM_H
#define NZ_GEMM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** y[m * ldy + r] = sum_k x[m * ldx + k] * w[r * ldw + k] (m < M, r < N),
 *  each element by the fixed sequence above (y overwritten; M, N or K may
 *  be 0: with K = 0 every y is +0). Cannot fail. */
void nz_gemm_f32(size_t M, size_t N, size_t K, const float *x, size_t ldx, const float *w, size_t ldw,
                 float *y, size_t ldy);

/** @return 1 when nz_gemm_f32 runs the AVX2 kernel (compiled in, the CPU has
 *  AVX2 and FMA, and the portable kernels are not forced), else 0. */
int nz_gemm_use_avx2(void);

/* ------------------------------------------------------------- internal */

/** The per-ISA kernels behind nz_gemm_f32 (not an API): same arguments and
 *  bits. The AVX2 one is a no-op stub when built without -mavx2 -mfma. */
void nz_gemm_f32_avx2(size_t M, size_t N, size_t K, const float *x, size_t ldx, const float *w, size_t ldw,
                      float *y, size_t ldy);
void nz_gemm_f32_portable(size_t M, size_t N, size_t K, const float *x, size_t ldx, const float *w,
                          size_t ldw, float *y, size_t ldy);
extern const int nz_gemm_avx2_compiled; /* 1 when nz_gemm_avx2.c was built with AVX2 and FMA */

#ifdef __cplusplus
}
#endif
#endif /* NZ_GEMM_H */

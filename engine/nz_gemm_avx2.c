/* The row-invariant fp32 matmul, AVX2 + FMA (the Makefile adds -mavx2 -mfma;
 * without them this file builds a stub and the portable kernel runs).
 *
 * Shape: y[M x N] = x[M x K] w[N x K]^T in blocks of mr input rows x nr
 * weight rows (4 x 3 in the body; the last M % 4 rows as 3 x 4, 2 x 6 or
 * 1 x 8; the last weight rows of a strip 1 at a time), one ymm accumulator
 * per (input row, weight row) pair: every element is the sequence of
 * nz_gemm.h whatever block computed it. A block's x rows stay in L1 while
 * the weight rows stream past (the caller's tile: ~512 KiB, L2). */
#include "nz_gemm.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <math.h>

const int nz_gemm_avx2_compiled = 1;

#define INLINE __attribute__((always_inline)) static inline

/* ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)): the tree of nz_gemm.h */
INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[i * ldy + j] for i < mr input rows (x) and j < nr weight rows (w), mr
 * and nr compile-time constants (mr * nr <= 12 accumulators); the operand
 * kept in registers across a step is the smaller side. */
INLINE void block(const int mr, const int nr, size_t K, const float *x, size_t ldx, const float *w,
                  size_t ldw, float *y, size_t ldy) {
    __m256 acc[4][8];
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) acc[i][j] = _mm256_setzero_ps();
    size_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (nr <= mr) { /* nr weight vectors in registers, one x vector at a time */
            __m256 wv[8];
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) wv[j] = _mm256_loadu_ps(w + (size_t)j * ldw + k);
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) {
                __m256 xv = _mm256_loadu_ps(x + (size_t)i * ldx + k);
#pragma GCC unroll 8
                for (int j = 0; j < nr; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        } else { /* mr x vectors in registers, one weight vector at a time */
            __m256 xv[4];
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) xv[i] = _mm256_loadu_ps(x + (size_t)i * ldx + k);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) {
                __m256 wv = _mm256_loadu_ps(w + (size_t)j * ldw + k);
#pragma GCC unroll 4
                for (int i = 0; i < mr; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) {
            const float *xi = x + (size_t)i * ldx, *wj = w + (size_t)j * ldw;
            float s = hsum8(acc[i][j]);
            for (size_t t = k; t < K; t++) s = fmaf(xi[t], wj[t], s);
            y[(size_t)i * ldy + (size_t)j] = s;
        }
}

/* mr input rows against all N weight rows: blocks of nr, then one at a time. */
INLINE void strip(const int mr, const int nr, size_t N, size_t K, const float *x, size_t ldx, const float *w,
                  size_t ldw, float *y, size_t ldy) {
    size_t r = 0;
    for (; r + (size_t)nr <= N; r += (size_t)nr) block(mr, nr, K, x, ldx, w + r * ldw, ldw, y + r, ldy);
    for (; r < N; r++) block(mr, 1, K, x, ldx, w + r * ldw, ldw, y + r, ldy);
}

void nz_gemm_f32_avx2(size_t M, size_t N, size_t K, const float *x, size_t ldx, const float *w, size_t ldw,
                      float *y, size_t ldy) {
    size_t m = 0;
    for (; m + 4 <= M; m += 4) strip(4, 3, N, K, x + m * ldx, ldx, w, ldw, y + m * ldy, ldy);
    const float *xm = x + m * ldx;
    float *ym = y + m * ldy;
    switch (M - m) {
    case 3:
        strip(3, 4, N, K, xm, ldx, w, ldw, ym, ldy);
        break;
    case 2:
        strip(2, 6, N, K, xm, ldx, w, ldw, ym, ldy);
        break;
    case 1:
        strip(1, 8, N, K, xm, ldx, w, ldw, ym, ldy);
        break;
    default:
        break;
    }
}

#else
const int nz_gemm_avx2_compiled = 0;
void nz_gemm_f32_avx2(size_t M, size_t N, size_t K, const float *x, size_t ldx, const float *w, size_t ldw,
                      float *y, size_t ldy) {
    (void)M, (void)N, (void)K, (void)x, (void)ldx, (void)w, (void)ldw, (void)y, (void)ldy;
}
#endif

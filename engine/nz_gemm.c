/* The row-invariant fp32 matmul: dispatch and the portable kernel (see nz_gemm.h). */
#include "nz_gemm.h"

#include "nz_rans.h"

#include <math.h>

/* One output element, the sequence of nz_gemm.h: 8 lanes of fmaf over the
 * whole groups of 8, the fixed tree, then the tail in order. (fmaf rounds
 * once, as the AVX2 kernel's vfmadd does; -std=c11 keeps the compiler from
 * contracting or reassociating the adds.) */
static float dot8(const float *x, const float *w, size_t K) {
    float a[8] = {0};
    size_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int l = 0; l < 8; l++) a[l] = fmaf(x[k + (size_t)l], w[k + (size_t)l], a[l]);
    float lo = (a[0] + a[4]) + (a[2] + a[6]);
    float hi = (a[1] + a[5]) + (a[3] + a[7]);
    float s = lo + hi;
    for (; k < K; k++) s = fmaf(x[k], w[k], s);
    return s;
}

void nz_gemm_f32_portable(size_t M, size_t N, size_t K, const float *x, size_t ldx, const float *w,
                          size_t ldw, float *y, size_t ldy) {
    for (size_t m = 0; m < M; m++)
        for (size_t r = 0; r < N; r++) y[m * ldy + r] = dot8(x + m * ldx, w + r * ldw, K);
}

int nz_gemm_use_avx2(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    return nz_gemm_avx2_compiled && nz_rans_active_kernel() != NZ_RANS_SCALAR &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

void nz_gemm_f32(size_t M, size_t N, size_t K, const float *x, size_t ldx, const float *w, size_t ldw,
                 float *y, size_t ldy) {
    if (nz_gemm_use_avx2())
        nz_gemm_f32_avx2(M, N, K, x, ldx, w, ldw, y, ldy);
    else
        nz_gemm_f32_portable(M, N, K, x, ldx, w, ldw, y, ldy);
}

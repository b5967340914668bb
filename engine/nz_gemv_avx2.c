/* Fused rANS bf16 decode-and-dot, AVX2 (the Makefile adds -mavx2 -mfma;
 * without them this file builds a no-op and the portable kernel runs).
 * 8 states per ymm; 32 or 64 lanes = 4 or 8 independent vectors. */
#include "nz_gemv.h"

#include "nz_rans.h"

#if defined(__AVX2__) && defined(__FMA__)
#include "nz_rans_simd.h"

#define INLINE __attribute__((always_inline)) static inline

/* fp32 weights of 8 elements: sm[0..8) into bytes 2 and 3 of each dword by
 * one in-lane shuffle, exponent from the entry's symbol byte. */
INLINE __m256 weights8(__m256i e, const uint8_t *sm) {
    const __m256i ctl = _mm256_set_epi32(0x07078080, 0x06068080, 0x05058080, 0x04048080, 0x03038080,
                                         0x02028080, 0x01018080, 0x00008080);
    __m128i b = _mm_loadl_epi64((const __m128i *)sm);
    __m256i s = _mm256_shuffle_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(b), b, 1), ctl);
    const __m256i m = _mm256_set1_epi32((int)0x807f0000u);
    __m256i f = _mm256_or_si256(_mm256_and_si256(s, m), _mm256_andnot_si256(m, _mm256_slli_epi32(e, 23)));
    return _mm256_castsi256_ps(f);
}

INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void nz_gemv_run_avx2(nz_gemv_run *r) {
    const int NV = r->lanes / 8;
    const uint32_t *exp8 = nz_rans_expand8();
    __m256i v[8], e[8];
    for (int k = 0; k < NV; k++) v[k] = _mm256_load_si256((const __m256i *)(r->st + 8 * k));
    const uint8_t *p = r->p, *end = r->end;
    const uint32_t *dtab = r->dtab;
    const float *x = r->x;
    float *y = r->y;
    const uint64_t cols = r->cols, lanes = (uint64_t)r->lanes;
    uint64_t i = r->i, row = r->row, col = r->col;
    float part = r->part;
    __m256 acc = _mm256_setzero_ps();
    while (r->n - i >= lanes && end - p >= 16 * NV) {
        if (NV == 8) {
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) v[k] = nz_rans_step8(v[k], &e[k], &p, dtab, exp8);
        } else {
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) v[k] = nz_rans_step8(v[k], &e[k], &p, dtab, exp8);
        }
        for (int k = 0; k < NV; k++, i += 8) {
            __m256 w = weights8(e[k], r->sm + i);
            if (col + 8 <= cols) {
                acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + col), acc);
                col += 8;
                if (col == cols) {
                    y[row++] = part + hsum8(acc);
                    acc = _mm256_setzero_ps();
                    part = 0;
                    col = 0;
                }
            } else { /* the vector straddles a row end */
                float wf[8] __attribute__((aligned(32)));
                _mm256_store_ps(wf, w);
                for (int j = 0; j < 8; j++) {
                    part += wf[j] * x[col];
                    if (++col == cols) {
                        y[row++] = part + hsum8(acc);
                        acc = _mm256_setzero_ps();
                        part = 0;
                        col = 0;
                    }
                }
            }
        }
    }
    for (int k = 0; k < NV; k++) _mm256_store_si256((__m256i *)(r->st + 8 * k), v[k]);
    r->p = p;
    r->i = i;
    r->row = row;
    r->col = col;
    r->part = part + hsum8(acc);
}
#else
void nz_gemv_run_avx2(nz_gemv_run *r) { (void)r; }
#endif

/* Fused rANS bf16 decode-and-dot, AVX-512 F/BW/VL (the Makefile adds the
 * flags; without them this file builds a no-op and the portable kernel runs).
 * 16 states per zmm; 32 or 64 lanes = 2 or 4 independent vectors. */
#include "nz_gemv.h"

#include "nz_rans.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "nz_rans_simd.h"

#define INLINE __attribute__((always_inline)) static inline

/* fp32 weights of 16 elements: sign+mantissa bytes sm[0..16) placed in
 * bytes 2 and 3 of each dword by one in-lane shuffle (bits 16-22 mantissa,
 * bit 31 sign), exponent from the table entry's symbol byte shifted to bits
 * 23-30, merged by one ternary logic op. */
INLINE __m512 weights16(__m512i e, const uint8_t *sm) {
    const __m512i ctl = _mm512_set_epi32(
        0x0f0f8080, 0x0e0e8080, 0x0d0d8080, 0x0c0c8080, 0x0b0b8080, 0x0a0a8080, 0x09098080, 0x08088080,
        0x07078080, 0x06068080, 0x05058080, 0x04048080, 0x03038080, 0x02028080, 0x01018080, 0x00008080);
    __m512i s = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)sm)), ctl);
    /* C ? A : B (imm 0xe4) with C = 0x807f0000: sign and mantissa from s, exponent from e << 23 */
    __m512i f =
        _mm512_ternarylogic_epi32(s, _mm512_slli_epi32(e, 23), _mm512_set1_epi32((int)0x807f0000u), 0xe4);
    return _mm512_castsi512_ps(f);
}

/* One stream's registers while a kernel runs. */
typedef struct {
    __m512i v[4];
    const uint8_t *p;
    uint64_t i, row, col;
    float part;
    __m512 acc;
} stream;

INLINE void load_stream(stream *s, const nz_gemv_run *r, int NV) {
#pragma GCC unroll 4
    for (int k = 0; k < NV; k++) s->v[k] = _mm512_load_si512(r->st + 16 * k);
    s->p = r->p;
    s->i = r->i;
    s->row = r->row;
    s->col = r->col;
    s->part = r->part;
    s->acc = _mm512_setzero_ps();
}

INLINE void store_stream(const stream *s, nz_gemv_run *r, int NV) {
#pragma GCC unroll 4
    for (int k = 0; k < NV; k++) _mm512_store_si512(r->st + 16 * k, s->v[k]);
    r->p = s->p;
    r->i = s->i;
    r->row = s->row;
    r->col = s->col;
    r->part = s->part + _mm512_reduce_add_ps(s->acc);
}

INLINE int can_step(const stream *s, const nz_gemv_run *r, int NV) {
    return r->n - s->i >= (uint64_t)r->lanes && r->end - s->p >= 32 * NV;
}

/* Add 16 weights (elements s->i ..) to the dot products. */
INLINE void dot16(stream *s, const nz_gemv_run *r, __m512 w) {
    const float *x = r->x;
    if (s->col + 16 <= r->cols) {
        s->acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + s->col), s->acc);
        s->col += 16;
        if (s->col == r->cols) {
            r->y[s->row++] = s->part + _mm512_reduce_add_ps(s->acc);
            s->acc = _mm512_setzero_ps();
            s->part = 0;
            s->col = 0;
        }
    } else { /* the vector straddles a row end */
        float wf[16] __attribute__((aligned(64)));
        _mm512_store_ps(wf, w);
        for (int j = 0; j < 16; j++) {
            s->part += wf[j] * x[s->col];
            if (++s->col == r->cols) {
                r->y[s->row++] = s->part + _mm512_reduce_add_ps(s->acc);
                s->acc = _mm512_setzero_ps();
                s->part = 0;
                s->col = 0;
            }
        }
    }
    s->i += 16;
}

/* Decode one group (NV vectors) of s and multiply it in. */
INLINE void group(stream *s, const nz_gemv_run *r, int NV) {
    __m512i e[4];
#pragma GCC unroll 4
    for (int k = 0; k < NV; k++) s->v[k] = nz_rans_step16(s->v[k], &e[k], &s->p, r->dtab);
#pragma GCC unroll 4
    for (int k = 0; k < NV; k++) dot16(s, r, weights16(e[k], r->sm + s->i));
}

INLINE void run1(nz_gemv_run *r, const int NV) {
    stream s;
    load_stream(&s, r, NV);
    while (can_step(&s, r, NV)) group(&s, r, NV);
    store_stream(&s, r, NV);
}

void nz_gemv_run_avx512(nz_gemv_run *r) {
    if (r->lanes == 64)
        run1(r, 4);
    else
        run1(r, 2);
}

#else
void nz_gemv_run_avx512(nz_gemv_run *r) { (void)r; }
#endif

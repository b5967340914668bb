/* The escape code's AVX2 kernels (the Makefile adds -mavx2 -mfma -mpopcnt;
 * without them this file builds stubs and the portable code runs).
 *
 * 32 fields per step: the low or high nibbles of a 32-byte block index a
 * 16-byte table (one vpshufb gives 32 symbols, escapes 0, another their
 * escape mask); escapes take the next bytes of the level below: an in-lane
 * prefix sum of the escape mask gives every escaped byte its index into 16
 * bytes loaded at the stream position (one load per 128-bit lane), and one
 * more vpshufb places them. */
#include "nz_esc.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__POPCNT__)
#include <immintrin.h>

const int nz_esc_avx2_compiled = 1;

#define INLINE __attribute__((always_inline)) static inline

typedef struct {
    __m256i tab[2]; /* symbol of field 0 / field 1 of a nibble */
    __m256i esc[2]; /* 0xff where that field is an escape */
} tables;

INLINE tables load_tables(const uint8_t nib[2][16]) {
    tables t;
    for (int k = 0; k < 2; k++) {
        t.tab[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)nib[k]));
        t.esc[k] = k ? _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 0, -1, -1, -1, -1)
                     : _mm256_setr_epi8(0, 0, 0, -1, 0, 0, 0, -1, 0, 0, 0, -1, 0, 0, 0, -1, 0, 0, 0, -1, 0, 0,
                                        0, -1, 0, 0, 0, -1, 0, 0, 0, -1);
    }
    return t;
}

/* the nibbles of a block: fields 0-31 and 32-63 in lo, 64-127 in hi */
INLINE void nibbles(const uint8_t *blk, __m256i *lo, __m256i *hi) {
    const __m256i m = _mm256_set1_epi8(0x0f);
    __m256i v = _mm256_loadu_si256((const __m256i *)blk);
    *lo = _mm256_and_si256(v, m);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
}

/* 32 symbols from nibbles nb (field k of each): table lookups, then the
 * escapes from *esc, which advances past them */
INLINE __m256i symbols32(__m256i nb, const tables *t, const int k, const uint8_t **esc) {
    __m256i s = _mm256_shuffle_epi8(t->tab[k], nb);
    __m256i em = _mm256_shuffle_epi8(t->esc[k], nb);
    uint32_t e = (uint32_t)_mm256_movemask_epi8(em);
    if (!e) return s;
    /* in-lane inclusive count of escapes, negated (escape bytes are -1) */
    __m256i p = em;
    p = _mm256_add_epi8(p, _mm256_slli_si256(p, 1));
    p = _mm256_add_epi8(p, _mm256_slli_si256(p, 2));
    p = _mm256_add_epi8(p, _mm256_slli_si256(p, 4));
    p = _mm256_add_epi8(p, _mm256_slli_si256(p, 8));
    /* an escaped byte's count c (1..16): ~(-c) = c - 1 indexes 16 bytes loaded at its lane's first escape */
    const uint8_t *q = *esc;
    unsigned c0 = (unsigned)__builtin_popcount(e & 0xffffu);
    __m256i d = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q)),
                                        _mm_loadu_si128((const __m128i *)(q + c0)), 1);
    *esc += __builtin_popcount(e);
    return _mm256_blendv_epi8(s, _mm256_shuffle_epi8(d, _mm256_xor_si256(p, _mm256_set1_epi8(-1))), em);
}

/* fields [32 j0, 32 j1), one run of 32 at a time: body(j, symbols); whole
 * blocks unrolled (table choice known at compile time) */
#define RUN(j, k, nb, body)                                                                                  \
    do {                                                                                                     \
        __m256i s_ = symbols32(nb, &t, k, &esc);                                                             \
        body((j), s_);                                                                                       \
    } while (0)
#define FOR_RUNS(blk, j0, j1, body)                                                                          \
    for (uint64_t j_ = (j0); j_ < (j1);) {                                                                   \
        __m256i lo_, hi_;                                                                                    \
        nibbles((blk) + 32 * (j_ / 4), &lo_, &hi_);                                                          \
        if (j_ % 4 == 0 && (j1)-j_ >= 4) {                                                                   \
            RUN(j_, 0, lo_, body);                                                                           \
            RUN(j_ + 1, 1, lo_, body);                                                                       \
            RUN(j_ + 2, 0, hi_, body);                                                                       \
            RUN(j_ + 3, 1, hi_, body);                                                                       \
            j_ += 4;                                                                                         \
            continue;                                                                                        \
        }                                                                                                    \
        for (; j_ < (j1); j_++) {                                                                            \
            switch (j_ % 4) {                                                                                \
            case 0:                                                                                          \
                RUN(j_, 0, lo_, body);                                                                       \
                break;                                                                                       \
            case 1:                                                                                          \
                RUN(j_, 1, lo_, body);                                                                       \
                break;                                                                                       \
            case 2:                                                                                          \
                RUN(j_, 0, hi_, body);                                                                       \
                break;                                                                                       \
            default:                                                                                         \
                RUN(j_, 1, hi_, body);                                                                       \
                break;                                                                                       \
            }                                                                                                \
            if (j_ % 4 == 3) {                                                                               \
                j_++;                                                                                        \
                break;                                                                                       \
            }                                                                                                \
        }                                                                                                    \
    }

uint64_t nz_esc_level_avx2(const uint8_t *blk, uint64_t i0, uint64_t i1, const uint8_t nib[2][16],
                           const uint8_t *esc, uint8_t *out) {
    const uint8_t *e0 = esc;
    tables t = load_tables(nib);
    uint8_t *o = out - i0; /* field i goes to o[i] */
#define STORE(j, s) _mm256_storeu_si256((__m256i *)(o + 32 * (j)), s)
    FOR_RUNS(blk, i0 / 32, i1 / 32, STORE)
#undef STORE
    return (uint64_t)(esc - e0);
}

/* The bf16-layout sign+mantissa bytes of run j: 32 bytes (mant 7), or 16
 * bytes of 4-bit lossy-3 fields (mant 3: low nibble first) spread to bytes
 * sign << 7 | mantissa << 4 */
INLINE __m256i sm32(const uint8_t *sm, uint64_t j, int mant) {
    if (mant == 7) return _mm256_loadu_si256((const __m256i *)(sm + 32 * j));
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)(sm + 16 * j));
    __m128i lo = _mm_and_si128(b, lo4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), lo4);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(lo, hi)),
                                        _mm_unpackhi_epi8(lo, hi), 1);
    const __m256i spread = _mm256_setr_epi8(
        0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, (char)0x80, (char)0x90, (char)0xa0, (char)0xb0,
        (char)0xc0, (char)0xd0, (char)0xe0, (char)0xf0, 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70,
        (char)0x80, (char)0x90, (char)0xa0, (char)0xb0, (char)0xc0, (char)0xd0, (char)0xe0, (char)0xf0);
    return _mm256_shuffle_epi8(spread, v);
}

/* fp32 of 32 weights from rotated symbols r and sign+mantissa bytes m: four
 * vectors holding weights {0-3,16-19}, {4-7,20-23}, {8-11,24-27}, {12-15,28-31} */
INLINE void weights32(__m256i r, __m256i m, __m256 f[4]) {
    __m256i x = _mm256_xor_si256(r, m);
    __m256i hi = _mm256_xor_si256(r, _mm256_and_si256(x, _mm256_set1_epi8((char)0x80))); /* sign, e >> 1 */
    __m256i lo = _mm256_xor_si256(r, _mm256_and_si256(x, _mm256_set1_epi8(0x7f)));       /* e & 1, mantissa */
    __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi), z = _mm256_setzero_si256();
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, a));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, a));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, b));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, b));
}

/* The GEMV's form of the same: even and odd weights of each unpacked half
 * by a shift and a mask instead of shuffles: vectors holding weights
 * {0,2,..,6, 16,..,22}, {1,3,..,7, 17,..,23}, {8,..,14, 24,..,30}, {9,..,15, 25,..,31} */
INLINE void weights32_eo(__m256i r, __m256i m, __m256 f[4]) {
    __m256i x = _mm256_xor_si256(r, m);
    __m256i hi = _mm256_xor_si256(r, _mm256_and_si256(x, _mm256_set1_epi8((char)0x80)));
    __m256i lo = _mm256_xor_si256(r, _mm256_and_si256(x, _mm256_set1_epi8(0x7f)));
    __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
    const __m256i top = _mm256_set1_epi32((int)0xffff0000u);
    f[0] = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
    f[1] = _mm256_castsi256_ps(_mm256_and_si256(a, top));
    f[2] = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
    f[3] = _mm256_castsi256_ps(_mm256_and_si256(b, top));
}

uint64_t nz_esc_bf16_avx2(const uint8_t *blk, uint64_t n32, const uint8_t nib[2][16], const uint8_t *esc,
                          const uint8_t *sm, int mant, float *out) {
    const uint8_t *e0 = esc;
    tables t = load_tables(nib);
#define STORE(j, s)                                                                                          \
    do {                                                                                                     \
        __m256 f[4];                                                                                         \
        weights32(s, sm32(sm, j, mant), f);                                                                  \
        float *o = out + 32 * (j);                                                                           \
        _mm256_storeu_ps(o, _mm256_permute2f128_ps(f[0], f[1], 0x20));                                       \
        _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(f[2], f[3], 0x20));                                   \
        _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(f[0], f[1], 0x31));                                  \
        _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(f[2], f[3], 0x31));                                  \
    } while (0)
    FOR_RUNS(blk, 0, n32 / 32, STORE)
#undef STORE
    return (uint64_t)(esc - e0);
}

/* even and odd elements of a and c (8 floats each), in order: [a0 a2 a4 a6 c0 c2 c4 c6], [a1 a3 .. c7] */
INLINE void evens_odds(__m256 a, __m256 c, __m256 *ev, __m256 *od) {
    *ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, c, 0x88)), 0xd8));
    *od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, c, 0xdd)), 0xd8));
}

void nz_esc_permute_x_avx2(const float *x, uint64_t cols, size_t M, float *xp) {
    /* the order of weights32_eo's vectors: {0,2,..,6, 16,..,22}, {1,3,..,7, 17,..,23},
     * {8,..,14, 24,..,30}, {9,..,15, 25,..,31} */
    for (uint64_t c = 0; c + 32 <= cols; c += 32)
        for (size_t m = 0; m < M; m++, xp += 32) {
            const float *q = x + m * cols + c;
            __m256 v[4];
            evens_odds(_mm256_loadu_ps(q), _mm256_loadu_ps(q + 16), &v[0], &v[1]);
            evens_odds(_mm256_loadu_ps(q + 8), _mm256_loadu_ps(q + 24), &v[2], &v[3]);
            for (int k = 0; k < 4; k++) _mm256_storeu_ps(xp + 8 * k, v[k]);
        }
}

INLINE float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

uint64_t nz_esc_gemv_avx2(const uint8_t *blk, uint64_t rows, uint64_t cols, const uint8_t nib[2][16],
                          const uint8_t *esc, const uint8_t *sm, int mant, const float *xp, float *y) {
    const uint8_t *e0 = esc;
    tables t = load_tables(nib);
    const uint64_t runs = cols / 32; /* per row */
    uint64_t c = 0;                  /* run within the row */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define DOT(j, s)                                                                                            \
    do {                                                                                                     \
        __m256 f[4];                                                                                         \
        weights32_eo(s, sm32(sm, j, mant), f);                                                               \
        const float *xc = xp + 32 * c;                                                                       \
        a0 = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xc), a0);                                                 \
        a1 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xc + 8), a1);                                             \
        a2 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xc + 16), a2);                                            \
        a3 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xc + 24), a3);                                            \
        if (++c == runs) {                                                                                   \
            *y++ = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                       \
            a0 = a1 = a2 = a3 = _mm256_setzero_ps();                                                         \
            c = 0;                                                                                           \
        }                                                                                                    \
    } while (0)
    FOR_RUNS(blk, 0, rows * runs, DOT)
#undef DOT
    return (uint64_t)(esc - e0);
}

uint64_t nz_esc_gemm_avx2(const uint8_t *blk, uint64_t rows, uint64_t cols, const uint8_t nib[2][16],
                          const uint8_t *esc, const uint8_t *sm, int mant, const float *xp, size_t M,
                          float *y, size_t ldy) {
    const uint8_t *e0 = esc;
    tables t = load_tables(nib);
    const uint64_t runs = cols / 32;
    uint64_t c = 0, r = 0;
    __m256 acc[NZ_ESC_GEMM_MAX];
    for (size_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
        /* per input row: one product chain of the run's 4 vectors, then one add into its accumulator */
#define DOTM(j, s)                                                                                           \
    do {                                                                                                     \
        __m256 f[4];                                                                                         \
        weights32_eo(s, sm32(sm, j, mant), f);                                                               \
        const float *xc = xp + 32 * M * c;                                                                   \
        for (size_t m = 0; m < M; m++, xc += 32) {                                                           \
            __m256 p = _mm256_mul_ps(f[0], _mm256_loadu_ps(xc));                                             \
            p = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xc + 8), p);                                           \
            p = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xc + 16), p);                                          \
            p = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xc + 24), p);                                          \
            acc[m] = _mm256_add_ps(acc[m], p);                                                               \
        }                                                                                                    \
        if (++c == runs) {                                                                                   \
            for (size_t m = 0; m < M; m++) {                                                                 \
                y[m * ldy + r] = hsum8(acc[m]);                                                              \
                acc[m] = _mm256_setzero_ps();                                                                \
            }                                                                                                \
            r++;                                                                                             \
            c = 0;                                                                                           \
        }                                                                                                    \
    } while (0)
    FOR_RUNS(blk, 0, rows * runs, DOTM)
#undef DOTM
    return (uint64_t)(esc - e0);
}

#else
const int nz_esc_avx2_compiled = 0;
uint64_t nz_esc_level_avx2(const uint8_t *blk, uint64_t i0, uint64_t i1, const uint8_t nib[2][16],
                           const uint8_t *esc, uint8_t *out) {
    return 0;
}
uint64_t nz_esc_bf16_avx2(const uint8_t *blk, uint64_t n32, const uint8_t nib[2][16], const uint8_t *esc,
                          const uint8_t *sm, int mant, float *out) {
    return 0;
}
uint64_t nz_esc_gemv_avx2(const uint8_t *blk, uint64_t rows, uint64_t cols, const uint8_t nib[2][16],
                          const uint8_t *esc, const uint8_t *sm, int mant, const float *xp, float *y) {
    return 0;
}
uint64_t nz_esc_gemm_avx2(const uint8_t *blk, uint64_t rows, uint64_t cols, const uint8_t nib[2][16],
                          const uint8_t *esc, const uint8_t *sm, int mant, const float *xp, size_t M,
                          float *y, size_t ldy) {
    return 0;
}
void nz_esc_permute_x_avx2(const float *x, uint64_t cols, size_t M, float *xp) {}
#endif

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

/* ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)) (nz_esc.c's portable path: the same tree) */
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
    /* the row's two accumulators (nz_esc.h): the even runs into one, the odd runs into the other, each
     * run's four vectors in order; cur is the one of this run (the sum of both is the same bits
     * either way round) */
    __m256 cur = _mm256_setzero_ps(), other = cur;
#define DOT(j, s)                                                                                            \
    do {                                                                                                     \
        __m256 f[4];                                                                                         \
        weights32_eo(s, sm32(sm, j, mant), f);                                                               \
        const float *xc = xp + 32 * c;                                                                       \
        __m256 a = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xc), cur);                                          \
        a = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xc + 8), a);                                               \
        a = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xc + 16), a);                                              \
        cur = other;                                                                                         \
        other = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xc + 24), a);                                          \
        if (++c == runs) {                                                                                   \
            *y++ = hsum8(_mm256_add_ps(cur, other));                                                         \
            cur = other = _mm256_setzero_ps();                                                               \
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
    __m256 acc[2 * NZ_ESC_GEMM_MAX]; /* per input row m: its even runs' accumulator at 2 m, odd at 2 m + 1 */
    for (size_t m = 0; m < 2 * M; m++) acc[m] = _mm256_setzero_ps();
#define DOTM(j, s)                                                                                           \
    do {                                                                                                     \
        __m256 f[4];                                                                                         \
        weights32_eo(s, sm32(sm, j, mant), f);                                                               \
        const float *xc = xp + 32 * M * c;                                                                   \
        __m256 *am = acc + (c & 1);                                                                          \
        for (size_t m = 0; m < M; m++, xc += 32) {                                                           \
            __m256 a = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xc), am[2 * m]);                                \
            a = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xc + 8), a);                                           \
            a = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xc + 16), a);                                          \
            am[2 * m] = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xc + 24), a);                                  \
        }                                                                                                    \
        if (++c == runs) {                                                                                   \
            for (size_t m = 0; m < M; m++) {                                                                 \
                y[m * ldy + r] = hsum8(_mm256_add_ps(acc[2 * m], acc[2 * m + 1]));                           \
                acc[2 * m] = acc[2 * m + 1] = _mm256_setzero_ps();                                           \
            }                                                                                                \
            r++;                                                                                             \
            c = 0;                                                                                           \
        }                                                                                                    \
    } while (0)
    FOR_RUNS(blk, 0, rows * runs, DOTM)
#undef DOTM
    return (uint64_t)(esc - e0);
}

/* The tile's weights in the runs' vector order (weights32_eo: run j's four
 * vectors at out[32 j ..]), for nz_esc_gemm_eo_avx2. */
uint64_t nz_esc_bf16eo_avx2(const uint8_t *blk, uint64_t n32, const uint8_t nib[2][16], const uint8_t *esc,
                            const uint8_t *sm, int mant, float *out) {
    const uint8_t *e0 = esc;
    tables t = load_tables(nib);
#define STORE(j, s)                                                                                          \
    do {                                                                                                     \
        __m256 f[4];                                                                                         \
        weights32_eo(s, sm32(sm, j, mant), f);                                                               \
        float *o = out + 32 * (j);                                                                           \
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(o + 8 * k, f[k]);                                       \
    } while (0)
    FOR_RUNS(blk, 0, n32 / 32, STORE)
#undef STORE
    return (uint64_t)(esc - e0);
}

/* Load v once into a register: GCC would rather fold the load into every
 * FMA that uses it as a memory operand, which makes the kernel load-bound. */
#define KEEP(v) __asm__("" : "+x"(v))

/* One run (four vectors at xc, wc) of the pairs (i < mr rows of xp, j < nr
 * rows of wt) into their accumulators h (0 or 1), all compile-time
 * constants: each pair's four FMAs in order. */
INLINE void eo_run(const int mr, const int nr, const int h, const float *xc, size_t ldx, const float *wc,
                   size_t ldw, __m256 acc[3][4][2]) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        if (nr <= mr) { /* nr weight vectors in registers */
            __m256 wv[4];
#pragma GCC unroll 4
            for (int j = 0; j < nr; j++) wv[j] = _mm256_loadu_ps(wc + (size_t)j * ldw + 8 * k);
#pragma GCC unroll 3
            for (int i = 0; i < mr; i++) {
                __m256 xv = _mm256_loadu_ps(xc + (size_t)i * ldx + 8 * k);
                KEEP(xv);
#pragma GCC unroll 4
                for (int j = 0; j < nr; j++) acc[i][j][h] = _mm256_fmadd_ps(wv[j], xv, acc[i][j][h]);
            }
        } else { /* mr x vectors in registers */
            __m256 xv[3];
#pragma GCC unroll 3
            for (int i = 0; i < mr; i++) xv[i] = _mm256_loadu_ps(xc + (size_t)i * ldx + 8 * k);
#pragma GCC unroll 4
            for (int j = 0; j < nr; j++) {
                __m256 wv = _mm256_loadu_ps(wc + (size_t)j * ldw + 8 * k);
                KEEP(wv);
#pragma GCC unroll 3
                for (int i = 0; i < mr; i++) acc[i][j][h] = _mm256_fmadd_ps(wv, xv[i], acc[i][j][h]);
            }
        }
    }
}

/* Runs [c0, c1) of the pairs (i < mr rows of xp, j < nr rows of wt; both in
 * the runs' vector order, rows ldx / ldw floats apart), mr and nr
 * compile-time constants (mr * nr <= 6 pairs of two accumulators). The
 * accumulators start at +0 (c0 = 0) or from acc_mem, pair (i, j) at
 * acc_mem[(3 j + i) 2 + 0 / 1]; after the last run (c1 = runs) the pair's
 * sum goes to y[i * ldy + j], else they go back to acc_mem. Per pair: the
 * arithmetic of nz_esc_gemm_avx2's DOTM. */
INLINE void eo_part(const int mr, const int nr, uint64_t c0, uint64_t c1, uint64_t runs, const float *xp,
                    size_t ldx, const float *wt, size_t ldw, __m256 *acc_mem, float *y, size_t ldy) {
    __m256 acc[3][4][2];
#pragma GCC unroll 3
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (int j = 0; j < nr; j++)
            for (int h = 0; h < 2; h++)
                acc[i][j][h] = c0 ? acc_mem[(3 * j + i) * 2 + h] : _mm256_setzero_ps();
    /* c0 is even: runs c0, c0 + 2, .. into accumulator 0, the others into 1 */
    uint64_t c = c0;
    for (; c + 2 <= c1; c += 2) {
        eo_run(mr, nr, 0, xp + 32 * c, ldx, wt + 32 * c, ldw, acc);
        eo_run(mr, nr, 1, xp + 32 * c + 32, ldx, wt + 32 * c + 32, ldw, acc);
    }
    if (c < c1) eo_run(mr, nr, 0, xp + 32 * c, ldx, wt + 32 * c, ldw, acc);
#pragma GCC unroll 3
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (int j = 0; j < nr; j++) {
            if (c1 == runs)
                y[(size_t)i * ldy + (size_t)j] = hsum8(_mm256_add_ps(acc[i][j][0], acc[i][j][1]));
            else
                for (int h = 0; h < 2; h++) acc_mem[(3 * j + i) * 2 + h] = acc[i][j][h];
        }
}

#define EO_GROUP 12 /* weight rows whose accumulators wait in a stack buffer (a multiple of nr = 2, 3, 4) */
#define EO_RUNS  32 /* runs per column block: 3 rows of x = 12 KiB, L1-resident */

/* mr (<= 3) rows of xp against every row of wt in blocks of nr (the last
 * rows of a group one at a time): per group of EO_GROUP weight rows, the
 * columns in blocks of EO_RUNS runs (the arithmetic is per pair, so
 * blocking the columns changes no bit; rows of up to 1024 columns are one
 * block, their accumulators never leave the registers). */
INLINE void eo_strip(const int mr, const int nr, uint64_t rows, uint64_t cols, const float *xp,
                     const float *wt, float *y, size_t ldy) {
    const uint64_t runs = cols / 32;
    __m256 acc[EO_GROUP * 3 * 2];
    for (uint64_t r0 = 0; r0 < rows; r0 += EO_GROUP) {
        const uint64_t g = rows - r0 < EO_GROUP ? rows - r0 : EO_GROUP;
        const float *wg = wt + r0 * cols;
        for (uint64_t c0 = 0; c0 < runs; c0 += EO_RUNS) {
            const uint64_t c1 = runs - c0 < EO_RUNS ? runs : c0 + EO_RUNS;
            uint64_t r = 0;
            for (; r + (uint64_t)nr <= g; r += (uint64_t)nr)
                eo_part(mr, nr, c0, c1, runs, xp, cols, wg + r * cols, cols, acc + r * 6, y + r0 + r, ldy);
            for (; r < g; r++)
                eo_part(mr, 1, c0, c1, runs, xp, cols, wg + r * cols, cols, acc + r * 6, y + r0 + r, ldy);
        }
    }
}

void nz_esc_gemm_eo_avx2(const float *wt, uint64_t rows, uint64_t cols, const float *x, size_t M, float *xp,
                         float *y, size_t ldy) {
    /* blocks of 3 input rows x 2 weight rows (the last M % 3 rows: 2 x 3 or 1 x 4), each block's
     * rows of x permuted into xp */
    for (size_t m = 0; m < M;) {
        size_t mr = M - m >= 3 ? 3 : M - m;
        for (size_t i = 0; i < mr; i++) nz_esc_permute_x_avx2(x + (m + i) * cols, cols, 1, xp + i * cols);
        float *ym = y + m * ldy;
        if (mr == 3)
            eo_strip(3, 2, rows, cols, xp, wt, ym, ldy);
        else if (mr == 2)
            eo_strip(2, 3, rows, cols, xp, wt, ym, ldy);
        else
            eo_strip(1, 4, rows, cols, xp, wt, ym, ldy);
        m += mr;
    }
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
uint64_t nz_esc_bf16eo_avx2(const uint8_t *blk, uint64_t n32, const uint8_t nib[2][16], const uint8_t *esc,
                            const uint8_t *sm, int mant, float *out) {
    return 0;
}
void nz_esc_gemm_eo_avx2(const float *wt, uint64_t rows, uint64_t cols, const float *x, size_t M, float *xp,
                         float *y, size_t ldy) {}
#endif

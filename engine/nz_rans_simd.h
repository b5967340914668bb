/*
 * nz_rans_simd.h — the rANS decode steps shared by the vector kernels
 * (engine-internal: nz_rans.c's stream decoders and nz_gemv_*.c's fused
 * decode-and-dot). x86-64 with GCC/clang only; each function carries its own
 * target attribute, so it can be used from files built with or without -m
 * flags.
 *
 * A decode-table entry (nz_rans.h) packs freq << 20 | start << 8 | symbol;
 * a step takes the low NZ_RANS_PROB_BITS of each state as the slot, looks up
 * the entry, advances x = freq * (x >> bits) + slot - start and refills
 * 16 bits from the stream into the states that fell below NZ_RANS_L.
 */
#ifndef NZ_RANS_SIMD_H
#define NZ_RANS_SIMD_H

#include "nz_rans.h"

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define NZ_RANS_L (1u << 16) /* lower bound of the state interval */

#define NZ_AVX512_INLINE                                                                                     \
    __attribute__((target("avx512f,avx512bw,avx512vl,popcnt"), always_inline)) static inline
#define NZ_AVX2_INLINE __attribute__((target("avx2,popcnt"), always_inline)) static inline

/* Table lookup of 16 slots as scalar loads: on AMD Zen 4/5 vpgatherdd has
 * ~30 cycles latency and issues every ~20 cycles; 16 loads + inserts are
 * cheaper and let independent chains overlap. */
NZ_AVX512_INLINE __m512i nz_rans_lookup16(__m512i slots, const uint32_t *tab) {
    uint32_t ix[16] __attribute__((aligned(64)));
    _mm512_store_si512(ix, slots);
    __m128i q[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        q[k] = _mm_cvtsi32_si128((int)tab[ix[4 * k]]);
        q[k] = _mm_insert_epi32(q[k], (int)tab[ix[4 * k + 1]], 1);
        q[k] = _mm_insert_epi32(q[k], (int)tab[ix[4 * k + 2]], 2);
        q[k] = _mm_insert_epi32(q[k], (int)tab[ix[4 * k + 3]], 3);
    }
    __m512i r = _mm512_castsi128_si512(q[0]);
    r = _mm512_inserti32x4(r, q[1], 1);
    r = _mm512_inserti32x4(r, q[2], 2);
    return _mm512_inserti32x4(r, q[3], 3);
}

/* One 16-lane step: decode 16 symbols (table entries into *e), renormalise
 * from *p (the refill words go to the needing lanes in order: vpexpandd). */
NZ_AVX512_INLINE __m512i nz_rans_step16(__m512i x, __m512i *e, const uint8_t **p, const uint32_t *dtab) {
    const __m512i slot_mask = _mm512_set1_epi32(NZ_RANS_PROB_SCALE - 1);
    *e = nz_rans_lookup16(_mm512_and_si512(x, slot_mask), dtab);
    x = _mm512_add_epi32(
        _mm512_mullo_epi32(_mm512_srli_epi32(*e, 20), _mm512_srli_epi32(x, NZ_RANS_PROB_BITS)),
        _mm512_and_si512(_mm512_srli_epi32(*e, 8), slot_mask));
    __mmask16 m = _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(NZ_RANS_L));
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)*p));
    x = _mm512_mask_or_epi32(x, m, _mm512_slli_epi32(x, 16), _mm512_maskz_expand_epi32(m, w));
    *p += 2 * (size_t)__builtin_popcount((unsigned)m);
    return x;
}

/** @return the AVX2 refill permutations: row m (8 dwords) gives, for each
 *  lane j, the index of the refill word lane j takes under need-mask m.
 *  Built once (thread-safe). */
const uint32_t *nz_rans_expand8(void);

NZ_AVX2_INLINE __m256i nz_rans_lookup8(__m256i slots, const uint32_t *tab) {
    uint32_t ix[8] __attribute__((aligned(32)));
    _mm256_store_si256((__m256i *)ix, slots);
    __m128i lo = _mm_cvtsi32_si128((int)tab[ix[0]]), hi = _mm_cvtsi32_si128((int)tab[ix[4]]);
    lo = _mm_insert_epi32(lo, (int)tab[ix[1]], 1);
    hi = _mm_insert_epi32(hi, (int)tab[ix[5]], 1);
    lo = _mm_insert_epi32(lo, (int)tab[ix[2]], 2);
    hi = _mm_insert_epi32(hi, (int)tab[ix[6]], 2);
    lo = _mm_insert_epi32(lo, (int)tab[ix[3]], 3);
    hi = _mm_insert_epi32(hi, (int)tab[ix[7]], 3);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

/* One 8-lane step; exp8 = nz_rans_expand8(). */
NZ_AVX2_INLINE __m256i nz_rans_step8(__m256i x, __m256i *e, const uint8_t **p, const uint32_t *dtab,
                                     const uint32_t *exp8) {
    const __m256i slot_mask = _mm256_set1_epi32(NZ_RANS_PROB_SCALE - 1);
    *e = nz_rans_lookup8(_mm256_and_si256(x, slot_mask), dtab);
    x = _mm256_add_epi32(
        _mm256_mullo_epi32(_mm256_srli_epi32(*e, 20), _mm256_srli_epi32(x, NZ_RANS_PROB_BITS)),
        _mm256_and_si256(_mm256_srli_epi32(*e, 8), slot_mask));
    __m256i need = _mm256_cmpeq_epi32(_mm256_min_epu32(x, _mm256_set1_epi32(NZ_RANS_L - 1)), x);
    int m = _mm256_movemask_ps(_mm256_castsi256_ps(need));
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)*p));
    w = _mm256_permutevar8x32_epi32(w, _mm256_load_si256((const __m256i *)(exp8 + 8 * m)));
    x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), w), need);
    *p += 2 * (size_t)__builtin_popcount((unsigned)m);
    return x;
}

#endif /* NZ_RANS_SIMD_H */

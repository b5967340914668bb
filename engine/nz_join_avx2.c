/* Joins of decoded planes into fp32 for the layouts without a fused kernel,
 * AVX2 + F16C (the Makefile adds -mavx2 -mf16c; without them this file
 * builds a stub and nz_codec_dec.c's portable loop runs). See nz_codec.h. */
#include "nz_codec.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>

uint64_t nz_join_f16_avx2(const uint8_t *e, const uint32_t *sm, float *out, uint64_t n) {
    const __m256i m10 = _mm256_set1_epi32(0x3ff);
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i ex = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(e + i)));
        __m256i s = _mm256_loadu_si256((const __m256i *)(sm + i));
        /* binary16 = sign << 15 | exponent << 10 | mantissa, in 32-bit lanes */
        __m256i h = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(s, 10), 15),
                                    _mm256_or_si256(_mm256_slli_epi32(ex, 10), _mm256_and_si256(s, m10)));
        /* vcvtph2ps quiets signalling NaNs: a group holding a NaN goes back to the portable loop */
        __m256i mag = _mm256_and_si256(h, _mm256_set1_epi32(0x7fff));
        if (_mm256_movemask_epi8(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7c00)))) break;
        __m128i h16 = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h16)); /* exact for every other value */
    }
    return i; /* elements done; the caller finishes from here */
}
#else
uint64_t nz_join_f16_avx2(const uint8_t *e, const uint32_t *sm, float *out, uint64_t n) { return 0; }
#endif

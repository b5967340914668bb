/* 32-way interleaved rANS: see nz_rans.h for the stream layout. */
#include "nz_rans.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "nz_rans_simd.h"
#define NZ_HAVE_AVX512_KERNEL 1
#else
#define NZ_HAVE_AVX512_KERNEL 0
#endif

#ifndef NZ_RANS_L
#define NZ_RANS_L (1u << 16) /* lower bound of the state interval */
#endif
#define RANS_L NZ_RANS_L

/* ---------------------------------------------------------------- tables */

int nz_rans_normalize(const uint64_t counts[256], uint32_t freq[256]) {
    uint64_t total = 0;
    int present = 0;
    for (int s = 0; s < 256; s++) {
        total += counts[s];
        present += counts[s] != 0;
        freq[s] = 0;
    }
    if (present == 0) return 0;
    if (present == 1) {
        for (int s = 0; s < 256; s++)
            if (counts[s]) freq[s] = NZ_RANS_PROB_SCALE;
        return 1;
    }
    int64_t sum = 0;
    for (int s = 0; s < 256; s++) {
        if (!counts[s]) continue;
        double f = (double)counts[s] * NZ_RANS_PROB_SCALE / (double)total;
        uint32_t q = (uint32_t)(f + 0.5);
        freq[s] = q ? q : 1;
        sum += freq[s];
    }
    /* Move single units where they cost least (greedy on the exact cost
     * change counts[s] * log2(f'/f)), until the sum is exact. */
    while (sum != NZ_RANS_PROB_SCALE) {
        int best = -1;
        double best_cost = 0;
        for (int s = 0; s < 256; s++) {
            if (!counts[s]) continue;
            double c;
            if (sum > NZ_RANS_PROB_SCALE) {
                if (freq[s] <= 1) continue;
                c = (double)counts[s] * log2((double)freq[s] / (freq[s] - 1)); /* bits lost */
            } else {
                c = -(double)counts[s] * log2((double)(freq[s] + 1) / freq[s]); /* bits gained */
            }
            if (best < 0 || c < best_cost) {
                best = s;
                best_cost = c;
            }
        }
        if (sum > NZ_RANS_PROB_SCALE) {
            freq[best]--;
            sum--;
        } else {
            freq[best]++;
            sum++;
        }
    }
    return present;
}

int nz_rans_check_freq(const uint32_t freq[256], nz_error *err) {
    uint64_t sum = 0;
    int present = 0;
    for (int s = 0; s < 256; s++) {
        if (freq[s] >= NZ_RANS_PROB_SCALE)
            return nz_fail(err, NZ_E_FORMAT, "rANS frequency of symbol %d is %u (must be < %u)", s, freq[s],
                           NZ_RANS_PROB_SCALE);
        sum += freq[s];
        present += freq[s] != 0;
    }
    if (sum != NZ_RANS_PROB_SCALE)
        return nz_fail(err, NZ_E_FORMAT, "rANS frequencies sum to %llu (must be %u)", (unsigned long long)sum,
                       NZ_RANS_PROB_SCALE);
    if (present < 2) return nz_fail(err, NZ_E_FORMAT, "rANS table has %d symbol(s) (must be >= 2)", present);
    return NZ_OK;
}

void nz_rans_build_dtab(const uint32_t freq[256], uint32_t dtab[NZ_RANS_PROB_SCALE]) {
    uint32_t cum = 0;
    for (uint32_t s = 0; s < 256; s++) {
        for (uint32_t k = 0; k < freq[s] && cum + k < NZ_RANS_PROB_SCALE; k++)
            dtab[cum + k] = freq[s] << 20 | k << 8 | s;
        cum += freq[s];
    }
}

/* ---------------------------------------------------------------- encoder */

int nz_rans_lanes_for(size_t n) { return n >= NZ_RANS_WIDE_MIN ? 64 : 32; }

size_t nz_rans_bound(size_t n) { return NZ_RANS_MAX_LANES * 4 + 2 * n + 2; }

static int bad_lanes(int lanes) { return lanes != 32 && lanes != 64; }

int nz_rans_encode(const uint8_t *sym, size_t n, const uint32_t freq[256], int lanes, uint8_t *dst,
                   size_t cap, size_t *out_len, nz_error *err) {
    if (bad_lanes(lanes)) return nz_fail(err, NZ_E_INVALID_ARG, "rANS encode: %d lanes (32 or 64)", lanes);
    uint32_t cum[256], c = 0;
    for (int s = 0; s < 256; s++) {
        cum[s] = c;
        c += freq[s];
    }
    if (c != NZ_RANS_PROB_SCALE)
        return nz_fail(err, NZ_E_INVALID_ARG, "rANS encode: frequencies sum to %u", c);
    size_t hdr = 4 * (size_t)lanes;
    if (cap < hdr) return nz_fail(err, NZ_E_INVALID_ARG, "rANS encode: output buffer too small");
    uint32_t x[NZ_RANS_MAX_LANES];
    for (int j = 0; j < lanes; j++) x[j] = RANS_L;
    /* Words are produced last-to-first; write them downwards from the end. */
    uint8_t *lo = dst + hdr, *wp = dst + cap;
    for (size_t i = n; i-- > 0;) {
        uint32_t s = sym[i], f = freq[s];
        uint32_t *xs = &x[i & (size_t)(lanes - 1)];
        if (!f)
            return nz_fail(err, NZ_E_INVALID_ARG, "rANS encode: symbol %u at %zu has zero frequency", s, i);
        uint64_t xmax = (uint64_t)((RANS_L >> NZ_RANS_PROB_BITS) << 16) * f;
        if (*xs >= xmax) {
            if (wp - lo < 2) return nz_fail(err, NZ_E_INVALID_ARG, "rANS encode: output buffer too small");
            wp -= 2;
            wp[0] = (uint8_t)*xs;
            wp[1] = (uint8_t)(*xs >> 8);
            *xs >>= 16;
        }
        *xs = ((*xs / f) << NZ_RANS_PROB_BITS) + (*xs % f) + cum[s];
    }
    for (int j = 0; j < lanes; j++) nz_wr32le(dst + 4 * j, x[j]);
    size_t words = (size_t)(dst + cap - wp);
    memmove(lo, wp, words);
    *out_len = hdr + words;
    return NZ_OK;
}

/* ---------------------------------------------------------------- decoders */

static atomic_int g_kernel = -1; /* requested nz_rans_kernel; -1: not yet read from NZ_SIMD */

static int cpu_has(nz_rans_kernel k) {
#if NZ_HAVE_AVX512_KERNEL
    __builtin_cpu_init();
    if (k == NZ_RANS_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    if (k == NZ_RANS_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif
    return k == NZ_RANS_SCALAR || k == NZ_RANS_AUTO;
}

int nz_rans_set_kernel(nz_rans_kernel k) {
    if ((unsigned)k > NZ_RANS_AVX512 || !cpu_has(k)) return NZ_E_UNSUPPORTED;
    atomic_store(&g_kernel, (int)k);
    return NZ_OK;
}

/* The kernel that runs: the requested one (NZ_SIMD=scalar|avx2|avx512 at
 * first use, when supported), else the best the CPU has. */
static nz_rans_kernel kernel(void) {
    int k = atomic_load(&g_kernel);
    if (k < 0) {
        const char *e = getenv("NZ_SIMD");
        k = NZ_RANS_AUTO;
        if (e && !strcmp(e, "scalar")) k = NZ_RANS_SCALAR;
        if (e && !strcmp(e, "avx2") && cpu_has(NZ_RANS_AVX2)) k = NZ_RANS_AVX2;
        if (e && !strcmp(e, "avx512") && cpu_has(NZ_RANS_AVX512)) k = NZ_RANS_AVX512;
        atomic_store(&g_kernel, k);
    }
    if (k != NZ_RANS_AUTO) return (nz_rans_kernel)k;
    static atomic_int best = -1;
    if (atomic_load(&best) < 0)
        atomic_store(&best, cpu_has(NZ_RANS_AVX512) ? NZ_RANS_AVX512
                            : cpu_has(NZ_RANS_AVX2) ? NZ_RANS_AVX2
                                                    : NZ_RANS_SCALAR);
    return (nz_rans_kernel)atomic_load(&best);
}

int nz_rans_force_scalar(int on) {
    int was = kernel() == NZ_RANS_SCALAR && atomic_load(&g_kernel) == NZ_RANS_SCALAR;
    atomic_store(&g_kernel, on ? NZ_RANS_SCALAR : NZ_RANS_AUTO);
    return was;
}

nz_rans_kernel nz_rans_active_kernel(void) { return kernel(); }

const char *nz_rans_decoder_name(void) {
    switch (kernel()) {
    case NZ_RANS_AVX512:
        return "avx512";
    case NZ_RANS_AVX2:
        return "avx2";
    default:
        return "scalar";
    }
}

static inline uint32_t bf16_bits(uint32_t e, uint32_t sm) {
    return (sm & 0x80u) << 24 | (e & 0xffu) << 23 | (sm & 0x7fu) << 16;
}

/* Decode symbols [i0, n) with the scalar loop; the state and stream position
 * continue from wherever the SIMD kernel stopped (always a group boundary). */
static int dec_scalar(const uint8_t **pp, const uint8_t *end, uint32_t *x, int lanes, const uint32_t *dtab,
                      size_t i0, size_t n, uint8_t *out, const uint8_t *sm, float *fout, nz_error *err) {
    const uint8_t *p = *pp;
    for (size_t i = i0; i < n; i++) {
        uint32_t *xs = &x[i & (size_t)(lanes - 1)];
        uint32_t e = dtab[*xs & (NZ_RANS_PROB_SCALE - 1)];
        *xs = (e >> 20) * (*xs >> NZ_RANS_PROB_BITS) + ((e >> 8) & (NZ_RANS_PROB_SCALE - 1));
        if (fout) {
            uint32_t b = bf16_bits(e, sm[i]);
            memcpy(&fout[i], &b, 4);
        } else {
            out[i] = (uint8_t)e;
        }
        if (*xs < RANS_L) {
            if (end - p < 2)
                return nz_fail(err, NZ_E_TRUNCATED, "rANS stream ends early (symbol %zu of %zu)", i, n);
            *xs = *xs << 16 | (uint32_t)p[0] | (uint32_t)p[1] << 8;
            p += 2;
        }
    }
    *pp = p;
    return NZ_OK;
}

/* Portable fast path for whole groups while a group's worth of words
 * (2 * lanes bytes) is left. Two passes per group: first every lane decodes
 * (independent lookups the CPU overlaps), then renormalisation walks the
 * lanes in order, branch-free (each word is read whether needed or not, the
 * pointer advances by 0 or 2), so the stream position is the only serial
 * chain and it costs one add per lane. @return groups decoded. */
static inline __attribute__((always_inline)) size_t
dec_fast(const uint8_t **pp, const uint8_t *end, uint32_t *restrict xio, const uint32_t *restrict dtab,
         size_t ngroups, uint8_t *restrict out, const uint8_t *restrict sm, float *restrict fout,
         const int lanes) {
    const uint8_t *p = *pp;
    uint32_t x[NZ_RANS_MAX_LANES], e[NZ_RANS_MAX_LANES];
    memcpy(x, xio, 4 * (size_t)lanes);
    size_t g = 0;
    for (; g < ngroups && end - p >= 2 * lanes; g++) {
        for (int j = 0; j < lanes; j++) {
            e[j] = dtab[x[j] & (NZ_RANS_PROB_SCALE - 1)];
            x[j] = (e[j] >> 20) * (x[j] >> NZ_RANS_PROB_BITS) + ((e[j] >> 8) & (NZ_RANS_PROB_SCALE - 1));
        }
        size_t i0 = g * (size_t)lanes;
        if (fout)
            for (int j = 0; j < lanes; j++) {
                uint32_t b = bf16_bits(e[j], sm[i0 + (size_t)j]);
                memcpy(&fout[i0 + (size_t)j], &b, 4);
            }
        else
            for (int j = 0; j < lanes; j++) out[i0 + (size_t)j] = (uint8_t)e[j];
        for (int j = 0; j < lanes; j++) {
            uint32_t need = x[j] < RANS_L, w = (uint32_t)p[0] | (uint32_t)p[1] << 8;
            x[j] = need ? x[j] << 16 | w : x[j];
            p += 2 * need;
        }
    }
    memcpy(xio, x, 4 * (size_t)lanes);
    *pp = p;
    return g;
}

static size_t dec_fast_32(const uint8_t **pp, const uint8_t *end, uint32_t *x, const uint32_t *dtab,
                          size_t ngroups, uint8_t *out, const uint8_t *sm, float *fout) {
    return dec_fast(pp, end, x, dtab, ngroups, out, sm, fout, 32);
}

static size_t dec_fast_64(const uint8_t **pp, const uint8_t *end, uint32_t *x, const uint32_t *dtab,
                          size_t ngroups, uint8_t *out, const uint8_t *sm, float *fout) {
    return dec_fast(pp, end, x, dtab, ngroups, out, sm, fout, 64);
}

#if NZ_HAVE_AVX512_KERNEL
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))
#define AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,popcnt"), always_inline)) static inline

/* Emit 16 decoded symbols: exponent bytes, or fp32 joined with bf16 sign+mantissa. */
AVX512_INLINE void emit16(__m512i e, size_t i, uint8_t *out, const uint8_t *sm, float *fout) {
    if (fout) { /* sm bytes into bytes 2 and 3 of each dword; C ? A : B merges sign+mantissa and e << 23 */
        const __m512i ctl = _mm512_set_epi32(
            0x0f0f8080, 0x0e0e8080, 0x0d0d8080, 0x0c0c8080, 0x0b0b8080, 0x0a0a8080, 0x09098080, 0x08088080,
            0x07078080, 0x06068080, 0x05058080, 0x04048080, 0x03038080, 0x02028080, 0x01018080, 0x00008080);
        __m512i s =
            _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(sm + i))), ctl);
        __m512i f =
            _mm512_ternarylogic_epi32(s, _mm512_slli_epi32(e, 23), _mm512_set1_epi32((int)0x807f0000u), 0xe4);
        _mm512_storeu_si512(fout + i, f);
    } else {
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(e));
    }
}

/* NV vectors of 16 states (lanes = 16 * NV). Each group reads at most
 * 2 * 16 * NV bytes; the loop stops while that much is not left, and the
 * scalar decoder finishes. @return groups decoded. */
#define NZ_RANS_KERNEL(NAME, NV)                                                                             \
    AVX512_TARGET static size_t NAME(const uint8_t **pp, const uint8_t *end, uint32_t *x,                    \
                                     const uint32_t *dtab, size_t ngroups, uint8_t *out, const uint8_t *sm,  \
                                     float *fout) {                                                          \
        __m512i v[NV], e[NV];                                                                                \
        for (int k = 0; k < NV; k++) v[k] = _mm512_loadu_si512(x + 16 * k);                                  \
        const uint8_t *p = *pp;                                                                              \
        size_t g = 0;                                                                                        \
        for (; g < ngroups && end - p >= 32 * NV; g++) {                                                     \
            _Pragma("GCC unroll 4") for (int k = 0; k < NV; k++) v[k] =                                      \
                nz_rans_step16(v[k], &e[k], &p, dtab);                                                       \
            _Pragma("GCC unroll 4") for (int k = 0; k < NV; k++)                                             \
                emit16(e[k], (16 * NV) * g + 16 * (size_t)k, out, sm, fout);                                 \
        }                                                                                                    \
        for (int k = 0; k < NV; k++) _mm512_storeu_si512(x + 16 * k, v[k]);                                  \
        *pp = p;                                                                                             \
        return g;                                                                                            \
    }
NZ_RANS_KERNEL(dec_avx512_32, 2)
NZ_RANS_KERNEL(dec_avx512_64, 4)

/* AVX2: 8 lanes per vector; renormalisation words are expanded into the
 * lanes that need them with a permutation chosen by the 8-bit need mask. */
#define AVX2_TARGET __attribute__((target("avx2,popcnt")))
#define AVX2_INLINE __attribute__((target("avx2,popcnt"), always_inline)) static inline

static uint32_t g_expand8[256][8] __attribute__((aligned(32)));

static void init_expand8(void) {
    for (int m = 0; m < 256; m++)
        for (int j = 0, k = 0; j < 8; j++) g_expand8[m][j] = (m >> j & 1) ? (uint32_t)k++ : 0;
}

const uint32_t *nz_rans_expand8(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_expand8);
    return &g_expand8[0][0];
}

AVX2_INLINE void emit8(__m256i e, size_t i, uint8_t *out, const uint8_t *sm, float *fout) {
    if (fout) {
        __m256i s = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sm + i)));
        __m256i f = _mm256_or_si256(
            _mm256_slli_epi32(_mm256_and_si256(s, _mm256_set1_epi32(0x80)), 24),
            _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(e, _mm256_set1_epi32(0xff)), 23),
                            _mm256_slli_epi32(_mm256_and_si256(s, _mm256_set1_epi32(0x7f)), 16)));
        _mm256_storeu_si256((__m256i *)(fout + i), f);
    } else {
        __m256i b = _mm256_and_si256(e, _mm256_set1_epi32(0xff));
        __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        _mm_storel_epi64((__m128i *)(out + i), _mm_packus_epi16(w16, w16));
    }
}

#define NZ_RANS_KERNEL_AVX2(NAME, NV)                                                                        \
    AVX2_TARGET static size_t NAME(const uint8_t **pp, const uint8_t *end, uint32_t *x,                      \
                                   const uint32_t *dtab, size_t ngroups, uint8_t *out, const uint8_t *sm,    \
                                   float *fout) {                                                            \
        __m256i v[NV], e[NV];                                                                                \
        _Pragma("GCC unroll 8") for (int k = 0; k < NV; k++) v[k] =                                          \
            _mm256_loadu_si256((const __m256i *)(x + 8 * k));                                                \
        const uint8_t *p = *pp;                                                                              \
        const uint32_t *exp8 = nz_rans_expand8();                                                            \
        size_t g = 0;                                                                                        \
        for (; g < ngroups && end - p >= 16 * NV; g++) {                                                     \
            _Pragma("GCC unroll 8") for (int k = 0; k < NV; k++) v[k] =                                      \
                nz_rans_step8(v[k], &e[k], &p, dtab, exp8);                                                  \
            _Pragma("GCC unroll 8") for (int k = 0; k < NV; k++)                                             \
                emit8(e[k], (8 * NV) * g + 8 * (size_t)k, out, sm, fout);                                    \
        }                                                                                                    \
        _Pragma("GCC unroll 8") for (int k = 0; k < NV; k++)                                                 \
            _mm256_storeu_si256((__m256i *)(x + 8 * k), v[k]);                                               \
        *pp = p;                                                                                             \
        return g;                                                                                            \
    }
NZ_RANS_KERNEL_AVX2(dec_avx2_32, 4)
NZ_RANS_KERNEL_AVX2(dec_avx2_64, 8)
#endif

static int dec_common(const uint8_t *src, size_t len, int lanes, const uint32_t *dtab, uint8_t *out,
                      const uint8_t *sm, float *fout, size_t n, nz_error *err) {
    if (bad_lanes(lanes)) return nz_fail(err, NZ_E_INVALID_ARG, "rANS: %d lanes (32 or 64)", lanes);
    size_t hdr = 4 * (size_t)lanes;
    if (len < hdr)
        return nz_fail(err, NZ_E_TRUNCATED, "rANS stream of %zu bytes is shorter than its %zu-byte header",
                       len, hdr);
    if ((len - hdr) % 2)
        return nz_fail(err, NZ_E_CORRUPT, "rANS stream length %zu is not header + whole words", len);
    uint32_t x[NZ_RANS_MAX_LANES] __attribute__((aligned(64)));
    for (int j = 0; j < lanes; j++) {
        x[j] = nz_rd32le(src + 4 * j);
        if (x[j] < RANS_L) return nz_fail(err, NZ_E_CORRUPT, "rANS initial state %d out of range", j);
    }
    const uint8_t *p = src + hdr, *end = src + len;
    size_t done = 0, ngroups = n / (size_t)lanes;
#if NZ_HAVE_AVX512_KERNEL
    nz_rans_kernel k = kernel();
    if (k == NZ_RANS_AVX512)
        done = lanes == 64 ? dec_avx512_64(&p, end, x, dtab, ngroups, out, sm, fout)
                           : dec_avx512_32(&p, end, x, dtab, ngroups, out, sm, fout);
    if (k == NZ_RANS_AVX2) {
        done = lanes == 64 ? dec_avx2_64(&p, end, x, dtab, ngroups, out, sm, fout)
                           : dec_avx2_32(&p, end, x, dtab, ngroups, out, sm, fout);
    }
#endif
    if (done < ngroups) { /* scalar fast path, continuing where SIMD stopped */
        size_t o = done * (size_t)lanes;
        done += lanes == 64 ? dec_fast_64(&p, end, x, dtab, ngroups - done, out ? out + o : NULL,
                                          sm ? sm + o : NULL, fout ? fout + o : NULL)
                            : dec_fast_32(&p, end, x, dtab, ngroups - done, out ? out + o : NULL,
                                          sm ? sm + o : NULL, fout ? fout + o : NULL);
    }
    done *= (size_t)lanes;
    int rc = dec_scalar(&p, end, x, lanes, dtab, done, n, out, sm, fout, err);
    if (rc) return rc;
    if (p != end) return nz_fail(err, NZ_E_CORRUPT, "rANS stream has %zu unread bytes", (size_t)(end - p));
    for (int j = 0; j < lanes; j++)
        if (x[j] != RANS_L) return nz_fail(err, NZ_E_CORRUPT, "rANS final state %d is wrong", j);
    return NZ_OK;
}

int nz_rans_decode(const uint8_t *src, size_t len, int lanes, const uint32_t *dtab, uint8_t *out, size_t n,
                   nz_error *err) {
    return dec_common(src, len, lanes, dtab, out, NULL, NULL, n, err);
}

int nz_rans_decode_bf16(const uint8_t *src, size_t len, int lanes, const uint32_t *dtab, const uint8_t *sm,
                        float *out, size_t n, nz_error *err) {
    return dec_common(src, len, lanes, dtab, NULL, sm, out, n, err);
}

/* Unit tests for engine/nz_rans.c: frequency normalisation (validity and
 * cost), encode/decode round trips over many lengths and alphabets with both
 * the scalar and the AVX-512 decoder, the fused bf16 decoder, and every error
 * path: truncations, bit flips, bad tables, small output buffers. Every
 * encoded stream lives in a heap block of exactly its length so that ASan
 * catches any read past its end. */
#include "test_util.h"

#include "nz_alloc.h"
#include "nz_rans.h"

#include <math.h>
#include <stdio.h>

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

static size_t g_scratch0; /* NZ_MEM_SCRATCH at the start of the current test */

static int per_test_setup(void **state) {
    g_scratch0 = nz_mem_current(NZ_MEM_SCRATCH);
    nz_rans_force_scalar(0);
    return 0;
}

static int per_test_teardown(void **state) {
    nz_rans_force_scalar(0);
    size_t now = nz_mem_current(NZ_MEM_SCRATCH);
    if (now != g_scratch0) {
        print_error("scratch memory leaked: %zu bytes before the test, %zu after\n", g_scratch0, now);
        return -1;
    }
    return 0;
}

/* Frequency table whose symbols are 0..nsym-1 with the given weights. */
static void table_from_counts(const uint64_t counts[256], uint32_t freq[256]) {
    int present = nz_rans_normalize(counts, freq);
    assert_true(present >= 2);
    assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_OK);
}

#define HDR(lanes) (4 * (size_t)(lanes)) /* state header bytes */

/* Encode into a heap block of exactly the encoded size. */
static uint8_t *encode_exact(const uint8_t *sym, size_t n, const uint32_t freq[256], int lanes, size_t *len) {
    size_t cap = nz_rans_bound(n);
    uint8_t *tmp = xmalloc(cap);
    nz_error err = {0};
    int rc = nz_rans_encode(sym, n, freq, lanes, tmp, cap, len, &err);
    if (rc != NZ_OK) fail_msg("nz_rans_encode(n=%zu, %d lanes) failed: %d %s", n, lanes, rc, err.msg);
    assert_true(*len >= HDR(lanes));
    assert_true(*len <= cap);
    assert_int_equal((*len - HDR(lanes)) % 2, 0);
    uint8_t *out = dup_exact(tmp, *len);
    free(tmp);
    return out;
}

/* Decoder kernels every test runs: index 0 the automatic choice (AVX-512 on
 * machines that have it), 1 scalar, 2 AVX2 (scalar again where the CPU lacks
 * AVX2, so the loops stay the same everywhere). */
#define NKERN 3
static const nz_rans_kernel KERN[NKERN] = {NZ_RANS_AUTO, NZ_RANS_SCALAR, NZ_RANS_AVX2};
static const char *const KNAME[NKERN] = {"auto", "scalar", "avx2"};

static void use_kernel(int which) {
    if (nz_rans_set_kernel(KERN[which]) != NZ_OK) assert_int_equal(nz_rans_set_kernel(NZ_RANS_SCALAR), NZ_OK);
}

/* Decode with the chosen kernel. */
static int decode_with(int scalar, const uint8_t *src, size_t len, int lanes, const uint32_t *dtab,
                       uint8_t *out, size_t n, nz_error *err) {
    use_kernel(scalar);
    int rc = nz_rans_decode(src, len, lanes, dtab, out, n, err);
    nz_rans_force_scalar(0);
    return rc;
}

static int decode_bf16_with(int scalar, const uint8_t *src, size_t len, int lanes, const uint32_t *dtab,
                            const uint8_t *sm, float *out, size_t n, nz_error *err) {
    use_kernel(scalar);
    int rc = nz_rans_decode_bf16(src, len, lanes, dtab, sm, out, n, err);
    nz_rans_force_scalar(0);
    return rc;
}

/* Encode sym[0..n) with freq in 32 and in 64 lanes, decode with both
 * decoders, require all to give back exactly sym. */
static void roundtrip(const uint8_t *sym, size_t n, const uint32_t freq[256], const char *what) {
    uint32_t *dtab = xmalloc(NZ_RANS_PROB_SCALE * sizeof *dtab);
    nz_rans_build_dtab(freq, dtab);
    for (int lanes = 32; lanes <= 64; lanes += 32) {
        size_t len = 0;
        uint8_t *enc = encode_exact(sym, n, freq, lanes, &len);
        for (int scalar = 0; scalar < NKERN; scalar++) {
            uint8_t *out = xmalloc(n);
            memset(out, 0xA5, n);
            nz_error err = {0};
            int rc = decode_with(scalar, enc, len, lanes, dtab, out, n, &err);
            if (rc != NZ_OK)
                fail_msg("%s n=%zu lanes %d %s decoder: decode failed %d (%s)", what, n, lanes, KNAME[scalar],
                         rc, err.msg);
            for (size_t i = 0; i < n; i++)
                if (out[i] != sym[i])
                    fail_msg("%s n=%zu lanes %d %s decoder: symbol %zu is %u, expected %u", what, n, lanes,
                             KNAME[scalar], i, out[i], sym[i]);
            free(out);
        }
        free(enc);
    }
    free(dtab);
}

/* Exponent byte of a standard normal sample stored as fp32. */
static uint8_t gauss_exponent(uint64_t *s) {
    float f = (float)tu_gauss(s);
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint8_t)(u >> 23);
}

/* Draw n symbols from a distribution given by integer weights (sum > 0). */
static void draw(uint64_t *s, const uint64_t w[256], uint8_t *sym, size_t n) {
    uint64_t total = 0;
    for (int i = 0; i < 256; i++) total += w[i];
    for (size_t k = 0; k < n; k++) {
        uint64_t r = tu_rand(s) % total;
        int i = 0;
        while (r >= w[i]) r -= w[i++];
        sym[k] = (uint8_t)i;
    }
}

/* ------------------------------------------------------------------------ */
/* nz_rans_normalize / nz_rans_check_freq / nz_rans_build_dtab              */
/* ------------------------------------------------------------------------ */

static void check_normalized(const uint64_t counts[256], const uint32_t freq[256], int ret) {
    uint64_t sum = 0;
    int present = 0;
    for (int s = 0; s < 256; s++) {
        sum += freq[s];
        if (counts[s]) {
            present++;
            if (freq[s] < 1)
                fail_msg("present symbol %d (count %llu) got frequency 0", s, (unsigned long long)counts[s]);
        } else if (freq[s] != 0) {
            fail_msg("absent symbol %d got frequency %u", s, freq[s]);
        }
    }
    assert_int_equal(ret, present);
    if (present)
        assert_int_equal(sum, NZ_RANS_PROB_SCALE);
    else
        assert_int_equal(sum, 0);
}

static void test_normalize_basic(void **state) {
    uint64_t counts[256];
    uint32_t freq[256];

    /* all zero counts: returns 0 and clears the table */
    memset(counts, 0, sizeof counts);
    memset(freq, 0x5A, sizeof freq);
    assert_int_equal(nz_rans_normalize(counts, freq), 0);
    for (int s = 0; s < 256; s++) assert_int_equal(freq[s], 0);

    /* one symbol, whatever its count: 4096 and returns 1 */
    const int lone[] = {0, 1, 77, 255};
    const uint64_t lone_cnt[] = {1, 5, 1000000, UINT64_MAX / 2};
    for (size_t i = 0; i < sizeof lone / sizeof *lone; i++) {
        memset(counts, 0, sizeof counts);
        memset(freq, 0x5A, sizeof freq);
        counts[lone[i]] = lone_cnt[i];
        assert_int_equal(nz_rans_normalize(counts, freq), 1);
        for (int s = 0; s < 256; s++) assert_int_equal(freq[s], s == lone[i] ? NZ_RANS_PROB_SCALE : 0);
    }

    /* two equal symbols: 2048 each */
    memset(counts, 0, sizeof counts);
    counts[3] = counts[200] = 12345;
    assert_int_equal(nz_rans_normalize(counts, freq), 2);
    assert_int_equal(freq[3], 2048);
    assert_int_equal(freq[200], 2048);

    /* all 256 symbols equally likely: 16 each */
    for (int s = 0; s < 256; s++) counts[s] = 999;
    assert_int_equal(nz_rans_normalize(counts, freq), 256);
    for (int s = 0; s < 256; s++) assert_int_equal(freq[s], 16);

    /* extreme skew: one huge count and 255 singletons; each singleton must
     * still get a frequency of at least 1 */
    for (int s = 0; s < 256; s++) counts[s] = 1;
    counts[128] = 1000000000000ull;
    int r = nz_rans_normalize(counts, freq);
    check_normalized(counts, freq, r);
    assert_int_equal(freq[128], NZ_RANS_PROB_SCALE - 255);

    /* proportional counts come back exactly */
    memset(counts, 0, sizeof counts);
    counts[10] = 1024 * 7;
    counts[11] = 2048 * 7;
    counts[12] = 1024 * 7;
    assert_int_equal(nz_rans_normalize(counts, freq), 3);
    assert_int_equal(freq[10], 1024);
    assert_int_equal(freq[11], 2048);
    assert_int_equal(freq[12], 1024);

    /* random tables: random subsets with random (often tiny or huge) counts */
    uint64_t seed = 0x1234567ull;
    int iters = tu_quick() ? 200 : 2000;
    for (int it = 0; it < iters; it++) {
        int density = 1 + (int)(tu_rand(&seed) % 256);
        for (int s = 0; s < 256; s++) {
            counts[s] = 0;
            if ((int)(tu_rand(&seed) % 256) < density) {
                switch (tu_rand(&seed) % 3) {
                case 0:
                    counts[s] = 1 + tu_rand(&seed) % 3;
                    break;
                case 1:
                    counts[s] = 1 + tu_rand(&seed) % 100000;
                    break;
                default:
                    counts[s] = 1 + (tu_rand(&seed) >> 24);
                    break;
                }
            }
        }
        r = nz_rans_normalize(counts, freq);
        check_normalized(counts, freq, r);
        if (r >= 2) assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_OK);
    }
}

/* The quantised table must cost close to the empirical entropy, and the coded
 * stream must be close to that cost: 32 lanes for 64K symbols, 64 lanes from
 * NZ_RANS_WIDE_MIN symbols on (the header promises < 0.02 bits/symbol of
 * state overhead there). */
static void cost_case(size_t n, int lanes, uint64_t seed) {
    uint8_t *sym = xmalloc(n);
    uint64_t counts[256] = {0};
    for (size_t i = 0; i < n; i++) counts[sym[i] = gauss_exponent(&seed)]++;
    uint32_t freq[256];
    int present = nz_rans_normalize(counts, freq);
    check_normalized(counts, freq, present);
    assert_true(present > 10); /* a Gaussian spans many binades */

    double h0 = 0, cost = 0;
    for (int s = 0; s < 256; s++) {
        if (!counts[s]) continue;
        double p = (double)counts[s] / n;
        h0 -= p * log2(p);
        cost -= p * log2((double)freq[s] / NZ_RANS_PROB_SCALE);
    }
    size_t len = 0;
    uint8_t *enc = encode_exact(sym, n, freq, lanes, &len);
    double coded = 8.0 * len / n;
    print_message("    %zu gaussian exponents, %d lanes: H0 %.4f, table cost %.4f, coded %.4f bits/symbol "
                  "(%d symbols)\n",
                  n, lanes, h0, cost, coded, present);
    if (cost - h0 > 0.005) fail_msg("table cost %.5f exceeds H0 %.5f by more than 0.005 bits", cost, h0);
    if (coded - cost > 0.02)
        fail_msg("%d lanes, n=%zu: coded %.5f bits/symbol exceeds the table cost %.5f by more than 0.02",
                 lanes, n, coded, cost);
    if (lanes == 32 && coded - h0 > 0.02)
        fail_msg("coded size %.5f bits/symbol exceeds H0 %.5f by more than 0.02", coded, h0);
    assert_true(coded > h0 - 0.01); /* sanity: cannot beat the entropy by much */
    free(enc);
    free(sym);
}

static void test_normalize_cost_near_entropy(void **state) {
    cost_case(65536, 32, 42);
    cost_case(NZ_RANS_WIDE_MIN, 64, 43);
    assert_int_equal(nz_rans_lanes_for(NZ_RANS_WIDE_MIN), 64);
}

static void test_check_freq(void **state) {
    uint32_t freq[256];
    nz_error err;

    memset(freq, 0, sizeof freq);
    freq[0] = 4095;
    freq[1] = 1;
    assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_OK);

    /* sum too small / too large */
    freq[1] = 0;
    freq[2] = 0;
    freq[0] = 2000;
    freq[7] = 2095;
    memset(&err, 0, sizeof err);
    assert_int_equal(nz_rans_check_freq(freq, &err), NZ_E_FORMAT);
    assert_int_equal(err.code, NZ_E_FORMAT);
    assert_non_null(strstr(err.msg, "sum"));
    freq[7] = 2097;
    assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_E_FORMAT);

    /* a frequency of 4096 or more (the lone-symbol table) */
    memset(freq, 0, sizeof freq);
    freq[9] = 4096;
    memset(&err, 0, sizeof err);
    assert_int_equal(nz_rans_check_freq(freq, &err), NZ_E_FORMAT);
    assert_int_equal(err.code, NZ_E_FORMAT);
    assert_true(strlen(err.msg) > 0);
    /* huge entries that would wrap a 32-bit sum back to 4096 */
    memset(freq, 0, sizeof freq);
    freq[0] = 0x80000000u;
    freq[1] = 0x80000000u;
    freq[2] = 4096;
    assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_E_FORMAT);
    memset(freq, 0, sizeof freq);
    freq[0] = 0xFFFFFFFFu;
    freq[1] = 4097;
    assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_E_FORMAT);

    /* all zero */
    memset(freq, 0, sizeof freq);
    assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_E_FORMAT);

    /* every valid 2-symbol split passes */
    for (uint32_t a = 1; a < NZ_RANS_PROB_SCALE; a += 97) {
        memset(freq, 0, sizeof freq);
        freq[0] = a;
        freq[255] = NZ_RANS_PROB_SCALE - a;
        assert_int_equal(nz_rans_check_freq(freq, NULL), NZ_OK);
    }
}

static void test_build_dtab(void **state) {
    uint64_t counts[256] = {0}, seed = 5;
    for (int s = 0; s < 256; s += 3) counts[s] = 1 + tu_rand(&seed) % 1000;
    uint32_t freq[256], dtab[NZ_RANS_PROB_SCALE];
    table_from_counts(counts, freq);
    nz_rans_build_dtab(freq, dtab);
    uint32_t cum = 0;
    for (int s = 0; s < 256; s++) {
        for (uint32_t k = 0; k < freq[s]; k++) {
            uint32_t e = dtab[cum + k];
            if ((e & 0xff) != (uint32_t)s || (e >> 20) != freq[s] || ((e >> 8) & 0xfff) != k)
                fail_msg("dtab[%u] = %#x, expected sym %d freq %u offset %u", cum + k, e, s, freq[s], k);
        }
        cum += freq[s];
    }
    assert_int_equal(cum, NZ_RANS_PROB_SCALE);
}

/* ------------------------------------------------------------------------ */
/* round trips                                                              */
/* ------------------------------------------------------------------------ */

static void test_decoder_selection(void **state) {
    assert_int_equal(nz_rans_force_scalar(1), 0); /* setup left it at 0 */
    assert_string_equal(nz_rans_decoder_name(), "scalar");
    assert_int_equal(nz_rans_force_scalar(1), 1);
    assert_int_equal(nz_rans_force_scalar(0), 1);
    const char *name = nz_rans_decoder_name();
    assert_true(!strcmp(name, "avx512") || !strcmp(name, "avx2") || !strcmp(name, "scalar"));
    if (nz_rans_set_kernel(NZ_RANS_AVX2) == NZ_OK) assert_string_equal(nz_rans_decoder_name(), "avx2");
    assert_int_equal(nz_rans_set_kernel((nz_rans_kernel)42), NZ_E_UNSUPPORTED);
    nz_rans_force_scalar(0);
#if defined(__x86_64__)
    __builtin_cpu_init();
    int cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl");
    if (cpu && strcmp(name, "avx512") != 0)
        fail_msg("CPU has AVX-512 F/BW/VL but the decoder in use is '%s'", name);
#endif
    if (strcmp(name, "avx512") != 0)
        print_message("    note: AVX-512 decoder not available here; only the scalar decoder is "
                      "exercised\n");
}

/* Many lengths around the 32-lane group size and the SIMD/scalar hand-over,
 * several alphabets; both decoders must return the input. */
static void test_roundtrip_lengths(void **state) {
    const size_t lens[] = {0,
                           1,
                           2,
                           15,
                           16,
                           17,
                           31,
                           32,
                           33,
                           63,
                           64,
                           65,
                           95,
                           96,
                           97,
                           127,
                           128,
                           129,
                           191,
                           192,
                           193,
                           255,
                           256,
                           257,
                           1000,
                           1023,
                           1024,
                           4097,
                           9999,
                           65536 + 7,
                           NZ_RANS_WIDE_MIN - 1,
                           NZ_RANS_WIDE_MIN + 33};
    size_t maxn = NZ_RANS_WIDE_MIN + 33;
    uint8_t *sym = xmalloc(maxn);
    uint64_t seed = 0xC0FFEE;

    enum { A_TWO, A_UNIFORM256, A_SKEW, A_GAUSS, A_EXTREME, A_ALLRARE, A_RANDOM, A_NALPHA };
    const char *names[A_NALPHA] = {"2 symbols",    "256 uniform", "skewed geometric", "gaussian exps",
                                   "4095:1 table", "all rare",    "random table"};
    for (int a = 0; a < A_NALPHA; a++) {
        uint64_t w[256] = {0};
        uint32_t freq[256];
        switch (a) {
        case A_TWO:
            w[0] = w[1] = 1;
            break;
        case A_UNIFORM256:
            for (int s = 0; s < 256; s++) w[s] = 1;
            break;
        case A_SKEW: /* geometric: symbol s has weight 2^(20-s) for 20 symbols */
            for (int s = 0; s < 20; s++) w[100 + s] = 1ull << (20 - s);
            break;
        case A_GAUSS: {
            uint64_t s2 = 99;
            for (int i = 0; i < 100000; i++) w[gauss_exponent(&s2)]++;
            break;
        }
        case A_EXTREME: /* symbol 7 almost always: few renormalisation words */
        case A_ALLRARE: /* same table but the data is only the rare symbol: 12 bits each */
            w[7] = 4095;
            w[250] = 1;
            break;
        default:
            for (int s = 0; s < 256; s++)
                if (tu_rand(&seed) % 4 == 0) w[s] = 1 + tu_rand(&seed) % 5000;
            w[0] = w[0] ? w[0] : 1;
            w[1] = w[1] ? w[1] : 1;
            break;
        }
        table_from_counts(w, freq);
        for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
            size_t n = lens[li];
            if (tu_quick() && n > 5000 && a != A_GAUSS) continue;
            if (a == A_ALLRARE)
                memset(sym, 250, n);
            else
                draw(&seed, w, sym, n);
            roundtrip(sym, n, freq, names[a]);
        }
    }
    free(sym);
}

/* Symbols that use every slot region of a dense table, long runs, and
 * alternating patterns, so every lane sees both renormalising and quiet
 * steps. */
static void test_roundtrip_patterns(void **state) {
    uint64_t w[256];
    uint32_t freq[256];
    for (int s = 0; s < 256; s++) w[s] = 1 + (uint64_t)s * s;
    table_from_counts(w, freq);
    const size_t n = 5000;
    uint8_t *sym = xmalloc(n);
    for (size_t i = 0; i < n; i++) sym[i] = (uint8_t)i; /* every symbol, cyclic */
    roundtrip(sym, n, freq, "cyclic");
    for (size_t i = 0; i < n; i++) sym[i] = (i / 97) % 2 ? 255 : 0; /* runs of rarest/commonest */
    roundtrip(sym, n, freq, "runs");
    for (size_t i = 0; i < n; i++) sym[i] = (i % 64) < 32 ? 0 : 255; /* lanes alternate by group */
    roundtrip(sym, n, freq, "lane groups");
    for (size_t i = 0; i < n; i++) sym[i] = (i % 32) < 16 ? 0 : 255; /* half lanes rare */
    roundtrip(sym, n, freq, "half lanes");
    free(sym);
}

/* nz_rans_decode_bf16 == floats assembled from nz_rans_decode + sm bytes. */
static void test_decode_bf16_fused(void **state) {
    const size_t lens[] = {0, 1, 31, 32, 33, 63, 64, 65, 100, 129, 1000, 4096 + 5, 20000};
    uint64_t seed = 77, w[256] = {0};
    for (int i = 0; i < 50000; i++) w[gauss_exponent(&seed)]++;
    w[0] = w[255] = 50; /* zeros/subnormals and Inf/NaN exponents too */
    uint32_t freq[256], *dtab = xmalloc(NZ_RANS_PROB_SCALE * sizeof *dtab);
    table_from_counts(w, freq);
    nz_rans_build_dtab(freq, dtab);
    for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
        size_t n = lens[li], len;
        uint8_t *sym = xmalloc(n), *sm = xmalloc(n), *exps = xmalloc(n);
        draw(&seed, w, sym, n);
        for (size_t i = 0; i < n; i++) sm[i] = (uint8_t)tu_rand(&seed);
        uint8_t *smx = dup_exact(sm, n); /* exact size: catches over-reads of sm */
        for (int lanes = 32; lanes <= 64; lanes += 32) {
            uint8_t *enc = encode_exact(sym, n, freq, lanes, &len);
            for (int scalar = 0; scalar < NKERN; scalar++) {
                float *out = xmalloc(n * sizeof *out);
                nz_error err = {0};
                assert_int_equal(decode_with(scalar, enc, len, lanes, dtab, exps, n, &err), NZ_OK);
                int rc = decode_bf16_with(scalar, enc, len, lanes, dtab, smx, out, n, &err);
                if (rc) fail_msg("fused decode n=%zu lanes %d failed: %s", n, lanes, err.msg);
                for (size_t i = 0; i < n; i++) {
                    uint32_t want = (uint32_t)(sm[i] >> 7) << 31 | (uint32_t)exps[i] << 23 |
                                    (uint32_t)(sm[i] & 0x7f) << 16;
                    uint32_t got;
                    memcpy(&got, &out[i], 4);
                    if (got != want || exps[i] != sym[i])
                        fail_msg("fused %s n=%zu lanes %d element %zu: bits %#010x, expected %#010x",
                                 KNAME[scalar], n, lanes, i, got, want);
                }
                free(out);
            }
            free(enc);
        }
        free(smx);
        free(sym);
        free(sm);
        free(exps);
    }
    free(dtab);
}

/* ------------------------------------------------------------------------ */
/* errors and corruption                                                    */
/* ------------------------------------------------------------------------ */

static void test_lanes(void **state) {
    assert_int_equal(nz_rans_lanes_for(0), 32);
    assert_int_equal(nz_rans_lanes_for(NZ_RANS_WIDE_MIN - 1), 32);
    assert_int_equal(nz_rans_lanes_for(NZ_RANS_WIDE_MIN), 64);
    assert_int_equal(nz_rans_lanes_for((size_t)1 << 40), 64);
    assert_true(nz_rans_bound(0) >= HDR(NZ_RANS_MAX_LANES));

    uint32_t freq[256] = {0}, dtab[NZ_RANS_PROB_SCALE];
    freq[4] = 1000;
    freq[5] = 3096;
    nz_rans_build_dtab(freq, dtab);
    uint8_t sym[500], out[500], buf[4096], sm[500] = {0};
    float fo[500];
    for (int i = 0; i < 500; i++) sym[i] = (uint8_t)(4 + (i * 7 % 5 == 0));
    size_t len;
    const int bad[] = {0, 1, 16, 31, 33, 48, 63, 65, 128, -32};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        nz_error err = {0};
        assert_int_equal(nz_rans_encode(sym, 500, freq, bad[i], buf, sizeof buf, &len, &err),
                         NZ_E_INVALID_ARG);
        assert_int_equal(err.code, NZ_E_INVALID_ARG);
        for (int scalar = 0; scalar < NKERN; scalar++) {
            memset(&err, 0, sizeof err);
            assert_int_equal(decode_with(scalar, buf, 1024, bad[i], dtab, out, 500, &err), NZ_E_INVALID_ARG);
            assert_int_equal(err.code, NZ_E_INVALID_ARG);
            assert_int_equal(decode_bf16_with(scalar, buf, 1024, bad[i], dtab, sm, fo, 500, NULL),
                             NZ_E_INVALID_ARG);
        }
    }
    /* a stream decoded with the other lane count fails */
    for (int lanes = 32; lanes <= 64; lanes += 32) {
        uint8_t *enc = encode_exact(sym, 500, freq, lanes, &len);
        for (int scalar = 0; scalar < NKERN; scalar++) {
            assert_int_equal(decode_with(scalar, enc, len, lanes, dtab, out, 500, NULL), NZ_OK);
            assert_memory_equal(out, sym, 500);
            assert_true(decode_with(scalar, enc, len, 96 - lanes, dtab, out, 500, NULL) < 0);
        }
        free(enc);
    }
}

static void test_encode_errors(void **state) {
    enum { N = 2000 }; /* enough symbols to overflow the 16 spare bits of each state */
    uint8_t sym[N], buf[8192];
    for (int lanes = 32; lanes <= 64; lanes += 32) {
        uint32_t freq[256] = {0};
        freq[1] = 3000;
        freq[2] = 1096;
        for (int i = 0; i < N; i++) sym[i] = (uint8_t)(1 + i % 2);
        size_t len = 0;
        nz_error err;

        /* symbol with zero frequency */
        sym[57] = 3;
        memset(&err, 0, sizeof err);
        assert_int_equal(nz_rans_encode(sym, N, freq, lanes, buf, sizeof buf, &len, &err), NZ_E_INVALID_ARG);
        assert_int_equal(err.code, NZ_E_INVALID_ARG);
        assert_non_null(strstr(err.msg, "zero frequency"));
        assert_int_equal(nz_rans_encode(sym, N, freq, lanes, buf, sizeof buf, &len, NULL), NZ_E_INVALID_ARG);
        sym[57] = 0; /* absent symbol 0 as well */
        assert_int_equal(nz_rans_encode(sym, N, freq, lanes, buf, sizeof buf, &len, NULL), NZ_E_INVALID_ARG);
        sym[57] = 1;

        /* table that does not sum to 4096 */
        freq[2] = 1095;
        memset(&err, 0, sizeof err);
        assert_int_equal(nz_rans_encode(sym, N, freq, lanes, buf, sizeof buf, &len, &err), NZ_E_INVALID_ARG);
        assert_int_equal(err.code, NZ_E_INVALID_ARG);
        freq[2] = 1096;

        /* buffer smaller than the state header */
        for (size_t cap = 0; cap < HDR(lanes); cap += 17) {
            uint8_t *small = xmalloc(cap);
            assert_int_equal(nz_rans_encode(sym, N, freq, lanes, small, cap, &len, NULL), NZ_E_INVALID_ARG);
            free(small);
        }

        /* exact size works; every smaller size fails, never writing outside */
        size_t need = 0;
        assert_int_equal(nz_rans_encode(sym, N, freq, lanes, buf, sizeof buf, &need, NULL), NZ_OK);
        assert_true(need > HDR(lanes) + 100); /* must renormalise */
        for (size_t cap = HDR(lanes); cap <= need; cap++) {
            uint8_t *b = xmalloc(cap);
            memset(&err, 0, sizeof err);
            int rc = nz_rans_encode(sym, N, freq, lanes, b, cap, &len, &err);
            if (cap < need) {
                if (rc != NZ_E_INVALID_ARG)
                    fail_msg("lanes %d: cap %zu < needed %zu gave %d", lanes, cap, need, rc);
                assert_int_equal(err.code, NZ_E_INVALID_ARG);
            } else {
                assert_int_equal(rc, NZ_OK);
                assert_int_equal(len, need);
                assert_memory_equal(b, buf, need);
            }
            free(b);
        }

        /* the worst case (every symbol has frequency 1) fits nz_rans_bound */
        memset(freq, 0, sizeof freq);
        freq[0] = 4095;
        freq[9] = 1;
        size_t n = 3333;
        uint8_t *rare = xmalloc(n);
        memset(rare, 9, n);
        size_t cap = nz_rans_bound(n);
        uint8_t *b = xmalloc(cap);
        assert_int_equal(nz_rans_encode(rare, n, freq, lanes, b, cap, &len, NULL), NZ_OK);
        assert_true(len <= cap);
        assert_true(len > HDR(lanes) + n); /* ~12 bits per symbol */
        free(b);
        free(rare);

        /* n == 0: only the header, every state at its start value */
        uint8_t hdr[HDR(NZ_RANS_MAX_LANES)];
        assert_int_equal(nz_rans_encode(NULL, 0, freq, lanes, hdr, sizeof hdr, &len, NULL), NZ_OK);
        assert_int_equal(len, HDR(lanes));
        for (int j = 0; j < lanes; j++)
            assert_int_equal(hdr[4 * j] | hdr[4 * j + 1] << 8 | hdr[4 * j + 2] << 16 | hdr[4 * j + 3] << 24,
                             1 << 16);
    }
}

/* A small stream (a few renormalisation words per lane). */
static uint8_t *small_stream(size_t n, int lanes, uint8_t *sym, uint32_t freq[256], size_t *len) {
    uint64_t w[256] = {0}, seed = 2024;
    w[10] = 60;
    w[11] = 25;
    w[12] = 10;
    w[13] = 4;
    w[14] = 1;
    table_from_counts(w, freq);
    draw(&seed, w, sym, n);
    return encode_exact(sym, n, freq, lanes, len);
}

static void test_truncation(void **state) {
    enum { N = 1500 };
    const size_t n = N;
    uint8_t sym[N], out[N], sm[N] = {0};
    float fout[N];
    uint32_t freq[256], dtab[NZ_RANS_PROB_SCALE];
    for (int lanes = 32; lanes <= 64; lanes += 32) {
        size_t len;
        uint8_t *enc = small_stream(n, lanes, sym, freq, &len);
        nz_rans_build_dtab(freq, dtab);
        assert_true(len > HDR(lanes) + 128);
        for (size_t l = 0; l < len; l++) {
            uint8_t *cut = dup_exact(enc, l);
            for (int scalar = 0; scalar < NKERN; scalar++) {
                nz_error err = {0};
                int rc = decode_with(scalar, cut, l, lanes, dtab, out, n, &err);
                /* the decoder reads the same words as for the full stream until
                 * it runs out, so the code is predictable */
                int want = l < HDR(lanes)         ? NZ_E_TRUNCATED
                           : (l - HDR(lanes)) % 2 ? NZ_E_CORRUPT
                                                  : NZ_E_TRUNCATED;
                if (rc != want)
                    fail_msg("%s decoder, %d lanes, stream cut to %zu of %zu bytes: got %d (%s), expected %d",
                             KNAME[scalar], lanes, l, len, rc, err.msg, want);
                assert_int_equal(err.code, want);
                assert_true(strlen(err.msg) > 0);
                assert_int_equal(decode_bf16_with(scalar, cut, l, lanes, dtab, sm, fout, n, NULL), want);
            }
            free(cut);
        }
        /* the full stream decodes; trailing bytes are rejected */
        assert_int_equal(decode_with(0, enc, len, lanes, dtab, out, n, NULL), NZ_OK);
        assert_memory_equal(out, sym, n);
        uint8_t *longer = xmalloc(len + 2);
        memcpy(longer, enc, len);
        longer[len] = longer[len + 1] = 0;
        for (int scalar = 0; scalar < NKERN; scalar++) {
            nz_error err = {0};
            assert_int_equal(decode_with(scalar, longer, len + 2, lanes, dtab, out, n, &err), NZ_E_CORRUPT);
            assert_non_null(strstr(err.msg, "unread"));
        }
        /* wrong symbol counts */
        for (int scalar = 0; scalar < NKERN; scalar++) {
            assert_true(decode_with(scalar, enc, len, lanes, dtab, out, n - 1, NULL) < 0);
            assert_true(decode_with(scalar, enc, len, lanes, dtab, out, n - 64, NULL) < 0);
            uint8_t big[N + 100];
            assert_true(decode_with(scalar, enc, len, lanes, dtab, big, N + 100, NULL) < 0);
        }
        free(longer);
        free(enc);
    }
}

/* Header states below 2^16 are rejected before any decoding. */
static void test_bad_initial_state(void **state) {
    uint32_t freq[256] = {0}, dtab[NZ_RANS_PROB_SCALE];
    freq[0] = freq[1] = 2048;
    nz_rans_build_dtab(freq, dtab);
    uint8_t out[4];
    for (int lanes = 32; lanes <= 64; lanes += 32) {
        uint8_t zero[HDR(NZ_RANS_MAX_LANES)] = {0};
        for (int scalar = 0; scalar < NKERN; scalar++) {
            nz_error err = {0};
            assert_int_equal(decode_with(scalar, zero, HDR(lanes), lanes, dtab, out, 0, &err), NZ_E_CORRUPT);
            assert_non_null(strstr(err.msg, "state"));
        }
        /* a valid empty stream decodes; states one off are rejected */
        size_t len;
        uint8_t hdr[HDR(NZ_RANS_MAX_LANES)];
        assert_int_equal(nz_rans_encode(NULL, 0, freq, lanes, hdr, sizeof hdr, &len, NULL), NZ_OK);
        assert_int_equal(decode_with(0, hdr, len, lanes, dtab, out, 0, NULL), NZ_OK);
        hdr[4 * (lanes - 1)] ^= 1; /* last lane's final state 2^16 + 1 */
        assert_int_equal(decode_with(0, hdr, len, lanes, dtab, out, 0, NULL), NZ_E_CORRUPT);
        assert_int_equal(decode_with(1, hdr, len, lanes, dtab, out, 0, NULL), NZ_E_CORRUPT);
        hdr[4 * (lanes - 1)] ^= 1;
        hdr[4 * 3 + 2] = 0; /* lane 3 initial state 0 */
        assert_int_equal(decode_with(0, hdr, len, lanes, dtab, out, 0, NULL), NZ_E_CORRUPT);
    }
}

/* Every single-bit flip of a small stream, and random multi-byte damage of a
 * larger one: error or successful decode, identical for both decoders, never
 * a crash or a sanitizer report. */
static void test_bitflips(void **state) {
    enum { N = 1500 };
    const size_t n = N;
    uint8_t sym[N], o0[N], o1[N], sm[N];
    float f0[N], f1[N];
    uint32_t freq[256], dtab[NZ_RANS_PROB_SCALE];
    memset(sm, 0x3c, sizeof sm);
    for (int lanes = 32; lanes <= 64; lanes += 32) {
        size_t len;
        uint8_t *enc = small_stream(n, lanes, sym, freq, &len);
        nz_rans_build_dtab(freq, dtab);
        uint8_t *bad = xmalloc(len);
        size_t detected = 0, total = 0;
        for (size_t bit = 0; bit < 8 * len; bit++) {
            memcpy(bad, enc, len);
            bad[bit / 8] ^= (uint8_t)(1u << (bit % 8));
            int r0 = decode_with(0, bad, len, lanes, dtab, o0, n, NULL);
            int r1 = decode_with(1, bad, len, lanes, dtab, o1, n, NULL);
            if (r0 != r1) fail_msg("lanes %d bit %zu: simd rc %d, scalar rc %d", lanes, bit, r0, r1);
            assert_true(r0 == NZ_OK || r0 == NZ_E_CORRUPT || r0 == NZ_E_TRUNCATED);
            if (r0 == NZ_OK) assert_memory_equal(o0, o1, n);
            assert_int_equal(decode_bf16_with(0, bad, len, lanes, dtab, sm, f0, n, NULL), r0);
            assert_int_equal(decode_bf16_with(1, bad, len, lanes, dtab, sm, f1, n, NULL), r0);
            if (r0 == NZ_OK) assert_memory_equal(f0, f1, sizeof f0);
            detected += r0 != NZ_OK;
            total++;
        }
        print_message("    %d lanes: single-bit flips detected without a checksum: %zu of %zu\n", lanes,
                      detected, total);
        /* the final-state and length checks catch nearly every flip */
        assert_true(detected * 100 >= total * 90);
        free(bad);
        free(enc);
    }

    /* larger streams (the SIMD path runs for many groups), random damage */
    const size_t n2 = 20000;
    uint8_t *sym2 = xmalloc(n2), *out0 = xmalloc(n2), *out1 = xmalloc(n2);
    uint64_t seed = 31337, w[256] = {0};
    for (int i = 0; i < 100000; i++) w[gauss_exponent(&seed)]++;
    uint32_t freq2[256];
    table_from_counts(w, freq2);
    nz_rans_build_dtab(freq2, dtab);
    draw(&seed, w, sym2, n2);
    for (int lanes = 32; lanes <= 64; lanes += 32) {
        size_t len2;
        uint8_t *enc2 = encode_exact(sym2, n2, freq2, lanes, &len2);
        uint8_t *bad2 = xmalloc(len2);
        int iters = tu_quick() ? 30 : 400;
        for (int it = 0; it < iters; it++) {
            memcpy(bad2, enc2, len2);
            int nb = 1 + (int)(tu_rand(&seed) % 8);
            for (int b = 0; b < nb; b++) bad2[tu_rand(&seed) % len2] = (uint8_t)tu_rand(&seed);
            int r0 = decode_with(0, bad2, len2, lanes, dtab, out0, n2, NULL);
            int r1 = decode_with(1, bad2, len2, lanes, dtab, out1, n2, NULL);
            if (r0 != r1) fail_msg("lanes %d damage %d: simd rc %d, scalar rc %d", lanes, it, r0, r1);
            if (r0 == NZ_OK) assert_memory_equal(out0, out1, n2);
        }
        free(bad2);
        free(enc2);
    }
    free(sym2);
    free(out0);
    free(out1);
}

int main(void) {
#define T(f) cmocka_unit_test_setup_teardown(f, per_test_setup, per_test_teardown)
    const struct CMUnitTest tests[] = {
        T(test_normalize_basic),
        T(test_normalize_cost_near_entropy),
        T(test_check_freq),
        T(test_build_dtab),
        T(test_decoder_selection),
        T(test_roundtrip_lengths),
        T(test_roundtrip_patterns),
        T(test_decode_bf16_fused),
        T(test_lanes),
        T(test_encode_errors),
        T(test_truncation),
        T(test_bad_initial_state),
        T(test_bitflips),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}

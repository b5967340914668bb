/* Unit tests for engine/nz_esc.c (the multi-level escape code): ranking,
 * round trips over many lengths and symbol distributions reaching every
 * level, the AVX2 kernels against the portable ones (symbols, bf16 -> fp32,
 * fused GEMV), its cost against the order-0 bound on Gaussian bf16 weights,
 * and every check of nz_esc_open. Sections live in heap blocks of exactly
 * their length so that ASan catches any read past the end. */
#include "test_util.h"

#include "nz_codec.h"
#include "nz_esc.h"
#include "nz_rans.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int setup(void **state) {
    nz_rans_force_scalar(0);
    return 0;
}

static int teardown(void **state) {
    nz_rans_force_scalar(0);
    return 0;
}

/* n symbols: rank r with probability ~ 2^-(r+1) / ... (geometric with ratio q),
 * drawn from a fixed permutation of 0..nsym-1; with the table built from them */
static uint8_t *gen_symbols(uint64_t n, int nsym, double q, uint64_t *seed, nz_esc_table *t) {
    uint8_t *s = xmalloc(n ? n : 1);
    uint8_t perm[256];
    for (int i = 0; i < 256; i++) perm[i] = (uint8_t)i;
    for (int i = 255; i > 0; i--) {
        int j = (int)(tu_rand(seed) % (uint64_t)(i + 1));
        uint8_t x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    uint32_t freq[256] = {0};
    for (uint64_t i = 0; i < n; i++) {
        int r = 0;
        while (r < nsym - 1 && (double)(tu_rand(seed) % 1000000) / 1e6 < q) r++;
        s[i] = perm[r];
        freq[s[i]]++;
    }
    nz_esc_table_build(freq, t);
    return s;
}

/* encode into an exact-size heap block */
static uint8_t *encode(const uint8_t *s, uint64_t n, const nz_esc_table *t, size_t *len) {
    size_t cap = nz_esc_bound(n);
    uint8_t *buf = xmalloc(cap);
    nz_error err = {0};
    assert_int_equal(nz_esc_encode(s, n, t, buf, cap, len, &err), NZ_OK);
    uint8_t *out = dup_exact(buf, *len);
    free(buf);
    return out;
}

static void test_table_ranks(void **state) {
    uint32_t freq[256] = {0};
    freq[120] = 50;
    freq[121] = 900;
    freq[119] = 50; /* ties: the smaller symbol first */
    freq[3] = 7;
    nz_esc_table t;
    nz_esc_table_build(freq, &t);
    assert_int_equal(t.sym[0], 121);
    assert_int_equal(t.sym[1], 119);
    assert_int_equal(t.sym[2], 120);
    assert_int_equal(t.sym[3], 3);
    assert_int_equal(t.sym[4], 121); /* past the symbols present: rank 0's */
    assert_int_equal(t.rank[121], 0);
    assert_int_equal(t.rank[3], 3);
    assert_int_equal(t.rank[4], 255);
    assert_int_equal(t.lut[0][0][0], 121);
    assert_int_equal(t.lut[0][0][3], 0); /* escape */
    assert_int_equal(t.lut[0][1][0], 3);
    assert_int_equal(t.lut[1][0][0], (121 >> 1 | 121 << 7) & 0xff); /* rotated */
    assert_int_equal(t.nib[0][0][0][0xB], 0);   /* nibble 10 11: field 0 = 3, an escape ... */
    assert_int_equal(t.nib[0][0][1][0xB], 120); /* ... field 1 = 2 -> rank 2 */
    assert_int_equal(t.nib[0][0][1][0x4], 119);
    /* 20 symbols: ranks 9+ are not ranked */
    memset(freq, 0, sizeof freq);
    for (int s = 0; s < 20; s++) freq[s] = 100 - (uint32_t)s;
    nz_esc_table_build(freq, &t);
    assert_int_equal(t.rank[8], 8);
    assert_int_equal(t.rank[9], 255);
}

/* decode with the current kernel choice and compare */
static void check_roundtrip(const uint8_t *s, uint64_t n, const nz_esc_table *t, const uint8_t *sec,
                            size_t len, const char *ctx) {
    nz_esc_view v;
    nz_error err = {0};
    if (nz_esc_open(sec, len, n, 8, &v, &err)) fail_msg("%s: open: %s", ctx, err.msg);
    uint8_t *scratch = calloc(1, nz_esc_scratch_bytes(&v));
    uint8_t *out = xmalloc(n + 1);
    out[n] = 0xA5;
    if (nz_esc_decode(&v, t, scratch, out, &err)) fail_msg("%s: decode: %s", ctx, err.msg);
    assert_int_equal(out[n], 0xA5); /* nothing past n */
    for (uint64_t i = 0; i < n; i++)
        if (out[i] != s[i])
            fail_msg("%s: symbol %llu is %u, want %u", ctx, (unsigned long long)i, out[i], s[i]);
    free(out);
    free(scratch);
}

static void test_roundtrip_kernels(void **state) {
    uint64_t seed = 77;
    const uint64_t lens[] = {0, 1, 2, 31, 32, 33, 63, 64, 65, 100, 255, 1000, 4096, 4097, 40000};
    const struct {
        int nsym;
        double q;
    } dist[] = {{1, 0}, {2, 0.5}, {3, 0.9}, {5, 0.4}, {8, 0.5}, {14, 0.6}, {40, 0.7}, {256, 0.97}};
    int levels_hit[NZ_ESC_LEVELS] = {0};
    for (size_t di = 0; di < sizeof dist / sizeof *dist; di++)
        for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
            uint64_t n = lens[li];
            nz_esc_table t;
            uint8_t *s = gen_symbols(n, dist[di].nsym, dist[di].q, &seed, &t);
            size_t len;
            uint8_t *sec = encode(s, n, &t, &len);
            nz_esc_view v;
            assert_int_equal(nz_esc_open(sec, len, n, 8, &v, NULL), NZ_OK);
            for (int l = 0; l < NZ_ESC_LEVELS; l++) levels_hit[l] += v.n[l] > 0;
            char ctx[96];
            for (int scalar = 0; scalar <= 1; scalar++) {
                nz_rans_force_scalar(scalar);
                snprintf(ctx, sizeof ctx, "nsym %d q %.2f n %llu %s", dist[di].nsym, dist[di].q,
                         (unsigned long long)n,
                         scalar              ? "scalar"
                         : nz_esc_use_avx2() ? "avx2"
                                             : "portable");
                check_roundtrip(s, n, &t, sec, len, ctx);
            }
            nz_rans_force_scalar(0);
            free(sec);
            free(s);
        }
    for (int l = 0; l < NZ_ESC_LEVELS; l++) assert_true(levels_hit[l] > 0);
    print_message("    kernel: %s\n", nz_esc_use_avx2() ? "avx2 and portable" : "portable only (no AVX2)");
}

/* bf16 weights N(0, std): exponents and sign+mantissa bytes */
static void gauss_bf16(uint64_t n, double std, uint64_t *seed, uint8_t *e, uint8_t *sm) {
    for (uint64_t i = 0; i < n; i++) {
        uint16_t b = nz_f32_to_bf16((float)(tu_gauss(seed) * std));
        e[i] = (uint8_t)(b >> 7 & 0xff);
        sm[i] = (uint8_t)((b >> 8 & 0x80) | (b & 0x7f));
    }
}

static void test_cost_near_bound(void **state) {
    uint64_t seed = 5, n = 131072;
    uint8_t *e = xmalloc(n), *sm = xmalloc(n);
    const double stds[] = {0.02, 0.05, 0.3};
    for (int k = 0; k < 3; k++) {
        gauss_bf16(n, stds[k], &seed, e, sm);
        uint32_t cnt[256] = {0};
        for (uint64_t i = 0; i < n; i++) cnt[e[i]]++;
        double h = 0;
        for (int s = 0; s < 256; s++)
            if (cnt[s]) h -= cnt[s] / (double)n * log2(cnt[s] / (double)n);
        nz_esc_table t;
        nz_esc_table_build(cnt, &t);
        size_t len;
        uint8_t *sec = encode(e, n, &t, &len);
        double bits = 8.0 * (double)len / (double)n;
        print_message("    N(0, %.2f): esc %.4f bits/exponent, order-0 bound %.4f (+%.4f)\n", stds[k], bits,
                      h, bits - h);
        assert_true(bits <= h + 0.15);
        check_roundtrip(e, n, &t, sec, len, "gauss");
        free(sec);
    }
    free(e);
    free(sm);
}

static float bf16f(uint8_t e, uint8_t sm) {
    uint32_t u = (uint32_t)(sm & 0x80) << 24 | (uint32_t)e << 23 | (uint32_t)(sm & 0x7f) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_bf16_and_gemv(void **state) {
    uint64_t seed = 11;
    const struct {
        uint64_t rows, cols;
    } shapes[] = {{1, 32}, {3, 64}, {17, 256}, {5, 1024}, {2, 40}, {7, 33}, {1, 1}, {9, 96}, {13, 1088}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        uint64_t rows = shapes[si].rows, cols = shapes[si].cols, n = rows * cols;
        uint8_t *e = xmalloc(n), *sm = xmalloc(n);
        gauss_bf16(n, 0.05, &seed, e, sm);
        if (si == 0) e[0] = 200; /* a level-4 symbol */
        uint32_t cnt[256] = {0};
        for (uint64_t i = 0; i < n; i++) cnt[e[i]]++;
        nz_esc_table t;
        nz_esc_table_build(cnt, &t);
        size_t len;
        uint8_t *sec = encode(e, n, &t, &len);
        nz_esc_view v;
        assert_int_equal(nz_esc_open(sec, len, n, 8, &v, NULL), NZ_OK);
        uint8_t *scratch = calloc(1, nz_esc_scratch_bytes(&v));
        const size_t MX = 40, ldy = rows + 3; /* past NZ_ESC_GEMM_MAX: passes, or the decode-once kernel */
        float *x = xmalloc(MX * cols * 4), *xp = xmalloc(NZ_ESC_GEMM_MAX * cols * 4), *w = xmalloc(n * 4),
              *y = xmalloc(MX * ldy * 4), *wt = xmalloc(n * 4);
        /* each row alone (M = 1), per mant: the simd run's, then the scalar run's must be the same bits */
        float *alone[2] = {xmalloc(MX * rows * 4 + 4), xmalloc(MX * rows * 4 + 4)};
        for (uint64_t c = 0; c < MX * cols; c++) x[c] = (float)tu_gauss(&seed);
        /* the lossy-3 plane: 4-bit fields sign << 3 | mantissa, low nibble first; as bf16-layout bytes in
         * sm3b */
        uint8_t *sm3 = xmalloc((n + 1) / 2), *sm3b = xmalloc(n);
        memset(sm3, 0, (n + 1) / 2);
        for (uint64_t i = 0; i < n; i++) {
            unsigned f = (unsigned)(tu_rand(&seed) & 15);
            sm3[i / 2] |= (uint8_t)(f << (4 * (i & 1)));
            sm3b[i] = (uint8_t)((f >> 3) << 7 | (f & 7) << 4);
        }
        for (int run = 0; run < 4; run++) {
            int scalar = run & 1, mant = run < 2 ? 7 : 3;
            const uint8_t *plane = mant == 7 ? sm : sm3, *smb = mant == 7 ? sm : sm3b;
            nz_rans_force_scalar(scalar);
            assert_int_equal(nz_esc_decode_bf16(&v, &t, scratch, plane, mant, w, NULL), NZ_OK);
            for (uint64_t i = 0; i < n; i++)
                if (memcmp(&w[i], &(float){bf16f(e[i], smb[i])}, 4))
                    fail_msg("shape %zu %s mant %d: weight %llu is %g", si, scalar ? "scalar" : "simd", mant,
                             (unsigned long long)i, w[i]);
            float *al = alone[mant == 3];
            for (size_t m = 0; m < MX; m++) {
                float y1[40];
                assert_true(rows <= 40);
                assert_int_equal(nz_esc_gemm_bf16(&v, &t, scratch, plane, mant, rows, cols, x + m * cols, 1,
                                                  xp, NULL, y1, 1, NULL),
                                 NZ_OK);
                if (scalar && memcmp(y1, al + m * rows, rows * 4)) /* AVX2 and portable: the same bits */
                    fail_msg("shape %zu mant %d: row %zu, scalar differs from simd", si, mant, m);
                memcpy(al + m * rows, y1, rows * 4);
            }
            const size_t Ms[] = {1, 2, 3, 5, 16, 17, 40, 40};
            for (size_t mi = 0; mi < sizeof Ms / sizeof *Ms; mi++) {
                size_t M = Ms[mi];
                float *wtm = mi == 7 ? wt : NULL;                   /* M = 40 again, with the tile scratch */
                for (size_t k = 0; k < MX * ldy; k++) y[k] = -7.0f; /* untouched outside the rows */
                assert_int_equal(nz_esc_gemm_bf16(&v, &t, scratch, plane, mant, rows, cols, x, M, xp, wtm, y,
                                                  M == 1 ? 1 : ldy, NULL),
                                 NZ_OK);
                /* row-invariant: each row the same bits as alone */
                for (size_t m = 0; m < M; m++)
                    if (memcmp(y + m * (M == 1 ? 1 : ldy), al + m * rows, rows * 4))
                        fail_msg("shape %zu %s mant %d M %zu%s: row %zu differs from the row alone", si,
                                 scalar ? "scalar" : "simd", mant, M, wtm ? " (decode once)" : "", m);
                for (size_t m = 0; m < M; m++)
                    for (uint64_t r = 0; r < rows; r++) {
                        double want = 0, mag = 0;
                        for (uint64_t c = 0; c < cols; c++) {
                            want += (double)w[r * cols + c] * x[m * cols + c];
                            mag += fabs((double)w[r * cols + c] * x[m * cols + c]);
                        }
                        float got = y[m * (M == 1 ? 1 : ldy) + r];
                        /* stated tolerance: summation order differs; fp32 rounding of sum |w x| */
                        if (fabs(got - want) > 1e-5 * mag + 1e-30)
                            fail_msg("shape %zu %s M %zu: y[%zu][%llu] %g, want %g", si,
                                     scalar ? "scalar" : "simd", M, m, (unsigned long long)r, got, want);
                    }
                if (M > 1)
                    for (size_t m = 0; m < M; m++)
                        for (size_t r = rows; r < ldy; r++) assert_true(y[m * ldy + r] == -7.0f);
            }
        }
        nz_rans_force_scalar(0);
        free(alone[0]);
        free(alone[1]);
        free(wt);
        free(sm3);
        free(sm3b);
        free(x);
        free(xp);
        free(w);
        free(y);
        free(scratch);
        free(sec);
        free(e);
        free(sm);
    }
}

/* a section to break: 200 symbols over 20 values (every level used) */
static uint8_t *sample_section(nz_esc_table *t, uint8_t **sym, size_t *len) {
    uint64_t seed = 9;
    *sym = gen_symbols(200, 20, 0.75, &seed, t);
    return encode(*sym, 200, t, len);
}

static int open_err(const uint8_t *sec, size_t len, uint64_t n, int bits, const char *want) {
    nz_esc_view v;
    nz_error err = {0};
    int rc = nz_esc_open(sec, len, n, bits, &v, &err);
    if (rc && want && !strstr(err.msg, want)) fail_msg("error \"%s\" does not say \"%s\"", err.msg, want);
    return rc;
}

/* open (must succeed), then decode every way; the status (all must agree) */
static int decode_err(const uint8_t *sec, size_t len, const nz_esc_table *t, const char *want) {
    nz_esc_view v;
    assert_int_equal(nz_esc_open(sec, len, 200, 8, &v, NULL), NZ_OK);
    uint8_t *scratch = calloc(1, nz_esc_scratch_bytes(&v)), out[200];
    float f[200], x[40] = {0}, xp[40], y[5];
    nz_error err = {0};
    int rc = nz_esc_decode(&v, t, scratch, out, &err);
    if (rc && want && !strstr(err.msg, want)) fail_msg("error \"%s\" does not say \"%s\"", err.msg, want);
    assert_int_equal(nz_esc_decode_bf16(&v, t, scratch, out, 7, f, NULL), rc);
    assert_int_equal(nz_esc_gemm_bf16(&v, t, scratch, out, 7, 5, 40, x, 1, xp, NULL, y, 1, NULL), rc);
    free(scratch);
    return rc;
}

static void test_open_checks(void **state) {
    nz_esc_table t;
    uint8_t *s;
    size_t len;
    uint8_t *sec = sample_section(&t, &s, &len);
    nz_esc_view v;
    assert_int_equal(nz_esc_open(sec, len, 200, 8, &v, NULL), NZ_OK);
    assert_true(v.n[1] > 0 && v.n[2] > 0 && v.n[3] > 0);
    /* every truncation, a trailing byte */
    for (size_t l = 0; l < len; l++) {
        uint8_t *cut = dup_exact(sec, l);
        assert_int_equal(open_err(cut, l, 200, 8, NULL), NZ_E_TRUNCATED);
        free(cut);
    }
    uint8_t *longer = xmalloc(len + 1);
    memcpy(longer, sec, len);
    longer[len] = 0;
    assert_int_equal(open_err(longer, len + 1, 200, 8, "counts need"), NZ_E_FORMAT);
    free(longer);
    uint8_t *bad = dup_exact(sec, len);
    /* a level with more entries than the one above */
    memcpy(bad, sec, len);
    bad[0] = 0xff, bad[1] = 0xff; /* n2 = 65535+ > 200 */
    assert_int_equal(open_err(bad, len, 200, 8, "more than level 1"), NZ_E_CORRUPT);
    /* an escape turned into a symbol: level 1 escapes no longer match n2 */
    memcpy(bad, sec, len);
    size_t k = 0;
    int sh = 0;
    for (;; k++) {
        for (sh = 0; sh < 8 && (sec[NZ_ESC_HDR + k] >> sh & 3) != 3; sh += 2) {
        }
        if (sh < 8) break;
    }
    bad[NZ_ESC_HDR + k] ^= (uint8_t)(2u << sh);                /* field 3 -> 1 */
    assert_int_equal(open_err(bad, len, 200, 8, NULL), NZ_OK); /* the decoders count, as they read */
    assert_int_equal(decode_err(bad, len, &t, "escapes for"), NZ_E_CORRUPT);
    /* more escapes than the next level holds: a symbol turned into an escape */
    memcpy(bad, sec, len);
    for (k = 0, sh = 8; sh == 8; k++)
        for (sh = 0; sh < 8 && (sec[NZ_ESC_HDR + k] >> sh & 3) == 3; sh += 2) {
        }
    bad[NZ_ESC_HDR + k - 1] |= (uint8_t)(3u << sh);
    assert_int_equal(decode_err(bad, len, &t, "escapes for"), NZ_E_CORRUPT);
    /* padding: 200 = 128 + 72 fields; set field 255 (byte 31 of level-1 block 1, bits 6-7) */
    memcpy(bad, sec, len);
    bad[NZ_ESC_HDR + 32 + 31] |= 0x40;
    assert_int_equal(open_err(bad, len, 200, 8, "past its last entry"), NZ_E_CORRUPT);
    /* a 5-bit exponent width: level-4 symbols must fit */
    int wide = 0;
    for (uint64_t i = 0; i < v.n[3]; i++) wide |= v.lv[3][i] >= 32;
    if (wide) assert_int_equal(open_err(sec, len, 200, 5, "wider than 5 bits"), NZ_E_CORRUPT);
    /* no header */
    assert_int_equal(open_err(sec, 11, 200, 8, "no header"), NZ_E_TRUNCATED);
    /* single-bit flips: an error or a decode of 200 symbols, never a read outside */
    uint8_t *out = xmalloc(200);
    for (size_t bit = 0; bit < 8 * len; bit++) {
        memcpy(bad, sec, len);
        bad[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        if (nz_esc_open(bad, len, 200, 8, &v, NULL) == NZ_OK) {
            uint8_t *scratch = calloc(1, nz_esc_scratch_bytes(&v));
            nz_error err = {0};
            int rc = nz_esc_decode(&v, &t, scratch, out, &err);
            assert_true(rc == NZ_OK || (rc == NZ_E_CORRUPT && strstr(err.msg, "escapes for")));
            free(scratch);
        }
    }
    free(out);
    free(bad);
    free(sec);
    free(s);
}

int main(void) {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_table_ranks),   T(test_roundtrip_kernels), T(test_cost_near_bound),
        T(test_bf16_and_gemv), T(test_open_checks),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}

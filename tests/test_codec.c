/* Unit tests for engine/nz_codec.c and nz_codec_dec.c: float conversions against independent
 * reference implementations, lossless round trips (bf16, f16, f32; coders
 * rans, zstd, const) over edge values and odd shapes, the lossy-k rounding
 * rule, mode bf16, block normalisers, raw tiles, descriptor validation, mode
 * names, and corruption/truncation of encoded tiles. Every encoded tile lives
 * in a heap block of exactly its length so ASan catches any over-read; every
 * test checks that the counted scratch memory returns to its starting value. */
#include "test_util.h"

#include "nz_alloc.h"
#include "nz_codec.h"
#include "nz_rans.h"

#include <float.h>
#include <math.h>
#include <stdio.h>

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

static size_t g_scratch0; /* NZ_MEM_SCRATCH at the start of the current test */

static int per_test_setup(void **state) {
    g_scratch0 = nz_mem_current(NZ_MEM_SCRATCH);
    return 0;
}

static int per_test_teardown(void **state) {
    size_t now = nz_mem_current(NZ_MEM_SCRATCH);
    if (now != g_scratch0) {
        print_error("scratch memory leaked: %zu bytes before the test, %zu after\n", g_scratch0, now);
        return -1;
    }
    return 0;
}

static uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t rd32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int f32_isnan(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }
static int f16_isnan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff); }
static int bf16_isnan(uint16_t b) { return (b & 0x7f80) == 0x7f80 && (b & 0x7f); }

/* ------------------------------------------------------------------------ */
/* reference conversions, written independently of the engine               */
/* ------------------------------------------------------------------------ */

/* binary16 -> fp32 bits, exact; NaN payload moved to the top of the fp32
 * mantissa. */
static uint32_t ref_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 31) return sign | 0x7f800000u | (uint32_t)m << 13;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return sign | f2u((float)v); /* exact: at most 11 significant bits */
}

/* fp32 bits -> binary16, round to nearest even on the binary16 grid.
 * NaN gives sign|0x7e00 (callers compare NaNs by property). */
static uint16_t ref_f32_to_f16(uint32_t u) {
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    if (f32_isnan(u)) return sign | 0x7e00;
    double a = fabs((double)u2f(u));
    if (isinf(a)) return sign | 0x7c00;
    double ulp;
    if (a < ldexp(1, -14)) {
        ulp = ldexp(1, -24);
    } else {
        int e;
        frexp(a, &e);
        ulp = ldexp(1, e - 1 - 10);
    }
    double r = nearbyint(a / ulp) * ulp; /* a / ulp is exact; ties to even multiple */
    if (r >= 65536.0) return sign | 0x7c00;
    if (r < ldexp(1, -14)) return sign | (uint16_t)(r / ldexp(1, -24));
    int e;
    double m = frexp(r, &e); /* r = m 2^e, m in [0.5, 1) */
    return sign | (uint16_t)((e - 1 + 15) << 10) | (uint16_t)((2 * m - 1) * 1024);
}

/* fp32 bits rounded to k mantissa bits (any k in 0..23), round to nearest,
 * ties to the neighbour whose fp32 encoding has a 0 in the last kept bit
 * (bit 23-k). For k >= 1 that is the even k-bit mantissa; for k = 0 (no
 * mantissa bits) it is the power of two with the even biased exponent.
 * Subnormals round on the fixed subnormal grid. Past FLT_MAX: Inf. NaN:
 * sign | 0x7fc00000. */
static uint32_t ref_round_k(uint32_t u, int k) {
    uint32_t sign = u & 0x80000000u, mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return sign | 0x7fc00000u;
    if (mag == 0x7f800000u || mag == 0) return u;
    double a = u2f(mag);
    int e;
    frexp(a, &e);
    int E = e - 1 < -126 ? -126 : e - 1;
    double ulp = ldexp(1.0, E - k);
    double lo = floor(a / ulp) * ulp, hi = lo + ulp, r;
    if (a - lo < hi - a)
        r = lo;
    else if (a - lo > hi - a)
        r = hi;
    else
        r = (f2u((float)lo) >> (23 - k)) & 1 ? hi : lo;
    if (r >= ldexp(1.0, 128)) return sign | 0x7f800000u;
    return sign | f2u((float)r);
}

/* ------------------------------------------------------------------------ */
/* source tensors                                                           */
/* ------------------------------------------------------------------------ */

static const nz_dtype k_float_dtypes[3] = {NZ_DT_BF16, NZ_DT_F16, NZ_DT_F32};

static uint32_t get_elem(nz_dtype dt, const void *src, size_t i) {
    const uint8_t *p = src;
    if (dt == NZ_DT_F32) {
        uint32_t u;
        memcpy(&u, p + 4 * i, 4);
        return u;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return h;
}

static void set_elem(nz_dtype dt, void *dst, size_t i, uint32_t v) {
    uint8_t *p = dst;
    if (dt == NZ_DT_F32) {
        memcpy(p + 4 * i, &v, 4);
    } else {
        uint16_t h = (uint16_t)v;
        memcpy(p + 2 * i, &h, 2);
    }
}

/* exact fp32 bits of a source element */
static uint32_t as_f32(nz_dtype dt, uint32_t v) {
    switch (dt) {
    case NZ_DT_BF16:
        return v << 16;
    case NZ_DT_F16:
        return ref_f16_to_f32((uint16_t)v);
    default:
        return v;
    }
}

/* fp32 value -> element of dt (round to nearest even) */
static uint32_t from_f32(nz_dtype dt, uint32_t u) {
    switch (dt) {
    case NZ_DT_BF16:
        return f32_isnan(u) ? (u >> 16) | 0x40 : ref_round_k(u, 7) >> 16;
    case NZ_DT_F16:
        return ref_f32_to_f16(u);
    default:
        return u;
    }
}

static uint32_t exp_field(nz_dtype dt, uint32_t v) {
    switch (dt) {
    case NZ_DT_BF16:
        return (v >> 7) & 0xff;
    case NZ_DT_F16:
        return (v >> 10) & 0x1f;
    default:
        return (v >> 23) & 0xff;
    }
}

/* Edge values of each dtype: signed zeros, infinities, quiet and signalling
 * NaNs with several payloads, smallest/largest subnormal, smallest normal,
 * largest finite, one. */
static const uint32_t k_edge_f32[] = {0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000,
                                      0x7f800001, 0xff800001, 0x7fbfffff, 0xffbfffff, 0x7fffffff, 0xffffffff,
                                      0x7fc00001, 0x7fd55555, 0x7f812345, 0x00000001, 0x80000001, 0x007fffff,
                                      0x807fffff, 0x00800000, 0x80800000, 0x7f7fffff, 0xff7fffff, 0x3f800000,
                                      0xbf800000, 0x00400000, 0x3fffffff};
static const uint32_t k_edge_f16[] = {0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0xfe00, 0x7c01, 0xfc01, 0x7dff,
                                      0xfdff, 0x7fff, 0xffff, 0x7e01, 0x7d55, 0x0001, 0x8001, 0x03ff, 0x83ff,
                                      0x0400, 0x8400, 0x7bff, 0xfbff, 0x3c00, 0xbc00, 0x0200, 0x3fff};
static const uint32_t k_edge_bf16[] = {0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc0, 0x7f81, 0xff81, 0x7fbf,
                                       0xffbf, 0x7fff, 0xffff, 0x7fc1, 0x7fd5, 0x0001, 0x8001, 0x007f, 0x807f,
                                       0x0080, 0x8080, 0x7f7f, 0xff7f, 0x3f80, 0xbf80, 0x0040, 0x3fff};

static const uint32_t *edge_values(nz_dtype dt, size_t *n) {
    switch (dt) {
    case NZ_DT_BF16:
        *n = sizeof k_edge_bf16 / sizeof *k_edge_bf16;
        return k_edge_bf16;
    case NZ_DT_F16:
        *n = sizeof k_edge_f16 / sizeof *k_edge_f16;
        return k_edge_f16;
    default:
        *n = sizeof k_edge_f32 / sizeof *k_edge_f32;
        return k_edge_f32;
    }
}

enum { FL_GAUSS, FL_BITS, FL_MIXED, FL_CONST };

/* n elements of dt: gaussian weights (with rare outliers), random bit
 * patterns, a mix of both plus edge values, or values sharing one exponent. */
static void *gen_tensor(nz_dtype dt, size_t n, int flavour, uint64_t seed) {
    void *p = xmalloc(n * nz_dtype_size(dt));
    size_t nedge;
    const uint32_t *edge = edge_values(dt, &nedge);
    for (size_t i = 0; i < n; i++) {
        uint64_t r = tu_rand(&seed);
        int kind = flavour == FL_MIXED ? (r % 100 < 85 ? FL_GAUSS : r % 100 < 95 ? FL_BITS : -1) : flavour;
        uint32_t v;
        if (kind == FL_GAUSS) {
            double g = tu_gauss(&seed) * 0.02;
            if (r % 1000 == 7) g *= 300; /* outlier */
            v = from_f32(dt, f2u((float)g));
        } else if (kind == FL_BITS) {
            v = (uint32_t)(tu_rand(&seed) >> 7);
            if (dt != NZ_DT_F32) v &= 0xffff;
        } else if (kind == FL_CONST) {
            uint32_t s = (uint32_t)(r >> 63);
            v = dt == NZ_DT_F32   ? s << 31 | 0x3f800000u | (uint32_t)(r >> 20 & 0x7fffff)
                : dt == NZ_DT_F16 ? s << 15 | 0x3c00 | (uint32_t)(r >> 20 & 0x3ff)
                                  : s << 15 | 0x3f80 | (uint32_t)(r >> 20 & 0x7f);
        } else {
            v = edge[(r >> 8) % nedge];
        }
        set_elem(dt, p, i, v);
    }
    return p;
}

/* ------------------------------------------------------------------------ */
/* encode / decode a whole tensor                                           */
/* ------------------------------------------------------------------------ */

typedef struct {
    nz_tensor_desc d;
    uint64_t nt;
    uint8_t **tile; /* each an exact-size heap block */
    size_t *len;
} enc_t;

static void enc_free(enc_t *e) {
    for (uint64_t t = 0; e->tile && t < e->nt; t++) free(e->tile[t]);
    free(e->tile);
    free(e->len);
    memset(e, 0, sizeof *e);
}

/* desc_init + analyze + validate + nz_tile_encode of every tile (tile t's
 * source starts at row t * tile_rows). Returns the first error. */
static int enc_build(enc_t *e, nz_dtype dt, size_t esz, const nz_mode *mode, nz_coder coder, uint64_t rows,
                     uint64_t cols, uint32_t tile_rows, const void *src, nz_error *err) {
    memset(e, 0, sizeof *e);
    int rc = nz_desc_init(&e->d, dt, esz, mode, coder, rows, cols, tile_rows, err);
    if (rc) return rc;
    rc = nz_tensor_analyze(&e->d, src, NULL, err);
    if (rc) return rc;
    nz_error verr = {0};
    if (nz_desc_validate(&e->d, &verr) != NZ_OK) fail_msg("analysed desc does not validate: %s", verr.msg);
    e->nt = nz_desc_ntiles(&e->d);
    e->tile = calloc(e->nt + 1, sizeof *e->tile);
    e->len = calloc(e->nt + 1, sizeof *e->len);
    assert_true(e->tile && e->len);
    size_t stride = (size_t)tile_rows * cols * e->d.elem_size;
    for (uint64_t t = 0; t < e->nt; t++) {
        size_t cap = nz_tile_bound(&e->d, t), len = 0;
        uint8_t *buf = xmalloc(cap);
        rc = nz_tile_encode(&e->d, t, (const uint8_t *)src + t * stride, buf, cap, &len, err);
        if (rc) {
            free(buf);
            return rc;
        }
        assert_true(len <= cap);
        if (e->d.coder == NZ_CODER_NONE) {
            assert_int_equal(len, nz_desc_tile_fixed_bytes(&e->d, t));
        } else { /* layout: u32 exp_len, u32 lanes (rans) or 0, exp, fixed planes */
            assert_true(len >= 8);
            uint64_t tn = nz_desc_tile_nrows(&e->d, t) * cols;
            assert_int_equal(rd32le(buf + 4),
                             e->d.coder == NZ_CODER_RANS ? (uint32_t)nz_rans_lanes_for(tn) : 0);
            assert_int_equal(len, 8 + (size_t)rd32le(buf) + nz_desc_tile_fixed_bytes(&e->d, t));
            if (e->d.coder == NZ_CODER_CONST) assert_int_equal(rd32le(buf), 0);
        }
        e->tile[t] = dup_exact(buf, len);
        e->len[t] = len;
        free(buf);
    }
    return NZ_OK;
}

static size_t native_size(const nz_tensor_desc *d) {
    nz_dtype nd = nz_desc_native_dtype(d);
    return nd == NZ_DT_OTHER ? d->elem_size : nz_dtype_size(nd);
}

/* Decode every tile to fp32 (last tile first, to show tiles are
 * independent). */
static void dec_f32_all(nz_dctx *dc, const enc_t *e, float *out, const char *what) {
    size_t per = (size_t)e->d.tile_rows * e->d.cols;
    for (uint64_t t = e->nt; t-- > 0;) {
        nz_error err = {0};
        int rc = nz_tile_decode_f32(dc, &e->d, t, e->tile[t], e->len[t], out + t * per, &err);
        if (rc) fail_msg("%s: nz_tile_decode_f32 tile %llu: %d %s", what, (unsigned long long)t, rc, err.msg);
    }
}

static void dec_native_all(nz_dctx *dc, const enc_t *e, void *out, const char *what) {
    size_t per = (size_t)e->d.tile_rows * e->d.cols * native_size(&e->d);
    for (uint64_t t = 0; t < e->nt; t++) {
        nz_error err = {0};
        int rc = nz_tile_decode_native(dc, &e->d, t, e->tile[t], e->len[t], (uint8_t *)out + t * per, &err);
        if (rc)
            fail_msg("%s: nz_tile_decode_native tile %llu: %d %s", what, (unsigned long long)t, rc, err.msg);
    }
}

static size_t total_len(const enc_t *e) {
    size_t s = 0;
    for (uint64_t t = 0; t < e->nt; t++) s += e->len[t];
    return s;
}

/* Lossless: native decode is bit-exact, fp32 decode is the exact conversion,
 * exponent decode gives the exponent fields. */
static void check_lossless(nz_dtype dt, nz_coder coder, uint64_t rows, uint64_t cols, uint32_t tile_rows,
                           const void *src, int expect_const, const char *what) {
    nz_mode m = {NZ_MODE_LOSSLESS, 0, 0};
    enc_t e;
    nz_error err = {0};
    char ctx[200];
    snprintf(ctx, sizeof ctx, "%s %s/%s %llux%llu tile_rows %u", what, nz_dtype_name(dt),
             nz_coder_name(coder), (unsigned long long)rows, (unsigned long long)cols, tile_rows);
    int rc = enc_build(&e, dt, 0, &m, coder, rows, cols, tile_rows, src, &err);
    if (rc) fail_msg("%s: encode failed %d %s", ctx, rc, err.msg);
    size_t n = (size_t)(rows * cols);
    if (n == 0) {
        assert_int_equal(e.nt, 0);
        enc_free(&e);
        return;
    }
    if (expect_const) {
        if (e.d.coder != NZ_CODER_CONST)
            fail_msg("%s: coder %s, expected const", ctx, nz_coder_name(e.d.coder));
        int ones = 0;
        for (int s = 0; s < 256; s++) ones += e.d.freq[s] == NZ_RANS_PROB_SCALE;
        assert_int_equal(ones, 1);
    } else if (e.d.coder != coder && e.d.coder != NZ_CODER_CONST) {
        fail_msg("%s: coder became %s", ctx, nz_coder_name(e.d.coder));
    }
    assert_int_equal(nz_desc_native_dtype(&e.d), dt);
    nz_dctx *dc = nz_dctx_create();
    assert_non_null(dc);

    size_t esz = nz_dtype_size(dt);
    uint8_t *nat = xmalloc(n * esz);
    memset(nat, 0xEE, n * esz);
    dec_native_all(dc, &e, nat, ctx);
    for (size_t i = 0; i < n; i++) {
        uint32_t got = get_elem(dt, nat, i), want = get_elem(dt, src, i);
        if (got != want) fail_msg("%s: native element %zu is %#x, source %#x", ctx, i, got, want);
    }
    float *f = xmalloc(n * sizeof *f);
    dec_f32_all(dc, &e, f, ctx);
    for (size_t i = 0; i < n; i++) {
        uint32_t got = f2u(f[i]), want = as_f32(dt, get_elem(dt, src, i));
        if (got != want)
            fail_msg("%s: fp32 element %zu is %#010x, expected %#010x (source %#x)", ctx, i, got, want,
                     get_elem(dt, src, i));
    }
    uint8_t *ex = xmalloc((size_t)(tile_rows < rows ? tile_rows : rows) * cols);
    for (uint64_t t = 0; t < e.nt; t++) {
        rc = nz_tile_decode_exponents(dc, &e.d, t, e.tile[t], e.len[t], ex, &err);
        if (rc) fail_msg("%s: decode_exponents tile %llu: %s", ctx, (unsigned long long)t, err.msg);
        size_t nt = (size_t)(nz_desc_tile_nrows(&e.d, t) * cols), i0 = (size_t)(t * tile_rows * cols);
        for (size_t i = 0; i < nt; i++)
            if (ex[i] != exp_field(dt, get_elem(dt, src, i0 + i)))
                fail_msg("%s: exponent %zu is %u, expected %u", ctx, i0 + i, ex[i],
                         exp_field(dt, get_elem(dt, src, i0 + i)));
    }
    free(ex);
    free(f);
    free(nat);
    nz_dctx_free(dc);
    enc_free(&e);
}

/* ------------------------------------------------------------------------ */
/* float helpers                                                            */
/* ------------------------------------------------------------------------ */

static void test_f16_to_f32_exhaustive(void **state) {
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t got = f2u(nz_f16_to_f32((uint16_t)h)), want = ref_f16_to_f32((uint16_t)h);
        if (got != want) fail_msg("nz_f16_to_f32(%#06x) = %#010x, expected %#010x", h, got, want);
        /* and back: every non-NaN half round-trips exactly */
        uint16_t back = nz_f32_to_f16(u2f(got));
        if (f16_isnan((uint16_t)h)) {
            if (!f16_isnan(back) || (back & 0x8000) != (h & 0x8000) || !(back & 0x200))
                fail_msg("NaN %#06x came back as %#06x (want a quiet NaN with the same sign)", h, back);
            if ((h & 0x200) && back != h) fail_msg("quiet NaN %#06x came back as %#06x", h, back);
        } else if (back != h) {
            fail_msg("nz_f32_to_f16(nz_f16_to_f32(%#06x)) = %#06x", h, back);
        }
        /* bf16 widening is a shift, narrowing a non-NaN bf16 is exact */
        assert_int_equal(f2u(nz_bf16_to_f32((uint16_t)h)), h << 16);
        uint16_t bb = nz_f32_to_bf16(nz_bf16_to_f32((uint16_t)h));
        if (bf16_isnan((uint16_t)h)) {
            if (!bf16_isnan(bb) || (bb & 0x8000) != (h & 0x8000) || !(bb & 0x40))
                fail_msg("bf16 NaN %#06x came back as %#06x", h, bb);
        } else if (bb != h) {
            fail_msg("nz_f32_to_bf16(nz_bf16_to_f32(%#06x)) = %#06x", h, bb);
        }
    }
}

static void check_f16(uint32_t u, uint16_t want) {
    uint16_t got = nz_f32_to_f16(u2f(u));
    if (got != want)
        fail_msg("nz_f32_to_f16(%#010x = %g) = %#06x, expected %#06x", u, (double)u2f(u), got, want);
}

static void test_f32_to_f16(void **state) {
    /* specials */
    check_f16(0x00000000, 0x0000);
    check_f16(0x80000000, 0x8000);
    check_f16(0x7f800000, 0x7c00);
    check_f16(0xff800000, 0xfc00);
    check_f16(f2u(65504.0f), 0x7bff);
    check_f16(f2u(65519.996f), 0x7bff); /* just below the overflow tie */
    check_f16(f2u(65520.0f), 0x7c00);   /* tie with odd 0x7bff: rounds to Inf */
    check_f16(f2u(-65520.0f), 0xfc00);
    check_f16(f2u(65536.0f), 0x7c00);
    check_f16(0x7f7fffff, 0x7c00); /* FLT_MAX */
    check_f16(0xff7fffff, 0xfc00);
    check_f16(f2u(0x1p-24f), 0x0001); /* smallest subnormal */
    check_f16(f2u(0x1p-25f), 0x0000); /* tie between 0 and 2^-24: even is 0 */
    check_f16(f2u(-0x1p-25f), 0x8000);
    check_f16(0x33000001, 0x0001);      /* just above 2^-25 */
    check_f16(f2u(0x1.8p-24f), 0x0002); /* 1.5 units: tie, to even 2 */
    check_f16(f2u(0x1.4p-23f), 0x0002); /* 2.5 units: tie, to even 2 */
    check_f16(f2u(0x1.cp-23f), 0x0004); /* 3.5 units: tie, to even 4 */
    check_f16(f2u(0x1p-26f), 0x0000);
    check_f16(0x00000001, 0x0000); /* fp32 subnormal */
    check_f16(0x80000001, 0x8000);
    check_f16(f2u(0x1p-14f), 0x0400);                   /* smallest normal */
    check_f16(f2u(0x1.ff8p-15f), 0x03ff);               /* largest subnormal, 1023 * 2^-24 */
    check_f16(f2u(0x1.ffcp-15f), 0x0400);               /* tie 1023.5 units: to even 1024 = smallest normal */
    check_f16(0x387fdfff, 0x03ff);                      /* just below that tie */
    check_f16(f2u(1.0f + 0x1p-11f), 0x3c00);            /* tie, to even */
    check_f16(f2u(1.0f + 0x1p-11f + 0x1p-23f), 0x3c01); /* above the tie */
    check_f16(f2u(1.0f + 3 * 0x1p-11f), 0x3c02);        /* tie, to even (up) */
    check_f16(f2u(2047.0f / 1024.0f + 0x1p-11f), 0x4000); /* carry into the exponent */
    /* NaNs: stay NaN, quiet, same sign */
    const uint32_t nans[] = {0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001,
                             0x7fbfffff, 0x7fffffff, 0x7f802000};
    for (size_t i = 0; i < sizeof nans / sizeof *nans; i++) {
        uint16_t h = nz_f32_to_f16(u2f(nans[i]));
        if (!f16_isnan(h) || !(h & 0x200) || (h >> 15) != (nans[i] >> 31))
            fail_msg("nz_f32_to_f16(NaN %#010x) = %#06x: want a quiet NaN with the same sign", nans[i], h);
    }

    /* every tie and its neighbours, both signs: the midpoint between two
     * adjacent halves (exact in fp32) goes to the even one */
    for (uint32_t h = 0; h < 0x7c00; h++) {
        double lo = u2f(ref_f16_to_f32((uint16_t)h));
        double hi = h == 0x7bff ? 65536.0 : u2f(ref_f16_to_f32((uint16_t)(h + 1)));
        float mid = (float)((lo + hi) / 2);
        assert_true((double)mid == (lo + hi) / 2);
        uint16_t even = h & 1 ? (uint16_t)(h + 1) : (uint16_t)h;
        for (uint32_t sg = 0; sg <= 0x8000; sg += 0x8000) {
            uint32_t fs = sg << 16;
            check_f16(fs | f2u(mid), (uint16_t)(sg | even));
            check_f16(fs | (f2u(mid) - 1), (uint16_t)(sg | h));
            check_f16(fs | (f2u(mid) + 1), (uint16_t)(sg | (h + 1)));
            check_f16(fs | f2u((float)lo), (uint16_t)(sg | h));
        }
    }

    /* random floats: uniformly random bits and values in the f16 range */
    uint64_t seed = 0xF16F16;
    int iters = tu_quick() ? 50000 : 2000000;
    for (int i = 0; i < iters; i++) {
        uint32_t u = (uint32_t)(tu_rand(&seed) >> 32);
        if (i & 1) u = (u & 0x807fffffu) | (uint32_t)(100 + (tu_rand(&seed) % 45)) << 23;
        uint16_t got = nz_f32_to_f16(u2f(u));
        if (f32_isnan(u)) {
            if (!f16_isnan(got) || (got >> 15) != (u >> 31)) fail_msg("NaN %#010x -> %#06x", u, got);
        } else if (got != ref_f32_to_f16(u)) {
            fail_msg("nz_f32_to_f16(%#010x) = %#06x, expected %#06x", u, got, ref_f32_to_f16(u));
        }
    }
}

static void check_bf16(uint32_t u, uint16_t want) {
    uint16_t got = nz_f32_to_bf16(u2f(u));
    if (got != want) fail_msg("nz_f32_to_bf16(%#010x) = %#06x, expected %#06x", u, got, want);
}

static void test_f32_to_bf16(void **state) {
    check_bf16(0x3f800000, 0x3f80);
    check_bf16(0x3f808000, 0x3f80); /* tie, even below */
    check_bf16(0x3f818000, 0x3f82); /* tie, even above */
    check_bf16(0xbf808000, 0xbf80);
    check_bf16(0xbf818000, 0xbf82);
    check_bf16(0x3f808001, 0x3f81);
    check_bf16(0x3f807fff, 0x3f80);
    check_bf16(0x3fff8000, 0x4000); /* tie, carry into the exponent */
    check_bf16(0x7f7fffff, 0x7f80); /* FLT_MAX rounds to Inf */
    check_bf16(0xff7fffff, 0xff80);
    check_bf16(0x7f7f8000, 0x7f80); /* tie with odd 0x7f7f: Inf */
    check_bf16(0x7f7f7fff, 0x7f7f);
    check_bf16(0x7f7e8000, 0x7f7e); /* tie, even */
    check_bf16(0x7f800000, 0x7f80);
    check_bf16(0xff800000, 0xff80);
    check_bf16(0x00000000, 0x0000);
    check_bf16(0x80000000, 0x8000);
    check_bf16(0x00008000, 0x0000); /* subnormal tie to 0 */
    check_bf16(0x00018000, 0x0002); /* subnormal tie up to even */
    check_bf16(0x00008001, 0x0001);
    check_bf16(0x807fffff, 0x8080); /* largest subnormal carries to the smallest normal */
    const uint32_t nans[] = {0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7f808000,
                             0x7fbfffff, 0x7fffffff, 0xffffffff, 0x7fc00001};
    for (size_t i = 0; i < sizeof nans / sizeof *nans; i++) {
        uint16_t b = nz_f32_to_bf16(u2f(nans[i]));
        if (!bf16_isnan(b) || !(b & 0x40) || (b >> 15) != (nans[i] >> 31))
            fail_msg("nz_f32_to_bf16(NaN %#010x) = %#06x: want a quiet NaN with the same sign", nans[i], b);
    }
    uint64_t seed = 0xBF16;
    int iters = tu_quick() ? 50000 : 2000000;
    for (int i = 0; i < iters; i++) {
        uint32_t u = (uint32_t)(tu_rand(&seed) >> 32);
        if (i % 3 == 0) u = (u & 0xffff0000u) | 0x8000; /* exact ties */
        if (f32_isnan(u)) continue;
        uint16_t want = (uint16_t)(ref_round_k(u, 7) >> 16);
        check_bf16(u, want);
    }
}

static void check_round(uint32_t u, int k, uint32_t want) {
    uint32_t got = nz_round_mantissa(u, k);
    if (got != want) fail_msg("nz_round_mantissa(%#010x, %d) = %#010x, expected %#010x", u, k, got, want);
}

static void test_round_mantissa(void **state) {
    /* the reference itself, on a few values worked out by hand */
    assert_int_equal(ref_round_k(f2u(1.25f), 1), f2u(1.0f));
    assert_int_equal(ref_round_k(f2u(1.75f), 1), f2u(2.0f));
    assert_int_equal(ref_round_k(f2u(1.5f), 0), f2u(2.0f));
    assert_int_equal(ref_round_k(f2u(1.9999f), 0), f2u(2.0f));
    assert_int_equal(ref_round_k(0x7f7fffff, 5), 0x7f800000);

    for (int k = 0; k <= 7; k++) {
        /* ties to even for every kept-mantissa pattern, both signs, several
         * binades (normal and subnormal) */
        for (uint32_t j = 0; j < (1u << k); j++) {
            const int exps[] = {1, 20, 127, 128, 200, 254};
            for (size_t xi = 0; xi < sizeof exps / sizeof *exps; xi++) {
                uint32_t base = (uint32_t)exps[xi] << 23 | j << (23 - k);
                uint32_t tie = base | 1u << (22 - k);
                uint32_t up = base + (1u << (23 - k)); /* may carry into the exponent or to Inf */
                uint32_t even = k == 0 ? ((base >> 23) & 1 ? up : base) : (j & 1 ? up : base);
                for (uint32_t sg = 0; sg <= 1; sg++) {
                    uint32_t s = sg << 31;
                    check_round(s | tie, k, s | even);
                    check_round(s | (tie - 1), k, s | base);
                    check_round(s | (tie + 1), k, s | up);
                    check_round(s | base, k, s | base);
                    assert_int_equal(ref_round_k(s | tie, k), s | even);
                }
            }
        }
        check_round(f2u(1.9999f), k, f2u(2.0f)); /* carry into the exponent */
        check_round(f2u(-1.9999f), k, f2u(-2.0f));
        check_round(0x7f7fffff, k, 0x7f800000); /* FLT_MAX overflows to Inf */
        check_round(0xff7fffff, k, 0xff800000);
        uint32_t maxk = 0x7f000000u | ((1u << k) - 1) << (23 - k); /* largest k-bit finite */
        check_round(maxk, k, maxk);
        check_round(maxk + (1u << (22 - k)) - 1, k, maxk); /* below the tie */
        /* the tie above it: odd mantissa, so Inf; at k = 0 the "even" neighbour
         * is the one with the even biased exponent (254), i.e. maxk itself */
        check_round(maxk + (1u << (22 - k)), k, k == 0 ? maxk : 0x7f800000);
        check_round(0x7f800000, k, 0x7f800000);
        check_round(0xff800000, k, 0xff800000);
        check_round(0x00000000, k, 0x00000000);
        check_round(0x80000000, k, 0x80000000);
        check_round(0x007fffff, k, 0x00800000); /* largest subnormal carries to FLT_MIN */
        check_round(0x00000001, k, 0x00000000);
        check_round(0x80000001, k, 0x80000000);
        if (k >= 1) {
            const uint32_t nans[] = {0x7f800001, 0xff800001, 0x7fc00000, 0xffc12345, 0x7fffffff, 0x7fbfffff};
            for (size_t i = 0; i < sizeof nans / sizeof *nans; i++) {
                uint32_t r = nz_round_mantissa(nans[i], k);
                if (!f32_isnan(r) || !(r & 0x00400000u) || (r >> 31) != (nans[i] >> 31) ||
                    (r & ((1u << (23 - k)) - 1)))
                    fail_msg("round(NaN %#010x, %d) = %#010x: want a quiet k-bit NaN, same sign", nans[i], k,
                             r);
            }
        }
    }
    /* random values against the reference, every k from 0 to 23 */
    uint64_t seed = 0x5EED;
    int iters = tu_quick() ? 3000 : 100000;
    for (int i = 0; i < iters; i++) {
        uint32_t u = (uint32_t)(tu_rand(&seed) >> 32);
        if (f32_isnan(u)) continue;
        for (int k = 0; k <= 23; k++) check_round(u, k, ref_round_k(u, k));
    }
}

/* ------------------------------------------------------------------------ */
/* names, descriptors                                                       */
/* ------------------------------------------------------------------------ */

static void test_mode_names(void **state) {
    const char *good[] = {"raw",     "lossless", "bf16",    "lossy-0", "lossy-1", "lossy-2",
                          "lossy-3", "lossy-4",  "lossy-5", "lossy-6", "lossy-7"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        nz_mode m;
        memset(&m, 0x7f, sizeof m);
        nz_error err = {0};
        assert_int_equal(nz_mode_parse(good[i], &m, &err), NZ_OK);
        assert_int_equal(m.norm_block, 0);
        char buf[32];
        assert_string_equal(nz_mode_name(&m, buf, sizeof buf), good[i]);
        if (i >= 3) {
            assert_int_equal(m.kind, NZ_MODE_LOSSY);
            assert_int_equal(m.k, (int)i - 3);
        }
    }
    nz_mode m;
    assert_int_equal(nz_mode_parse("raw", &m, NULL), NZ_OK);
    assert_int_equal(m.kind, NZ_MODE_RAW);
    assert_int_equal(nz_mode_parse("lossless", &m, NULL), NZ_OK);
    assert_int_equal(m.kind, NZ_MODE_LOSSLESS);
    assert_int_equal(nz_mode_parse("bf16", &m, NULL), NZ_OK);
    assert_int_equal(m.kind, NZ_MODE_BF16);

    const char *bad[] = {"lossy-8",  "foo",   "",     "lossy-", "lossy-10", "lossy-1x", "LOSSLESS",
                         "lossy--1", "lossy", "raw ", " bf16",  "lossy-9",  "lossy-a"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        nz_error err = {0};
        int rc = nz_mode_parse(bad[i], &m, &err);
        if (rc != NZ_E_INVALID_ARG)
            fail_msg("nz_mode_parse(\"%s\") = %d, expected NZ_E_INVALID_ARG", bad[i], rc);
        assert_int_equal(err.code, NZ_E_INVALID_ARG);
        char quoted[40];
        snprintf(quoted, sizeof quoted, "'%s'", bad[i]);
        if (!strstr(err.msg, quoted)) fail_msg("message \"%s\" does not name %s", err.msg, quoted);
        assert_int_equal(nz_mode_parse(bad[i], &m, NULL), NZ_E_INVALID_ARG);
    }
    /* a short buffer truncates the name but stays terminated */
    char small[4];
    m.kind = NZ_MODE_LOSSY;
    m.k = 5;
    assert_string_equal(nz_mode_name(&m, small, sizeof small), "los");

    /* coders */
    const char *cn[] = {"none", "rans", "zstd", "const", "esc"};
    for (int c = 0; c < 5; c++) {
        assert_string_equal(nz_coder_name((nz_coder)c), cn[c]);
        nz_coder got = (nz_coder)99;
        assert_int_equal(nz_coder_parse(cn[c], &got, NULL), NZ_OK);
        assert_int_equal(got, c);
    }
    assert_string_equal(nz_coder_name((nz_coder)5), "invalid");
    assert_string_equal(nz_coder_name((nz_coder)-1), "invalid");
    nz_coder c;
    nz_error err = {0};
    assert_int_equal(nz_coder_parse("RANS", &c, &err), NZ_E_INVALID_ARG);
    assert_non_null(strstr(err.msg, "'RANS'"));
    assert_int_equal(nz_coder_parse("invalid", &c, NULL), NZ_E_INVALID_ARG);
    assert_int_equal(nz_coder_parse("", &c, NULL), NZ_E_INVALID_ARG);
}

static void test_desc_init_geometry(void **state) {
    nz_tensor_desc d;
    nz_error err;
    nz_mode lossless = {NZ_MODE_LOSSLESS, 0, 0}, raw = {NZ_MODE_RAW, 0, 0};

    /* errors */
    memset(&err, 0, sizeof err);
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 4, 4, 0, &err),
                     NZ_E_INVALID_ARG);
    assert_int_equal(err.code, NZ_E_INVALID_ARG);
    nz_mode l8 = {NZ_MODE_LOSSY, 8, 0}, lm1 = {NZ_MODE_LOSSY, -1, 0};
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &l8, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_E_INVALID_ARG);
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lm1, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_E_INVALID_ARG);
    memset(&err, 0, sizeof err);
    assert_int_equal(nz_desc_init(&d, NZ_DT_OTHER, 8, &lossless, NZ_CODER_RANS, 4, 4, 1, &err),
                     NZ_E_UNSUPPORTED);
    assert_int_equal(err.code, NZ_E_UNSUPPORTED);
    assert_int_equal(nz_desc_init(&d, NZ_DT_OTHER, 0, &raw, NZ_CODER_NONE, 4, 4, 1, NULL), NZ_E_INVALID_ARG);
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, UINT64_MAX / 2, 3, 1, NULL),
                     NZ_E_INVALID_ARG);

    /* derived fields */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F16, 0, &lossless, NZ_CODER_NONE, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(d.coder, NZ_CODER_ESC); /* NONE means the default */
    assert_int_equal(d.exp_bits, 5);
    assert_int_equal(d.mant_bits, 10);
    assert_int_equal(d.elem_size, 2);
    assert_int_equal(nz_desc_init(&d, NZ_DT_BF16, 0, &lossless, NZ_CODER_ZSTD, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(d.exp_bits, 8);
    assert_int_equal(d.mant_bits, 7);
    assert_int_equal(d.coder, NZ_CODER_ZSTD);
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(d.mant_bits, 23);
    assert_int_equal(d.elem_size, 4);
    nz_mode bf = {NZ_MODE_BF16, 0, 77};
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &bf, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(d.mode.kind, NZ_MODE_BF16);
    assert_int_equal(d.mode.norm_block, 0); /* only lossy keeps a normaliser */
    assert_int_equal(d.mant_bits, 7);
    assert_int_equal(nz_desc_init(&d, NZ_DT_BF16, 0, &bf, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(d.mode.kind, NZ_MODE_LOSSLESS); /* bf16 of a bf16 tensor is lossless */
    nz_mode l3 = {NZ_MODE_LOSSY, 3, 64};
    assert_int_equal(nz_desc_init(&d, NZ_DT_F16, 0, &l3, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(d.exp_bits, 8);
    assert_int_equal(d.mant_bits, 3);
    assert_int_equal(d.mode.norm_block, 64);
    assert_int_equal(nz_desc_init(&d, NZ_DT_OTHER, 8, &raw, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(d.coder, NZ_CODER_NONE);
    assert_int_equal(d.elem_size, 8);
    /* empty tensors are raw with no tiles */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 0, 7, 2, NULL), NZ_OK);
    assert_int_equal(d.mode.kind, NZ_MODE_RAW);
    assert_int_equal(d.coder, NZ_CODER_NONE);
    assert_int_equal(nz_desc_ntiles(&d), 0);
    assert_int_equal(nz_tensor_analyze(&d, NULL, NULL, NULL), NZ_OK);
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 7, 0, 2, NULL), NZ_OK);
    assert_int_equal(nz_desc_ntiles(&d), 0);

    /* ids are unique */
    nz_tensor_desc d2;
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(nz_desc_init(&d2, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    assert_true(d.id != 0 && d2.id != 0 && d.id != d2.id);

    /* tiles: 37 rows in tiles of 8 -> 4 full + 1 of 5 */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F16, 0, &lossless, NZ_CODER_RANS, 37, 13, 8, NULL), NZ_OK);
    assert_int_equal(nz_desc_ntiles(&d), 5);
    for (uint64_t t = 0; t < 4; t++) assert_int_equal(nz_desc_tile_nrows(&d, t), 8);
    assert_int_equal(nz_desc_tile_nrows(&d, 4), 5);
    assert_int_equal(nz_desc_tile_nrows(&d, 5), 0);
    assert_int_equal(nz_desc_tile_fixed_bytes(&d, 0), (8 * 13 * 11 + 7) / 8);
    assert_int_equal(nz_desc_tile_fixed_bytes(&d, 4), (5 * 13 * 11 + 7) / 8);
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &l3, NZ_CODER_RANS, 37, 13, 8, NULL), NZ_OK);
    assert_int_equal(nz_desc_tile_fixed_bytes(&d, 0), (104 * 4 + 7) / 8 + (104 + 63) / 64);
    assert_int_equal(nz_desc_tile_fixed_bytes(&d, 4), (65 * 4 + 7) / 8 + 2);
    assert_int_equal(nz_desc_init(&d, NZ_DT_OTHER, 6, &raw, NZ_CODER_NONE, 37, 13, 8, NULL), NZ_OK);
    assert_int_equal(nz_desc_tile_fixed_bytes(&d, 4), 5 * 13 * 6);
    assert_int_equal(nz_tile_bound(&d, 4), 5 * 13 * 6);
    /* tile_rows larger than the tensor: one short tile */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 5, 7, 100, NULL), NZ_OK);
    assert_int_equal(nz_desc_ntiles(&d), 1);
    assert_int_equal(nz_desc_tile_nrows(&d, 0), 5);

    /* default tile rows: about 131072 elements (512 KiB of fp32), at least
     * one row */
    const uint64_t target = 131072;
    assert_int_equal(nz_default_tile_rows(0), 1);
    assert_int_equal(nz_default_tile_rows(1), target);
    assert_int_equal(nz_default_tile_rows(1000), target / 1000);
    assert_int_equal(nz_default_tile_rows(target), 1);
    assert_int_equal(nz_default_tile_rows(1000000), 1);
    for (uint64_t c = 1; c < 2 * target; c += 777) {
        uint32_t r = nz_default_tile_rows(c);
        assert_true(r >= 1);
        assert_true(r == 1 || r * c <= target);
        assert_true((r + 1) * c > target);
    }
}

static void test_desc_validate(void **state) {
    nz_tensor_desc d;
    nz_error err;
    nz_mode lossless = {NZ_MODE_LOSSLESS, 0, 0}, raw = {NZ_MODE_RAW, 0, 0};
#define EXPECT_FORMAT(desc)                                                                                  \
    do {                                                                                                     \
        memset(&err, 0, sizeof err);                                                                         \
        int rc_ = nz_desc_validate(&(desc), &err);                                                           \
        if (rc_ != NZ_E_FORMAT)                                                                              \
            fail_msg("line %d: nz_desc_validate = %d, expected NZ_E_FORMAT", __LINE__, rc_);                 \
        assert_int_equal(err.code, NZ_E_FORMAT);                                                             \
        assert_true(strlen(err.msg) > 0);                                                                    \
        assert_int_equal(nz_desc_validate(&(desc), NULL), NZ_E_FORMAT);                                      \
    } while (0)

    /* a good rans desc */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    d.freq[126] = 3000;
    d.freq[127] = 1096;
    assert_int_equal(nz_desc_validate(&d, NULL), NZ_OK);
    /* bad rans tables */
    nz_tensor_desc b = d;
    b.freq[127] = 1095;
    EXPECT_FORMAT(b);
    b = d;
    b.freq[127] = 1097;
    EXPECT_FORMAT(b);
    b = d;
    memset(b.freq, 0, sizeof b.freq);
    b.freq[5] = 4096; /* one symbol belongs to const, not rans */
    EXPECT_FORMAT(b);
    b = d;
    memset(b.freq, 0, sizeof b.freq);
    EXPECT_FORMAT(b);

    /* const: exactly one symbol with 4096 */
    b = d;
    b.coder = NZ_CODER_CONST;
    EXPECT_FORMAT(b); /* two symbols */
    memset(b.freq, 0, sizeof b.freq);
    b.freq[9] = 4096;
    assert_int_equal(nz_desc_validate(&b, NULL), NZ_OK);
    b.freq[10] = 1; /* two symbols, one of them 4096 */
    EXPECT_FORMAT(b);
    memset(b.freq, 0, sizeof b.freq);
    b.freq[9] = 4095;
    EXPECT_FORMAT(b);
    memset(b.freq, 0, sizeof b.freq);
    EXPECT_FORMAT(b);

    /* f16: 5-bit exponents only */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F16, 0, &lossless, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    d.freq[15] = 2048;
    d.freq[31] = 2048;
    assert_int_equal(nz_desc_validate(&d, NULL), NZ_OK);
    b = d;
    b.freq[31] = 0;
    b.freq[32] = 2048;
    EXPECT_FORMAT(b);
    b.coder = NZ_CODER_ZSTD;
    EXPECT_FORMAT(b);
    memset(b.freq, 0, sizeof b.freq);
    b.freq[200] = 4096;
    b.coder = NZ_CODER_CONST;
    EXPECT_FORMAT(b);
    b.freq[200] = 0;
    b.freq[31] = 4096;
    assert_int_equal(nz_desc_validate(&b, NULL), NZ_OK);
    /* bf16 may use exponent 255 */
    assert_int_equal(nz_desc_init(&d, NZ_DT_BF16, 0, &lossless, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    d.freq[0] = 1;
    d.freq[255] = 4095;
    assert_int_equal(nz_desc_validate(&d, NULL), NZ_OK);

    /* zstd: the table is informative only */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_ZSTD, 4, 4, 1, NULL), NZ_OK);
    d.freq[3] = 17;
    assert_int_equal(nz_desc_validate(&d, NULL), NZ_OK);

    /* coder vs mode */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &raw, NZ_CODER_NONE, 4, 4, 1, NULL), NZ_OK);
    assert_int_equal(nz_desc_validate(&d, NULL), NZ_OK);
    b = d;
    b.coder = NZ_CODER_RANS;
    b.freq[1] = b.freq[2] = 2048;
    EXPECT_FORMAT(b);
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_RANS, 4, 4, 1, NULL), NZ_OK);
    d.coder = NZ_CODER_NONE;
    EXPECT_FORMAT(d);

    /* geometry */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossless, NZ_CODER_ZSTD, 4, 4, 1, NULL), NZ_OK);
    b = d;
    b.tile_rows = 0;
    EXPECT_FORMAT(b);
    b = d;
    b.rows = UINT64_MAX / 2;
    b.cols = 3;
    EXPECT_FORMAT(b);
    nz_mode lossy = {NZ_MODE_LOSSY, 2, 0};
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &lossy, NZ_CODER_ZSTD, 4, 4, 1, NULL), NZ_OK);
    d.mode.norm_block = (1u << 30) + 1;
    EXPECT_FORMAT(d);
    d.mode.norm_block = 1u << 30;
    assert_int_equal(nz_desc_validate(&d, NULL), NZ_OK);
#undef EXPECT_FORMAT
}

/* ------------------------------------------------------------------------ */
/* lossless                                                                 */
/* ------------------------------------------------------------------------ */

static void test_lossless_roundtrip(void **state) {
    const nz_coder coders[] = {NZ_CODER_RANS, NZ_CODER_ZSTD, NZ_CODER_ESC};
    const int flavours[] = {FL_GAUSS, FL_BITS, FL_MIXED};
    const char *fname[] = {"gauss", "random bits", "mixed"};
    uint64_t rows = 96, cols = 300;
    uint32_t tr = 16;
    for (int di = 0; di < 3; di++) {
        for (int fi = 0; fi < 3; fi++) {
            void *src = gen_tensor(k_float_dtypes[di], rows * cols, flavours[fi], 1000 + di * 10 + fi);
            for (int ci = 0; ci < 2; ci++)
                check_lossless(k_float_dtypes[di], coders[ci], rows, cols, tr, src, 0, fname[fi]);
            free(src);
        }
    }
    /* the codec actually compresses gaussian weights: exponents ~2.6 bits */
    const double max_ratio[3] = {0.75, 0.92, 0.90}; /* bf16, f16, f32 */
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        void *src = gen_tensor(dt, rows * cols, FL_GAUSS, 77 + di);
        for (int ci = 0; ci < 2; ci++) {
            nz_mode m = {NZ_MODE_LOSSLESS, 0, 0};
            enc_t e;
            assert_int_equal(enc_build(&e, dt, 0, &m, coders[ci], rows, cols, tr, src, NULL), NZ_OK);
            double ratio = (double)total_len(&e) / (rows * cols * nz_dtype_size(dt));
            print_message("    %s gaussian, %s: compressed to %.3f of the source\n", nz_dtype_name(dt),
                          nz_coder_name(coders[ci]), ratio);
            if (ratio > max_ratio[di])
                fail_msg("%s/%s ratio %.3f > %.2f", nz_dtype_name(dt), nz_coder_name(coders[ci]), ratio,
                         max_ratio[di]);
            enc_free(&e);
        }
        free(src);
    }
}

static void test_lossless_const(void **state) {
    /* every exponent equal: the const coder whatever was asked for */
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        void *src = gen_tensor(dt, 37 * 50, FL_CONST, 9 + di);
        check_lossless(dt, NZ_CODER_RANS, 37, 50, 8, src, 1, "const");
        check_lossless(dt, NZ_CODER_ZSTD, 37, 50, 8, src, 1, "const");
        check_lossless(dt, NZ_CODER_RANS, 1, 1, 1, src, 1, "const 1x1");
        free(src);
        /* all zeros, all one NaN pattern, all Inf */
        const uint32_t fill[3][3] = {
            {0x0000, 0x7fc1, 0xff80}, {0x0000, 0x7e01, 0xfc00}, {0, 0x7fa00001, 0xff800000}};
        void *z = xmalloc(40 * nz_dtype_size(dt));
        for (int v = 0; v < 3; v++) {
            for (size_t i = 0; i < 40; i++) set_elem(dt, z, i, fill[di][v]);
            check_lossless(dt, NZ_CODER_RANS, 8, 5, 3, z, 1, "const fill");
        }
        /* two exponents: not const */
        set_elem(dt, z, 17, dt == NZ_DT_F32 ? 0x3f800000 : dt == NZ_DT_F16 ? 0x3c00 : 0x3f80);
        check_lossless(dt, NZ_CODER_RANS, 8, 5, 3, z, 0, "two exponents");
        free(z);
    }
}

static void test_lossless_edge_values(void **state) {
    const nz_coder coders[] = {NZ_CODER_RANS, NZ_CODER_ZSTD, NZ_CODER_ESC};
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        size_t ne;
        const uint32_t *edge = edge_values(dt, &ne);
        /* the edge values alone, as a row, a column, and repeated to fill
         * several 32-symbol groups with a remainder */
        void *row = xmalloc(ne * 4);
        for (size_t i = 0; i < ne; i++) set_elem(dt, row, i, edge[i]);
        size_t nrep = 3 * 77;
        void *rep = xmalloc(nrep * 4);
        for (size_t i = 0; i < nrep; i++) set_elem(dt, rep, i, edge[(i * 7) % ne]);
        for (int ci = 0; ci < 2; ci++) {
            check_lossless(dt, coders[ci], 1, ne, 1, row, 0, "edge row");
            check_lossless(dt, coders[ci], ne, 1, 4, row, 0, "edge column");
            check_lossless(dt, coders[ci], 3, 77, 2, rep, 0, "edge repeated");
        }
        free(row);
        free(rep);
        /* every bf16 / f16 bit pattern once */
        if (dt != NZ_DT_F32) {
            void *all = xmalloc(65536 * 2);
            for (uint32_t i = 0; i < 65536; i++) set_elem(dt, all, i, i);
            for (int ci = 0; ci < 2; ci++)
                check_lossless(dt, coders[ci], 256, 256, 64, all, 0, "all patterns");
            free(all);
        }
    }
}

static void test_odd_shapes(void **state) {
    struct {
        uint64_t rows, cols;
        uint32_t tr;
    } shapes[] = {{1, 1, 1},
                  {1, 1, 8},
                  {1, 257, 4},
                  {300, 1, 8},
                  {37, 13, 8},
                  {37, 13, 1},
                  {5, 7, 100},
                  {64, 64, 16},
                  {33, 31, 32},
                  {3, 5, 2},
                  {1, 100000, 1},
                  {2, 40000, 0},
                  /* tiles just below and at the rANS 64-lane threshold */
                  {3, NZ_RANS_WIDE_MIN / 3, 3},
                  {2, NZ_RANS_WIDE_MIN - 1, 1},
                  {7, 1000, 0}};
    const nz_coder coders[] = {NZ_CODER_RANS, NZ_CODER_ZSTD, NZ_CODER_ESC};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        uint64_t rows = shapes[si].rows, cols = shapes[si].cols;
        uint32_t tr = shapes[si].tr ? shapes[si].tr : nz_default_tile_rows(cols);
        for (int di = 0; di < 3; di++) {
            void *src = gen_tensor(k_float_dtypes[di], rows * cols, FL_MIXED, 500 + si * 3 + di);
            for (int ci = 0; ci < 2; ci++)
                check_lossless(k_float_dtypes[di], coders[ci], rows, cols, tr, src, 0, "shape");
            free(src);
        }
    }
    /* empty tensors */
    check_lossless(NZ_DT_F32, NZ_CODER_RANS, 0, 5, 1, NULL, 0, "empty");
}

/* tile_rows far beyond the row count is valid (one tile); analysing such a
 * tensor must not size its scratch by tile_rows. */
static void test_huge_tile_rows(void **state) {
    uint64_t rows = 3, cols = 1000;
    for (int di = 0; di < 3; di++) {
        void *src = gen_tensor(k_float_dtypes[di], rows * cols, FL_MIXED, 4242 + di);
        check_lossless(k_float_dtypes[di], NZ_CODER_RANS, rows, cols, 1u << 31, src, 0, "huge tile_rows");
        check_lossless(k_float_dtypes[di], NZ_CODER_ZSTD, rows, cols, UINT32_MAX, src, 0, "huge tile_rows");
        free(src);
    }
}

/* ------------------------------------------------------------------------ */
/* lossy                                                                    */
/* ------------------------------------------------------------------------ */

/* check one decoded lossy value (no normaliser) against the rounding rule */
static void check_lossy_value(uint32_t x, uint32_t got, int k, const char *ctx, size_t i) {
    if (f32_isnan(x)) {
        if (!f32_isnan(got) || !(got & 0x00400000u) || (got >> 31) != (x >> 31))
            fail_msg("%s element %zu: NaN %#010x decoded as %#010x (want quiet NaN, same sign)", ctx, i, x,
                     got);
        return;
    }
    uint32_t want = ref_round_k(x, k);
    if (got != want)
        fail_msg("%s element %zu: %#010x (%g) decoded as %#010x (%g), expected %#010x (%g)", ctx, i, x,
                 (double)u2f(x), got, (double)u2f(got), want, (double)u2f(want));
    /* and the documented error bound: half an ulp at k bits */
    uint32_t mag = x & 0x7fffffffu;
    if (mag >= 0x00800000u && mag < 0x7f800000u && (got & 0x7fffffffu) < 0x7f800000u) {
        int e;
        frexp((double)u2f(mag), &e);
        double bound = ldexp(1.0, e - 1 - k - 1), diff = fabs((double)u2f(got) - (double)u2f(x));
        if (diff > bound) fail_msg("%s element %zu: error %g > half ulp %g at k=%d", ctx, i, diff, bound, k);
    }
}

/* Values that exercise the rounding rule in a source dtype: constructed ties
 * at k bits, carries, near-overflow values, NaNs and the edge values. */
static void *lossy_specials(nz_dtype dt, int k, size_t *n) {
    uint32_t v[512];
    size_t c = 0;
    size_t ne;
    const uint32_t *edge = edge_values(dt, &ne);
    for (size_t i = 0; i < ne; i++) {
        uint32_t f = as_f32(dt, edge[i]);
        if (k == 0 && f32_isnan(f)) continue;
        v[c++] = edge[i];
    }
    /* ties and neighbours at k bits for a few mantissas and binades */
    for (uint32_t j = 0; j < (1u << k) && j < 6; j++) {
        const uint32_t exps[] = {100, 127, 130, 140};
        for (int xi = 0; xi < 4; xi++) {
            uint32_t base = exps[xi] << 23 | j << (23 - k), tie = base | 1u << (22 - k);
            const uint32_t cand[] = {tie, tie | 0x80000000u, tie + 1, tie - 1, base};
            for (int q = 0; q < 5; q++) {
                uint32_t f = cand[q];
                if (dt == NZ_DT_BF16 && (f & 0xffff)) continue; /* not representable */
                if (dt == NZ_DT_F16) {
                    uint16_t h = ref_f32_to_f16(f);
                    if (ref_f16_to_f32(h) != f) continue;
                    f = h;
                } else if (dt == NZ_DT_BF16) {
                    f >>= 16;
                }
                v[c++] = f;
            }
        }
    }
    /* carries and overflow */
    const uint32_t f32s[] = {f2u(1.9999f), f2u(-1.9999f), 0x7f7fffff, 0xff7fffff, 0x7f7f0000,
                             0x7f7f8000,   0x7f7fc000,    0x3fffffff, 0x007fffff};
    for (size_t i = 0; i < sizeof f32s / sizeof *f32s; i++) {
        if (dt == NZ_DT_F32)
            v[c++] = f32s[i];
        else if (dt == NZ_DT_BF16)
            v[c++] = f32s[i] >> 16;
    }
    if (dt == NZ_DT_F16) {
        v[c++] = 0x7bff; /* 65504 carries past the f16 range at k < 10 */
        v[c++] = 0x3fff; /* 1.999 */
        v[c++] = 0x3bff;
    }
    assert_true(c <= 512);
    void *p = xmalloc(c * 4);
    for (size_t i = 0; i < c; i++) set_elem(dt, p, i, v[i]);
    *n = c;
    return p;
}

/* Lossy-k without normaliser: fp32 decode equals the rounding rule element
 * by element; native decode returns the source dtype. */
static void test_lossy_exact(void **state) {
    const nz_coder coders[] = {NZ_CODER_RANS, NZ_CODER_ZSTD, NZ_CODER_ESC};
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        for (int k = 0; k <= 7; k++) {
            size_t nspec;
            void *spec = lossy_specials(dt, k, &nspec);
            uint64_t cols = 97, rows = 40 + (nspec + cols - 1) / cols;
            size_t n = rows * cols;
            void *src = gen_tensor(dt, n, FL_GAUSS, 300 + di * 8 + k);
            memcpy(src, spec, nspec * nz_dtype_size(dt));
            /* a few random patterns too (no NaN at k = 0) */
            uint64_t seed = 99 + k;
            for (size_t i = nspec; i < n; i += 13) {
                uint32_t r = (uint32_t)(tu_rand(&seed) >> 32);
                if (dt != NZ_DT_F32) r &= 0xffff;
                if (k == 0 && f32_isnan(as_f32(dt, r))) continue;
                set_elem(dt, src, i, r);
            }
            for (int ci = 0; ci < 2; ci++) {
                char ctx[96];
                snprintf(ctx, sizeof ctx, "lossy-%d %s/%s", k, nz_dtype_name(dt), nz_coder_name(coders[ci]));
                nz_mode m = {NZ_MODE_LOSSY, k, 0};
                enc_t e;
                nz_error err = {0};
                int rc = enc_build(&e, dt, 0, &m, coders[ci], rows, cols, 8, src, &err);
                if (rc) fail_msg("%s: encode failed: %s", ctx, err.msg);
                assert_int_equal(nz_desc_native_dtype(&e.d), dt);
                assert_int_equal(e.d.mant_bits, k);
                nz_dctx *dc = nz_dctx_create();
                assert_non_null(dc);
                float *f = xmalloc(n * 4);
                dec_f32_all(dc, &e, f, ctx);
                for (size_t i = 0; i < n; i++)
                    check_lossy_value(as_f32(dt, get_elem(dt, src, i)), f2u(f[i]), k, ctx, i);
                uint8_t *nat = xmalloc(n * nz_dtype_size(dt));
                dec_native_all(dc, &e, nat, ctx);
                for (size_t i = 0; i < n; i++) {
                    uint32_t d = f2u(f[i]), got = get_elem(dt, nat, i);
                    if (dt == NZ_DT_F32) {
                        if (got != d) fail_msg("%s: native f32 %zu = %#x, fp32 decode %#x", ctx, i, got, d);
                    } else if (dt == NZ_DT_BF16) {
                        /* k <= 7 bits always fit bf16 exactly */
                        if (got != d >> 16)
                            fail_msg("%s: native bf16 %zu = %#x, expected %#x", ctx, i, got, d >> 16);
                    } else if (f32_isnan(d)) {
                        if (!f16_isnan((uint16_t)got) || (got >> 15) != (d >> 31))
                            fail_msg("%s: native f16 %zu = %#x for NaN", ctx, i, got);
                    } else if (got != ref_f32_to_f16(d)) {
                        fail_msg("%s: native f16 %zu = %#x, expected %#x", ctx, i, got, ref_f32_to_f16(d));
                    }
                }
                free(nat);
                free(f);
                nz_dctx_free(dc);
                enc_free(&e);
            }
            free(src);
            free(spec);
        }
    }
}

/* Specific lossy results spelled out (f32 source through the codec). */
static void test_lossy_known_values(void **state) {
    struct {
        float x;
        int k;
        float want;
    } cases[] = {
        {1.9999f, 0, 2.0f},
        {1.9999f, 7, 2.0f},
        {-1.9999f, 3, -2.0f},
        {1.5f, 0, 2.0f},
        {1.25f, 1, 1.0f},
        {1.75f, 1, 2.0f},
        {1.0625f, 3, 1.0f},
        {1.1875f, 3, 1.25f},
        {-1.1875f, 3, -1.25f},
        {1.00390625f, 7, 1.0f},
        {1.01171875f, 7, 1.015625f},
        {1.3f, 2, 1.25f},
        {-0.0f, 4, -0.0f},
        {0.0f, 0, 0.0f},
        {FLT_MAX, 0, INFINITY},
        {FLT_MAX, 7, INFINITY},
        {-FLT_MAX, 5, -INFINITY},
        {0x1.fcp127f, 6, 0x1.fcp127f}, /* largest 6-bit finite stays */
        {0x1.fep127f, 6, INFINITY},    /* its tie with Inf rounds up */
        {0x1.fdfffep127f, 6, 0x1.fcp127f},
        {INFINITY, 0, INFINITY},
        {-INFINITY, 7, -INFINITY},
    };
    size_t nc = sizeof cases / sizeof *cases;
    for (size_t i = 0; i < nc; i++) {
        nz_mode m = {NZ_MODE_LOSSY, cases[i].k, 0};
        enc_t e;
        float src[3] = {cases[i].x, 1.0f, 0.5f}; /* never a one-exponent tensor */
        assert_int_equal(enc_build(&e, NZ_DT_F32, 0, &m, NZ_CODER_RANS, 1, 3, 1, src, NULL), NZ_OK);
        nz_dctx *dc = nz_dctx_create();
        float out[3];
        dec_f32_all(dc, &e, out, "known");
        if (f2u(out[0]) != f2u(cases[i].want))
            fail_msg("lossy-%d of %a gave %a, expected %a", cases[i].k, (double)cases[i].x, (double)out[0],
                     (double)cases[i].want);
        assert_int_equal(nz_round_mantissa(f2u(cases[i].x), cases[i].k), f2u(cases[i].want));
        nz_dctx_free(dc);
        enc_free(&e);
    }
    /* NaN -> quiet NaN, sign kept, k >= 1 (f32 and bf16 sources) */
    for (int k = 1; k <= 7; k++) {
        uint32_t nans[] = {0x7f800001, 0xff800001, 0x7fc00000, 0xffd00000,
                           0x7fbfffff, 0xffffffff, 0x3f800000};
        nz_mode m = {NZ_MODE_LOSSY, k, 0};
        enc_t e;
        assert_int_equal(enc_build(&e, NZ_DT_F32, 0, &m, NZ_CODER_RANS, 7, 1, 2, nans, NULL), NZ_OK);
        nz_dctx *dc = nz_dctx_create();
        float out[7];
        dec_f32_all(dc, &e, out, "nan");
        for (int i = 0; i < 6; i++) check_lossy_value(nans[i], f2u(out[i]), k, "nan f32", (size_t)i);
        enc_free(&e);
        uint16_t bn[] = {0x7f81, 0xff81, 0x7fc0, 0xffff, 0x3f80};
        assert_int_equal(enc_build(&e, NZ_DT_BF16, 0, &m, NZ_CODER_ZSTD, 1, 5, 1, bn, NULL), NZ_OK);
        dec_f32_all(dc, &e, out, "nan bf16");
        for (int i = 0; i < 4; i++)
            check_lossy_value((uint32_t)bn[i] << 16, f2u(out[i]), k, "nan bf16", (size_t)i);
        uint16_t nat[5];
        dec_native_all(dc, &e, nat, "nan bf16 native");
        for (int i = 0; i < 4; i++) assert_true(bf16_isnan(nat[i]) && (nat[i] >> 15) == (bn[i] >> 15));
        nz_dctx_free(dc);
        enc_free(&e);
    }
}

/* lossy-0 cannot hold a NaN: analyse and encode refuse with NZ_E_RANGE. */
static void test_lossy0_nan_range(void **state) {
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        const uint32_t nan = dt == NZ_DT_F32 ? 0xff800001u : dt == NZ_DT_F16 ? 0x7c01u : 0x7fc0u;
        const size_t where[] = {0, 99, 20 * 10 - 1};
        for (size_t wi = 0; wi < 3; wi++) {
            void *src = gen_tensor(dt, 200, FL_GAUSS, 7);
            set_elem(dt, src, where[wi], nan);
            for (uint32_t nb = 0; nb <= 16; nb += 16) {
                nz_mode m0 = {NZ_MODE_LOSSY, 0, nb};
                nz_tensor_desc d;
                assert_int_equal(nz_desc_init(&d, dt, 0, &m0, NZ_CODER_RANS, 20, 10, 4, NULL), NZ_OK);
                nz_error err = {0};
                int rc = nz_tensor_analyze(&d, src, NULL, &err);
                if (rc != NZ_E_RANGE)
                    fail_msg("%s NaN at %zu: analyze gave %d, expected NZ_E_RANGE", nz_dtype_name(dt),
                             where[wi], rc);
                assert_int_equal(err.code, NZ_E_RANGE);
                assert_non_null(strstr(err.msg, "NaN"));
                assert_int_equal(nz_tensor_analyze(&d, src, NULL, NULL), NZ_E_RANGE);

                /* encode after analysing a clean tensor: the NaN tile is refused */
                void *clean = gen_tensor(dt, 200, FL_GAUSS, 7);
                assert_int_equal(nz_tensor_analyze(&d, clean, NULL, NULL), NZ_OK);
                uint64_t t = where[wi] / 40;
                size_t cap = nz_tile_bound(&d, t), len;
                uint8_t *buf = xmalloc(cap);
                memset(&err, 0, sizeof err);
                rc = nz_tile_encode(&d, t, (uint8_t *)src + t * 40 * nz_dtype_size(dt), buf, cap, &len, &err);
                assert_int_equal(rc, NZ_E_RANGE);
                assert_int_equal(err.code, NZ_E_RANGE);
                free(buf);
                free(clean);
                /* lossy-1 takes the same tensor */
                nz_mode m1 = {NZ_MODE_LOSSY, 1, nb};
                enc_t e;
                assert_int_equal(enc_build(&e, dt, 0, &m1, NZ_CODER_RANS, 20, 10, 4, src, NULL), NZ_OK);
                nz_dctx *dc = nz_dctx_create();
                float out[200];
                dec_f32_all(dc, &e, out, "lossy-1 nan");
                assert_true(isnan(out[where[wi]]));
                nz_dctx_free(dc);
                enc_free(&e);
            }
            free(src);
        }
    }
    /* Inf is fine at lossy-0 */
    float inf[4] = {INFINITY, -INFINITY, 1.0f, 3.0f};
    nz_mode m0 = {NZ_MODE_LOSSY, 0, 0};
    enc_t e;
    assert_int_equal(enc_build(&e, NZ_DT_F32, 0, &m0, NZ_CODER_RANS, 1, 4, 1, inf, NULL), NZ_OK);
    nz_dctx *dc = nz_dctx_create();
    float out[4];
    dec_f32_all(dc, &e, out, "inf");
    assert_true(isinf(out[0]) && out[0] > 0);
    assert_true(isinf(out[1]) && out[1] < 0);
    nz_dctx_free(dc);
    enc_free(&e);
}

/* Mode bf16 turns f32/f16 sources into bf16; native decode returns bf16. */
static void test_mode_bf16(void **state) {
    const nz_coder coders[] = {NZ_CODER_RANS, NZ_CODER_ZSTD, NZ_CODER_ESC};
    uint64_t rows = 45, cols = 77;
    size_t n = rows * cols;
    for (int src_f16 = 0; src_f16 <= 1; src_f16++) {
        nz_dtype dt = src_f16 ? NZ_DT_F16 : NZ_DT_F32;
        for (int fl = 0; fl < 2; fl++) {
            void *src = gen_tensor(dt, n, fl ? FL_CONST : FL_MIXED, 55 + src_f16);
            if (fl) /* keep the rounded values inside one binade: [1, 1.5) */
                for (size_t i = 0; i < n; i++)
                    set_elem(dt, src, i, get_elem(dt, src, i) & (dt == NZ_DT_F32 ? 0xffbfffffu : 0xfdffu));
            for (int ci = 0; ci < 2; ci++) {
                char ctx[80];
                snprintf(ctx, sizeof ctx, "mode bf16 from %s/%s%s", nz_dtype_name(dt),
                         nz_coder_name(coders[ci]), fl ? " const" : "");
                nz_mode m = {NZ_MODE_BF16, 0, 0};
                enc_t e;
                nz_error err = {0};
                int rc = enc_build(&e, dt, 0, &m, coders[ci], rows, cols, 8, src, &err);
                if (rc) fail_msg("%s: %s", ctx, err.msg);
                assert_int_equal(e.d.mode.kind, NZ_MODE_BF16);
                assert_int_equal(nz_desc_native_dtype(&e.d), NZ_DT_BF16);
                if (fl) assert_int_equal(e.d.coder, NZ_CODER_CONST);
                nz_dctx *dc = nz_dctx_create();
                uint16_t *nat = xmalloc(n * 2);
                float *f = xmalloc(n * 4);
                dec_native_all(dc, &e, nat, ctx);
                dec_f32_all(dc, &e, f, ctx);
                for (size_t i = 0; i < n; i++) {
                    uint32_t x = as_f32(dt, get_elem(dt, src, i));
                    uint16_t want = nz_f32_to_bf16(u2f(x));
                    if (nat[i] != want)
                        fail_msg("%s: element %zu (%#010x) is %#06x, nz_f32_to_bf16 %#06x", ctx, i, x, nat[i],
                                 want);
                    if (!f32_isnan(x) && want != ref_round_k(x, 7) >> 16)
                        fail_msg("%s: element %zu: nz_f32_to_bf16 disagrees with the reference", ctx, i);
                    if (f2u(f[i]) != (uint32_t)nat[i] << 16)
                        fail_msg("%s: fp32 element %zu is %#010x, bf16 %#06x", ctx, i, f2u(f[i]), nat[i]);
                }
                free(nat);
                free(f);
                nz_dctx_free(dc);
                enc_free(&e);
            }
            free(src);
        }
    }
}

static void test_native_dtype(void **state) {
    nz_tensor_desc d;
    nz_mode ll = {NZ_MODE_LOSSLESS, 0, 0}, bf = {NZ_MODE_BF16, 0, 0}, raw = {NZ_MODE_RAW, 0, 0};
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        assert_int_equal(nz_desc_init(&d, dt, 0, &ll, NZ_CODER_RANS, 2, 2, 1, NULL), NZ_OK);
        assert_int_equal(nz_desc_native_dtype(&d), dt);
        assert_int_equal(nz_desc_init(&d, dt, 0, &bf, NZ_CODER_RANS, 2, 2, 1, NULL), NZ_OK);
        assert_int_equal(nz_desc_native_dtype(&d), NZ_DT_BF16);
        assert_int_equal(nz_desc_init(&d, dt, 0, &raw, NZ_CODER_RANS, 2, 2, 1, NULL), NZ_OK);
        assert_int_equal(nz_desc_native_dtype(&d), dt);
        for (int k = 0; k <= 7; k++) {
            nz_mode lk = {NZ_MODE_LOSSY, k, (uint32_t)k * 8};
            assert_int_equal(nz_desc_init(&d, dt, 0, &lk, NZ_CODER_RANS, 2, 2, 1, NULL), NZ_OK);
            assert_int_equal(nz_desc_native_dtype(&d), dt);
        }
    }
    assert_int_equal(nz_desc_init(&d, NZ_DT_OTHER, 8, &raw, NZ_CODER_NONE, 2, 2, 1, NULL), NZ_OK);
    assert_int_equal(nz_desc_native_dtype(&d), NZ_DT_OTHER);
}

/* Independent normaliser of a block of fp32 values: n = round((m-1)*256)
 * for absmax = 2^e m; *tie set when (m-1)*256 is exactly halfway. */
static int ref_norm(const uint32_t *x, size_t n, int *tie, double *amax_out) {
    double amax = 0;
    for (size_t i = 0; i < n; i++) {
        double a = fabs((double)u2f(x[i]));
        if (isfinite(a) && a > amax) amax = a;
    }
    *amax_out = amax;
    *tie = 0;
    if (amax == 0) return 0;
    int e;
    double m = 2 * frexp(amax, &e), t = (m - 1) * 256;
    *tie = t - floor(t) == 0.5;
    double q = nearbyint(t);
    return q > 255 ? 255 : (int)q;
}

/* Lossy with block normalisers: every stored normaliser matches its block,
 * every element is within the bound implied by "stored round_k(x/s),
 * decoded round_k(x/s) * s", and the block maximum comes back almost
 * exactly (2^e * s). */
static void test_lossy_norm_block(void **state) {
    const uint32_t blocks[] = {1, 48, 64, 1000};
    uint64_t rows = 37, cols = 50;
    uint32_t tr = 8; /* tiles of 400 elements and a last one of 250 */
    size_t n = rows * cols;
    double worst_rel[8] = {0};
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        /* gaussian values whose scale changes every 40 elements, a zero run,
         * values near FLT_MAX, infinities, NaNs and subnormals */
        uint8_t *src = xmalloc(n * 4);
        uint64_t seed = 8080 + di;
        for (size_t i = 0; i < n; i++) {
            int sc = (int)((i / 40) * 7919 % 41) - 20;
            double g = ldexp(tu_gauss(&seed), dt == NZ_DT_F16 ? sc / 3 : sc);
            uint32_t v = from_f32(dt, f2u((float)g));
            if (i >= 400 && i < 470) v = 0; /* all-zero block(s) */
            if (dt == NZ_DT_F32 && i >= 800 && i < 810) v = 0x7f7fffffu - (uint32_t)(i - 800) * 0x123456u;
            if (dt == NZ_DT_BF16 && i >= 800 && i < 810) v = 0x7f7f - (uint32_t)(i - 800);
            if (i == 1234) v = dt == NZ_DT_F32 ? 0x00000123u : 0x0003; /* subnormal */
            set_elem(dt, src, i, v);
        }
        size_t ne;
        const uint32_t *edge = edge_values(dt, &ne);
        for (size_t j = 0; j < ne; j++) set_elem(dt, src, 1500 + j * 3, edge[j]);

        for (int k = 0; k <= 7; k++) {
            /* lossy-0 refuses NaN: replace NaNs by Inf for k = 0 */
            uint8_t *s = dup_exact(src, n * 4);
            for (size_t i = 0; i < n; i++)
                if (k == 0 && f32_isnan(as_f32(dt, get_elem(dt, s, i))))
                    set_elem(dt, s, i, dt == NZ_DT_F32 ? 0x7f800000u : dt == NZ_DT_F16 ? 0x7c00u : 0x7f80u);
            for (size_t bi = 0; bi < sizeof blocks / sizeof *blocks; bi++) {
                uint32_t B = blocks[bi];
                char ctx[96];
                snprintf(ctx, sizeof ctx, "lossy-%d norm %u from %s", k, B, nz_dtype_name(dt));
                nz_mode m = {NZ_MODE_LOSSY, k, B};
                enc_t e;
                nz_error err = {0};
                int rc = enc_build(&e, dt, 0, &m, (bi & 1) ? NZ_CODER_ZSTD : NZ_CODER_RANS, rows, cols, tr, s,
                                   &err);
                if (rc) fail_msg("%s: encode: %s", ctx, err.msg);
                assert_int_equal(e.d.mode.norm_block, B);
                nz_dctx *dc = nz_dctx_create();
                float *f = xmalloc(n * 4);
                uint8_t *nat = xmalloc(n * 4);
                dec_f32_all(dc, &e, f, ctx);
                dec_native_all(dc, &e, nat, ctx);
                uint32_t *x = xmalloc(n * 4);
                for (size_t i = 0; i < n; i++) x[i] = as_f32(dt, get_elem(dt, s, i));
                for (uint64_t t = 0; t < e.nt; t++) {
                    size_t i0 = (size_t)(t * tr * cols), tn = (size_t)(nz_desc_tile_nrows(&e.d, t) * cols);
                    size_t nb = (tn + B - 1) / B;
                    const uint8_t *norm = e.tile[t] + e.len[t] - nb;
                    for (size_t b = 0; b < nb; b++) {
                        size_t b0 = i0 + b * B, bn = tn - b * B < B ? tn - b * B : B;
                        int tie;
                        double amax;
                        int q = ref_norm(x + b0, bn, &tie, &amax);
                        if (norm[b] != q && !(tie && (norm[b] == q - 1 || norm[b] == q + 1)))
                            fail_msg("%s tile %llu block %zu: normaliser %u, expected %d (absmax %g)", ctx,
                                     (unsigned long long)t, b, norm[b], q, amax);
                        double sc = 1 + norm[b] / 256.0;
                        int ea;
                        frexp(amax, &ea);
                        ea -= 1; /* amax = 2^ea * m */
                        for (size_t i = b0; i < b0 + bn; i++) {
                            double xv = u2f(x[i]), dv = u2f(f2u(f[i]));
                            if (f32_isnan(x[i])) {
                                if (!isnan(dv)) fail_msg("%s: NaN element %zu decoded as %g", ctx, i, dv);
                                continue;
                            }
                            if (isinf(xv)) {
                                if (dv != xv) fail_msg("%s: Inf element %zu decoded as %g", ctx, i, dv);
                                continue;
                            }
                            if (!isfinite(dv))
                                fail_msg("%s: finite element %zu (%g) decoded as %g", ctx, i, xv, dv);
                            double ax = fabs(xv), y = ax / sc, bound;
                            if (y == 0) {
                                bound = 0;
                            } else {
                                int ey;
                                frexp(y, &ey);
                                int E = ey - 1 < -126 ? -126 : ey - 1;
                                bound = sc * ldexp(1, E - k - 1) + sc * 0x1p-150 + 0x1p-22 * ax + 0x1p-149;
                            }
                            double diff = fabs(dv - xv);
                            if (diff > bound)
                                fail_msg("%s element %zu: %a decoded as %a, error %g > bound %g (s = %g)",
                                         ctx, i, xv, dv, diff, bound, sc);
                            if (dv != 0 && signbit(dv) != signbit(xv))
                                fail_msg("%s element %zu: sign flipped", ctx, i);
                            if (ax >= 0x1p-100 && diff / ax > worst_rel[k]) worst_rel[k] = diff / ax;
                            /* the block maximum: decodes to exactly 2^e * s */
                            if (ax == amax && amax >= 0x1p-120) {
                                double want = ldexp(sc, ea), lim = ldexp(1, ea - (norm[b] == 255 ? 8 : 9));
                                if (fabs(dv) != want || fabs(dv - xv) > lim)
                                    fail_msg("%s element %zu: block max %a decoded as %a, expected %a", ctx,
                                             i, xv, dv, want);
                            }
                        }
                    }
                }
                /* native: the source dtype, rounded to nearest even */
                for (size_t i = 0; i < n; i++) {
                    uint32_t d = f2u(f[i]), got = get_elem(dt, nat, i);
                    uint32_t want = dt == NZ_DT_F32    ? d
                                    : dt == NZ_DT_BF16 ? ref_round_k(d, 7) >> 16
                                                       : ref_f32_to_f16(d);
                    if (f32_isnan(d)) {
                        uint32_t back = as_f32(dt, got);
                        if (!f32_isnan(back)) fail_msg("%s: native NaN %zu is %#x", ctx, i, got);
                    } else if (got != want) {
                        fail_msg("%s: native element %zu is %#x, expected %#x", ctx, i, got, want);
                    }
                }
                free(x);
                free(f);
                free(nat);
                nz_dctx_free(dc);
                enc_free(&e);
            }
            free(s);
        }
        free(src);
    }
    for (int k = 0; k <= 7; k++) {
        print_message("    lossy-%d with normalisers: worst relative error %.3g (no-norm bound %.3g)\n", k,
                      worst_rel[k], ldexp(1, -k - 1));
        assert_true(worst_rel[k] <= ldexp(1, -k - 1) * (1 + 0x1p-10));
    }
}

/* ------------------------------------------------------------------------ */
/* raw tiles                                                                */
/* ------------------------------------------------------------------------ */

static void test_raw_tiles(void **state) {
    nz_mode raw = {NZ_MODE_RAW, 0, 0};
    /* dtype other, 8-byte elements */
    uint64_t rows = 10, cols = 3;
    uint8_t src[10 * 3 * 8];
    for (size_t i = 0; i < sizeof src; i++) src[i] = (uint8_t)(i * 37 + 11);
    enc_t e;
    nz_error err = {0};
    assert_int_equal(enc_build(&e, NZ_DT_OTHER, 8, &raw, NZ_CODER_RANS, rows, cols, 4, src, &err), NZ_OK);
    assert_int_equal(e.d.coder, NZ_CODER_NONE);
    assert_int_equal(e.nt, 3);
    assert_int_equal(e.len[0], 4 * 3 * 8);
    assert_int_equal(e.len[2], 2 * 3 * 8);
    assert_memory_equal(e.tile[1], src + 96, 96);
    uint64_t counts[256];
    memset(counts, 0xff, sizeof counts);
    assert_int_equal(nz_tensor_analyze(&e.d, src, counts, NULL), NZ_OK);
    for (int s = 0; s < 256; s++) assert_int_equal(counts[s], 0);
    nz_dctx *dc = nz_dctx_create();
    uint8_t out[sizeof src];
    dec_native_all(dc, &e, out, "raw other");
    assert_memory_equal(out, src, sizeof src);
    float f[12];
    memset(&err, 0, sizeof err);
    assert_int_equal(nz_tile_decode_f32(dc, &e.d, 0, e.tile[0], e.len[0], f, &err), NZ_E_UNSUPPORTED);
    assert_int_equal(err.code, NZ_E_UNSUPPORTED);
    /* wrong lengths and tile numbers */
    assert_int_equal(nz_tile_decode_native(dc, &e.d, 0, e.tile[0], e.len[0] - 1, out, NULL), NZ_E_TRUNCATED);
    assert_int_equal(nz_tile_decode_native(dc, &e.d, 2, e.tile[0], e.len[0], out, NULL), NZ_E_FORMAT);
    assert_int_equal(nz_tile_decode_native(dc, &e.d, 0, e.tile[2], e.len[2], out, NULL), NZ_E_TRUNCATED);
    assert_int_equal(nz_tile_decode_native(dc, &e.d, 3, e.tile[0], 0, out, NULL), NZ_E_INVALID_ARG);
    /* encoder buffer too small */
    uint8_t small[95];
    size_t len;
    assert_int_equal(nz_tile_encode(&e.d, 0, src, small, sizeof small, &len, NULL), NZ_E_INVALID_ARG);
    enc_free(&e);

    /* float dtypes stored raw: native is the bytes, fp32 is the exact view */
    for (int di = 0; di < 3; di++) {
        nz_dtype dt = k_float_dtypes[di];
        size_t ne;
        const uint32_t *edge = edge_values(dt, &ne);
        size_t n = 9 * 7;
        void *s = gen_tensor(dt, n, FL_BITS, 31 + di);
        for (size_t i = 0; i < ne && i < n; i++) set_elem(dt, s, i, edge[i]);
        assert_int_equal(enc_build(&e, dt, 0, &raw, NZ_CODER_ZSTD, 9, 7, 2, s, NULL), NZ_OK);
        assert_int_equal(e.d.coder, NZ_CODER_NONE);
        uint8_t nat[9 * 7 * 4];
        float ff[9 * 7];
        dec_native_all(dc, &e, nat, "raw float");
        assert_memory_equal(nat, s, n * nz_dtype_size(dt));
        dec_f32_all(dc, &e, ff, "raw float");
        for (size_t i = 0; i < n; i++)
            if (f2u(ff[i]) != as_f32(dt, get_elem(dt, s, i)))
                fail_msg("raw %s element %zu: fp32 %#010x, expected %#010x", nz_dtype_name(dt), i, f2u(ff[i]),
                         as_f32(dt, get_elem(dt, s, i)));
        enc_free(&e);
        free(s);
    }
    nz_dctx_free(dc);
}

/* ------------------------------------------------------------------------ */
/* corruption                                                               */
/* ------------------------------------------------------------------------ */

static int decode_both(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                       void *nat, float *f) {
    nz_error e1 = {0}, e2 = {0};
    int r1 = nz_tile_decode_f32(dc, d, t, tile, len, f, &e1);
    int r2 = nz_tile_decode_native(dc, d, t, tile, len, nat, &e2);
    if (r1 != r2) fail_msg("fp32 decode gave %d (%s), native decode %d (%s)", r1, e1.msg, r2, e2.msg);
    if (r1) {
        assert_int_equal(e1.code, r1);
        assert_true(strlen(e1.msg) > 0);
    }
    return r1;
}

static void test_tile_corruption(void **state) {
    struct {
        nz_dtype dt;
        nz_mode m;
        nz_coder c;
        int fl;
    } cfg[] = {
        {NZ_DT_BF16, {NZ_MODE_LOSSLESS, 0, 0}, NZ_CODER_RANS, FL_GAUSS}, /* fused decoder */
        {NZ_DT_F16, {NZ_MODE_LOSSLESS, 0, 0}, NZ_CODER_RANS, FL_MIXED},
        {NZ_DT_F16, {NZ_MODE_LOSSLESS, 0, 0}, NZ_CODER_ZSTD, FL_MIXED},
        {NZ_DT_F32, {NZ_MODE_LOSSLESS, 0, 0}, NZ_CODER_RANS, FL_MIXED},
        {NZ_DT_F32, {NZ_MODE_LOSSY, 3, 16}, NZ_CODER_RANS, FL_GAUSS},
        {NZ_DT_BF16, {NZ_MODE_LOSSY, 5, 0}, NZ_CODER_ZSTD, FL_GAUSS},
        {NZ_DT_F32, {NZ_MODE_BF16, 0, 0}, NZ_CODER_RANS, FL_GAUSS},
        {NZ_DT_BF16, {NZ_MODE_LOSSLESS, 0, 0}, NZ_CODER_RANS, FL_CONST},
        {NZ_DT_BF16, {NZ_MODE_LOSSLESS, 0, 0}, NZ_CODER_ESC, FL_GAUSS}, /* fused esc decoder */
        {NZ_DT_F16, {NZ_MODE_LOSSLESS, 0, 0}, NZ_CODER_ESC, FL_MIXED},
        {NZ_DT_F32, {NZ_MODE_LOSSY, 3, 16}, NZ_CODER_ESC, FL_MIXED},
    };
    uint64_t rows = 9, cols = 40;
    uint32_t tr = 4; /* tiles 0 and 1 have 160 elements, tile 2 has 40 */
    uint64_t seed = 0xBADB17;
    for (size_t ci = 0; ci < sizeof cfg / sizeof *cfg; ci++) {
        nz_dtype dt = cfg[ci].dt;
        void *src = gen_tensor(dt, rows * cols, cfg[ci].fl, 60 + ci);
        enc_t e;
        nz_error err = {0};
        assert_int_equal(enc_build(&e, dt, 0, &cfg[ci].m, cfg[ci].c, rows, cols, tr, src, &err), NZ_OK);
        nz_dctx *dc = nz_dctx_create();
        uint8_t nat[160 * 4];
        float f[160];
        const uint8_t *tile = e.tile[1];
        size_t len = e.len[1];
        assert_int_equal(decode_both(dc, &e.d, 1, tile, len, nat, f), NZ_OK);

        /* every truncation */
        for (size_t l = 0; l < len; l++) {
            uint8_t *cut = dup_exact(tile, l);
            int rc = decode_both(dc, &e.d, 1, cut, l, nat, f);
            if (rc != NZ_E_TRUNCATED)
                fail_msg("config %zu: tile cut to %zu of %zu bytes gave %d", ci, l, len, rc);
            free(cut);
        }
        /* a trailing byte, a wrong tile number, the reserved field */
        uint8_t *longer = xmalloc(len + 1);
        memcpy(longer, tile, len);
        longer[len] = 0;
        assert_int_equal(decode_both(dc, &e.d, 1, longer, len + 1, nat, f), NZ_E_FORMAT);
        free(longer);
        assert_int_equal(decode_both(dc, &e.d, 2, tile, len, nat, f), NZ_E_FORMAT); /* tile 2 is shorter */
        assert_int_equal(decode_both(dc, &e.d, 3, tile, len, nat, f), NZ_E_INVALID_ARG);
        uint8_t *bad = dup_exact(tile, len);
        bad[5] = 1; /* lane count 32 + 256, or 256 for zstd/const */
        assert_int_equal(decode_both(dc, &e.d, 1, bad, len, nat, f), NZ_E_FORMAT);
        memcpy(bad, tile, len);
        if (e.d.coder == NZ_CODER_RANS) {
            assert_int_equal(rd32le(tile + 4), 32);
            bad[4] = 64; /* the other valid lane count: the stream no longer fits */
            int rc = decode_both(dc, &e.d, 1, bad, len, nat, f);
            assert_true(rc == NZ_E_CORRUPT || rc == NZ_E_TRUNCATED);
            bad[4] = 33;
        } else {
            bad[4] = 32; /* a lane count on a tile without rANS */
        }
        assert_int_equal(decode_both(dc, &e.d, 1, bad, len, nat, f), NZ_E_FORMAT);
        memcpy(bad, tile, len);
        bad[3] = 0x80; /* exponent section claims 2 GiB */
        assert_int_equal(decode_both(dc, &e.d, 1, bad, len, nat, f), NZ_E_TRUNCATED);
        free(bad);

        if (e.d.coder == NZ_CODER_CONST) {
            /* a const tile with a (consistent-length) exponent section */
            uint8_t *fat = xmalloc(len + 3);
            memcpy(fat, tile, 8);
            fat[0] = 3;
            memset(fat + 8, 0x55, 3);
            memcpy(fat + 11, tile + 8, len - 8);
            assert_int_equal(decode_both(dc, &e.d, 1, fat, len + 3, nat, f), NZ_E_FORMAT);
            free(fat);
        }

        /* single-bit flips anywhere: an error or a decode, never a crash */
        uint8_t *flip = xmalloc(len);
        int nflips = tu_quick() ? 200 : 8 * (int)len;
        int errors = 0;
        for (int i = 0; i < nflips; i++) {
            memcpy(flip, tile, len);
            size_t bit = tu_quick() ? tu_rand(&seed) % (8 * len) : (size_t)i;
            flip[bit / 8] ^= (uint8_t)(1u << (bit % 8));
            int rc = decode_both(dc, &e.d, 1, flip, len, nat, f);
            if (rc != NZ_OK && rc != NZ_E_CORRUPT && rc != NZ_E_TRUNCATED && rc != NZ_E_FORMAT)
                fail_msg("config %zu bit %zu: unexpected status %d", ci, bit, rc);
            errors += rc != NZ_OK;
        }
        char mname[32];
        print_message("    corruption config %zu (%s %s/%s): %d-byte tile, %d of %d flips detected "
                      "(no checksum at this level)\n",
                      ci, nz_dtype_name(dt), nz_mode_name(&e.d.mode, mname, sizeof mname),
                      nz_coder_name(e.d.coder), (int)len, errors, nflips);
        /* the tile still decodes after all that */
        assert_int_equal(decode_both(dc, &e.d, 1, tile, len, nat, f), NZ_OK);
        free(flip);
        nz_dctx_free(dc);
        enc_free(&e);
        free(src);
    }
}

/* ------------------------------------------------------------------------ */
/* encoder errors, decoder context                                          */
/* ------------------------------------------------------------------------ */

static void test_encode_errors(void **state) {
    nz_mode ll = {NZ_MODE_LOSSLESS, 0, 0};
    float a[64], b[64];
    for (int i = 0; i < 64; i++) {
        a[i] = 1.0f + i / 128.0f; /* one exponent */
        b[i] = (float)(i + 1);    /* several */
    }
    nz_tensor_desc d;
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &ll, NZ_CODER_RANS, 8, 8, 4, NULL), NZ_OK);
    assert_int_equal(nz_tensor_analyze(&d, a, NULL, NULL), NZ_OK);
    assert_int_equal(d.coder, NZ_CODER_CONST);
    size_t cap = nz_tile_bound(&d, 0), len;
    uint8_t *buf = xmalloc(cap);
    nz_error err = {0};
    /* an exponent the const table does not have */
    assert_int_equal(nz_tile_encode(&d, 0, b, buf, cap, &len, &err), NZ_E_INVALID_ARG);
    assert_int_equal(err.code, NZ_E_INVALID_ARG);
    /* buffer smaller than the bound */
    assert_int_equal(nz_tile_encode(&d, 0, a, buf, cap - 1, &len, NULL), NZ_E_INVALID_ARG);
    assert_int_equal(nz_tile_encode(&d, 0, a, buf, cap, &len, NULL), NZ_OK);
    /* a rans table built from other data */
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &ll, NZ_CODER_RANS, 8, 8, 4, NULL), NZ_OK);
    assert_int_equal(nz_tensor_analyze(&d, b, NULL, NULL), NZ_OK);
    assert_int_equal(d.coder, NZ_CODER_RANS);
    float c[32];
    for (int i = 0; i < 32; i++) c[i] = 1e30f;
    free(buf);
    cap = nz_tile_bound(&d, 0);
    buf = xmalloc(cap);
    memset(&err, 0, sizeof err);
    assert_int_equal(nz_tile_encode(&d, 0, c, buf, cap, &len, &err), NZ_E_INVALID_ARG);
    assert_non_null(strstr(err.msg, "frequency"));
    free(buf);
    /* analyze reports the raw histogram */
    uint64_t counts[256];
    assert_int_equal(nz_tensor_analyze(&d, b, counts, NULL), NZ_OK);
    uint64_t tot = 0;
    for (int s = 0; s < 256; s++) tot += counts[s];
    assert_int_equal(tot, 64);
    assert_int_equal(counts[127], 1);  /* 1.0 */
    assert_int_equal(counts[128], 2);  /* 2, 3 */
    assert_int_equal(counts[132], 32); /* 32..63 */
    assert_int_equal(counts[133], 1);  /* 64 */
}

/* One decoder context across tensors with different tables, and the same
 * desc analysed again with other data. */
static void test_dctx_table_cache(void **state) {
    nz_mode ll = {NZ_MODE_LOSSLESS, 0, 0};
    uint64_t rows = 16, cols = 64;
    size_t n = rows * cols;
    float *a = xmalloc(n * 4), *b = xmalloc(n * 4), *out = xmalloc(n * 4);
    uint64_t seed = 1;
    for (size_t i = 0; i < n; i++) {
        a[i] = (float)tu_gauss(&seed) * 1e-3f;
        b[i] = (float)tu_gauss(&seed) * 1e6f;
    }
    enc_t ea, eb;
    assert_int_equal(enc_build(&ea, NZ_DT_F32, 0, &ll, NZ_CODER_RANS, rows, cols, 4, a, NULL), NZ_OK);
    assert_int_equal(enc_build(&eb, NZ_DT_F32, 0, &ll, NZ_CODER_RANS, rows, cols, 4, b, NULL), NZ_OK);
    nz_dctx *dc = nz_dctx_create();
    for (int round = 0; round < 3; round++) {
        for (uint64_t t = 0; t < ea.nt; t++) {
            assert_int_equal(nz_tile_decode_f32(dc, &ea.d, t, ea.tile[t], ea.len[t], out, NULL), NZ_OK);
            assert_memory_equal(out, a + t * 4 * cols, 4 * cols * 4);
            assert_int_equal(nz_tile_decode_f32(dc, &eb.d, t, eb.tile[t], eb.len[t], out, NULL), NZ_OK);
            assert_memory_equal(out, b + t * 4 * cols, 4 * cols * 4);
        }
    }
    /* the same desc analysed again with data of another distribution: tiles
     * encoded with the new table must decode with a context that cached the
     * old one */
    nz_tensor_desc d;
    assert_int_equal(nz_desc_init(&d, NZ_DT_F32, 0, &ll, NZ_CODER_RANS, rows, cols, 4, NULL), NZ_OK);
    for (int pass = 0; pass < 2; pass++) {
        const float *src = pass ? b : a;
        assert_int_equal(nz_tensor_analyze(&d, src, NULL, NULL), NZ_OK);
        size_t cap = nz_tile_bound(&d, 0), len;
        uint8_t *buf = xmalloc(cap);
        assert_int_equal(nz_tile_encode(&d, 0, src, buf, cap, &len, NULL), NZ_OK);
        uint8_t *tile = dup_exact(buf, len);
        nz_error err = {0};
        int rc = nz_tile_decode_f32(dc, &d, 0, tile, len, out, &err);
        if (rc) fail_msg("re-analysed desc, pass %d: decode failed: %s", pass, err.msg);
        assert_memory_equal(out, src, 4 * cols * 4);
        free(tile);
        free(buf);
    }
    nz_dctx_free(dc);
    enc_free(&ea);
    enc_free(&eb);
    free(a);
    free(b);
    free(out);
}

/* Decoder contexts and lossy native decodes hold scratch only while alive. */
static void test_scratch_memory(void **state) {
    size_t m0 = nz_mem_current(NZ_MEM_SCRATCH);
    nz_dctx_free(NULL);
    nz_dctx *dc = nz_dctx_create();
    assert_non_null(dc);
    assert_true(nz_mem_current(NZ_MEM_SCRATCH) > m0);
    nz_mode modes[] = {{NZ_MODE_LOSSLESS, 0, 0}, {NZ_MODE_LOSSY, 2, 32}, {NZ_MODE_BF16, 0, 0}};
    const nz_coder coders[] = {NZ_CODER_RANS, NZ_CODER_ZSTD, NZ_CODER_ESC};
    void *src = gen_tensor(NZ_DT_F32, 50 * 60, FL_GAUSS, 3);
    float *f = xmalloc(50 * 60 * 4);
    for (int mi = 0; mi < 3; mi++)
        for (int ci = 0; ci < 2; ci++) {
            enc_t e;
            assert_int_equal(enc_build(&e, NZ_DT_F32, 0, &modes[mi], coders[ci], 50, 60, 7, src, NULL),
                             NZ_OK);
            dec_f32_all(dc, &e, f, "scratch");
            dec_native_all(dc, &e, f, "scratch");
            enc_free(&e);
        }
    free(f);
    free(src);
    nz_dctx_free(dc);
    assert_int_equal(nz_mem_current(NZ_MEM_SCRATCH), m0);
}

int main(void) {
#define T(f) cmocka_unit_test_setup_teardown(f, per_test_setup, per_test_teardown)
    const struct CMUnitTest tests[] = {
        T(test_f16_to_f32_exhaustive),
        T(test_f32_to_f16),
        T(test_f32_to_bf16),
        T(test_round_mantissa),
        T(test_mode_names),
        T(test_desc_init_geometry),
        T(test_desc_validate),
        T(test_native_dtype),
        T(test_lossless_roundtrip),
        T(test_lossless_const),
        T(test_lossless_edge_values),
        T(test_odd_shapes),
        T(test_huge_tile_rows),
        T(test_lossy_exact),
        T(test_lossy_known_values),
        T(test_lossy0_nan_range),
        T(test_mode_bf16),
        T(test_lossy_norm_block),
        T(test_raw_tiles),
        T(test_tile_corruption),
        T(test_encode_errors),
        T(test_dctx_table_cache),
        T(test_scratch_memory),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}

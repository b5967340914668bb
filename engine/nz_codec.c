/* NeuZip tile codec: see nz_codec.h for the formats. */
#include "nz_codec.h"

#include "nz_alloc.h"
#include "nz_esc.h"
#include "nz_gemv.h"
#include "nz_rans.h"

#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_createDCtx_advanced: counted allocations */
#include <zstd.h>

#include <cpuid.h>
#include <endian.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#define TILE_HDR 8

/* zstd's allocations go through the counted allocator (scratch). */
static void *zstd_alloc(void *opaque, size_t n) { return nz_malloc(n, NZ_MEM_SCRATCH); }
static void zstd_free(void *opaque, void *p) { nz_free(p); }

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* ------------------------------------------------------------- float helpers */

/* Branch-free binary16 -> fp32 (vectorises): normals rebias the exponent
 * with an integer add, subnormals convert their integer significand exactly
 * (em * 2^-24, no denormal operand, so DAZ/FTZ modes cannot change the
 * result), Inf/NaN keep their payload. */
static inline float f16_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
    uint32_t bits = (em << 13) + (112u << 23);
    if (em < 0x400u) bits = f2u((float)em * 0x1p-24f);
    if (em >= 0x7c00u) bits = 0x7f800000u | (em & 0x3ffu) << 13;
    return u2f(sign | bits);
}

float nz_f16_to_f32(uint16_t h) { return f16_to_f32(h); }

uint16_t nz_f32_to_f16(float x) {
    uint32_t u = f2u(x), sign = (u >> 16) & 0x8000, mag = u & 0x7fffffff;
    if (mag > 0x7f800000u) return (uint16_t)(sign | 0x7e00 | ((mag >> 13) & 0x1ff)); /* NaN */
    if (mag >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds to Inf (>= 65520) */
    if (mag < 0x38800000u) {                          /* below the smallest normal 2^-14: subnormal or zero */
        if (mag < 0x33000000u) return (uint16_t)sign; /* < 2^-25 rounds to 0 */
        uint32_t e = mag >> 23, m = (mag & 0x7fffff) | 0x800000;
        int shift = 126 - (int)e; /* value = m * 2^(e-150); result units 2^-24 */
        /* in units of 2^-24 the value is m >> (126 - e) */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = mag + 0xfff + ((mag >> 13) & 1);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

uint32_t nz_round_mantissa(uint32_t bits, int k) {
    uint32_t sign = bits & 0x80000000u, mag = bits & 0x7fffffffu;
    if (mag > 0x7f800000u) return sign | 0x7fc00000u; /* quiet NaN */
    int drop = 23 - k;
    if (drop <= 0) return bits;
    uint32_t lsb = (mag >> drop) & 1;
    mag += (1u << (drop - 1)) - 1 + lsb;
    mag &= ~((1u << drop) - 1);
    return sign | mag;
}

uint16_t nz_f32_to_bf16(float x) { return (uint16_t)(nz_round_mantissa(f2u(x), 7) >> 16); }

float nz_bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

/* ------------------------------------------------------------- names */

int nz_mode_parse(const char *s, nz_mode *m, nz_error *err) {
    memset(m, 0, sizeof *m);
    if (!strcmp(s, "raw"))
        m->kind = NZ_MODE_RAW;
    else if (!strcmp(s, "lossless"))
        m->kind = NZ_MODE_LOSSLESS;
    else if (!strcmp(s, "bf16"))
        m->kind = NZ_MODE_BF16;
    else if (!strncmp(s, "lossy-", 6) && s[6] >= '0' && s[6] <= '7' && s[7] == 0) {
        m->kind = NZ_MODE_LOSSY;
        m->k = s[6] - '0';
    } else
        return nz_fail(err, NZ_E_INVALID_ARG,
                       "unknown mode '%s' (expected raw, lossless, bf16 or lossy-0..lossy-7)", s);
    return NZ_OK;
}

const char *nz_mode_name(const nz_mode *m, char *buf, size_t cap) {
    switch (m->kind) {
    case NZ_MODE_RAW:
        snprintf(buf, cap, "raw");
        break;
    case NZ_MODE_LOSSLESS:
        snprintf(buf, cap, "lossless");
        break;
    case NZ_MODE_BF16:
        snprintf(buf, cap, "bf16");
        break;
    default:
        snprintf(buf, cap, "lossy-%d", m->k);
        break;
    }
    return buf;
}

const char *nz_coder_name(nz_coder c) {
    static const char *n[] = {"none", "rans", "zstd", "const", "esc"};
    return (unsigned)c < 5 ? n[c] : "invalid";
}

int nz_coder_parse(const char *s, nz_coder *c, nz_error *err) {
    for (int i = 0; i < 5; i++)
        if (!strcmp(s, nz_coder_name((nz_coder)i))) {
            *c = (nz_coder)i;
            return NZ_OK;
        }
    return nz_fail(err, NZ_E_INVALID_ARG, "unknown coder '%s' (expected esc, rans, zstd, const or none)", s);
}

/* ------------------------------------------------------------- descriptors */

uint32_t nz_default_tile_rows(uint64_t cols) {
    const uint64_t target = 131072; /* elements: 512 KiB of fp32 */
    if (cols == 0 || cols >= target) return 1;
    return (uint32_t)(target / cols);
}

static atomic_uint_fast64_t g_desc_id = 1;

int nz_desc_init(nz_tensor_desc *d, nz_dtype dtype, size_t elem_size, const nz_mode *mode, nz_coder coder,
                 uint64_t rows, uint64_t cols, uint32_t tile_rows, nz_error *err) {
    memset(d, 0, sizeof *d);
    if (tile_rows == 0) return nz_fail(err, NZ_E_INVALID_ARG, "tile rows must be >= 1");
    if (cols && rows > UINT64_MAX / cols) return nz_fail(err, NZ_E_INVALID_ARG, "tensor too large");
    d->dtype = dtype;
    d->elem_size = dtype == NZ_DT_OTHER ? elem_size : nz_dtype_size(dtype);
    if (d->elem_size == 0) return nz_fail(err, NZ_E_INVALID_ARG, "element size 0");
    d->mode = *mode;
    d->rows = rows;
    d->cols = cols;
    d->tile_rows = tile_rows;
    d->zstd_level = 3;
    d->id = atomic_fetch_add(&g_desc_id, 1);
    if (mode->kind != NZ_MODE_RAW && dtype == NZ_DT_OTHER)
        return nz_fail(err, NZ_E_UNSUPPORTED, "mode needs a float tensor (bf16, f16, f32)");
    if (mode->kind == NZ_MODE_LOSSY && (mode->k < 0 || mode->k > 7))
        return nz_fail(err, NZ_E_INVALID_ARG, "lossy mantissa bits %d out of range 0..7", mode->k);
    if (mode->kind != NZ_MODE_LOSSY) d->mode.norm_block = 0;
    if (mode->kind == NZ_MODE_BF16 && dtype == NZ_DT_BF16) d->mode.kind = NZ_MODE_LOSSLESS;
    if (rows * cols == 0) d->mode.kind = NZ_MODE_RAW;
    switch (d->mode.kind) {
    case NZ_MODE_RAW:
        d->coder = NZ_CODER_NONE;
        return NZ_OK;
    case NZ_MODE_LOSSLESS:
        d->exp_bits = dtype == NZ_DT_F16 ? 5 : 8;
        d->mant_bits = dtype == NZ_DT_F16 ? 10 : dtype == NZ_DT_F32 ? 23 : 7;
        break;
    case NZ_MODE_BF16:
        d->exp_bits = 8;
        d->mant_bits = 7;
        break;
    case NZ_MODE_LOSSY:
        d->exp_bits = 8;
        d->mant_bits = mode->k;
        break;
    }
    if (coder == NZ_CODER_NONE || coder == NZ_CODER_CONST) coder = NZ_CODER_ESC;
    d->coder = d->coder_req = coder;
    return NZ_OK;
}

int nz_desc_validate(const nz_tensor_desc *d, nz_error *err) {
    if (d->tile_rows == 0) return nz_fail(err, NZ_E_FORMAT, "tile_rows is 0");
    if (d->cols && d->rows > UINT64_MAX / d->cols) return nz_fail(err, NZ_E_FORMAT, "shape overflows");
    if ((d->mode.kind == NZ_MODE_RAW) != (d->coder == NZ_CODER_NONE))
        return nz_fail(err, NZ_E_FORMAT, "coder '%s' does not fit the mode", nz_coder_name(d->coder));
    if (d->coder == NZ_CODER_NONE) return NZ_OK;
    if (d->mode.kind == NZ_MODE_LOSSY && d->mode.norm_block > (1u << 30))
        return nz_fail(err, NZ_E_FORMAT, "norm_block %u too large", d->mode.norm_block);
    uint32_t nsym = 1u << d->exp_bits;
    int present = 0;
    for (uint32_t s = 0; s < 256; s++) {
        if (!d->freq[s]) continue;
        present++;
        if (s >= nsym)
            return nz_fail(err, NZ_E_FORMAT, "frequency table holds exponent %u (width %d bits)", s,
                           d->exp_bits);
    }
    if (d->coder == NZ_CODER_CONST) {
        for (int s = 0; s < 256; s++)
            if (d->freq[s] == NZ_RANS_PROB_SCALE && present == 1) return NZ_OK;
        return nz_fail(err, NZ_E_FORMAT, "const coder needs exactly one exponent with frequency %u",
                       NZ_RANS_PROB_SCALE);
    }
    if (d->coder == NZ_CODER_RANS) return nz_rans_check_freq(d->freq, err);
    if (d->coder == NZ_CODER_ESC && !present)
        return nz_fail(err, NZ_E_FORMAT, "esc coder with an empty table");
    return NZ_OK; /* zstd: the table is informative only; esc: ranks from it */
}

uint64_t nz_desc_ntiles(const nz_tensor_desc *d) {
    if (d->rows == 0 || d->cols == 0) return 0;
    return (d->rows + d->tile_rows - 1) / d->tile_rows;
}

uint64_t nz_desc_tile_nrows(const nz_tensor_desc *d, uint64_t t) {
    uint64_t r0 = t * d->tile_rows;
    if (r0 >= d->rows) return 0;
    uint64_t r = d->rows - r0;
    return r < d->tile_rows ? r : d->tile_rows;
}

static uint64_t sm_bytes(const nz_tensor_desc *d, uint64_t n) {
    uint64_t w = 1 + (uint64_t)d->mant_bits;
    return (n * w + 7) / 8;
}

static uint64_t norm_bytes(const nz_tensor_desc *d, uint64_t n) {
    uint32_t b = d->mode.kind == NZ_MODE_LOSSY ? d->mode.norm_block : 0;
    return b ? (n + b - 1) / b : 0;
}

uint64_t nz_desc_tile_fixed_bytes(const nz_tensor_desc *d, uint64_t t) {
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    if (d->coder == NZ_CODER_NONE) return n * d->elem_size;
    return sm_bytes(d, n) + norm_bytes(d, n);
}

nz_dtype nz_desc_native_dtype(const nz_tensor_desc *d) {
    return d->mode.kind == NZ_MODE_BF16 ? NZ_DT_BF16 : d->dtype;
}

/* ------------------------------------------------------------- splitting */

static inline uint32_t src_f32_bits(nz_dtype dt, const uint8_t *src, uint64_t i) {
    switch (dt) {
    case NZ_DT_BF16:
        return (uint32_t)nz_rd16le(src + 2 * i) << 16;
    case NZ_DT_F16:
        return f2u(nz_f16_to_f32(nz_rd16le(src + 2 * i)));
    default:
        return nz_rd32le(src + 4 * i);
    }
}

/* Normaliser byte of a block: absmax = 2^e * m, m in [1,2), n = round((m-1)*256). */
static uint8_t block_normaliser(nz_dtype dt, const uint8_t *src, uint64_t i0, uint64_t n) {
    float amax = 0;
    for (uint64_t i = i0; i < i0 + n; i++) {
        float a = fabsf(u2f(src_f32_bits(dt, src, i)));
        if (isfinite(a) && a > amax) amax = a;
    }
    if (amax == 0) return 0;
    int e;
    float m = 2 * frexpf(amax, &e); /* [1, 2) */
    long q = lrintf((m - 1) * 256);
    return (uint8_t)(q > 255 ? 255 : q < 0 ? 0 : q);
}

/* Split n source elements into exponent and sign+mantissa fields (and block
 * normalisers). norm may be NULL when the mode has none. */
static int split(const nz_tensor_desc *d, const void *srcv, uint64_t n, uint8_t *e, uint32_t *sm,
                 uint8_t *norm, nz_error *err) {
    const uint8_t *src = srcv;
    if (d->mode.kind == NZ_MODE_LOSSLESS) {
        for (uint64_t i = 0; i < n; i++) {
            if (d->dtype == NZ_DT_BF16) {
                uint16_t b = nz_rd16le(src + 2 * i);
                e[i] = (uint8_t)(b >> 7);
                sm[i] = (uint32_t)(b >> 15) << 7 | (b & 0x7f);
            } else if (d->dtype == NZ_DT_F16) {
                uint16_t h = nz_rd16le(src + 2 * i);
                e[i] = (h >> 10) & 0x1f;
                sm[i] = (uint32_t)(h >> 15) << 10 | (h & 0x3ff);
            } else {
                uint32_t u = nz_rd32le(src + 4 * i);
                e[i] = (uint8_t)(u >> 23);
                sm[i] = (u >> 31) << 23 | (u & 0x7fffff);
            }
        }
        return NZ_OK;
    }
    /* bf16 and lossy: round each value (seen as fp32) to k mantissa bits */
    int k = d->mant_bits;
    uint32_t B = d->mode.kind == NZ_MODE_LOSSY ? d->mode.norm_block : 0;
    uint64_t blk = B ? B : n;
    for (uint64_t b0 = 0; b0 < n; b0 += blk) {
        uint64_t bn = n - b0 < blk ? n - b0 : blk;
        float scale = 1;
        if (B) {
            uint8_t q = block_normaliser(d->dtype, src, b0, bn);
            if (norm) norm[b0 / B] = q;
            scale = 1 + q / 256.0f;
        }
        for (uint64_t i = b0; i < b0 + bn; i++) {
            uint32_t u = src_f32_bits(d->dtype, src, i);
            if ((u & 0x7fffffff) > 0x7f800000u && k == 0)
                return nz_fail(err, NZ_E_RANGE, "element %llu is NaN, which lossy-0 cannot store",
                               (unsigned long long)i);
            if (scale != 1) u = f2u(u2f(u) / scale);
            uint32_t r = nz_round_mantissa(u, k);
            e[i] = (uint8_t)(r >> 23);
            sm[i] = (r >> 31) << k | ((r >> (23 - k)) & ((1u << k) - 1));
        }
    }
    return NZ_OK;
}

/* sign+mantissa plane: w bits per element, LSB first */
static void pack_sm(const uint32_t *sm, uint64_t n, int w, uint8_t *out) {
    if (w == 8) {
        for (uint64_t i = 0; i < n; i++) out[i] = (uint8_t)sm[i];
        return;
    }
    if (w == 24) {
        for (uint64_t i = 0; i < n; i++) {
            out[3 * i] = (uint8_t)sm[i];
            out[3 * i + 1] = (uint8_t)(sm[i] >> 8);
            out[3 * i + 2] = (uint8_t)(sm[i] >> 16);
        }
        return;
    }
    uint64_t acc = 0;
    int bits = 0;
    uint64_t o = 0;
    for (uint64_t i = 0; i < n; i++) {
        acc |= (uint64_t)sm[i] << bits;
        bits += w;
        while (bits >= 8) {
            out[o++] = (uint8_t)acc;
            acc >>= 8;
            bits -= 8;
        }
    }
    if (bits) out[o++] = (uint8_t)acc;
}

static void unpack_sm(const uint8_t *in, uint64_t n, int w, uint32_t *sm) {
    if (w == 8) {
        for (uint64_t i = 0; i < n; i++) sm[i] = in[i];
        return;
    }
    if (w == 24) {
        for (uint64_t i = 0; i < n; i++)
            sm[i] = (uint32_t)in[3 * i] | (uint32_t)in[3 * i + 1] << 8 | (uint32_t)in[3 * i + 2] << 16;
        return;
    }
    /* Branch-free: each field is a 64-bit little-endian load at its byte
     * offset, shifted by its bit offset (w <= 24, so one load holds it), while
     * 8 bytes remain; the byte-wise loop finishes the tail. */
    uint64_t nbytes = (n * (uint64_t)w + 7) / 8, i = 0;
    uint32_t mask = (1u << w) - 1;
    for (; i < n; i++) {
        uint64_t bit = i * (uint64_t)w, byte = bit >> 3;
        if (byte + 8 > nbytes) break;
        uint64_t v;
        memcpy(&v, in + byte, 8);
        sm[i] = (uint32_t)(le64toh(v) >> (bit & 7)) & mask;
    }
    uint64_t bit = i * (uint64_t)w;
    for (; i < n; i++, bit += (uint64_t)w) {
        uint32_t v = 0;
        for (int k = 0; k < w; k++)
            v |= (uint32_t)(in[(bit + (uint64_t)k) >> 3] >> ((bit + (uint64_t)k) & 7) & 1) << k;
        sm[i] = v;
    }
}

/* ------------------------------------------------------------- encoder */

int nz_tensor_analyze(nz_tensor_desc *d, const void *src, uint64_t counts[256], nz_error *err) {
    uint64_t hist[256] = {0};
    memset(d->freq, 0, sizeof d->freq);
    if (d->coder != NZ_CODER_NONE) d->coder = d->coder_req ? d->coder_req : NZ_CODER_ESC;
    if (d->coder == NZ_CODER_NONE) {
        if (counts) memset(counts, 0, 256 * sizeof *counts);
        return NZ_OK;
    }
    /* scratch for the largest tile: tile_rows may exceed rows (one short tile) */
    uint64_t nt = nz_desc_ntiles(d),
             maxn = (d->tile_rows < d->rows ? (uint64_t)d->tile_rows : d->rows) * d->cols;
    uint8_t *e = nz_malloc(maxn, NZ_MEM_SCRATCH);
    uint32_t *sm = nz_malloc(maxn * 4, NZ_MEM_SCRATCH);
    if (!e || !sm) {
        nz_free(e);
        nz_free(sm);
        return nz_fail(err, NZ_E_NOMEM, "out of memory analysing tensor");
    }
    int rc = NZ_OK;
    for (uint64_t t = 0; t < nt && rc == NZ_OK; t++) {
        uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
        const uint8_t *p = (const uint8_t *)src + t * d->tile_rows * d->cols * d->elem_size;
        rc = split(d, p, n, e, sm, NULL, err);
        if (rc && err) nz_fail_prefix(err, "tile %llu", (unsigned long long)t);
        for (uint64_t i = 0; rc == NZ_OK && i < n; i++) hist[e[i]]++;
    }
    nz_free(e);
    nz_free(sm);
    if (rc) return rc;
    if (counts) memcpy(counts, hist, sizeof hist);
    int present = nz_rans_normalize(hist, d->freq);
    if (present == 1) d->coder = NZ_CODER_CONST;
    /* new table, new decoder-cache key: a dctx that cached this desc's old
     * table must not reuse it */
    d->id = atomic_fetch_add(&g_desc_id, 1);
    return NZ_OK;
}

size_t nz_tile_bound(const nz_tensor_desc *d, uint64_t t) {
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    if (d->coder == NZ_CODER_NONE) return n * d->elem_size;
    size_t rb = nz_rans_bound(n), zb = ZSTD_compressBound(n), eb = nz_esc_bound(n);
    rb = rb > zb ? rb : zb;
    return TILE_HDR + (rb > eb ? rb : eb) + nz_desc_tile_fixed_bytes(d, t);
}

int nz_tile_encode(const nz_tensor_desc *d, uint64_t t, const void *src, uint8_t *dst, size_t cap,
                   size_t *len, nz_error *err) {
    if (t >= nz_desc_ntiles(d))
        return nz_fail(err, NZ_E_INVALID_ARG, "tile %llu out of range", (unsigned long long)t);
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    if (d->coder == NZ_CODER_NONE) {
        if (cap < n * d->elem_size) return nz_fail(err, NZ_E_INVALID_ARG, "tile buffer too small");
        memcpy(dst, src, n * d->elem_size);
        *len = n * d->elem_size;
        return NZ_OK;
    }
    if (cap < nz_tile_bound(d, t)) return nz_fail(err, NZ_E_INVALID_ARG, "tile buffer too small");
    uint8_t *e = nz_malloc(n, NZ_MEM_SCRATCH);
    uint32_t *sm = nz_malloc(n * 4, NZ_MEM_SCRATCH);
    uint8_t *norm = nz_malloc(norm_bytes(d, n), NZ_MEM_SCRATCH);
    int rc = NZ_OK;
    if (!e || !sm || !norm) {
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory encoding tile");
        goto done;
    }
    rc = split(d, src, n, e, sm, norm, err);
    if (rc) goto done;
    size_t elen = 0;
    uint32_t lanes = 0;
    if (d->coder == NZ_CODER_RANS) {
        lanes = (uint32_t)nz_rans_lanes_for(n);
        rc = nz_rans_encode(e, n, d->freq, (int)lanes, dst + TILE_HDR, cap - TILE_HDR, &elen, err);
        if (rc) goto done;
    } else if (d->coder == NZ_CODER_ESC) {
        nz_esc_table et;
        nz_esc_table_build(d->freq, &et);
        rc = nz_esc_encode(e, n, &et, dst + TILE_HDR, cap - TILE_HDR, &elen, err);
        if (rc) goto done;
    } else if (d->coder == NZ_CODER_ZSTD) {
        ZSTD_customMem mem = {zstd_alloc, zstd_free, NULL}; /* counted as scratch */
        ZSTD_CCtx *cc = ZSTD_createCCtx_advanced(mem);
        if (!cc) {
            rc = nz_fail(err, NZ_E_NOMEM, "out of memory for zstd");
            goto done;
        }
        size_t z = ZSTD_compressCCtx(cc, dst + TILE_HDR, cap - TILE_HDR, e, n, d->zstd_level);
        ZSTD_freeCCtx(cc);
        if (ZSTD_isError(z)) {
            rc = nz_fail(err, NZ_E_INVALID_ARG, "zstd: %s", ZSTD_getErrorName(z));
            goto done;
        }
        elen = z;
    } else { /* const */
        for (uint64_t i = 0; i < n; i++)
            if (!d->freq[e[i]]) {
                rc = nz_fail(err, NZ_E_INVALID_ARG, "exponent %u not in the tensor's table", e[i]);
                goto done;
            }
    }
    if (elen > UINT32_MAX) {
        rc = nz_fail(err, NZ_E_INVALID_ARG, "exponent section too large");
        goto done;
    }
    nz_wr32le(dst, (uint32_t)elen);
    nz_wr32le(dst + 4, lanes);
    uint8_t *p = dst + TILE_HDR + elen;
    pack_sm(sm, n, 1 + d->mant_bits, p);
    p += sm_bytes(d, n);
    memcpy(p, norm, norm_bytes(d, n));
    p += norm_bytes(d, n);
    *len = (size_t)(p - dst);
done:
    nz_free(e);
    nz_free(sm);
    nz_free(norm);
    return rc;
}

int nz_tensor_encode(const nz_tensor_desc *d, const void *src, nz_tile_sink sink, void *ud, nz_error *err) {
    uint64_t nt = nz_desc_ntiles(d);
    if (!nt) return NZ_OK;
    size_t cap = nz_tile_bound(d, 0); /* the first tile is the largest */
    uint8_t *buf = nz_malloc(cap, NZ_MEM_SCRATCH);
    if (!buf) return nz_fail(err, NZ_E_NOMEM, "out of memory encoding tensor");
    uint64_t stride = (uint64_t)d->tile_rows * d->cols * d->elem_size;
    int rc = NZ_OK;
    for (uint64_t t = 0; t < nt && !rc; t++) {
        size_t len;
        rc = nz_tile_encode(d, t, (const uint8_t *)src + t * stride, buf, cap, &len, err);
        if (!rc) rc = sink(ud, t, buf, len, err);
        if (rc) nz_fail_prefix(err, "tile %llu", (unsigned long long)t);
    }
    nz_free(buf);
    return rc;
}

/* ------------------------------------------------------------- decoder */

struct nz_dctx {
    uint64_t tab_id;   /* desc id whose table is in dtab (0: none) */
    uint32_t *dtab;    /* [4096] rANS decode table */
    uint64_t etab_id;  /* desc id whose ranks are in etab (0: none) */
    nz_esc_table etab; /* esc ranks and decode tables */
    uint8_t *escr;     /* [escr_cap bytes] esc levels 2-4 scratch */
    size_t escr_cap;
    float *xp; /* [xp_cap bytes] permuted GEMV input */
    size_t xp_cap;
    uint8_t *exps; /* [cap] exponent scratch */
    uint32_t *sm;  /* [cap] sign+mantissa scratch */
    uint64_t cap;
    ZSTD_DCtx *zd;
};

nz_dctx *nz_dctx_create(void) {
    nz_dctx *dc = nz_calloc(1, sizeof *dc, NZ_MEM_SCRATCH);
    if (!dc) return NULL;
    dc->dtab = nz_malloc(NZ_RANS_PROB_SCALE * sizeof *dc->dtab, NZ_MEM_SCRATCH);
    if (!dc->dtab) {
        nz_free(dc);
        return NULL;
    }
    return dc;
}

void nz_dctx_free(nz_dctx *dc) {
    if (!dc) return;
    nz_free(dc->dtab);
    nz_free(dc->escr);
    nz_free(dc->xp);
    nz_free(dc->exps);
    nz_free(dc->sm);
    ZSTD_freeDCtx(dc->zd);
    nz_free(dc);
}

static int reserve(nz_dctx *dc, uint64_t n, nz_error *err) {
    if (n <= dc->cap) return NZ_OK;
    nz_free(dc->exps);
    nz_free(dc->sm);
    dc->exps = nz_malloc(n, NZ_MEM_SCRATCH);
    dc->sm = nz_malloc(n * 4, NZ_MEM_SCRATCH);
    dc->cap = dc->exps && dc->sm ? n : 0;
    if (!dc->cap) return nz_fail(err, NZ_E_NOMEM, "out of memory for decode scratch");
    return NZ_OK;
}

/* Grow a zero-filled scratch block to at least need bytes (contents are not
 * kept). @return NZ_OK or NZ_E_NOMEM. */
static int grow(void **buf, size_t *cap, size_t need, const char *what, nz_error *err) {
    if (need <= *cap) return NZ_OK;
    nz_free(*buf);
    *buf = nz_calloc(1, need, NZ_MEM_SCRATCH);
    *cap = *buf ? need : 0;
    return *buf ? NZ_OK : nz_fail(err, NZ_E_NOMEM, "out of memory for %s", what);
}

/* The planes of a coded tile. */
typedef struct {
    uint64_t n;                    /* elements */
    const uint8_t *ex, *sm, *norm; /* exponent section, sign+mantissa plane, normalisers */
    uint64_t elen;                 /* exponent section bytes */
    uint32_t lanes;                /* rANS interleave */
} tile_view;

/* Check tile t's header and size against d and locate its planes. */
static int frame_tile(const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len, tile_view *v,
                      nz_error *err) {
    if (t >= nz_desc_ntiles(d))
        return nz_fail(err, NZ_E_INVALID_ARG, "tile %llu out of range", (unsigned long long)t);
    v->n = nz_desc_tile_nrows(d, t) * d->cols;
    uint64_t fixed = nz_desc_tile_fixed_bytes(d, t);
    if (len < TILE_HDR) return nz_fail(err, NZ_E_TRUNCATED, "tile of %zu bytes has no header", len);
    v->elen = nz_rd32le(tile);
    v->lanes = nz_rd32le(tile + 4);
    if (d->coder == NZ_CODER_RANS ? v->lanes != 32 && v->lanes != 64 : v->lanes != 0)
        return nz_fail(err, NZ_E_FORMAT, "tile header lane count %u invalid for coder %s", v->lanes,
                       nz_coder_name(d->coder));
    if (TILE_HDR + v->elen + fixed != len)
        return nz_fail(err, len < TILE_HDR + v->elen + fixed ? NZ_E_TRUNCATED : NZ_E_FORMAT,
                       "tile size %zu does not match its planes (8 + %llu exponent + %llu fixed bytes)", len,
                       (unsigned long long)v->elen, (unsigned long long)fixed);
    v->ex = tile + TILE_HDR;
    v->sm = v->ex + v->elen;
    v->norm = v->sm + sm_bytes(d, v->n);
    return NZ_OK;
}

/* Check an esc exponent section; its ranks and scratch into dc. */
static int esc_open(nz_dctx *dc, const nz_tensor_desc *d, const tile_view *v, nz_esc_view *ev,
                    nz_error *err) {
    int rc = nz_esc_open(v->ex, v->elen, v->n, d->exp_bits, ev, err);
    if (rc) return rc;
    if (dc->etab_id != d->id) {
        nz_esc_table_build(d->freq, &dc->etab);
        dc->etab_id = d->id;
    }
    /* zero-filled: a corrupt section may read past what it wrote */
    return grow((void **)&dc->escr, &dc->escr_cap, nz_esc_scratch_bytes(ev), "esc scratch", err);
}

/* Locate the planes of tile t and decode its exponents into exps (unless
 * fused output is requested: then fout receives the bf16 values directly). */
static int open_tile(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                     uint8_t *exps, float *fout, tile_view *v, nz_error *err) {
    int rc = frame_tile(d, t, tile, len, v, err);
    if (rc) return rc;
    const uint8_t *ex = v->ex;
    uint64_t elen = v->elen;
    uint32_t lanes = v->lanes;
    switch (d->coder) {
    case NZ_CODER_ESC: {
        nz_esc_view ev;
        rc = esc_open(dc, d, v, &ev, err);
        if (rc) break;
        rc = fout ? nz_esc_decode_bf16(&ev, &dc->etab, dc->escr, v->sm, d->mant_bits, fout, err)
                  : nz_esc_decode(&ev, &dc->etab, dc->escr, exps, err);
        break;
    }
    case NZ_CODER_RANS:
        if (dc->tab_id != d->id) {
            nz_rans_build_dtab(d->freq, dc->dtab);
            dc->tab_id = d->id;
        }
        rc = fout ? nz_rans_decode_bf16(ex, elen, (int)lanes, dc->dtab, v->sm, fout, v->n, err)
                  : nz_rans_decode(ex, elen, (int)lanes, dc->dtab, exps, v->n, err);
        break;
    case NZ_CODER_ZSTD: {
        if (!dc->zd) {
            ZSTD_customMem mem = {zstd_alloc, zstd_free, NULL};
            dc->zd = ZSTD_createDCtx_advanced(mem);
            if (!dc->zd) return nz_fail(err, NZ_E_NOMEM, "out of memory for zstd");
        }
        size_t z = ZSTD_decompressDCtx(dc->zd, exps, v->n, ex, elen);
        if (ZSTD_isError(z)) return nz_fail(err, NZ_E_CORRUPT, "zstd: %s", ZSTD_getErrorName(z));
        if (z != v->n)
            return nz_fail(err, NZ_E_CORRUPT, "zstd exponent plane holds %zu of %llu symbols", z,
                           (unsigned long long)v->n);
        if (d->exp_bits < 8)
            for (uint64_t i = 0; i < v->n; i++)
                if (exps[i] >> d->exp_bits)
                    return nz_fail(err, NZ_E_CORRUPT, "exponent %u wider than %d bits", exps[i], d->exp_bits);
        break;
    }
    case NZ_CODER_CONST: {
        if (elen)
            return nz_fail(err, NZ_E_FORMAT, "const tile has a %llu-byte exponent section",
                           (unsigned long long)elen);
        int s = 0;
        while (s < 255 && !d->freq[s]) s++;
        memset(exps, s, v->n);
        break;
    }
    default:
        return nz_fail(err, NZ_E_INVALID_ARG, "no exponent plane to decode");
    }
    if (rc) nz_fail_prefix(err, "exponent plane");
    return rc;
}

static int decode_raw(const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len, float *out,
                      void *native, nz_error *err) {
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    if (t >= nz_desc_ntiles(d))
        return nz_fail(err, NZ_E_INVALID_ARG, "tile %llu out of range", (unsigned long long)t);
    if (len != n * d->elem_size)
        return nz_fail(err, len < n * d->elem_size ? NZ_E_TRUNCATED : NZ_E_FORMAT,
                       "raw tile has %zu bytes, expected %llu", len, (unsigned long long)(n * d->elem_size));
    if (native) {
        memcpy(native, tile, len);
        return NZ_OK;
    }
    if (d->dtype == NZ_DT_OTHER)
        return nz_fail(err, NZ_E_UNSUPPORTED, "tensor of a non-float dtype has no fp32 view");
    for (uint64_t i = 0; i < n; i++) out[i] = u2f(src_f32_bits(d->dtype, tile, i));
    return NZ_OK;
}

/* whether nz_join_f16_avx2 may run: the CPU has AVX2 and F16C (read once),
 * and the vector kernels are not switched off (NZ_SIMD=scalar, nz_rans_set_kernel) */
static int have_f16c(void) {
    static atomic_int cpu = -1;
    int c = atomic_load_explicit(&cpu, memory_order_relaxed);
    if (c < 0) {
        unsigned a, b, ecx,
            d; /* CPUID leaf 1: ECX bit 29 = F16C (clang's __builtin_cpu_supports lacks "f16c") */
        c = __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &ecx, &d) && (ecx >> 29 & 1);
        atomic_store_explicit(&cpu, c, memory_order_relaxed);
    }
    return c && nz_rans_active_kernel() != NZ_RANS_SCALAR;
}

/* fp32 bits of element i from its fields (exp8 formats) */
static inline uint32_t join8(uint32_t e, uint32_t sm, int mb) {
    return (sm >> mb) << 31 | e << 23 | (sm & ((1u << mb) - 1)) << (23 - mb);
}

int nz_tile_decode_f32(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                       float *out, nz_error *err) {
    if (d->coder == NZ_CODER_NONE) return decode_raw(d, t, tile, len, out, NULL, err);
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    int fused = nz_tile_gemv_fusable(d);
    tile_view v;
    int rc = reserve(dc, fused ? 0 : n, err);
    if (rc) return rc;
    rc = open_tile(dc, d, t, tile, len, dc->exps, fused ? out : NULL, &v, err);
    if (rc || fused) return rc;
    const uint8_t *e = dc->exps;
    if (d->exp_bits == 8 && d->mant_bits == 23) { /* f32 lossless: one pass over 3-byte fields */
        const uint8_t *p = v.sm;
        uint32_t *o = (uint32_t *)out;
        for (uint64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)p[3 * i] | (uint32_t)p[3 * i + 1] << 8 | (uint32_t)p[3 * i + 2] << 16;
            o[i] = (u >> 23) << 31 | (uint32_t)e[i] << 23 | (u & 0x7fffffu);
        }
        return NZ_OK;
    }
    unpack_sm(v.sm, n, 1 + d->mant_bits, dc->sm);
    const uint32_t *sm = dc->sm;
    if (d->exp_bits == 5) {
        uint64_t i0 = have_f16c() ? nz_join_f16_avx2(e, sm, out, n) : 0;
        for (uint64_t i = i0; i < n; i++)
            out[i] = f16_to_f32((sm[i] >> 10) << 15 | (uint32_t)e[i] << 10 | (sm[i] & 0x3ff));
        return NZ_OK;
    }
    int mb = d->mant_bits;
    for (uint64_t i = 0; i < n; i++) out[i] = u2f(join8(e[i], sm[i], mb));
    uint32_t B = d->mode.kind == NZ_MODE_LOSSY ? d->mode.norm_block : 0;
    if (B)
        for (uint64_t i = 0; i < n; i++) out[i] *= 1 + v.norm[i / B] / 256.0f;
    return NZ_OK;
}

int nz_tile_gemv_fusable(const nz_tensor_desc *d) {
    if (d->exp_bits != 8 || (d->mode.kind == NZ_MODE_LOSSY && d->mode.norm_block)) return 0;
    if (d->coder == NZ_CODER_RANS) return d->mant_bits == 7;
    return d->coder == NZ_CODER_ESC && (d->mant_bits == 7 || d->mant_bits == 3);
}

int nz_tile_gemm_fusable(const nz_tensor_desc *d, size_t M) {
    if (M == 1) return nz_tile_gemv_fusable(d);
    return M >= 2 && d->coder == NZ_CODER_ESC && nz_tile_gemv_fusable(d);
}

int nz_tile_gemm_f32(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                     const float *x, size_t M, float *y, size_t ldy, float *scratch, nz_error *err) {
    if (!nz_tile_gemm_fusable(d, M))
        return nz_fail(err, NZ_E_UNSUPPORTED,
                       "fused multiply needs an esc (M >= 1) or rANS (M = 1) tile in the bf16 or lossy-3 "
                       "layout, M = %zu",
                       M);
    tile_view v;
    int rc = frame_tile(d, t, tile, len, &v, err);
    if (rc) return rc;
    uint64_t rows = nz_desc_tile_nrows(d, t);
    if (d->coder == NZ_CODER_ESC) {
        nz_esc_view ev;
        rc = esc_open(dc, d, &v, &ev, err);
        size_t pass = M < NZ_ESC_GEMM_MAX ? M : NZ_ESC_GEMM_MAX; /* rows of one pass */
        if (!rc)
            rc = grow((void **)&dc->xp, &dc->xp_cap, pass * d->cols * sizeof *dc->xp, "GEMV scratch", err);
        if (!rc)
            rc = nz_esc_gemm_bf16(&ev, &dc->etab, dc->escr, v.sm, d->mant_bits, rows, d->cols, x, M, dc->xp,
                                  scratch, y, ldy, err);
    } else {
        if (dc->tab_id != d->id) {
            nz_rans_build_dtab(d->freq, dc->dtab);
            dc->tab_id = d->id;
        }
        rc = nz_gemv_rans_bf16(v.ex, v.elen, (int)v.lanes, dc->dtab, v.sm, rows, d->cols, x, y, err);
    }
    if (rc) nz_fail_prefix(err, "exponent plane");
    return rc;
}

int nz_tile_gemv_f32(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                     const float *x, float *y, nz_error *err) {
    return nz_tile_gemm_f32(dc, d, t, tile, len, x, 1, y, 1, NULL, err);
}

int nz_tile_decode_native(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                          void *out, nz_error *err) {
    if (d->coder == NZ_CODER_NONE) return decode_raw(d, t, tile, len, NULL, out, err);
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    nz_dtype nd = nz_desc_native_dtype(d);
    if (d->mode.kind == NZ_MODE_LOSSY) {
        /* values are fp32-exact: decode to fp32, then narrow */
        float *f = nz_malloc(n * sizeof *f, NZ_MEM_SCRATCH);
        if (!f) return nz_fail(err, NZ_E_NOMEM, "out of memory for decode");
        int rc = nz_tile_decode_f32(dc, d, t, tile, len, f, err);
        uint8_t *o = out;
        for (uint64_t i = 0; rc == NZ_OK && i < n; i++) {
            if (nd == NZ_DT_F32)
                memcpy(o + 4 * i, &f[i], 4);
            else {
                uint16_t h = nd == NZ_DT_BF16 ? nz_f32_to_bf16(f[i]) : nz_f32_to_f16(f[i]);
                memcpy(o + 2 * i, &h, 2);
            }
        }
        nz_free(f);
        return rc;
    }
    tile_view v;
    int rc = reserve(dc, n, err);
    if (rc) return rc;
    rc = open_tile(dc, d, t, tile, len, dc->exps, NULL, &v, err);
    if (rc) return rc;
    unpack_sm(v.sm, n, 1 + d->mant_bits, dc->sm);
    const uint8_t *e = dc->exps;
    const uint32_t *sm = dc->sm;
    uint8_t *o = out;
    for (uint64_t i = 0; i < n; i++) {
        if (nd == NZ_DT_F32) {
            uint32_t u = join8(e[i], sm[i], 23);
            memcpy(o + 4 * i, &u, 4);
        } else {
            uint16_t h = nd == NZ_DT_BF16
                             ? (uint16_t)((sm[i] >> 7) << 15 | (uint32_t)e[i] << 7 | (sm[i] & 0x7f))
                             : (uint16_t)((sm[i] >> 10) << 15 | (uint32_t)e[i] << 10 | (sm[i] & 0x3ff));
            memcpy(o + 2 * i, &h, 2);
        }
    }
    return NZ_OK;
}

int nz_tile_decode_exponents(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile,
                             size_t len, uint8_t *exps, nz_error *err) {
    tile_view v;
    return open_tile(dc, d, t, tile, len, exps, NULL, &v, err);
}

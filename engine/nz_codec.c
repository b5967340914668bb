/* NeuZip tile codec: see nz_codec.h for the formats. Names, descriptors and
 * the encoder; the decoder is in nz_codec_dec.c, what both share in
 * nz_codec_int.h. */
#include "nz_codec.h"
#include "nz_codec_int.h"

#include "nz_alloc.h"
#include "nz_esc.h"
#include "nz_rans.h"

#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_createCCtx_advanced: counted allocations */
#include <zstd.h>

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------- float helpers */

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

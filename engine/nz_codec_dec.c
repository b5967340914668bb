/* NeuZip tile codec, the decoder: decode contexts, tile framing, exponent
 * planes, decoding to fp32 or the native dtype and the fused decode-and-multiply
 * paths. See nz_codec.h for the formats; the descriptors and the encoder are in
 * nz_codec.c, what both share in nz_codec_int.h. */
#include "nz_codec.h"
#include "nz_codec_int.h"

#include "nz_alloc.h"
#include "nz_esc.h"
#include "nz_gemv.h"
#include "nz_rans.h"

#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_createDCtx_advanced: counted allocations */
#include <zstd.h>

#include <cpuid.h>
#include <endian.h>
#include <stdatomic.h>
#include <string.h>

/* ------------------------------------------------------------- sign+mantissa plane */

/* the inverse of nz_codec.c's pack_sm: w bits per element, LSB first */
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

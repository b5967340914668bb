/*
 * fuzz_common.h — the per-input bodies of the libFuzzer targets, shared by
 * tests/fuzz/fuzz_container.c, tests/fuzz/fuzz_tile.c, the seed generator
 * tests/fuzz/make_seeds.c and the regression test tests/test_fuzz_regress.c
 * (which replays every file under tests/fuzz/regress/ and tests/fuzz/corpus/<target>/).
 *
 *   fuzz_container_one(data, size)   .nzp image -> nz_model_load_buffer, then
 *                                    every blob, the padding check and
 *                                    (capped) every tile
 *   fuzz_tile_one(data, size)        parameter bytes + one tile -> the tile
 *                                    decoders (both rANS kernels)
 *   fuzz_safetensors_one(data, size) safetensors image -> nz_st_parse, every
 *                                    tensor found by name, every byte read
 *
 * Besides "no crash, no leak, no UB" (the sanitizers), the bodies check
 * invariants and report a violation through FUZZ_FAIL (abort() by default; the
 * cmocka test turns it into a test failure):
 *   - every failing call returns a known negative code, fills err with the same
 *     code and a non-empty message, and returns the same code when err is NULL;
 *   - the engine's counted allocations return to their starting level;
 *   - a loaded model is self-consistent: prefix, tile counts, tile offsets and
 *     sizes inside the data section and large enough for their planes (checked
 *     with 128-bit arithmetic), no overlaps, unique names;
 *   - the f32, native and exponent decoders agree with each other (same status,
 *     consistent values), every kernel this CPU has (rANS and esc: scalar,
 *     AVX2, AVX-512, nz_rans_set_kernel) agrees with the others bit for bit,
 *     the fused GEMV agrees with dot products of the decoded tile,
 *     and a decoded lossless tile re-encodes to a tile that decodes to the same
 *     bytes (rANS: the very same exponent stream).
 */
#ifndef NZ_FUZZ_COMMON_H
#define NZ_FUZZ_COMMON_H

#include "nz_alloc.h"
#include "nz_codec.h"
#include "nz_common.h"
#include "nz_container.h"
#include "nz_hash.h"
#include "nz_rans.h"
#include "nz_safetensors.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef FUZZ_FAIL
#define FUZZ_FAIL(...)                                                                                       \
    do {                                                                                                     \
        fprintf(stderr, "fuzz invariant violated (%s:%d): ", __FILE__, __LINE__);                            \
        fprintf(stderr, __VA_ARGS__);                                                                        \
        fprintf(stderr, "\n");                                                                               \
        abort();                                                                                             \
    } while (0)
#endif
#define FUZZ_CHECK(cond, ...)                                                                                \
    do {                                                                                                     \
        if (!(cond)) FUZZ_FAIL(__VA_ARGS__);                                                                 \
    } while (0)

#define FUZZ_UNUSED __attribute__((unused))

/* Work caps (container): skip tensors whose decoded tile would exceed
 * FUZZ_TILE_BUF_MAX bytes; decode at most FUZZ_MAX_TILES tiles per input. */
#define FUZZ_TILE_BUF_MAX ((uint64_t)16 << 20)
#define FUZZ_MAX_TILES    64

typedef unsigned __int128 fz_u128;

static FUZZ_UNUSED uint32_t fz_rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static FUZZ_UNUSED uint32_t fz_f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* malloc of exactly n bytes (ASan sees over-reads), 1 for n == 0 */
static FUZZ_UNUSED void *fz_malloc(size_t n) { return malloc(n ? n : 1); }

static FUZZ_UNUSED size_t fuzz_mem_total(void) {
    size_t s = 0;
    for (int c = 0; c < NZ_MEM_NCAT; c++) s += nz_mem_current((nz_mem_cat)c);
    return s;
}

/* A failing call: known negative code, err filled consistently. */
static FUZZ_UNUSED void fz_check_err(int rc, const nz_error *err, const char *what) {
    FUZZ_CHECK(rc >= NZ_E_NOT_FOUND && rc < 0, "%s: unknown status %d", what, rc);
    FUZZ_CHECK(err->code == rc, "%s: returned %d but err->code is %d (%s)", what, rc, err->code, err->msg);
    FUZZ_CHECK(memchr(err->msg, 0, sizeof err->msg) != NULL, "%s: error message not terminated", what);
    FUZZ_CHECK(err->msg[0] != 0, "%s: empty error message for status %d", what, rc);
}
static FUZZ_UNUSED void fz_err_reset(nz_error *err) {
    memset(err, 0, sizeof *err);
    err->code = 12345;
}

/* fp32 bits of native element i */
static FUZZ_UNUSED uint32_t fz_native_f32bits(nz_dtype nd, const uint8_t *nat, uint64_t i) {
    switch (nd) {
    case NZ_DT_BF16:
        return (uint32_t)nz_rd16le(nat + 2 * i) << 16;
    case NZ_DT_F16:
        return fz_f2u(nz_f16_to_f32(nz_rd16le(nat + 2 * i)));
    default:
        return fz_rd32(nat + 4 * i);
    }
}

/* ------------------------------------------------------------------ tile decode */

/* Select rANS kernel k (nz_rans_kernel); the scalar one when the CPU lacks k.
 * @return the kernel selected. */
static FUZZ_UNUSED int fz_set_kernel(int k) {
    if (nz_rans_set_kernel((nz_rans_kernel)k) == NZ_OK) return k;
    nz_rans_set_kernel(NZ_RANS_SCALAR);
    return NZ_RANS_SCALAR;
}

/* Decode tile t of d held in tile[0..len) with every decoder and cross-check
 * the results. `kernel` (nz_rans_kernel) is the primary rANS kernel; for rANS
 * tensors every other kernel the CPU has decodes again and must agree exactly.
 * The caller guarantees nz_desc_tile_nrows(d, t) * cols * 8 fits in memory.
 * @return the status of nz_tile_decode_native. */
static FUZZ_UNUSED int fuzz_decode_tile(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile,
                                        size_t len, int kernel) {
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    int coded = d->coder != NZ_CODER_NONE;
    int isfloat = d->dtype != NZ_DT_OTHER;
    nz_dtype nd = nz_desc_native_dtype(d);
    size_t nsz = coded ? nz_dtype_size(nd) : d->elem_size;
    float *f = fz_malloc(n * 4);
    uint8_t *nat = fz_malloc(n * nsz);
    uint8_t *ex = fz_malloc(n);
    if (!f || !nat || !ex) {
        free(f);
        free(nat);
        free(ex);
        return NZ_E_NOMEM;
    }
    nz_error err;
    kernel = fz_set_kernel(kernel);

    fz_err_reset(&err);
    int rf = nz_tile_decode_f32(dc, d, t, tile, len, f, &err);
    if (rf) fz_check_err(rf, &err, "nz_tile_decode_f32");
    if (!isfloat)
        FUZZ_CHECK(rf == NZ_E_UNSUPPORTED || rf == NZ_E_TRUNCATED || rf == NZ_E_FORMAT ||
                       rf == NZ_E_INVALID_ARG,
                   "fp32 decode of a non-float tensor returned %d", rf);

    fz_err_reset(&err);
    int rn = nz_tile_decode_native(dc, d, t, tile, len, nat, &err);
    if (rn) fz_check_err(rn, &err, "nz_tile_decode_native");
    if (isfloat) FUZZ_CHECK(rf == rn, "fp32 decode returned %d, native decode %d", rf, rn);

    int re = NZ_OK;
    if (coded) {
        fz_err_reset(&err);
        re = nz_tile_decode_exponents(dc, d, t, tile, len, ex, &err);
        if (re) fz_check_err(re, &err, "nz_tile_decode_exponents");
        FUZZ_CHECK(re == rn, "exponent decode returned %d, native decode %d", re, rn);
    }

    /* values agree between decoders */
    if (rn == NZ_OK && !coded) FUZZ_CHECK(len == n * nsz && !memcmp(nat, tile, len), "raw tile changed");
    if (rn == NZ_OK && isfloat) {
        int lossy = d->mode.kind == NZ_MODE_LOSSY;
        uint32_t B = lossy ? d->mode.norm_block : 0;
        for (uint64_t i = 0; i < n; i++) {
            uint32_t fb = fz_f2u(f[i]);
            if (!lossy) {
                FUZZ_CHECK(fb == fz_native_f32bits(nd, nat, i), "element %llu: fp32 %08x vs native %08x",
                           (unsigned long long)i, fb, fz_native_f32bits(nd, nat, i));
            } else if (nd == NZ_DT_F32) {
                FUZZ_CHECK(fb == fz_rd32(nat + 4 * i), "lossy element %llu: fp32 vs native",
                           (unsigned long long)i);
            } else {
                uint16_t h = nd == NZ_DT_BF16 ? nz_f32_to_bf16(f[i]) : nz_f32_to_f16(f[i]);
                FUZZ_CHECK(h == nz_rd16le(nat + 2 * i), "lossy element %llu: native not narrowed fp32",
                           (unsigned long long)i);
            }
            if (coded && d->exp_bits == 5)
                FUZZ_CHECK(ex[i] == ((nz_rd16le(nat + 2 * i) >> 10) & 0x1f), "f16 exponent %llu",
                           (unsigned long long)i);
            else if (coded && !B)
                FUZZ_CHECK(ex[i] == ((fb >> 23) & 0xff), "element %llu: exponent %u vs value %08x",
                           (unsigned long long)i, ex[i], fb);
        }
    }

    /* fused GEMV (rANS or esc, bf16 layout) against the decoded tile's dot products */
    if (rf == NZ_OK && nz_tile_gemv_fusable(d)) {
        uint64_t rows = nz_desc_tile_nrows(d, t);
        float *x = fz_malloc(d->cols * 4), *y = fz_malloc(rows * 4);
        for (uint64_t c = 0; x && c < d->cols; c++) x[c] = 1.0f / (float)(c % 7 + 1) - 0.3f;
        fz_err_reset(&err);
        int rg = x && y ? nz_tile_gemv_f32(dc, d, t, tile, len, x, y, &err) : NZ_OK;
        if (rg) fz_check_err(rg, &err, "nz_tile_gemv_f32");
        FUZZ_CHECK(rg == NZ_OK, "fused GEMV refused a tile the decoder took: %d", rg);
        for (uint64_t r = 0; x && y && r < rows; r++) {
            double want = 0, mag = 0;
            for (uint64_t c = 0; c < d->cols; c++) {
                want += (double)f[r * d->cols + c] * x[c];
                mag += __builtin_fabs((double)f[r * d->cols + c] * x[c]);
            }
            if (__builtin_isfinite(mag) && mag < 1e30)
                FUZZ_CHECK(__builtin_fabs(y[r] - want) <= 1e-5 * mag + 1e-35, "fused GEMV row %llu: %g vs %g",
                           (unsigned long long)r, y[r], want);
        }
        free(x);
        free(y);
    }

    /* the other kernels (rANS, esc), err NULL: same status, same bytes */
    if (coded && (d->coder == NZ_CODER_RANS || d->coder == NZ_CODER_ESC)) {
        float *f2 = fz_malloc(n * 4);
        uint8_t *ex2 = fz_malloc(n);
        static const int others[3] = {NZ_RANS_SCALAR, NZ_RANS_AVX2, NZ_RANS_AVX512};
        for (int k = 0; f2 && ex2 && k < 3; k++) {
            if (others[k] == kernel || nz_rans_set_kernel((nz_rans_kernel)others[k]) != NZ_OK) continue;
            int rf2 = nz_tile_decode_f32(dc, d, t, tile, len, f2, NULL);
            int re2 = nz_tile_decode_exponents(dc, d, t, tile, len, ex2, NULL);
            FUZZ_CHECK(rf2 == rf, "kernels %d and %d disagree on fp32 decode: %d vs %d", kernel, others[k],
                       rf, rf2);
            FUZZ_CHECK(re2 == re, "kernels %d and %d disagree on exponent decode: %d vs %d", kernel,
                       others[k], re, re2);
            if (rf == NZ_OK)
                FUZZ_CHECK(!memcmp(f, f2, n * 4), "kernels %d and %d decode different values", kernel,
                           others[k]);
            if (re == NZ_OK)
                FUZZ_CHECK(!memcmp(ex, ex2, n), "kernels %d and %d decode different exponents", kernel,
                           others[k]);
        }
        fz_set_kernel(kernel);
        free(f2);
        free(ex2);
    }

    /* lossless round trip: encode what was decoded, decode again */
    if (rn == NZ_OK && coded && d->mode.kind == NZ_MODE_LOSSLESS) {
        size_t cap = nz_tile_bound(d, t), elen = 0;
        uint8_t *enc = fz_malloc(cap), *nat2 = fz_malloc(n * nsz);
        if (enc && nat2) {
            fz_err_reset(&err);
            int rc = nz_tile_encode(d, t, nat, enc, cap, &elen, &err);
            FUZZ_CHECK(rc == NZ_OK, "re-encoding a decoded lossless tile failed: %s", err.msg);
            rc = nz_tile_decode_native(dc, d, t, enc, elen, nat2, &err);
            FUZZ_CHECK(rc == NZ_OK, "decoding a re-encoded lossless tile failed: %s", err.msg);
            FUZZ_CHECK(!memcmp(nat, nat2, n * nsz), "lossless round trip changed the values");
            /* rANS decoding is a bijection on the streams it accepts: the same
             * exponent section comes back (when the header's second word, which
             * may carry coder parameters, is the same) */
            if (d->coder == NZ_CODER_RANS && !memcmp(enc + 4, tile + 4, 4))
                FUZZ_CHECK(fz_rd32(enc) == fz_rd32(tile) && !memcmp(enc + 8, tile + 8, fz_rd32(tile)),
                           "decoder accepted a non-canonical rANS stream (%u vs %u bytes)", fz_rd32(tile),
                           fz_rd32(enc));
        }
        free(enc);
        free(nat2);
    }

    nz_rans_set_kernel(NZ_RANS_AUTO);
    free(f);
    free(nat);
    free(ex);
    return rn;
}

/* ------------------------------------------------------------------ container */

typedef struct {
    uint64_t off, end;
} fz_region;

static FUZZ_UNUSED int fz_region_cmp(const void *a, const void *b) {
    const fz_region *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Append [off, off + size) unless empty. @return 0 when out of memory. */
static FUZZ_UNUSED int fz_region_push(fz_region **reg, size_t *n, size_t *cap, uint64_t off, uint64_t size) {
    if (!size) return 1;
    if (*n == *cap) {
        fz_region *q = realloc(*reg, 2 * *cap * sizeof *q);
        if (!q) return 0;
        *reg = q;
        *cap *= 2;
    }
    (*reg)[(*n)++] = (fz_region){off, off + size};
    return 1;
}

/* Exact byte size a tile of n elements needs (coded: 8 + planes, at least). */
static FUZZ_UNUSED fz_u128 fz_tile_need(const nz_tensor_desc *d, uint64_t t) {
    fz_u128 n = (fz_u128)nz_desc_tile_nrows(d, t) * d->cols;
    if (d->coder == NZ_CODER_NONE) return n * d->elem_size;
    fz_u128 need = 8 + (n * (fz_u128)(1 + d->mant_bits) + 7) / 8;
    uint32_t B = d->mode.kind == NZ_MODE_LOSSY ? d->mode.norm_block : 0;
    if (B) need += (n + B - 1) / B;
    return need;
}

/* Invariants of a model the loader accepted. */
static FUZZ_UNUSED void fuzz_check_model(const nz_model *m, const uint8_t *buf, size_t size) {
    uint64_t hlen = nz_rd64le(buf + 16), doff = nz_rd64le(buf + 24), dsize = nz_rd64le(buf + 32);
    FUZZ_CHECK(size >= NZ_CONTAINER_PREFIX && (fz_u128)doff + dsize == size && doff % 64 == 0 &&
                   (fz_u128)doff >= (fz_u128)64 + hlen,
               "accepted an inconsistent prefix");
    FUZZ_CHECK(nz_model_file_size(m) == size && nz_model_header_size(m) == hlen, "sizes");
    const json_t *c = nz_model_config(m), *md = nz_model_metadata(m);
    FUZZ_CHECK(!c || json_is_object(c), "config is not an object");
    FUZZ_CHECK(!md || json_is_object(md), "metadata is not an object");
    size_t nt = nz_model_ntensors(m), nb = nz_model_nblobs(m);
    FUZZ_CHECK(nz_model_tensor(m, nt) == NULL && nz_model_blob_name(m, nb) == NULL, "index past end");
    size_t nreg = 0, capreg = 16;
    fz_region *reg = malloc(capreg * sizeof *reg);
    if (!reg) return;
    for (size_t i = 0; i < nt; i++) {
        const nz_tensor *x = nz_model_tensor(m, i);
        const nz_tensor_desc *d = &x->desc;
        FUZZ_CHECK(x && x->name && x->name[0], "tensor %zu has no name", i);
        FUZZ_CHECK(nz_model_find(m, x->name) == (long)i, "tensor name '%s' not unique", x->name);
        FUZZ_CHECK(nz_desc_validate(d, NULL) == NZ_OK, "tensor '%s': invalid desc accepted", x->name);
        FUZZ_CHECK(x->ndim >= 0 && x->ndim <= NZ_MAX_DIMS_C, "ndim %d", x->ndim);
        fz_u128 rows = 1, cols = 1;
        for (int k = 0; k < x->ndim; k++) {
            FUZZ_CHECK(x->shape[k] >= 0, "negative dim");
            if (k == 0 && x->ndim >= 2)
                rows = (uint64_t)x->shape[k];
            else if (cols <= UINT64_MAX)
                cols *= (uint64_t)x->shape[k];
        }
        if (rows * cols != 0)
            FUZZ_CHECK(rows == d->rows && cols == d->cols, "tensor '%s': shape vs rows x cols", x->name);
        FUZZ_CHECK((rows * cols == 0) == ((fz_u128)d->rows * d->cols == 0), "empty vs shape");
        FUZZ_CHECK((fz_u128)d->rows * d->cols * d->elem_size <= UINT64_MAX, "tensor '%s' overflows", x->name);
        /* callers size tile buffers as tile_rows * cols * (elem size <= 8) */
        FUZZ_CHECK((fz_u128)d->tile_rows * d->cols * 8 <= UINT64_MAX, "tensor '%s': tile buffer overflows",
                   x->name);
        FUZZ_CHECK(x->ntiles == nz_desc_ntiles(d), "tensor '%s': %llu tiles", x->name,
                   (unsigned long long)x->ntiles);
        uint64_t sum = 0;
        for (uint64_t j = 0; j < x->ntiles; j++) {
            const nz_tile_ref *r = &x->tiles[j];
            FUZZ_CHECK(r->offset % 64 == 0 && (fz_u128)r->offset + r->size <= dsize,
                       "tensor '%s' tile %llu outside the data section", x->name, (unsigned long long)j);
            fz_u128 need = fz_tile_need(d, j);
            if (d->coder == NZ_CODER_NONE)
                FUZZ_CHECK(r->size == need, "raw tensor '%s' tile %llu: size %llu", x->name,
                           (unsigned long long)j, (unsigned long long)r->size);
            else
                FUZZ_CHECK(r->size >= need,
                           "tensor '%s' tile %llu: size %llu cannot hold its planes (%llu x %llu elements)",
                           x->name, (unsigned long long)j, (unsigned long long)r->size,
                           (unsigned long long)nz_desc_tile_nrows(d, j), (unsigned long long)d->cols);
            sum += r->size;
            if (!fz_region_push(&reg, &nreg, &capreg, r->offset, r->size)) goto out;
        }
        FUZZ_CHECK(sum == x->stored_bytes, "stored_bytes");
    }
    for (size_t i = 0; i < nb; i++) {
        const char *name = nz_model_blob_name(m, i);
        FUZZ_CHECK(name != NULL, "blob %zu has no name", i);
        const uint8_t *p = NULL;
        size_t n = 0;
        nz_error err;
        fz_err_reset(&err);
        int rc = nz_model_blob(m, name, &p, &n, &err);
        if (rc) {
            fz_check_err(rc, &err, "nz_model_blob");
            FUZZ_CHECK(rc == NZ_E_CHECKSUM, "blob '%s': status %d", name, rc);
            FUZZ_CHECK(nz_model_blob(m, name, &p, &n, NULL) == rc, "blob status depends on err");
            continue;
        }
        FUZZ_CHECK(p >= buf + doff && (fz_u128)(p - buf) + n <= size && (p - buf - doff) % 64 == 0,
                   "blob '%s' outside the data section", name);
        FUZZ_CHECK(nz_hash(p, n) == nz_hash(p, n), "hash");
        if (!fz_region_push(&reg, &nreg, &capreg, (uint64_t)(p - buf - doff), n)) goto out;
    }
    qsort(reg, nreg, sizeof *reg, fz_region_cmp);
    for (size_t i = 1; i < nreg; i++)
        FUZZ_CHECK(reg[i].off >= reg[i - 1].end, "data regions overlap at %llu",
                   (unsigned long long)reg[i].off);
out:
    free(reg);
}

static FUZZ_UNUSED void fuzz_walk_model(const nz_model *m, const uint8_t *buf, size_t size, int kernel) {
    fuzz_check_model(m, buf, size);
    const uint8_t *dsec = buf + nz_rd64le(buf + 24);
    nz_error err;
    const uint8_t *p;
    size_t n;
    size_t nt = nz_model_ntensors(m);
    fz_err_reset(&err);
    int rc = nz_model_tile(m, nt, 0, &p, &n, &err);
    FUZZ_CHECK(rc == NZ_E_INVALID_ARG, "tile of tensor %zu of %zu: %d", nt, nt, rc);
    fz_check_err(rc, &err, "nz_model_tile");
    fz_err_reset(&err);
    rc = nz_model_blob(m, "\x01no such blob", &p, &n, &err);
    FUZZ_CHECK(rc == NZ_E_NOT_FOUND, "missing blob: %d", rc);
    fz_check_err(rc, &err, "nz_model_blob");

    fz_err_reset(&err);
    rc = nz_model_check_padding(m, &err);
    if (rc) {
        fz_check_err(rc, &err, "nz_model_check_padding");
        FUZZ_CHECK(rc == NZ_E_FORMAT, "padding check: %d", rc);
    }
    FUZZ_CHECK(nz_model_check_padding(m, NULL) == rc, "padding status depends on err");

    nz_dctx *dc = nz_dctx_create();
    if (!dc) return;
    unsigned budget = FUZZ_MAX_TILES;
    for (size_t i = 0; i < nt && budget; i++) {
        const nz_tensor *x = nz_model_tensor(m, i);
        const nz_tensor_desc *d = &x->desc;
        if (x->ntiles == 0) continue;
        fz_err_reset(&err);
        rc = nz_model_tile(m, i, x->ntiles, &p, &n, &err);
        FUZZ_CHECK(rc == NZ_E_INVALID_ARG, "tile past the end: %d", rc);
        size_t esz = d->elem_size > 4 ? d->elem_size : 4;
        fz_u128 bytes = (fz_u128)nz_desc_tile_nrows(d, 0) * d->cols * esz; /* tile 0 is the largest */
        if (bytes > FUZZ_TILE_BUF_MAX) continue;
        void *out = malloc((size_t)bytes);
        if (!out) continue;
        for (uint64_t t = 0; t < x->ntiles && budget; t++, budget--) {
            fz_err_reset(&err);
            int rf = nz_model_decode_f32(m, dc, i, t, out, &err);
            if (rf) fz_check_err(rf, &err, "nz_model_decode_f32");
            fz_err_reset(&err);
            int rn = nz_model_decode_native(m, dc, i, t, out, &err);
            if (rn) fz_check_err(rn, &err, "nz_model_decode_native");
            fz_err_reset(&err);
            int rt = nz_model_tile(m, i, t, &p, &n, &err);
            if (rt == NZ_OK) {
                FUZZ_CHECK(p == dsec + x->tiles[t].offset && n == x->tiles[t].size, "tile pointer");
            } else {
                fz_check_err(rt, &err, "nz_model_tile");
                FUZZ_CHECK(rt == NZ_E_CHECKSUM && rf == rt && rn == rt,
                           "tile status %d, decode statuses %d %d", rt, rf, rn);
                p = dsec + x->tiles[t].offset; /* decode the damaged bytes anyway */
                n = (size_t)x->tiles[t].size;
            }
            int rd = fuzz_decode_tile(dc, d, t, p, n, kernel);
            if (rt == NZ_OK) FUZZ_CHECK(rd == rn, "model decode %d vs tile decode %d", rn, rd);
        }
        free(out);
    }
    nz_dctx_free(dc);
}

static FUZZ_UNUSED void fuzz_safetensors_one(const uint8_t *data, size_t size) {
    size_t mem0 = fuzz_mem_total();
    uint8_t *buf = fz_malloc(size); /* exact size: ASan sees any overread */
    if (!buf) return;
    if (size) memcpy(buf, data, size);
    nz_st_file *f = NULL;
    nz_error err;
    fz_err_reset(&err);
    int rc = nz_st_parse(buf, size, &f, &err);
    if (rc != NZ_OK) fz_check_err(rc, &err, "nz_st_parse");
    if (rc == NZ_OK) {
        unsigned sum = 0;
        for (size_t i = 0; i < nz_st_count(f); i++) {
            const nz_st_tensor *t = nz_st_get(f, i);
            for (uint64_t k = 0; k < t->size; k++) sum += t->data[k];
            FUZZ_CHECK(nz_st_find(f, t->name) == t, "tensor '%s' not found by name", t->name);
            FUZZ_CHECK(t->size == t->nelem * t->elem_size, "tensor '%s' size mismatch", t->name);
            FUZZ_CHECK(t->data >= buf + 8 && t->data + t->size <= buf + size, "tensor '%s' outside", t->name);
        }
        (void)sum;
        nz_st_free(f);
    } else {
        FUZZ_CHECK(nz_st_parse(buf, size, &f, NULL) == rc, "status differs when err is NULL");
    }
    free(buf);
    FUZZ_CHECK(fuzz_mem_total() == mem0, "counted memory leaked");
}

static FUZZ_UNUSED void fuzz_container_one(const uint8_t *data, size_t size) {
    nz_alloc_hook_json();
    size_t mem0 = fuzz_mem_total();
    uint8_t *buf = fz_malloc(size);
    if (!buf) return;
    if (size) memcpy(buf, data, size);
    /* Fix the header checksum so mutations reach the JSON validation. */
    if (size >= NZ_CONTAINER_PREFIX) {
        uint64_t hlen = nz_rd64le(buf + 16);
        if (hlen <= size - NZ_CONTAINER_PREFIX) nz_wr64le(buf + 40, nz_hash(buf + NZ_CONTAINER_PREFIX, hlen));
    }
    nz_model *m = NULL;
    nz_error err;
    fz_err_reset(&err);
    int rc = nz_model_load_buffer(buf, size, &m, &err);
    if (rc) {
        fz_check_err(rc, &err, "nz_model_load_buffer");
        FUZZ_CHECK(m == NULL, "failed load left a model");
    }
    nz_model *m2 = NULL;
    int rc2 = nz_model_load_buffer(buf, size, &m2, NULL);
    FUZZ_CHECK(rc2 == rc, "load returns %d with err, %d without (%s)", rc, rc2, err.msg);
    nz_model_free(m2);
    if (rc == NZ_OK) {
        fuzz_walk_model(m, buf, size, (int)(size % 4)); /* primary kernel: any of the four */
        nz_model_free(m);
    }
    free(buf);
    FUZZ_CHECK(fuzz_mem_total() == mem0, "engine allocations not returned: %zu -> %zu bytes", mem0,
               fuzz_mem_total());
}

/* ------------------------------------------------------------------ tile target */

/*
 * fuzz_tile input: FUZZ_TILE_HDR parameter bytes, K [symbol, weight] pairs,
 * then the tile bytes.
 *   0  dtype       % 3: bf16, f16, f32
 *   1  mode        % 10: lossless, bf16, lossy-0 .. lossy-7
 *   2  norm_block  lossy only: 0 none, 1..254 that many, 255 = 2^30
 *   3  coder       % 3: rans, zstd, const
 *   4  rows - 1    % 64
 *   5,6 cols - 1   u16 LE % 512
 *   7  tile_rows-1 % 64
 *   8  tile index  % ntiles
 *   9  kernel      & 3: primary rANS kernel (nz_rans_kernel: auto, scalar, avx2,
 *                  avx512; scalar when the CPU lacks it); the others cross-check
 *   10 K           number of [symbol, weight] pairs that follow
 * Frequency table: counts[symbol mod 2^exp_bits] += weight + 1, then
 * nz_rans_normalize. rans: fewer than 2 symbols get a neighbour added.
 * const: the first pair's symbol (0 without pairs) gets 4096. zstd: the
 * normalised table (informative only; may be empty).
 */
#define FUZZ_TILE_HDR 11

typedef struct {
    nz_tensor_desc d;
    uint64_t t;
    int kernel; /* nz_rans_kernel */
    size_t hdr; /* bytes before the tile */
} fuzz_tile_params;

/* @return 1 and p filled from data, or 0 when data is too short. */
static FUZZ_UNUSED int fuzz_tile_parse(const uint8_t *data, size_t size, fuzz_tile_params *p) {
    if (size < FUZZ_TILE_HDR) return 0;
    size_t K = data[10];
    if (size < FUZZ_TILE_HDR + 2 * K) return 0;
    static const nz_dtype dts[3] = {NZ_DT_BF16, NZ_DT_F16, NZ_DT_F32};
    static const nz_coder cds[4] = {NZ_CODER_RANS, NZ_CODER_ZSTD, NZ_CODER_CONST, NZ_CODER_ESC};
    nz_mode mode = {NZ_MODE_LOSSLESS, 0, 0};
    int mk = data[1] % 10;
    if (mk == 1) mode.kind = NZ_MODE_BF16;
    if (mk >= 2) {
        mode.kind = NZ_MODE_LOSSY;
        mode.k = mk - 2;
        mode.norm_block = data[2] == 255 ? 1u << 30 : data[2];
    }
    uint64_t rows = 1 + data[4] % 64, cols = 1 + nz_rd16le(data + 5) % 512;
    uint32_t tr = 1 + data[7] % 64;
    nz_error err;
    fz_err_reset(&err);
    int rc = nz_desc_init(&p->d, dts[data[0] % 3], 0, &mode, cds[data[3] % 4], rows, cols, tr, &err);
    FUZZ_CHECK(rc == NZ_OK, "nz_desc_init: %s", err.msg);
    nz_tensor_desc *d = &p->d;
    d->coder = cds[data[3] % 4]; /* as the loader does: nz_desc_init never picks const itself */
    uint32_t nsym = 1u << d->exp_bits;
    uint64_t counts[256] = {0};
    const uint8_t *pairs = data + FUZZ_TILE_HDR;
    for (size_t k = 0; k < K; k++) counts[pairs[2 * k] % nsym] += (uint64_t)pairs[2 * k + 1] + 1;
    if (d->coder == NZ_CODER_CONST) {
        memset(d->freq, 0, sizeof d->freq);
        d->freq[K ? pairs[0] % nsym : 0] = NZ_RANS_PROB_SCALE;
    } else {
        if (d->coder == NZ_CODER_RANS) {
            int present = 0, first = -1;
            for (uint32_t s = 0; s < nsym; s++)
                if (counts[s]) {
                    present++;
                    if (first < 0) first = (int)s;
                }
            if (present == 0)
                counts[0] = counts[1] = 1;
            else if (present == 1)
                counts[((uint32_t)first + 1) % nsym] = 1;
        }
        if (d->coder == NZ_CODER_ESC) { /* ranks need one symbol at least */
            int any = 0;
            for (uint32_t s = 0; s < nsym; s++) any |= counts[s] != 0;
            if (!any) counts[0] = 1;
        }
        int present = nz_rans_normalize(counts, d->freq);
        FUZZ_CHECK(present >= 0, "nz_rans_normalize: %d", present);
        if (d->coder == NZ_CODER_RANS) {
            fz_err_reset(&err);
            FUZZ_CHECK(nz_rans_check_freq(d->freq, &err) == NZ_OK, "normalised table invalid: %s", err.msg);
        }
    }
    fz_err_reset(&err);
    rc = nz_desc_validate(d, &err);
    FUZZ_CHECK(rc == NZ_OK, "a valid desc was refused: %s", err.msg);
    p->t = data[8] % nz_desc_ntiles(d);
    p->kernel = data[9] & 3;
    p->hdr = FUZZ_TILE_HDR + 2 * K;
    return 1;
}

static FUZZ_UNUSED void fuzz_tile_one(const uint8_t *data, size_t size) {
    size_t mem0 = fuzz_mem_total();
    fuzz_tile_params p;
    if (!fuzz_tile_parse(data, size, &p)) return;
    size_t len = size - p.hdr;
    uint8_t *tile = fz_malloc(len);
    nz_dctx *dc = nz_dctx_create();
    if (tile && dc) {
        if (len) memcpy(tile, data + p.hdr, len);
        fuzz_decode_tile(dc, &p.d, p.t, tile, len, p.kernel);
        /* a tile index past the end is refused */
        uint64_t n = nz_desc_tile_nrows(&p.d, 0) * p.d.cols;
        float *f = malloc(n * 4);
        if (f) {
            nz_error err;
            fz_err_reset(&err);
            int rc = nz_tile_decode_f32(dc, &p.d, nz_desc_ntiles(&p.d), tile, len, f, &err);
            FUZZ_CHECK(rc != NZ_OK, "decoded a tile past the end");
            fz_check_err(rc, &err, "nz_tile_decode_f32 past the end");
            free(f);
        }
    }
    nz_dctx_free(dc);
    free(tile);
    FUZZ_CHECK(fuzz_mem_total() == mem0, "engine allocations not returned: %zu -> %zu bytes", mem0,
               fuzz_mem_total());
}

#endif /* NZ_FUZZ_COMMON_H */

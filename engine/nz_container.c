/* .nzp container: the loader, with its checks and the tile accessors. See
 * nz_container.h for the layout; the writer is in nz_container_writer.c. */
#include "nz_container.h"
#include "nz_guard.h"
#include "nz_hash.h"

#include "nz_alloc.h"
#include "nz_safetensors.h"

#include <stdatomic.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------- loader */

typedef struct {
    const char *name;
    uint64_t offset, size, hash;
} blob_ref;

struct nz_model {
    const uint8_t *base; /* whole image */
    uint64_t len;
    const uint8_t *map; /* nz_map_file mapping to release, or NULL */
    json_t *root;
    const json_t *config, *metadata;
    const uint8_t *data; /* data section */
    uint64_t data_size, header_len;
    size_t nt, nb;
    nz_tensor *t;
    blob_ref *b;
    /* verify-once: bit (tile_base[i] + t) of vbits is set once tile t of
     * tensor i has matched its checksum (see nz_model_tile_once) */
    uint64_t *tile_base;     /* [nt] */
    _Atomic uint64_t *vbits; /* [ceil(total tiles / 64)] */
    _Atomic int verify;      /* nz_verify_policy */
};

typedef struct {
    uint64_t off, end;
    const char *what; /* tensor or blob name */
    uint64_t tile;    /* UINT64_MAX for blobs */
} region;

static int region_cmp(const void *a, const void *b) {
    const region *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static int name_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int get_u64(const json_t *obj, const char *key, uint64_t *v, const char *ctx, nz_error *err) {
    const json_t *j = json_object_get(obj, key);
    if (!j) return nz_fail(err, NZ_E_FORMAT, "%s: missing field \"%s\"", ctx, key);
    if (!json_is_integer(j) || json_integer_value(j) < 0)
        return nz_fail(err, NZ_E_FORMAT, "%s: field \"%s\" must be a non-negative integer", ctx, key);
    *v = (uint64_t)json_integer_value(j);
    return NZ_OK;
}

static int get_str(const json_t *obj, const char *key, const char **v, const char *ctx, nz_error *err) {
    const json_t *j = json_object_get(obj, key);
    if (!j) return nz_fail(err, NZ_E_FORMAT, "%s: missing field \"%s\"", ctx, key);
    if (!json_is_string(j)) return nz_fail(err, NZ_E_FORMAT, "%s: field \"%s\" must be a string", ctx, key);
    *v = json_string_value(j);
    return NZ_OK;
}

static int parse_hash(const json_t *j, uint64_t *h) {
    const char *s = json_is_string(j) ? json_string_value(j) : NULL;
    if (!s || strlen(s) != 16) return -1;
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v << 4 | (uint64_t)d;
    }
    *h = v;
    return 0;
}

/* [[symbol, value], ...] with symbols < 256, each at most once */
static int parse_pairs(const json_t *arr, uint64_t out[256], uint64_t max_val, const char *ctx,
                       const char *key, nz_error *err) {
    memset(out, 0, 256 * sizeof *out);
    if (!arr) return NZ_OK;
    if (!json_is_array(arr)) return nz_fail(err, NZ_E_FORMAT, "%s: \"%s\" must be an array", ctx, key);
    size_t i;
    const json_t *p;
    json_array_foreach(arr, i, p) {
        const json_t *s = json_array_get(p, 0), *v = json_array_get(p, 1);
        if (!json_is_array(p) || json_array_size(p) != 2 || !json_is_integer(s) || !json_is_integer(v) ||
            json_integer_value(s) < 0 || json_integer_value(s) > 255 || json_integer_value(v) <= 0 ||
            (uint64_t)json_integer_value(v) > max_val || out[json_integer_value(s)])
            return nz_fail(err, NZ_E_FORMAT, "%s: \"%s\" entry %zu is not a valid [symbol, count]", ctx, key,
                           i);
        out[json_integer_value(s)] = (uint64_t)json_integer_value(v);
    }
    return NZ_OK;
}

/* A tensor entry's string fields and the 2-D view of its shape, as parse_tensor reads them. */
typedef struct {
    const char *dts, *sts, *modes, *coders; /* "dtype", "st_dtype", "mode", "coder" */
    nz_dtype dt;
    size_t esz;            /* bytes per element (st_dtype) */
    uint64_t erows, ecols; /* rows = shape[0], cols = product of the rest (1-D/0-D: 1 x n) */
} tensor_fields;

/* f's dtype and st_dtype, which must agree; t->st_dtype set. */
static int parse_dtype(tensor_fields *f, nz_tensor *t, const char *ctx, nz_error *err) {
    if (!strcmp(f->dts, "bf16"))
        f->dt = NZ_DT_BF16;
    else if (!strcmp(f->dts, "f16"))
        f->dt = NZ_DT_F16;
    else if (!strcmp(f->dts, "f32"))
        f->dt = NZ_DT_F32;
    else if (!strcmp(f->dts, "other"))
        f->dt = NZ_DT_OTHER;
    else
        return nz_fail(err, NZ_E_FORMAT, "%s: unknown dtype \"%.32s\"", ctx, f->dts);
    f->esz = nz_st_dtype_size(f->sts);
    if (!f->esz || strlen(f->sts) >= sizeof t->st_dtype)
        return nz_fail(err, NZ_E_FORMAT, "%s: unknown st_dtype \"%.32s\"", ctx, f->sts);
    nz_dtype expect = !strcmp(f->sts, "BF16")  ? NZ_DT_BF16
                      : !strcmp(f->sts, "F16") ? NZ_DT_F16
                      : !strcmp(f->sts, "F32") ? NZ_DT_F32
                                               : NZ_DT_OTHER;
    if (expect != f->dt)
        return nz_fail(err, NZ_E_FORMAT, "%s: dtype %s does not match st_dtype %s", ctx, f->dts, f->sts);
    strcpy(t->st_dtype, f->sts);
    return NZ_OK;
}

/* "shape" into t->ndim and t->shape, and its 2-D view into f (no overflow even in bytes). */
static int parse_shape(const json_t *jt, tensor_fields *f, nz_tensor *t, const char *ctx, nz_error *err) {
    const json_t *shape = json_object_get(jt, "shape");
    if (!json_is_array(shape) || json_array_size(shape) > NZ_MAX_DIMS_C)
        return nz_fail(err, NZ_E_FORMAT, "%s: shape must be an array of at most %d dims", ctx, NZ_MAX_DIMS_C);
    t->ndim = (int)json_array_size(shape);
    uint64_t erows = 1, ecols = 1;
    for (int i = 0; i < t->ndim; i++) {
        const json_t *d = json_array_get(shape, (size_t)i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return nz_fail(err, NZ_E_FORMAT, "%s: shape dim %d is not a non-negative integer", ctx, i);
        t->shape[i] = json_integer_value(d);
        uint64_t v = (uint64_t)t->shape[i];
        if (i == 0 && t->ndim >= 2) {
            erows = v;
            continue;
        }
        if (v && ecols > UINT64_MAX / v / f->esz)
            return nz_fail(err, NZ_E_FORMAT, "%s: shape overflows", ctx);
        ecols *= v;
    }
    if (ecols && erows > UINT64_MAX / ecols / f->esz)
        return nz_fail(err, NZ_E_FORMAT, "%s: shape overflows", ctx);
    f->erows = erows;
    f->ecols = ecols;
    return NZ_OK;
}

/* rows, cols, tile_rows, norm_block, mode and coder into t->desc: they must fit the shape. */
static int parse_desc(const json_t *jt, const tensor_fields *f, nz_tensor *t, const char *ctx,
                      nz_error *err) {
    uint64_t rows, cols, tile_rows, norm_block = 0, nelem = f->erows * f->ecols;
    int rc;
    if ((rc = get_u64(jt, "rows", &rows, ctx, err)) || (rc = get_u64(jt, "cols", &cols, ctx, err)) ||
        (rc = get_u64(jt, "tile_rows", &tile_rows, ctx, err)))
        return rc;
    if (json_object_get(jt, "norm_block") && (rc = get_u64(jt, "norm_block", &norm_block, ctx, err)))
        return rc;
    if (rows != f->erows || cols != f->ecols)
        return nz_fail(err, NZ_E_FORMAT, "%s: rows x cols %" PRIu64 " x %" PRIu64 " do not match the shape",
                       ctx, rows, cols);
    if (tile_rows == 0 || tile_rows > UINT32_MAX)
        return nz_fail(err, NZ_E_FORMAT, "%s: tile_rows %" PRIu64 " out of range", ctx, tile_rows);
    /* Keep sizes derived from the shape far from 64-bit overflow: plane bytes
     * (n * 24 bits) and callers' tile buffers (tile_rows * cols * 8 bytes). */
    if (nelem > (UINT64_MAX >> 5) || (cols && tile_rows > (UINT64_MAX >> 5) / cols))
        return nz_fail(err, NZ_E_FORMAT,
                       "%s: tensor too large (%" PRIu64 " x %" PRIu64 ", tile_rows %" PRIu64 ")", ctx, rows,
                       cols, tile_rows);
    nz_mode mode;
    nz_coder coder;
    if ((rc = nz_mode_parse(f->modes, &mode, err)) || (rc = nz_coder_parse(f->coders, &coder, err))) {
        nz_fail(err, NZ_E_FORMAT, "%s: bad mode or coder (\"%.20s\", \"%.20s\")", ctx, f->modes, f->coders);
        return NZ_E_FORMAT;
    }
    if (norm_block > (1u << 30))
        return nz_fail(err, NZ_E_FORMAT, "%s: norm_block %" PRIu64 " out of range", ctx, norm_block);
    mode.norm_block = (uint32_t)norm_block;
    rc = nz_desc_init(&t->desc, f->dt, f->esz, &mode, coder, rows, cols, (uint32_t)tile_rows, err);
    if (rc) {
        nz_fail_prefix(err, "%s", ctx);
        if (err) err->code = NZ_E_FORMAT;
        return NZ_E_FORMAT;
    }
    if (t->desc.mode.kind != mode.kind || t->desc.mode.norm_block != mode.norm_block)
        return nz_fail(err, NZ_E_FORMAT, "%s: mode \"%s\" is not valid for this tensor", ctx, f->modes);
    t->desc.coder = coder;
    return NZ_OK;
}

/* "freq" into t->desc (then checked whole) and "counts" into t->counts: a coded tensor's exponent
 * counts must add up to its nelem elements. */
static int parse_freq_counts(const json_t *jt, nz_tensor *t, uint64_t nelem, const char *ctx, nz_error *err) {
    uint64_t fq[256];
    int rc;
    if ((rc = parse_pairs(json_object_get(jt, "freq"), fq, 1u << 12, ctx, "freq", err)) ||
        (rc = parse_pairs(json_object_get(jt, "counts"), t->counts, UINT64_MAX, ctx, "counts", err)))
        return rc;
    for (int s = 0; s < 256; s++) t->desc.freq[s] = (uint32_t)fq[s];
    if ((rc = nz_desc_validate(&t->desc, err))) {
        nz_fail_prefix(err, "%s", ctx); /* its return value is INVALID_ARG when err is NULL */
        return rc;
    }
    if (t->desc.coder != NZ_CODER_NONE && json_object_get(jt, "counts")) {
        uint64_t sum = 0;
        for (int s = 0; s < 256; s++) {
            if (t->counts[s] > nelem - sum)
                return nz_fail(err, NZ_E_FORMAT, "%s: exponent counts exceed the element count", ctx);
            sum += t->counts[s];
        }
        if (sum != nelem)
            return nz_fail(err, NZ_E_FORMAT, "%s: exponent counts add up to %" PRIu64 ", not %" PRIu64, ctx,
                           sum, nelem);
    }
    return NZ_OK;
}

/* "tiles" into t->tiles ([offset, size, hash] each, inside m's data section) and t->stored_bytes. */
static int parse_tiles(const nz_model *m, const json_t *jt, nz_tensor *t, const char *ctx, nz_error *err) {
    const json_t *tiles = json_object_get(jt, "tiles");
    t->ntiles = nz_desc_ntiles(&t->desc);
    if (!json_is_array(tiles) || json_array_size(tiles) != t->ntiles)
        return nz_fail(err, NZ_E_FORMAT, "%s: expected %" PRIu64 " tiles, found %zu", ctx, t->ntiles,
                       json_is_array(tiles) ? json_array_size(tiles) : 0);
    t->tiles = nz_calloc(t->ntiles ? t->ntiles : 1, sizeof *t->tiles, NZ_MEM_OTHER);
    if (!t->tiles) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    for (uint64_t i = 0; i < t->ntiles; i++) {
        const json_t *e = json_array_get(tiles, i), *o = json_array_get(e, 0), *s = json_array_get(e, 1);
        nz_tile_ref *r = &t->tiles[i];
        if (!json_is_array(e) || json_array_size(e) != 3 || !json_is_integer(o) || !json_is_integer(s) ||
            json_integer_value(o) < 0 || json_integer_value(s) < 0 ||
            parse_hash(json_array_get(e, 2), &r->hash))
            return nz_fail(err, NZ_E_FORMAT, "%s tile %" PRIu64 ": entry is not [offset, size, hash]", ctx,
                           i);
        r->offset = (uint64_t)json_integer_value(o);
        r->size = (uint64_t)json_integer_value(s);
        if (r->offset % NZ_CONTAINER_ALIGN)
            return nz_fail(err, NZ_E_FORMAT, "%s tile %" PRIu64 ": offset %" PRIu64 " not 64-byte aligned",
                           ctx, i, r->offset);
        if (r->offset > m->data_size || r->size > m->data_size - r->offset)
            return nz_fail(err, NZ_E_FORMAT,
                           "%s tile %" PRIu64 ": bytes [%" PRIu64 ", +%" PRIu64 ") lie outside the %" PRIu64
                           "-byte data section",
                           ctx, i, r->offset, r->size, m->data_size);
        uint64_t fixed = nz_desc_tile_fixed_bytes(&t->desc, i);
        if (t->desc.coder == NZ_CODER_NONE ? r->size != fixed : r->size < 8 + fixed)
            return nz_fail(err, NZ_E_FORMAT,
                           "%s tile %" PRIu64 ": size %" PRIu64 " cannot hold its %" PRIu64 " fixed bytes",
                           ctx, i, r->size, fixed);
        t->stored_bytes += r->size;
    }
    return NZ_OK;
}

static int parse_tensor(nz_model *m, const json_t *jt, size_t idx, nz_tensor *t, nz_error *err) {
    char ctx[200];
    snprintf(ctx, sizeof ctx, "tensor #%zu", idx);
    if (!json_is_object(jt)) return nz_fail(err, NZ_E_FORMAT, "%s: not an object", ctx);
    int rc = get_str(jt, "name", &t->name, ctx, err);
    if (rc) return rc;
    if (!*t->name) return nz_fail(err, NZ_E_FORMAT, "%s: empty name", ctx);
    snprintf(ctx, sizeof ctx, "tensor '%.160s'", t->name);

    tensor_fields f;
    if ((rc = get_str(jt, "dtype", &f.dts, ctx, err)) || (rc = get_str(jt, "st_dtype", &f.sts, ctx, err)) ||
        (rc = get_str(jt, "mode", &f.modes, ctx, err)) || (rc = get_str(jt, "coder", &f.coders, ctx, err)))
        return rc;
    if ((rc = parse_dtype(&f, t, ctx, err)) || (rc = parse_shape(jt, &f, t, ctx, err)) ||
        (rc = parse_desc(jt, &f, t, ctx, err)) ||
        (rc = parse_freq_counts(jt, t, f.erows * f.ecols, ctx, err)))
        return rc;
    return parse_tiles(m, jt, t, ctx, err);
}

/* All blobs and tiles sorted by offset, in a new NZ_MEM_OTHER array. */
static region *sorted_regions(const nz_model *m, size_t *count) {
    size_t n = m->nb;
    for (size_t i = 0; i < m->nt; i++) n += m->t[i].ntiles;
    *count = n;
    region *r = nz_malloc((n ? n : 1) * sizeof *r, NZ_MEM_OTHER);
    if (!r) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < m->nb; i++)
        r[k++] = (region){m->b[i].offset, m->b[i].offset + m->b[i].size, m->b[i].name, UINT64_MAX};
    for (size_t i = 0; i < m->nt; i++)
        for (uint64_t j = 0; j < m->t[i].ntiles; j++)
            r[k++] = (region){m->t[i].tiles[j].offset, m->t[i].tiles[j].offset + m->t[i].tiles[j].size,
                              m->t[i].name, j};
    qsort(r, n, sizeof *r, region_cmp);
    return r;
}

static int check_overlaps(nz_model *m, nz_error *err) {
    size_t n;
    region *r = sorted_regions(m, &n);
    if (!r) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    int rc = NZ_OK;
    uint64_t end = 0;
    const region *last = NULL;
    for (size_t i = 0; i < n; i++) {
        if (r[i].off == r[i].end) continue;
        if (last && r[i].off < end) {
            rc = nz_fail(err, NZ_E_FORMAT,
                         "data regions overlap: '%.100s'%s and '%.100s'%s at offset %" PRIu64, last->what,
                         last->tile == UINT64_MAX ? " (blob)" : "", r[i].what,
                         r[i].tile == UINT64_MAX ? " (blob)" : "", r[i].off);
            break;
        }
        end = r[i].end;
        last = &r[i];
    }
    nz_free(r);
    return rc;
}

/* The magic at the start of the image (with a hint for a .safetensors file). */
static int check_magic(const uint8_t *b, uint64_t len, nz_error *err) {
    if (len == 0) return nz_fail(err, NZ_E_TRUNCATED, "empty file");
    if (len < 8 || memcmp(b, NZ_CONTAINER_MAGIC, 8)) {
        if (len >= 8 && nz_rd64le(b) < len && len > 9 && b[8] == '{')
            return nz_fail(err, NZ_E_FORMAT,
                           "bad magic: this is a .safetensors file, not .nzp "
                           "(pack it with `nzp pack`)");
        return nz_fail(err, len < 8 ? NZ_E_TRUNCATED : NZ_E_FORMAT, "bad magic (not an .nzp file)");
    }
    return NZ_OK;
}

/* The fixed prefix after the magic: version, flags, the header and data section it declares (which
 * must fill the image exactly), the header's checksum and zero padding. Sets m->header_len, m->data
 * and m->data_size. */
static int read_prefix(nz_model *m, nz_error *err) {
    const uint8_t *b = m->base;
    uint64_t len = m->len;
    if (len < NZ_CONTAINER_PREFIX)
        return nz_fail(err, NZ_E_TRUNCATED, "truncated: %" PRIu64 " bytes, shorter than the %d-byte prefix",
                       len, NZ_CONTAINER_PREFIX);
    uint32_t version = nz_rd32le(b + 8), flags = nz_rd32le(b + 12);
    if (version != NZ_CONTAINER_VERSION)
        return nz_fail(err, NZ_E_UNSUPPORTED, "unsupported version %u (this build reads version %d)", version,
                       NZ_CONTAINER_VERSION);
    if (flags) return nz_fail(err, NZ_E_UNSUPPORTED, "unsupported flags 0x%x", flags);
    uint64_t hlen = nz_rd64le(b + 16), doff = nz_rd64le(b + 24), dsize = nz_rd64le(b + 32),
             hhash = nz_rd64le(b + 40);
    if (nz_rd64le(b + 48) || nz_rd64le(b + 56))
        return nz_fail(err, NZ_E_FORMAT, "reserved prefix bytes are not zero");
    if (hlen > UINT64_MAX - NZ_CONTAINER_PREFIX || doff < NZ_CONTAINER_PREFIX + hlen ||
        doff % NZ_CONTAINER_ALIGN || dsize > UINT64_MAX - doff)
        return nz_fail(err, NZ_E_FORMAT,
                       "inconsistent prefix: header_len %" PRIu64 ", data_offset %" PRIu64
                       ", data_size %" PRIu64,
                       hlen, doff, dsize);
    if (doff + dsize > len)
        return nz_fail(err, NZ_E_TRUNCATED, "truncated: file is %" PRIu64 " bytes, prefix declares %" PRIu64,
                       len, doff + dsize);
    if (doff + dsize < len)
        return nz_fail(err, NZ_E_FORMAT, "%" PRIu64 " unexpected bytes after the data section",
                       len - doff - dsize);
    if (nz_hash(b + NZ_CONTAINER_PREFIX, hlen) != hhash)
        return nz_fail(err, NZ_E_CHECKSUM, "header checksum mismatch (header damaged)");
    for (uint64_t i = NZ_CONTAINER_PREFIX + hlen; i < doff; i++)
        if (b[i]) return nz_fail(err, NZ_E_FORMAT, "padding after the header is not zero");
    m->header_len = hlen;
    m->data = b + doff;
    m->data_size = dsize;
    return NZ_OK;
}

/* The header JSON into m->root, with its optional "config" and "metadata" objects. */
static int parse_header(nz_model *m, nz_error *err) {
    nz_alloc_hook_json();
    json_error_t je;
    m->root =
        json_loadb((const char *)m->base + NZ_CONTAINER_PREFIX, m->header_len, JSON_REJECT_DUPLICATES, &je);
    if (!m->root)
        return nz_fail(err, NZ_E_FORMAT, "header JSON: %s (line %d column %d)", je.text, je.line, je.column);
    if (!json_is_object(m->root)) return nz_fail(err, NZ_E_FORMAT, "header JSON is not an object");
    m->config = json_object_get(m->root, "config");
    if (m->config && !json_is_object(m->config))
        return nz_fail(err, NZ_E_FORMAT, "header: \"config\" must be an object");
    m->metadata = json_object_get(m->root, "metadata");
    if (m->metadata && !json_is_object(m->metadata))
        return nz_fail(err, NZ_E_FORMAT, "header: \"metadata\" must be an object");
    return NZ_OK;
}

/* Blob key's entry jb into r: offset, size and xxh3, inside a data section of dsize bytes. */
static int parse_blob(const char *key, const json_t *jb, blob_ref *r, uint64_t dsize, nz_error *err) {
    char ctx[200];
    snprintf(ctx, sizeof ctx, "blob '%.160s'", key);
    r->name = key;
    int rc;
    if (!json_is_object(jb)) return nz_fail(err, NZ_E_FORMAT, "%s: not an object", ctx);
    if ((rc = get_u64(jb, "offset", &r->offset, ctx, err)) || (rc = get_u64(jb, "size", &r->size, ctx, err)))
        return rc;
    if (parse_hash(json_object_get(jb, "xxh3"), &r->hash))
        return nz_fail(err, NZ_E_FORMAT, "%s: \"xxh3\" must be 16 hex digits", ctx);
    if (r->offset % NZ_CONTAINER_ALIGN || r->offset > dsize || r->size > dsize - r->offset)
        return nz_fail(err, NZ_E_FORMAT,
                       "%s: bytes [%" PRIu64 ", +%" PRIu64 ") misaligned or outside "
                       "the data section",
                       ctx, r->offset, r->size);
    return NZ_OK;
}

/* The header's optional "blobs" object into m->b and m->nb. */
static int parse_blobs(nz_model *m, nz_error *err) {
    const json_t *blobs = json_object_get(m->root, "blobs");
    if (blobs && !json_is_object(blobs))
        return nz_fail(err, NZ_E_FORMAT, "header: \"blobs\" must be an object");
    m->nb = blobs ? json_object_size(blobs) : 0;
    m->b = nz_calloc(m->nb ? m->nb : 1, sizeof *m->b, NZ_MEM_OTHER);
    if (!m->b) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    if (!blobs) return NZ_OK;
    const char *key;
    const json_t *jb;
    size_t bi = 0;
    json_object_foreach((json_t *)blobs, key, jb) {
        int rc = parse_blob(key, jb, &m->b[bi++], m->data_size, err);
        if (rc) return rc;
    }
    return NZ_OK;
}

/* No two of m's tensors have the same name. */
static int check_unique_names(const nz_model *m, nz_error *err) {
    if (m->nt < 2) return NZ_OK;
    const char **names = nz_malloc(m->nt * sizeof *names, NZ_MEM_OTHER);
    if (!names) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    for (size_t i = 0; i < m->nt; i++) names[i] = m->t[i].name;
    qsort(names, m->nt, sizeof *names, name_cmp);
    int rc = NZ_OK;
    for (size_t i = 1; i < m->nt && !rc; i++)
        if (!strcmp(names[i - 1], names[i]))
            rc = nz_fail(err, NZ_E_FORMAT, "duplicate tensor name '%.200s'", names[i]);
    nz_free(names);
    return rc;
}

/* The header's "tensors" array into m->t and m->nt, names unique. */
static int parse_tensors(nz_model *m, nz_error *err) {
    const json_t *tensors = json_object_get(m->root, "tensors");
    if (!json_is_array(tensors)) return nz_fail(err, NZ_E_FORMAT, "header: \"tensors\" must be an array");
    m->nt = json_array_size(tensors);
    m->t = nz_calloc(m->nt ? m->nt : 1, sizeof *m->t, NZ_MEM_OTHER);
    if (!m->t) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    for (size_t i = 0; i < m->nt; i++) {
        int rc = parse_tensor(m, json_array_get(tensors, i), i, &m->t[i], err);
        if (rc) return rc;
    }
    return check_unique_names(m, err);
}

static int load(nz_model *m, nz_error *err) {
    int rc;
    if ((rc = check_magic(m->base, m->len, err)) || (rc = read_prefix(m, err)) ||
        (rc = parse_header(m, err)) || (rc = parse_blobs(m, err)) || (rc = parse_tensors(m, err)))
        return rc;
    return check_overlaps(m, err);
}

/* The verify-once bitmap (after a successful load). */
static int init_verified(nz_model *m, nz_error *err) {
    m->tile_base = nz_calloc(m->nt ? m->nt : 1, sizeof *m->tile_base, NZ_MEM_OTHER);
    if (!m->tile_base) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    uint64_t total = 0;
    for (size_t i = 0; i < m->nt; i++) {
        m->tile_base[i] = total;
        total += m->t[i].ntiles;
    }
    m->vbits = nz_calloc((size_t)(total / 64 + 1), sizeof *m->vbits, NZ_MEM_OTHER);
    if (!m->vbits) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    const char *e = getenv("NZ_VERIFY");
    atomic_store(&m->verify, e && !strcmp(e, "always") ? NZ_VERIFY_ALWAYS : NZ_VERIFY_ONCE);
    return NZ_OK;
}

int nz_model_load_buffer(const uint8_t *buf, size_t len, nz_model **out, nz_error *err) {
    *out = NULL;
    if (!buf && len) return nz_fail(err, NZ_E_INVALID_ARG, "NULL buffer");
    nz_model *m = nz_calloc(1, sizeof *m, NZ_MEM_OTHER);
    if (!m) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    m->base = buf;
    m->len = len;
    int rc = load(m, err);
    if (!rc) rc = init_verified(m, err);
    if (rc) {
        nz_model_free(m);
        return rc;
    }
    *out = m;
    return NZ_OK;
}

int nz_model_open(const char *path, nz_model **out, nz_error *err) {
    *out = NULL;
    const uint8_t *map;
    size_t len;
    int rc = nz_map_file(path, &map, &len, err);
    if (rc) return rc;
    nz_model *m = nz_calloc(1, sizeof *m, NZ_MEM_OTHER);
    if (!m) {
        nz_unmap_file(map, len);
        return nz_fail(err, NZ_E_NOMEM, "out of memory");
    }
    m->base = map;
    m->len = len;
    m->map = map;
    nz_mem_map_register(map, len);
    rc = load(m, err);
    if (!rc) rc = init_verified(m, err);
    if (rc) {
        nz_fail_prefix(err, "%s", path);
        nz_model_free(m);
        return rc;
    }
    *out = m;
    return NZ_OK;
}

void nz_model_free(nz_model *m) {
    if (!m) return;
    if (m->t)
        for (size_t i = 0; i < m->nt; i++) nz_free(m->t[i].tiles);
    nz_free(m->t);
    nz_free(m->b);
    nz_free(m->tile_base);
    nz_free((void *)m->vbits);
    json_decref(m->root);
    if (m->map) nz_mem_map_unregister(m->map, m->len);
    nz_unmap_file(m->map, m->len);
    nz_free(m);
}

size_t nz_model_ntensors(const nz_model *m) { return m->nt; }
const nz_tensor *nz_model_tensor(const nz_model *m, size_t i) { return i < m->nt ? &m->t[i] : NULL; }
const json_t *nz_model_config(const nz_model *m) { return m->config; }
const json_t *nz_model_metadata(const nz_model *m) { return m->metadata; }
uint64_t nz_model_file_size(const nz_model *m) { return m->len; }
uint64_t nz_model_header_size(const nz_model *m) { return m->header_len; }
size_t nz_model_nblobs(const nz_model *m) { return m->nb; }
const char *nz_model_blob_name(const nz_model *m, size_t i) { return i < m->nb ? m->b[i].name : NULL; }

long nz_model_find(const nz_model *m, const char *name) {
    for (size_t i = 0; i < m->nt; i++)
        if (!strcmp(m->t[i].name, name)) return (long)i;
    return -1;
}

/* *h = nz_hash(p, n) of mapped bytes. @return NZ_OK, or NZ_E_IO when the file changed under us. */
static int mapped_hash(const uint8_t *p, size_t n, uint64_t *h, nz_error *err) {
    volatile int rc = NZ_OK; /* set again after a fault's jump */
    NZ_MAPPED(rc, err, *h = nz_hash(p, n));
    return rc;
}

int nz_model_blob(const nz_model *m, const char *name, const uint8_t **data, size_t *size, nz_error *err) {
    for (size_t i = 0; i < m->nb; i++) {
        if (strcmp(m->b[i].name, name)) continue;
        const uint8_t *p = m->data + m->b[i].offset;
        uint64_t h = 0;
        int rc = mapped_hash(p, m->b[i].size, &h, err);
        if (rc) {
            nz_fail_prefix(err, "blob '%s'", name);
            return rc;
        }
        if (h != m->b[i].hash) return nz_fail(err, NZ_E_CHECKSUM, "blob '%s': checksum mismatch", name);
        *data = p;
        *size = m->b[i].size;
        return NZ_OK;
    }
    return nz_fail(err, NZ_E_NOT_FOUND, "no embedded file '%s'", name);
}

int nz_model_tile(const nz_model *m, size_t ti, uint64_t t, const uint8_t **data, size_t *size,
                  nz_error *err) {
    if (ti >= m->nt) return nz_fail(err, NZ_E_INVALID_ARG, "tensor index %zu out of range", ti);
    const nz_tensor *x = &m->t[ti];
    if (t >= x->ntiles)
        return nz_fail(err, NZ_E_INVALID_ARG,
                       "tensor '%s': tile %" PRIu64 " out of range (%" PRIu64 " tiles)", x->name, t,
                       x->ntiles);
    const nz_tile_ref *r = &x->tiles[t];
    const uint8_t *p = m->data + r->offset;
    uint64_t h = 0;
    int rc = mapped_hash(p, r->size, &h, err);
    if (rc) {
        nz_fail_prefix(err, "tensor '%s' tile %" PRIu64, x->name, t);
        return rc;
    }
    if (h != r->hash)
        return nz_fail(err, NZ_E_CHECKSUM, "tensor '%s' tile %" PRIu64 ": checksum mismatch", x->name, t);
    *data = p;
    *size = r->size;
    return NZ_OK;
}

int nz_model_tile_once(const nz_model *m, size_t ti, uint64_t t, const uint8_t **data, size_t *size,
                       nz_error *err) {
    if (ti >= m->nt || t >= m->t[ti].ntiles || atomic_load(&((nz_model *)m)->verify) == NZ_VERIFY_ALWAYS)
        return nz_model_tile(m, ti, t, data, size, err);
    uint64_t bit = m->tile_base[ti] + t, mask = (uint64_t)1 << (bit % 64);
    _Atomic uint64_t *word = &m->vbits[bit / 64];
    if (!(atomic_load_explicit(word, memory_order_acquire) & mask)) {
        int rc = nz_model_tile(m, ti, t, data, size, err);
        if (rc) return rc; /* a mismatch is never remembered: the next use checks again */
        atomic_fetch_or_explicit(word, mask, memory_order_release);
        return NZ_OK;
    }
    const nz_tile_ref *r = &m->t[ti].tiles[t];
    *data = m->data + r->offset;
    *size = r->size;
    return NZ_OK;
}

int nz_model_verify_tiles(const nz_model *m, nz_error *err) {
    for (size_t ti = 0; ti < m->nt; ti++)
        for (uint64_t t = 0; t < m->t[ti].ntiles; t++) {
            const uint8_t *p;
            size_t n;
            int rc = nz_model_tile_once(m, ti, t, &p, &n, err);
            if (rc) return rc;
        }
    return NZ_OK;
}

int nz_model_faulted(const nz_model *m) { return m && m->map && nz_guard_faulted(m->map); }

void nz_model_set_verify(nz_model *m, nz_verify_policy p) {
    if (m) atomic_store(&m->verify, (int)p);
}

static int decode(const nz_model *m, nz_dctx *dc, size_t ti, uint64_t t, void *out, int native,
                  nz_error *err) {
    const uint8_t *p;
    size_t n;
    int rc = nz_model_tile(m, ti, t, &p, &n, err);
    if (rc) return rc;
    const nz_tensor *x = &m->t[ti];
    NZ_MAPPED(rc, err,
              rc = native ? nz_tile_decode_native(dc, &x->desc, t, p, n, out, err)
                          : nz_tile_decode_f32(dc, &x->desc, t, p, n, out, err));
    if (rc) nz_fail_prefix(err, "tensor '%s' tile %" PRIu64, x->name, t);
    return rc;
}

int nz_model_decode_f32(const nz_model *m, nz_dctx *dc, size_t ti, uint64_t t, float *out, nz_error *err) {
    return decode(m, dc, ti, t, out, 0, err);
}

int nz_model_decode_native(const nz_model *m, nz_dctx *dc, size_t ti, uint64_t t, void *out, nz_error *err) {
    return decode(m, dc, ti, t, out, 1, err);
}

/* The bytes between the n sorted regions r must be zero. */
static int padding_scan(const nz_model *m, const region *r, size_t n, nz_error *err) {
    uint64_t pos = 0;
    for (size_t i = 0; i <= n; i++) {
        uint64_t stop = i < n ? r[i].off : m->data_size;
        for (; pos < stop; pos++)
            if (m->data[pos])
                return nz_fail(err, NZ_E_FORMAT, "padding byte at data offset %" PRIu64 " is not zero", pos);
        if (i < n && r[i].end > pos) pos = r[i].end;
    }
    return NZ_OK;
}

int nz_model_check_padding(const nz_model *m, nz_error *err) {
    size_t n;
    region *r = sorted_regions(m, &n);
    if (!r) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    int rc = NZ_OK;
    NZ_MAPPED(rc, err, rc = padding_scan(m, r, n, err));
    nz_free(r);
    return rc;
}

/*
 * nz_safetensors.c — safetensors reader and writer.
 *
 * Reader: nz_st_parse() validates a whole image before returning anything,
 * so callers can trust every nz_st_tensor (data lies inside the buffer,
 * size == nelem * elem_size, no two non-empty tensors share a byte).
 * Tensor names are copied into one block; the "__metadata__" object is kept
 * alive by reference after the rest of the JSON is freed.
 *
 * Zero-size tensors hold no bytes, so they never overlap anything.
 *
 * Writer: the header is written up front (offsets are known from the shapes),
 * then the data arrives in order through nz_st_writer_put(); one put never
 * spans two tensors, so a caller that miscounts is stopped at the tensor it
 * got wrong. Everything goes to "<path>.tmp.<pid>", which is renamed over
 * path only by a successful nz_st_writer_close() (after fsync), so a failed
 * or aborted write never leaves a partial file at path.
 */
#include "nz_safetensors.h"

#include "nz_alloc.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ST_METADATA_KEY "__metadata__"

/* ------------------------------------------------------------------------ */
/* dtypes                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct {
    const char *name;
    size_t size;
    nz_dtype dt;
} st_dtype_info;

static const st_dtype_info k_dtypes[] = {
    {"BOOL", 1, NZ_DT_OTHER},    {"U8", 1, NZ_DT_OTHER},      {"I8", 1, NZ_DT_OTHER},
    {"F8_E4M3", 1, NZ_DT_OTHER}, {"F8_E5M2", 1, NZ_DT_OTHER}, {"I16", 2, NZ_DT_OTHER},
    {"U16", 2, NZ_DT_OTHER},     {"F16", 2, NZ_DT_F16},       {"BF16", 2, NZ_DT_BF16},
    {"I32", 4, NZ_DT_OTHER},     {"U32", 4, NZ_DT_OTHER},     {"F32", 4, NZ_DT_F32},
    {"I64", 8, NZ_DT_OTHER},     {"U64", 8, NZ_DT_OTHER},     {"F64", 8, NZ_DT_OTHER},
};

static const st_dtype_info *dtype_lookup(const char *s) {
    for (size_t i = 0; i < sizeof k_dtypes / sizeof k_dtypes[0]; i++)
        if (strcmp(k_dtypes[i].name, s) == 0) return &k_dtypes[i];
    return NULL;
}

size_t nz_st_dtype_size(const char *st_dtype) {
    const st_dtype_info *d = st_dtype ? dtype_lookup(st_dtype) : NULL;
    return d ? d->size : 0;
}

/* ------------------------------------------------------------------------ */
/* small helpers                                                            */
/* ------------------------------------------------------------------------ */

/* Names go into fixed-size messages: keep long ones from crowding out the
 * actual problem. */
#define ST_NAME_SHOW 96

static const char *show_name(const char *name, char buf[ST_NAME_SHOW + 4]) {
    size_t n = strlen(name);
    if (n <= ST_NAME_SHOW) return name;
    memcpy(buf, name, ST_NAME_SHOW);
    memcpy(buf + ST_NAME_SHOW, "...", 4);
    return buf;
}

/* "[2, 3]" into buf (always NUL-terminated, truncated if it must be). */
static void format_shape(char *buf, size_t cap, const int64_t *shape, int ndim) {
    size_t pos = 0;
    buf[0] = '\0';
    for (int i = -1; i <= ndim && pos < cap; i++) {
        int k;
        if (i < 0)
            k = snprintf(buf + pos, cap - pos, "[");
        else if (i == ndim)
            k = snprintf(buf + pos, cap - pos, "]");
        else
            k = snprintf(buf + pos, cap - pos, "%s%" PRId64, i ? ", " : "", shape[i]);
        if (k < 0) return;
        pos += (size_t)k;
    }
}

/* Product of dims with overflow checking; a zero dim makes the product 0
 * whatever the others are. @return 0, or -1 on overflow. */
static int shape_nelem(const int64_t *shape, int ndim, uint64_t *out) {
    uint64_t n = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0) {
            *out = 0;
            return 0;
        }
    for (int i = 0; i < ndim; i++) {
        uint64_t d = (uint64_t)shape[i];
        if (n > UINT64_MAX / d) return -1;
        n *= d;
    }
    *out = n;
    return 0;
}

static const char *json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a real number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "?";
}

/* Check that a metadata object holds only string values. */
static int check_metadata(const json_t *md, int code, const char *who, nz_error *err) {
    if (!json_is_object(md))
        return nz_fail(err, code, "%s: %s must be an object, got %s", who, ST_METADATA_KEY, json_kind(md));
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)md, key, val) {
        if (!json_is_string(val)) {
            char nb[ST_NAME_SHOW + 4];
            return nz_fail(err, code, "%s: %s value for key '%s' must be a string, got %s", who,
                           ST_METADATA_KEY, show_name(key, nb), json_kind(val));
        }
    }
    return NZ_OK;
}

/* ------------------------------------------------------------------------ */
/* reader                                                                   */
/* ------------------------------------------------------------------------ */

struct nz_st_file {
    nz_st_tensor *t;              /* [n], ascending offset (ties: name) */
    const nz_st_tensor **by_name; /* [n], ascending name, for nz_st_find */
    size_t n;
    char *names;        /* every name, NUL-separated */
    json_t *metadata;   /* own reference, or NULL */
    const uint8_t *map; /* nz_st_open's mapping, or NULL */
    size_t map_len;
};

static int cmp_offset(const void *a, const void *b) {
    const nz_st_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_name(const void *a, const void *b) {
    const nz_st_tensor *x = *(const nz_st_tensor *const *)a;
    const nz_st_tensor *y = *(const nz_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

/* Fill t from the header entry of one tensor; t->name is already set.
 * data_size is the size of the data section; who starts every message. */
static int parse_tensor(const json_t *entry, uint64_t data_size, nz_st_tensor *t, const char *who,
                        nz_error *err) {
    char nb[ST_NAME_SHOW + 4];
    const char *name = show_name(t->name, nb);

    if (!json_is_object(entry))
        return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': entry must be an object, got %s", who, name,
                       json_kind(entry));

    /* dtype */
    const json_t *jd = json_object_get(entry, "dtype");
    if (!jd) return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': missing \"dtype\"", who, name);
    if (!json_is_string(jd))
        return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': \"dtype\" must be a string, got %s", who, name,
                       json_kind(jd));
    const st_dtype_info *di = dtype_lookup(json_string_value(jd));
    if (!di)
        return nz_fail(err, NZ_E_UNSUPPORTED, "%s: tensor '%s': unknown dtype '%.32s'", who, name,
                       json_string_value(jd));
    snprintf(t->st_dtype, sizeof t->st_dtype, "%s", di->name);
    t->dt = di->dt;
    t->elem_size = di->size;

    /* shape */
    const json_t *js = json_object_get(entry, "shape");
    if (!js) return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': missing \"shape\"", who, name);
    if (!json_is_array(js))
        return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': \"shape\" must be an array, got %s", who, name,
                       json_kind(js));
    size_t ndim = json_array_size(js);
    if (ndim > NZ_MAX_DIMS)
        return nz_fail(err, NZ_E_UNSUPPORTED, "%s: tensor '%s': %zu dims (at most %d supported)", who, name,
                       ndim, NZ_MAX_DIMS);
    t->ndim = (int)ndim;
    for (size_t i = 0; i < ndim; i++) {
        const json_t *jv = json_array_get(js, i);
        if (!json_is_integer(jv))
            return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': shape[%zu] must be an integer, got %s", who,
                           name, i, json_kind(jv));
        json_int_t v = json_integer_value(jv);
        if (v < 0)
            return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': shape[%zu] is negative (%lld)", who, name, i,
                           (long long)v);
        t->shape[i] = (int64_t)v;
    }
    char sb[128];
    format_shape(sb, sizeof sb, t->shape, t->ndim);
    if (shape_nelem(t->shape, t->ndim, &t->nelem) != 0 || t->nelem > UINT64_MAX / t->elem_size)
        return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': shape %s x %s overflows 64 bits", who, name, sb,
                       t->st_dtype);
    t->size = t->nelem * t->elem_size;

    /* data_offsets */
    const json_t *jo = json_object_get(entry, "data_offsets");
    if (!jo) return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': missing \"data_offsets\"", who, name);
    if (!json_is_array(jo) || json_array_size(jo) != 2)
        return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': \"data_offsets\" must be an array [begin, end]",
                       who, name);
    json_int_t off[2];
    for (size_t i = 0; i < 2; i++) {
        const json_t *jv = json_array_get(jo, i);
        if (!json_is_integer(jv))
            return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': data_offsets[%zu] must be an integer, got %s",
                           who, name, i, json_kind(jv));
        off[i] = json_integer_value(jv);
        if (off[i] < 0)
            return nz_fail(err, NZ_E_FORMAT, "%s: tensor '%s': data_offsets[%zu] is negative (%lld)", who,
                           name, i, (long long)off[i]);
    }
    uint64_t begin = (uint64_t)off[0], end = (uint64_t)off[1];
    if (begin > end)
        return nz_fail(err, NZ_E_FORMAT,
                       "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] end before begin", who, name,
                       begin, end);
    if (end - begin != t->size)
        return nz_fail(err, NZ_E_FORMAT,
                       "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                       "] do not match shape %s x %s (%" PRIu64 " bytes)",
                       who, name, begin, end, sb, t->st_dtype, t->size);
    if (end > data_size)
        return nz_fail(err, NZ_E_TRUNCATED,
                       "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                       "] beyond the data section (%" PRIu64 " bytes)",
                       who, name, begin, end, data_size);
    t->offset = begin;
    return NZ_OK;
}

/* Build f from the already-loaded header root. */
static int parse_header(json_t *root, const uint8_t *data, uint64_t data_size, nz_st_file *f, const char *who,
                        nz_error *err) {
    const char *key;
    json_t *val;

    /* Count tensors and the bytes their names need. */
    size_t n = 0, name_bytes = 0;
    json_object_foreach(root, key, val) {
        if (strcmp(key, ST_METADATA_KEY) == 0) continue;
        n++;
        name_bytes += strlen(key) + 1;
    }

    json_t *md = json_object_get(root, ST_METADATA_KEY);
    if (md && !json_is_null(md)) {
        int rc = check_metadata(md, NZ_E_FORMAT, who, err);
        if (rc != NZ_OK) return rc;
        f->metadata = json_incref(md);
    }

    f->t = nz_calloc(n ? n : 1, sizeof *f->t, NZ_MEM_OTHER);
    f->by_name = nz_calloc(n ? n : 1, sizeof *f->by_name, NZ_MEM_OTHER);
    f->names = nz_malloc(name_bytes ? name_bytes : 1, NZ_MEM_OTHER);
    if (!f->t || !f->by_name || !f->names)
        return nz_fail(err, NZ_E_NOMEM, "%s: out of memory for %zu tensors", who, n);

    char *np = f->names;
    json_object_foreach(root, key, val) {
        if (strcmp(key, ST_METADATA_KEY) == 0) continue;
        nz_st_tensor *t = &f->t[f->n++];
        size_t len = strlen(key) + 1;
        memcpy(np, key, len);
        t->name = np;
        np += len;
        int rc = parse_tensor(val, data_size, t, who, err);
        if (rc != NZ_OK) return rc;
    }

    /* Offset order; a non-empty tensor must start at or after the end of
     * every earlier one. Empty tensors hold no bytes and overlap nothing. */
    qsort(f->t, f->n, sizeof *f->t, cmp_offset);
    const nz_st_tensor *last = NULL;
    for (size_t i = 0; i < f->n; i++) {
        nz_st_tensor *t = &f->t[i];
        t->data = data + t->offset;
        f->by_name[i] = t;
        if (t->size == 0) continue;
        if (last && t->offset < last->offset + last->size) {
            char nb1[ST_NAME_SHOW + 4], nb2[ST_NAME_SHOW + 4];
            return nz_fail(err, NZ_E_FORMAT,
                           "%s: tensor '%s' [%" PRIu64 ", %" PRIu64 "] overlaps tensor '%s' [%" PRIu64
                           ", %" PRIu64 "]",
                           who, show_name(t->name, nb1), t->offset, t->offset + t->size,
                           show_name(last->name, nb2), last->offset, last->offset + last->size);
        }
        last = t;
    }
    qsort(f->by_name, f->n, sizeof *f->by_name, cmp_name);
    return NZ_OK;
}

/* nz_st_parse with who ("safetensors" or "safetensors: <path>") starting
 * every message. */
static int st_parse(const uint8_t *buf, size_t len, const char *who, nz_st_file **out, nz_error *err) {
    if (len == 0) return nz_fail(err, NZ_E_TRUNCATED, "%s: empty file", who);
    if (len < 8)
        return nz_fail(err, NZ_E_TRUNCATED, "%s: truncated: %zu bytes, shorter than the 8-byte header length",
                       who, len);

    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
    if (hlen > len - 8)
        return nz_fail(err, NZ_E_TRUNCATED, "%s: header length %" PRIu64 " exceeds file size %zu", who, hlen,
                       len);

    nz_alloc_hook_json();
    json_error_t je;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return nz_fail(err, NZ_E_FORMAT,
                       "%s: header is not valid JSON: %s (line %d, column %d, header byte %d)", who, je.text,
                       je.line, je.column, je.position);
    if (!json_is_object(root)) {
        int rc = nz_fail(err, NZ_E_FORMAT, "%s: header must be a JSON object, got %s", who, json_kind(root));
        json_decref(root);
        return rc;
    }

    nz_st_file *f = nz_calloc(1, sizeof *f, NZ_MEM_OTHER);
    if (!f) {
        json_decref(root);
        return nz_fail(err, NZ_E_NOMEM, "%s: out of memory", who);
    }
    const uint8_t *data = buf + 8 + hlen;
    int rc = parse_header(root, data, (uint64_t)(len - 8 - hlen), f, who, err);
    json_decref(root);
    if (rc != NZ_OK) {
        nz_st_free(f);
        return rc;
    }
    *out = f;
    return NZ_OK;
}

int nz_st_parse(const uint8_t *buf, size_t len, nz_st_file **out, nz_error *err) {
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors: out is NULL");
    *out = NULL;
    if (!buf && len) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors: buf is NULL");
    return st_parse(buf, len, "safetensors", out, err);
}

int nz_st_open(const char *path, nz_st_file **out, nz_error *err) {
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors: out is NULL");
    *out = NULL;
    if (!path) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors: path is NULL");
    /* every message names the file; a very long path keeps its tail */
    char who[NZ_ERROR_MSG_MAX / 2];
    size_t plen = strlen(path), keep = sizeof who - 20;
    snprintf(who, sizeof who, "safetensors: %s%s", plen > keep ? "..." : "",
             plen > keep ? path + plen - keep : path);

    const uint8_t *map;
    size_t len;
    int rc = nz_map_file(path, &map, &len, err);
    if (rc) return nz_fail_prefix(err, "safetensors");
    if (len == 0) return nz_fail(err, NZ_E_TRUNCATED, "%s: empty file", who);

    nz_st_file *f = NULL;
    rc = st_parse(map, len, who, &f, err);
    if (rc != NZ_OK) {
        nz_unmap_file(map, len);
        return rc;
    }
    f->map = map;
    f->map_len = len;
    *out = f;
    return NZ_OK;
}

void nz_st_free(nz_st_file *f) {
    if (!f) return;
    if (f->metadata) json_decref(f->metadata);
    nz_unmap_file(f->map, f->map_len);
    nz_free(f->t);
    nz_free(f->by_name);
    nz_free(f->names);
    nz_free(f);
}

size_t nz_st_count(const nz_st_file *f) { return f ? f->n : 0; }

const nz_st_tensor *nz_st_get(const nz_st_file *f, size_t i) { return f && i < f->n ? &f->t[i] : NULL; }

const nz_st_tensor *nz_st_find(const nz_st_file *f, const char *name) {
    if (!f || !name) return NULL;
    size_t lo = 0, hi = f->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->by_name[mid]->name);
        if (c == 0) return f->by_name[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const json_t *nz_st_metadata(const nz_st_file *f) { return f ? f->metadata : NULL; }

/* ------------------------------------------------------------------------ */
/* writer                                                                   */
/* ------------------------------------------------------------------------ */

struct nz_st_writer {
    FILE *fp;
    char *path;     /* final destination */
    char *tmp;      /* path.tmp.<pid>, renamed to path by close */
    size_t n;       /* tensors */
    char **names;   /* [n], for messages */
    uint64_t *size; /* [n] bytes each tensor needs */
    size_t cur;     /* tensor now receiving bytes */
    uint64_t done;  /* bytes of tensor cur received so far */
    int failed;     /* an I/O error happened: close must fail */
};

static void writer_free(nz_st_writer *w) {
    if (!w) return;
    if (w->names)
        for (size_t i = 0; i < w->n; i++) nz_free(w->names[i]);
    nz_free(w->names);
    nz_free(w->size);
    nz_free(w->path);
    nz_free(w->tmp);
    nz_free(w);
}

/* Skip tensors that are already complete (including empty ones). */
static void writer_advance(nz_st_writer *w) {
    while (w->cur < w->n && w->done == w->size[w->cur]) {
        w->cur++;
        w->done = 0;
    }
}

/* Add tensor o (index i, data at offset *off) to the header root; records
 * its byte count in w->size[i] and advances *off. @return NZ_OK or an error. */
static int add_tensor(json_t *root, const nz_st_out *o, size_t i, uint64_t *off, nz_st_writer *w,
                      nz_error *err) {
    if (!o->name) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: tensor %zu has no name", i);
    char nb[ST_NAME_SHOW + 4];
    const char *name = show_name(o->name, nb);
    if (strcmp(o->name, ST_METADATA_KEY) == 0)
        return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: tensor name '%s' is reserved",
                       ST_METADATA_KEY);
    if (json_object_get(root, o->name))
        return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: duplicate tensor name '%s'", name);
    const st_dtype_info *di = o->st_dtype ? dtype_lookup(o->st_dtype) : NULL;
    if (!di)
        return nz_fail(err, NZ_E_UNSUPPORTED, "safetensors writer: tensor '%s': unknown dtype '%.32s'", name,
                       o->st_dtype ? o->st_dtype : "(null)");
    if (o->ndim < 0 || o->ndim > NZ_MAX_DIMS)
        return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: tensor '%s': ndim %d out of range 0..%d",
                       name, o->ndim, NZ_MAX_DIMS);
    for (int d = 0; d < o->ndim; d++)
        if (o->shape[d] < 0)
            return nz_fail(err, NZ_E_INVALID_ARG,
                           "safetensors writer: tensor '%s': shape[%d] is negative (%" PRId64 ")", name, d,
                           o->shape[d]);
    uint64_t nelem = 0;
    if (shape_nelem(o->shape, o->ndim, &nelem) != 0 || nelem > UINT64_MAX / di->size ||
        nelem * di->size > (uint64_t)INT64_MAX - *off)
        return nz_fail(err, NZ_E_RANGE, "safetensors writer: tensor '%s': size overflows 64 bits", name);
    uint64_t size = nelem * di->size;

    json_t *e = json_object(), *shape = json_array(), *offs = json_array();
    int bad = !e || !shape || !offs;
    for (int d = 0; !bad && d < o->ndim; d++)
        bad = json_array_append_new(shape, json_integer((json_int_t)o->shape[d])) != 0;
    bad = bad || json_array_append_new(offs, json_integer((json_int_t)*off)) != 0 ||
          json_array_append_new(offs, json_integer((json_int_t)(*off + size))) != 0 ||
          json_object_set_new(e, "dtype", json_string(di->name)) != 0;
    /* set_new takes over the value's reference even when it fails */
    bad = json_object_set_new(e, "shape", shape) != 0 || bad;
    bad = json_object_set_new(e, "data_offsets", offs) != 0 || bad;
    if (bad) {
        json_decref(e);
        return nz_fail(err, NZ_E_NOMEM, "safetensors writer: tensor '%s': out of memory", name);
    }
    /* fails for keys that are not valid UTF-8 (or when out of memory) */
    if (json_object_set_new(root, o->name, e) != 0)
        return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: tensor name '%s' is not valid UTF-8",
                       name);
    w->size[i] = size;
    *off += size;
    return NZ_OK;
}

/* Build the header object for t[0..n), offsets consecutive in that order.
 * @return NZ_OK and *root_out, or an error. */
static int build_header(const nz_st_out *t, size_t n, const json_t *metadata, nz_st_writer *w,
                        json_t **root_out, nz_error *err) {
    json_t *root = json_object();
    if (!root) return nz_fail(err, NZ_E_NOMEM, "safetensors writer: out of memory");
    int rc = NZ_OK;
    if (metadata) {
        rc = check_metadata(metadata, NZ_E_INVALID_ARG, "safetensors writer", err);
        json_t *copy = rc == NZ_OK ? json_deep_copy(metadata) : NULL;
        if (rc == NZ_OK && (!copy || json_object_set_new(root, ST_METADATA_KEY, copy) != 0))
            rc = nz_fail(err, NZ_E_NOMEM, "safetensors writer: out of memory");
    }
    uint64_t off = 0;
    for (size_t i = 0; rc == NZ_OK && i < n; i++) rc = add_tensor(root, &t[i], i, &off, w, err);
    if (rc != NZ_OK) {
        json_decref(root);
        return rc;
    }
    *root_out = root;
    return NZ_OK;
}

int nz_st_writer_open(const char *path, const nz_st_out *t, size_t n, const json_t *metadata,
                      nz_st_writer **out, nz_error *err) {
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: out is NULL");
    *out = NULL;
    if (!path) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: path is NULL");
    if (!t && n) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: tensors are NULL");
    nz_alloc_hook_json();

    nz_st_writer *w = nz_calloc(1, sizeof *w, NZ_MEM_OTHER);
    if (!w) return nz_fail(err, NZ_E_NOMEM, "safetensors writer: out of memory");
    w->n = n;
    w->names = nz_calloc(n ? n : 1, sizeof *w->names, NZ_MEM_OTHER);
    w->size = nz_calloc(n ? n : 1, sizeof *w->size, NZ_MEM_OTHER);
    w->path = nz_strdup(path);
    size_t tmp_cap = strlen(path) + 32;
    w->tmp = nz_malloc(tmp_cap, NZ_MEM_OTHER);
    if (!w->names || !w->size || !w->path || !w->tmp) {
        writer_free(w);
        return nz_fail(err, NZ_E_NOMEM, "safetensors writer: out of memory");
    }
    snprintf(w->tmp, tmp_cap, "%s.tmp.%ld", path, (long)getpid());

    json_t *root = NULL;
    int rc = build_header(t, n, metadata, w, &root, err);
    if (rc != NZ_OK) {
        writer_free(w);
        return rc;
    }
    for (size_t i = 0; i < n; i++)
        if (!(w->names[i] = nz_strdup(t[i].name))) {
            json_decref(root);
            writer_free(w);
            return nz_fail(err, NZ_E_NOMEM, "safetensors writer: out of memory");
        }

    char *hdr = json_dumps(root, JSON_PRESERVE_ORDER | JSON_COMPACT);
    json_decref(root);
    json_free_t json_free_fn; /* json_dumps allocates with jansson's allocator */
    json_get_alloc_funcs(NULL, &json_free_fn);
    if (!hdr) {
        writer_free(w);
        return nz_fail(err, NZ_E_NOMEM, "safetensors writer: out of memory for the header");
    }
    /* Pad with spaces so the data section starts 8-byte aligned. */
    size_t hlen = strlen(hdr);
    size_t pad = (8 - hlen % 8) % 8;
    uint64_t total = (uint64_t)(hlen + pad);
    uint8_t lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (uint8_t)(total >> (8 * i));

    /* Truncate rather than O_EXCL: a crashed earlier run with the same pid
     * (common in containers) must not block this one. */
    w->fp = fopen(w->tmp, "wb");
    if (!w->fp) {
        rc = nz_fail(err, NZ_E_IO, "safetensors writer: %s: create: %s", w->tmp, strerror(errno));
        json_free_fn(hdr);
        writer_free(w);
        return rc;
    }
    int ok = fwrite(lenbuf, 1, 8, w->fp) == 8 && fwrite(hdr, 1, hlen, w->fp) == hlen &&
             fwrite("        ", 1, pad, w->fp) == pad;
    int e = errno;
    json_free_fn(hdr);
    if (!ok) {
        nz_st_writer_abort(w);
        return nz_fail(err, NZ_E_IO, "safetensors writer: %s: write header: %s", path, strerror(e));
    }
    writer_advance(w);
    *out = w;
    return NZ_OK;
}

int nz_st_writer_put(nz_st_writer *w, const void *data, size_t size, nz_error *err) {
    if (!w) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: writer is NULL");
    if (w->failed) return nz_fail(err, NZ_E_IO, "safetensors writer: %s: an earlier write failed", w->path);
    if (size == 0) return NZ_OK;
    if (!data) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: data is NULL");
    if (w->cur >= w->n)
        return nz_fail(err, NZ_E_RANGE,
                       "safetensors writer: %s: %zu bytes given after all %zu tensors are complete", w->path,
                       size, w->n);
    uint64_t left = w->size[w->cur] - w->done;
    if ((uint64_t)size > left) {
        char nb[ST_NAME_SHOW + 4];
        return nz_fail(err, NZ_E_RANGE,
                       "safetensors writer: tensor '%s': %zu bytes given but only %" PRIu64 " of %" PRIu64
                       " remain",
                       show_name(w->names[w->cur], nb), size, left, w->size[w->cur]);
    }
    if (fwrite(data, 1, size, w->fp) != size) {
        w->failed = 1;
        return nz_fail(err, NZ_E_IO, "safetensors writer: %s: write: %s", w->tmp, strerror(errno));
    }
    w->done += size;
    writer_advance(w);
    return NZ_OK;
}

int nz_st_writer_close(nz_st_writer *w, nz_error *err) {
    if (!w) return nz_fail(err, NZ_E_INVALID_ARG, "safetensors writer: writer is NULL");
    int rc = NZ_OK;
    if (w->failed) {
        rc = nz_fail(err, NZ_E_IO, "safetensors writer: %s: an earlier write failed", w->path);
    } else if (w->cur < w->n) {
        char nb[ST_NAME_SHOW + 4];
        rc = nz_fail(err, NZ_E_TRUNCATED,
                     "safetensors writer: tensor '%s': received %" PRIu64 " of %" PRIu64 " bytes",
                     show_name(w->names[w->cur], nb), w->done, w->size[w->cur]);
    }
    if (rc != NZ_OK) {
        nz_st_writer_abort(w);
        return rc;
    }

    const char *step = "flush";
    int ok = fflush(w->fp) == 0;
    if (ok) {
        step = "fsync";
        ok = fsync(fileno(w->fp)) == 0 || errno == EINVAL || errno == EROFS;
    }
    int e = errno;
    if (fclose(w->fp) != 0 && ok) {
        step = "close";
        ok = 0;
        e = errno;
    }
    w->fp = NULL;
    if (ok && rename(w->tmp, w->path) != 0) {
        step = "rename";
        ok = 0;
        e = errno;
    }
    if (!ok) {
        rc = nz_fail(err, NZ_E_IO, "safetensors writer: %s: %s: %s", w->path, step, strerror(e));
        unlink(w->tmp);
    }
    writer_free(w);
    return rc;
}

void nz_st_writer_abort(nz_st_writer *w) {
    if (!w) return;
    if (w->fp) fclose(w->fp);
    unlink(w->tmp);
    writer_free(w);
}

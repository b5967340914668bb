/*
 * parity_runner — run engine layers (nz_layer.h, nz_ops.h) over the weights
 * of a .nzp model for the PyTorch parity tests (tests/python/test_parity.py,
 * references in tests/python/parity_ref.py).
 *
 *   parity_runner MODEL.nzp INPUTS.safetensors OUT.safetensors [--cache BYTES] [--threads N]
 *
 * The model's config.json says which case to run ("kind") and how to bind
 * its layers; INPUTS holds the inputs (names starting with "expect." are the
 * expected outputs, ignored here). Every output is written to OUT (fp32, or
 * I64 for positions, buckets and indices). One JSON line with the tile cache
 * counters goes to stdout. Errors: a message on stderr, exit status 1.
 * Everything is freed before exit; engine blocks still counted in any heap
 * category at the end are reported as an error (a leak).
 */
#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_container.h"
#include "nz_layer.h"
#include "nz_ops.h"
#include "nz_pool.h"
#include "nz_safetensors.h"
#include "nz_weight.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_OUT   64
#define MAX_ALLOC 512

typedef struct out_tensor {
    char name[64];
    const char *dtype; /* "F32" or "I64" */
    int ndim;
    int64_t shape[NZ_MAX_DIMS];
    void *data;
    size_t bytes;
} out_tensor;

typedef struct run {
    const nz_model *m;
    const json_t *cfg;
    const nz_st_file *in;
    nz_matmul_ctx *mc;
    out_tensor out[MAX_OUT];
    size_t nout;
    void *allocs[MAX_ALLOC]; /* freed at the end */
    size_t nalloc;
    nz_error err;
} run;

#define TRY(x)                                                                                               \
    do {                                                                                                     \
        if ((rc = (x)) != NZ_OK) goto done;                                                                  \
    } while (0)

/* ------------------------------------------------------------------ memory */

static void *ralloc(run *r, size_t bytes) {
    if (r->nalloc == MAX_ALLOC) {
        nz_fail(&r->err, NZ_E_NOMEM, "runner: too many allocations");
        return NULL;
    }
    void *p = nz_calloc(1, bytes ? bytes : 1, NZ_MEM_ACTIVATIONS);
    if (!p) {
        nz_fail(&r->err, NZ_E_NOMEM, "runner: out of memory (%zu bytes)", bytes);
        return NULL;
    }
    r->allocs[r->nalloc++] = p;
    return p;
}

/* Adopt a block allocated elsewhere (nz_param_load) so it is freed at the end. */
static int adopt(run *r, void *p) {
    if (r->nalloc == MAX_ALLOC) {
        nz_free(p);
        return nz_fail(&r->err, NZ_E_NOMEM, "runner: too many allocations");
    }
    r->allocs[r->nalloc++] = p;
    return NZ_OK;
}

#define ALLOC(ptr, count)                                                                                    \
    do {                                                                                                     \
        if (!((ptr) = ralloc(r, (size_t)(count) * sizeof *(ptr)))) {                                         \
            rc = r->err.code;                                                                                \
            goto done;                                                                                       \
        }                                                                                                    \
    } while (0)

/* ------------------------------------------------------------------ config */

static int cfg_int(run *r, const char *key, int64_t *v) {
    const json_t *j = json_object_get(r->cfg, key);
    if (!json_is_integer(j)) return nz_fail(&r->err, NZ_E_FORMAT, "config: '%s' must be an integer", key);
    *v = (int64_t)json_integer_value(j);
    return NZ_OK;
}

static int cfg_size(run *r, const char *key, size_t *v) {
    int64_t x = 0;
    int rc = cfg_int(r, key, &x);
    if (rc) return rc;
    if (x <= 0) return nz_fail(&r->err, NZ_E_FORMAT, "config: '%s' must be > 0", key);
    *v = (size_t)x;
    return NZ_OK;
}

static int cfg_num(run *r, const char *key, double *v) {
    const json_t *j = json_object_get(r->cfg, key);
    if (!json_is_number(j)) return nz_fail(&r->err, NZ_E_FORMAT, "config: '%s' must be a number", key);
    *v = json_number_value(j);
    return NZ_OK;
}

/* @return the string, or NULL when absent or null. */
static const char *cfg_str(run *r, const char *key) {
    const json_t *j = json_object_get(r->cfg, key);
    return json_is_string(j) ? json_string_value(j) : NULL;
}

static int cfg_req_str(run *r, const char *key, const char **v) {
    *v = cfg_str(r, key);
    return *v ? NZ_OK : nz_fail(&r->err, NZ_E_FORMAT, "config: '%s' must be a string", key);
}

static int cfg_bool(run *r, const char *key) { return json_is_true(json_object_get(r->cfg, key)); }

/* ------------------------------------------------------------------ inputs */

static int in_has(run *r, const char *name) { return nz_st_find(r->in, name) != NULL; }

/* Copy input name (dtype, ndim dims; shape may be NULL) into a new block. */
static void *in_copy(run *r, const char *name, const char *dtype, int ndim, int64_t *shape) {
    const nz_st_tensor *t = nz_st_find(r->in, name);
    if (!t) {
        nz_fail(&r->err, NZ_E_NOT_FOUND, "inputs: no tensor '%s'", name);
        return NULL;
    }
    if (strcmp(t->st_dtype, dtype) || t->ndim != ndim) {
        nz_fail(&r->err, NZ_E_FORMAT, "inputs: '%s' is %s %d-D, expected %s %d-D", name, t->st_dtype, t->ndim,
                dtype, ndim);
        return NULL;
    }
    void *p = ralloc(r, t->size);
    if (!p) return NULL;
    if (t->size) memcpy(p, t->data, t->size);
    if (shape)
        for (int i = 0; i < ndim; i++) shape[i] = t->shape[i];
    return p;
}

#define INPUT(ptr, name, dtype, ndim, shape)                                                                 \
    do {                                                                                                     \
        if (!((ptr) = in_copy(r, name, dtype, ndim, shape))) {                                               \
            rc = r->err.code;                                                                                \
            goto done;                                                                                       \
        }                                                                                                    \
    } while (0)

/* An int64 input vector as uint32 indices, each < limit. */
static uint32_t *in_index(run *r, const char *name, size_t n, size_t limit) {
    int64_t sh[1];
    int64_t *v = in_copy(r, name, "I64", 1, sh);
    if (!v) return NULL;
    if ((size_t)sh[0] != n) {
        nz_fail(&r->err, NZ_E_FORMAT, "inputs: '%s' has %" PRId64 " entries, expected %zu", name, sh[0], n);
        return NULL;
    }
    uint32_t *u = ralloc(r, n * sizeof *u);
    if (!u) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < 0 || (uint64_t)v[i] >= limit) {
            nz_fail(&r->err, NZ_E_RANGE, "inputs: '%s'[%zu] = %" PRId64 " not below %zu", name, i, v[i],
                    limit);
            return NULL;
        }
        u[i] = (uint32_t)v[i];
    }
    return u;
}

/* ------------------------------------------------------------------ outputs */

static void *out_new(run *r, const char *name, const char *dtype, int ndim, const int64_t *shape) {
    if (r->nout == MAX_OUT) {
        nz_fail(&r->err, NZ_E_NOMEM, "runner: too many outputs");
        return NULL;
    }
    out_tensor *o = &r->out[r->nout];
    memset(o, 0, sizeof *o);
    snprintf(o->name, sizeof o->name, "%s", name);
    o->dtype = dtype;
    o->ndim = ndim;
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        o->shape[i] = shape[i];
        n *= (size_t)shape[i];
    }
    o->bytes = n * nz_st_dtype_size(dtype);
    o->data = nz_calloc(1, o->bytes ? o->bytes : 1, NZ_MEM_ACTIVATIONS);
    if (!o->data) {
        nz_fail(&r->err, NZ_E_NOMEM, "runner: out of memory for output '%s'", name);
        return NULL;
    }
    r->nout++;
    return o->data;
}

#define OUTPUT(ptr, name, dtype, ndim, ...)                                                                  \
    do {                                                                                                     \
        const int64_t shape_[] = {__VA_ARGS__};                                                              \
        if (!((ptr) = out_new(r, name, dtype, ndim, shape_))) {                                              \
            rc = r->err.code;                                                                                \
            goto done;                                                                                       \
        }                                                                                                    \
    } while (0)

static int write_outputs(run *r, const char *path) {
    nz_st_out desc[MAX_OUT];
    memset(desc, 0, sizeof desc);
    for (size_t i = 0; i < r->nout; i++) {
        desc[i].name = r->out[i].name;
        desc[i].st_dtype = r->out[i].dtype;
        desc[i].ndim = r->out[i].ndim;
        memcpy(desc[i].shape, r->out[i].shape, sizeof desc[i].shape);
    }
    nz_st_writer *w;
    int rc = nz_st_writer_open(path, desc, r->nout, NULL, &w, &r->err);
    for (size_t i = 0; !rc && i < r->nout; i++) {
        rc = nz_st_writer_put(w, r->out[i].data, r->out[i].bytes, &r->err);
        if (rc) nz_st_writer_abort(w);
    }
    if (!rc) rc = nz_st_writer_close(w, &r->err);
    return rc;
}

#define FAIL(...)                                                                                            \
    do {                                                                                                     \
        rc = nz_fail(&r->err, __VA_ARGS__);                                                                  \
        goto done;                                                                                           \
    } while (0)

#define FAIL_RC()                                                                                            \
    do {                                                                                                     \
        rc = r->err.code;                                                                                    \
        goto done;                                                                                           \
    } while (0)

/* ------------------------------------------------------------------ embed */

/* out[M x D] += positional embedding of positions pos[M]. */
static int add_positions(run *r, const char *kind, const nz_weight *P, const int64_t *pos, size_t M, size_t D,
                         int64_t pidx, float *out) {
    int rc = NZ_OK;
    float *tmp;
    ALLOC(tmp, M * D);
    if (!strcmp(kind, "sinusoidal")) {
        nz_sinusoidal_positions(tmp, pos, M, D, pidx);
    } else if (!strcmp(kind, "learned")) {
        int32_t *ids;
        ALLOC(ids, M);
        for (size_t i = 0; i < M; i++) ids[i] = (int32_t)pos[i];
        TRY(nz_embed(r->mc, P, ids, M, 1.0f, tmp, &r->err));
    } else {
        FAIL(NZ_E_FORMAT, "config: unknown positions '%s'", kind);
    }
    nz_add(out, tmp, M * D);
done:
    return rc;
}

static int do_embed(run *r) {
    int rc = NZ_OK;
    size_t D = 0;
    int64_t pidx = 0, sh[2];
    double scale = 0;
    const char *kind, *tname;
    nz_weight E, P;
    memset(&P, 0, sizeof P);
    TRY(cfg_size(r, "d_model", &D));
    TRY(cfg_int(r, "padding_idx", &pidx));
    TRY(cfg_num(r, "scale", &scale));
    TRY(cfg_req_str(r, "positions", &kind));
    TRY(cfg_req_str(r, "tokens", &tname));
    TRY(nz_weight_bind(&E, r->m, tname, &r->err));
    if (E.k != D) FAIL(NZ_E_FORMAT, "'%s' is not %zu wide", tname, D);
    if (!strcmp(kind, "learned")) {
        const char *pname;
        TRY(cfg_req_str(r, "table", &pname));
        TRY(nz_weight_bind(&P, r->m, pname, &r->err));
    }
    int32_t *tok;
    INPUT(tok, "tokens", "I32", 2, sh);
    size_t B = (size_t)sh[0], T = (size_t)sh[1];
    float *out;
    int64_t *pos;
    OUTPUT(out, "out", "F32", 3, (int64_t)B, (int64_t)T, (int64_t)D);
    OUTPUT(pos, "positions", "I64", 2, (int64_t)B, (int64_t)T);
    nz_fairseq_positions(pos, tok, B, T, (int32_t)pidx, 0);
    TRY(nz_embed(r->mc, &E, tok, B * T, (float)scale, out, &r->err));
    TRY(add_positions(r, kind, &P, pos, B * T, D, pidx, out));

    /* incremental decoding: one token per sequence per step, start = step */
    int32_t *inc;
    INPUT(inc, "inc_tokens", "I32", 2, sh);
    if ((size_t)sh[0] != B) FAIL(NZ_E_FORMAT, "inc_tokens: %zu rows expected", B);
    size_t n = (size_t)sh[1];
    float *iout, *step;
    int64_t *ipos, *spos;
    int32_t *stok;
    OUTPUT(iout, "inc_out", "F32", 3, (int64_t)B, (int64_t)n, (int64_t)D);
    OUTPUT(ipos, "inc_positions", "I64", 2, (int64_t)B, (int64_t)n);
    ALLOC(step, B * D);
    ALLOC(spos, B);
    ALLOC(stok, B);
    for (size_t s = 0; s < n; s++) {
        for (size_t b = 0; b < B; b++) stok[b] = inc[b * n + s];
        nz_fairseq_positions(spos, stok, B, 1, (int32_t)pidx, (int64_t)s);
        TRY(nz_embed(r->mc, &E, stok, B, (float)scale, step, &r->err));
        TRY(add_positions(r, kind, &P, spos, B, D, pidx, step));
        for (size_t b = 0; b < B; b++) {
            memcpy(iout + (b * n + s) * D, step + b * D, D * sizeof *step);
            ipos[b * n + s] = spos[b];
        }
    }
done:
    return rc;
}

/* ------------------------------------------------------------------ T5 position bias */

static int do_t5_bias(run *r) {
    int rc = NZ_OK;
    size_t H = 0, nb = 0;
    int64_t md = 0, sh[2];
    const char *tname;
    float *table = NULL;
    TRY(cfg_size(r, "heads", &H));
    TRY(cfg_size(r, "num_buckets", &nb));
    TRY(cfg_int(r, "max_distance", &md));
    TRY(cfg_req_str(r, "table", &tname));
    TRY(nz_param_load(r->m, tname, nb * H, &table, NULL, &r->err));
    TRY(adopt(r, table));
    int64_t *rel;
    INPUT(rel, "rel", "I64", 1, sh);
    size_t n = (size_t)sh[0];
    const json_t *params = json_object_get(r->cfg, "bucket_params"), *p;
    size_t i;
    if (!json_is_array(params)) FAIL(NZ_E_FORMAT, "config: bucket_params must be an array");
    json_array_foreach(params, i, p) {
        int pnb = (int)json_integer_value(json_array_get(p, 0)),
            pmd = (int)json_integer_value(json_array_get(p, 1));
        for (int bi = 0; bi < 2; bi++) {
            char name[64];
            int64_t *o;
            snprintf(name, sizeof name, "bucket.%d.%d.%d", pnb, pmd, bi);
            OUTPUT(o, name, "I64", 1, (int64_t)n);
            for (size_t j = 0; j < n; j++) o[j] = nz_t5_bucket(rel[j], bi, pnb, pmd);
        }
    }
    int64_t *args;
    INPUT(args, "bias_args", "I64", 2, sh);
    if (sh[1] != 5) FAIL(NZ_E_FORMAT, "bias_args must be [k x 5]");
    for (int64_t k = 0; k < sh[0]; k++) {
        const int64_t *a = args + 5 * k;
        char name[64];
        float *o;
        snprintf(name, sizeof name, "bias.%" PRId64, k);
        OUTPUT(o, name, "F32", 3, (int64_t)H, a[0], a[1]);
        nz_t5_position_bias(o, table, H, (size_t)a[0], (size_t)a[1], a[2], a[3], (int)a[4], (int)nb, (int)md);
    }
done:
    return rc;
}

/* ------------------------------------------------------------------ norm */

static int do_norm(run *r) {
    int rc = NZ_OK;
    size_t D = 0;
    double eps = 0;
    int64_t sh[3];
    const char *kind, *gname;
    nz_norm n;
    memset(&n, 0, sizeof n);
    TRY(cfg_size(r, "d_model", &D));
    TRY(cfg_num(r, "eps", &eps));
    TRY(cfg_req_str(r, "norm", &kind));
    TRY(cfg_req_str(r, "gain", &gname));
    nz_norm_kind nk = !strcmp(kind, "rms") ? NZ_NORM_RMS : NZ_NORM_LAYER;
    TRY(nz_norm_bind(&n, r->m, nk, gname, cfg_str(r, "bias"), D, (float)eps, &r->err));
    float *x, *y, *z;
    INPUT(x, "x", "F32", 3, sh);
    if ((size_t)sh[2] != D) FAIL(NZ_E_FORMAT, "x is not %zu wide", D);
    size_t M = (size_t)(sh[0] * sh[1]);
    OUTPUT(y, "out", "F32", 3, sh[0], sh[1], sh[2]);
    OUTPUT(z, "out_inplace", "F32", 3, sh[0], sh[1], sh[2]);
    nz_norm_fwd(&n, x, M, y);
    memcpy(z, x, M * D * sizeof *x);
    nz_norm_fwd(&n, z, M, z);
done:
    nz_norm_free(&n);
    return rc;
}

/* ------------------------------------------------------------------ incremental driver */

/* One incremental step: x[B x n x D] new positions (padding pad[B x n] or
 * NULL) appended to kv at position q0, result in out[B x n x D]. */
typedef int (*step_fn)(run *r, void *ctx, const float *x, size_t B, size_t n, const uint8_t *pad, nz_kv *kv,
                       size_t q0, float *out);

/* Run x[B x T x D] through fn in the chunks of input "chunks", reordering
 * the cache (input "reorder_src") before chunk "reorder_at" (-1: never).
 * A chunk without padding is passed key_pad NULL. The whole schedule runs
 * twice, with nz_kv_reset in between: the second run must reproduce the
 * first bit for bit. */
static int incremental(run *r, size_t B, size_t T, size_t D, size_t kvD, const float *x, const uint8_t *pad,
                       step_fn fn, void *ctx, float *out) {
    int rc = NZ_OK;
    int64_t sh[1], *chunks, *at;
    nz_kv kv;
    memset(&kv, 0, sizeof kv);
    INPUT(chunks, "chunks", "I64", 1, sh);
    size_t nch = (size_t)sh[0];
    INPUT(at, "reorder_at", "I64", 1, NULL);
    uint32_t *src = NULL;
    if (at[0] >= 0 && !(src = in_index(r, "reorder_src", B, B))) FAIL_RC();
    float *xc, *oc, *first;
    uint8_t *pc;
    ALLOC(xc, B * T * D);
    ALLOC(oc, B * T * D);
    ALLOC(first, B * T * D);
    ALLOC(pc, B * T);
    TRY(nz_kv_init(&kv, B, T, kvD, &r->err));
    for (int pass = 0; pass < 2; pass++) {
        size_t t0 = 0;
        nz_kv_reset(&kv);
        for (size_t c = 0; c < nch; c++) {
            size_t n = (size_t)chunks[c];
            if (chunks[c] <= 0 || t0 + n > T) FAIL(NZ_E_FORMAT, "chunks do not add up to T = %zu", T);
            if ((int64_t)c == at[0]) TRY(nz_kv_reorder(&kv, src, &r->err));
            int any_pad = 0;
            for (size_t b = 0; b < B; b++) {
                memcpy(xc + b * n * D, x + (b * T + t0) * D, n * D * sizeof *x);
                for (size_t i = 0; i < n; i++) any_pad |= (pc[b * n + i] = pad ? pad[b * T + t0 + i] : 0);
            }
            TRY(fn(r, ctx, xc, B, n, any_pad ? pc : NULL, &kv, t0, oc));
            if (kv.len != t0 + n)
                FAIL(NZ_E_FORMAT, "kv->len is %zu after a step to %zu positions", kv.len, t0 + n);
            for (size_t b = 0; b < B; b++)
                memcpy(out + (b * T + t0) * D, oc + b * n * D, n * D * sizeof *out);
            t0 += n;
        }
        if (t0 != T) FAIL(NZ_E_FORMAT, "chunks add up to %zu, not T = %zu", t0, T);
        if (pass == 0)
            memcpy(first, out, B * T * D * sizeof *out);
        else if (memcmp(first, out, B * T * D * sizeof *out))
            FAIL(NZ_E_FORMAT, "incremental run after nz_kv_reset differs from the first run");
    }
done:
    nz_kv_free(&kv);
    return rc;
}

/* ------------------------------------------------------------------ attention */

static int bind_attn(run *r, nz_attn *a, size_t *D) {
    int rc = NZ_OK;
    size_t H = 0;
    double scale = 0;
    const char *prefix, *names[4];
    TRY(cfg_size(r, "d_model", D));
    TRY(cfg_size(r, "heads", &H));
    TRY(cfg_num(r, "scale", &scale));
    TRY(cfg_req_str(r, "prefix", &prefix));
    const json_t *jn = json_object_get(r->cfg, "names");
    for (size_t i = 0; i < 4; i++) {
        names[i] = json_string_value(json_array_get(jn, i));
        if (!names[i]) FAIL(NZ_E_FORMAT, "config: names must be 4 strings");
    }
    TRY(nz_attn_bind(a, r->m, prefix, names, cfg_bool(r, "with_bias"), *D, H, (float)scale, &r->err));
done:
    return rc;
}

static int attn_step(run *r, void *ctx, const float *x, size_t B, size_t n, const uint8_t *pad, nz_kv *kv,
                     size_t q0, float *out) {
    (void)q0;
    return nz_attn_self(r->mc, ctx, x, B, n, pad, 1, kv, NULL, out, &r->err);
}

static int do_attn_self(run *r) {
    int rc = NZ_OK;
    size_t D = 0;
    int64_t sh[3];
    nz_attn a;
    memset(&a, 0, sizeof a);
    TRY(bind_attn(r, &a, &D));
    float *x, *o1, *o2;
    uint8_t *pad = NULL;
    INPUT(x, "x", "F32", 3, sh);
    size_t B = (size_t)sh[0], T = (size_t)sh[1];
    if ((size_t)sh[2] != D) FAIL(NZ_E_FORMAT, "x is not %zu wide", D);
    if (in_has(r, "pad")) INPUT(pad, "pad", "U8", 2, NULL);
    OUTPUT(o1, "out", "F32", 3, sh[0], sh[1], sh[2]);
    OUTPUT(o2, "out_causal", "F32", 3, sh[0], sh[1], sh[2]);
    TRY(nz_attn_self(r->mc, &a, x, B, T, pad, 0, NULL, NULL, o1, &r->err));
    TRY(nz_attn_self(r->mc, &a, x, B, T, pad, 1, NULL, NULL, o2, &r->err));
    if (in_has(r, "chunks")) {
        float *o3;
        OUTPUT(o3, "inc_out", "F32", 3, sh[0], sh[1], sh[2]);
        TRY(incremental(r, B, T, D, a.H * a.dh, x, pad, attn_step, &a, o3));
    }
done:
    nz_attn_free(&a);
    return rc;
}

static int do_attn_cross(run *r) {
    int rc = NZ_OK;
    size_t D = 0;
    int64_t se[3], sx[3];
    nz_attn a;
    nz_kv kv;
    memset(&a, 0, sizeof a);
    memset(&kv, 0, sizeof kv);
    TRY(bind_attn(r, &a, &D));
    float *enc, *x, *o;
    uint8_t *enc_pad = NULL;
    uint32_t *map = NULL;
    INPUT(enc, "enc", "F32", 3, se);
    size_t Be = (size_t)se[0], S = (size_t)se[1];
    if (in_has(r, "enc_pad")) INPUT(enc_pad, "enc_pad", "U8", 2, NULL);
    INPUT(x, "x", "F32", 3, sx);
    size_t B = (size_t)sx[0], T = (size_t)sx[1];
    if ((size_t)se[2] != D || (size_t)sx[2] != D) FAIL(NZ_E_FORMAT, "not %zu wide", D);
    if (in_has(r, "kv_map") && !(map = in_index(r, "kv_map", B, Be))) FAIL_RC();
    /* a cache with spare room: rows of kv are cap apart, not S */
    TRY(nz_kv_init(&kv, Be, S + 2, a.H * a.dh, &r->err));
    TRY(nz_attn_cross_kv(r->mc, &a, enc, Be, S, enc_pad, &kv, &r->err));
    OUTPUT(o, "out", "F32", 3, sx[0], sx[1], sx[2]);
    TRY(nz_attn_cross(r->mc, &a, x, B, T, &kv, map, NULL, o, &r->err));
    if (in_has(r, "x_id")) {
        float *xi, *oi;
        INPUT(xi, "x_id", "F32", 3, sx);
        if ((size_t)sx[0] != Be) FAIL(NZ_E_FORMAT, "x_id needs %zu rows", Be);
        OUTPUT(oi, "out_id", "F32", 3, sx[0], sx[1], sx[2]);
        TRY(nz_attn_cross(r->mc, &a, xi, Be, (size_t)sx[1], &kv, NULL, NULL, oi, &r->err));
    }
done:
    nz_kv_free(&kv);
    nz_attn_free(&a);
    return rc;
}

/* ------------------------------------------------------------------ FFN, adapter */

static int parse_act(run *r, const char *s, nz_act *act) {
    if (!strcmp(s, "relu"))
        *act = NZ_ACT_RELU;
    else if (!strcmp(s, "gelu"))
        *act = NZ_ACT_GELU;
    else if (!strcmp(s, "gelu_tanh"))
        *act = NZ_ACT_GELU_TANH;
    else if (!strcmp(s, "gated_gelu"))
        *act = NZ_ACT_GATED_GELU;
    else
        return nz_fail(&r->err, NZ_E_FORMAT, "config: unknown act '%s'", s);
    return NZ_OK;
}

static int do_ffn(run *r) {
    int rc = NZ_OK;
    size_t D = 0;
    int64_t sh[3];
    const char *act_s, *wi;
    nz_act act;
    nz_ffn f;
    memset(&f, 0, sizeof f);
    TRY(cfg_size(r, "d_model", &D));
    TRY(cfg_req_str(r, "act", &act_s));
    TRY(parse_act(r, act_s, &act));
    TRY(cfg_req_str(r, "wi_w", &wi));
    TRY(nz_ffn_bind(&f, r->m, act, wi, cfg_str(r, "wi_b"), cfg_str(r, "wg_w"), cfg_str(r, "wo_w"),
                    cfg_str(r, "wo_b"), D, &r->err));
    float *x, *y;
    INPUT(x, "x", "F32", 3, sh);
    if ((size_t)sh[2] != D) FAIL(NZ_E_FORMAT, "x is not %zu wide", D);
    OUTPUT(y, "out", "F32", 3, sh[0], sh[1], sh[2]);
    TRY(nz_ffn_fwd(r->mc, &f, x, (size_t)(sh[0] * sh[1]), y, &r->err));
done:
    nz_ffn_free(&f);
    return rc;
}

static int bind_adapter(run *r, nz_adapter *ad, const char *prefix, size_t D) {
    char n[4][256];
    snprintf(n[0], sizeof n[0], "%sdown.weight", prefix);
    snprintf(n[1], sizeof n[1], "%sdown.bias", prefix);
    snprintf(n[2], sizeof n[2], "%sup.weight", prefix);
    snprintf(n[3], sizeof n[3], "%sup.bias", prefix);
    return nz_adapter_bind(ad, r->m, n[0], n[1], n[2], n[3], D, &r->err);
}

static int do_adapter(run *r) {
    int rc = NZ_OK;
    size_t D = 0;
    int64_t sh[3];
    const char *prefix;
    nz_adapter ad;
    memset(&ad, 0, sizeof ad);
    TRY(cfg_size(r, "d_model", &D));
    TRY(cfg_req_str(r, "prefix", &prefix));
    TRY(bind_adapter(r, &ad, prefix, D));
    float *x, *y;
    INPUT(x, "x", "F32", 3, sh);
    if ((size_t)sh[2] != D) FAIL(NZ_E_FORMAT, "x is not %zu wide", D);
    OUTPUT(y, "out", "F32", 3, sh[0], sh[1], sh[2]);
    memcpy(y, x, (size_t)(sh[0] * sh[1]) * D * sizeof *x);
    TRY(nz_adapter_fwd(r->mc, &ad, y, (size_t)(sh[0] * sh[1]), &r->err));
done:
    nz_adapter_free(&ad);
    return rc;
}

/* ------------------------------------------------------------------ blocks */

typedef struct block_case {
    nz_block blk;
    nz_adapter adapter;
    int t5;
    float *table; /* T5 relative_attention_bias [num_buckets x H] */
    int num_buckets, max_distance;
    size_t H;
    const nz_kv *cross_kv;
    const uint32_t *kv_map;
    /* per-group adapters (config "group_adapters": prefix or null per group) */
    size_t ngroups, group_B;
    nz_adapter groups[8];
    const nz_adapter *group_ptr[8];
} block_case;

static int bind_block(run *r, block_case *bc, size_t *D) {
    int rc = NZ_OK;
    size_t H = 0;
    double eps = 0;
    const char *fam, *p, *act_s;
    nz_act act;
    char a[256], b[256], c[256], d[256], e[256];
    nz_block *blk = &bc->blk;
    TRY(cfg_size(r, "d_model", D));
    TRY(cfg_size(r, "heads", &H));
    TRY(cfg_num(r, "eps", &eps));
    TRY(cfg_req_str(r, "family", &fam));
    TRY(cfg_req_str(r, "prefix", &p));
    TRY(cfg_req_str(r, "act", &act_s));
    TRY(parse_act(r, act_s, &act));
    bc->H = H;
    blk->pre_norm = cfg_bool(r, "pre_norm");
    blk->has_cross = cfg_bool(r, "has_cross");
    if (!strcmp(fam, "fairseq")) {
        static const char *const names[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
        snprintf(a, sizeof a, "%sself_attn.", p);
        TRY(nz_attn_bind(&blk->self, r->m, a, names, 1, *D, H, 0, &r->err));
        snprintf(a, sizeof a, "%sself_attn_layer_norm.weight", p);
        snprintf(b, sizeof b, "%sself_attn_layer_norm.bias", p);
        TRY(nz_norm_bind(&blk->self_norm, r->m, NZ_NORM_LAYER, a, b, *D, (float)eps, &r->err));
        if (blk->has_cross) {
            snprintf(a, sizeof a, "%sencoder_attn.", p);
            TRY(nz_attn_bind(&blk->cross, r->m, a, names, 1, *D, H, 0, &r->err));
            snprintf(a, sizeof a, "%sencoder_attn_layer_norm.weight", p);
            snprintf(b, sizeof b, "%sencoder_attn_layer_norm.bias", p);
            TRY(nz_norm_bind(&blk->cross_norm, r->m, NZ_NORM_LAYER, a, b, *D, (float)eps, &r->err));
        }
        snprintf(a, sizeof a, "%sfc1.weight", p);
        snprintf(b, sizeof b, "%sfc1.bias", p);
        snprintf(c, sizeof c, "%sfc2.weight", p);
        snprintf(d, sizeof d, "%sfc2.bias", p);
        TRY(nz_ffn_bind(&blk->ffn, r->m, act, a, b, NULL, c, d, *D, &r->err));
        snprintf(a, sizeof a, "%sfinal_layer_norm.weight", p);
        snprintf(b, sizeof b, "%sfinal_layer_norm.bias", p);
        TRY(nz_norm_bind(&blk->ffn_norm, r->m, NZ_NORM_LAYER, a, b, *D, (float)eps, &r->err));
    } else if (!strcmp(fam, "t5")) {
        static const char *const names[4] = {"q", "k", "v", "o"};
        int64_t nb = 0, md = 0;
        bc->t5 = 1;
        TRY(cfg_int(r, "num_buckets", &nb));
        TRY(cfg_int(r, "max_distance", &md));
        bc->num_buckets = (int)nb;
        bc->max_distance = (int)md;
        snprintf(a, sizeof a, "%slayer.0.SelfAttention.", p);
        TRY(nz_attn_bind(&blk->self, r->m, a, names, 0, *D, H, 1.0f, &r->err));
        snprintf(a, sizeof a, "%slayer.0.SelfAttention.relative_attention_bias.weight", p);
        TRY(nz_param_load(r->m, a, (size_t)nb * H, &bc->table, NULL, &r->err));
        TRY(adopt(r, bc->table));
        snprintf(a, sizeof a, "%slayer.0.layer_norm.weight", p);
        TRY(nz_norm_bind(&blk->self_norm, r->m, NZ_NORM_RMS, a, NULL, *D, (float)eps, &r->err));
        int f = 1;
        if (blk->has_cross) {
            snprintf(a, sizeof a, "%slayer.1.EncDecAttention.", p);
            TRY(nz_attn_bind(&blk->cross, r->m, a, names, 0, *D, H, 1.0f, &r->err));
            snprintf(a, sizeof a, "%slayer.1.layer_norm.weight", p);
            TRY(nz_norm_bind(&blk->cross_norm, r->m, NZ_NORM_RMS, a, NULL, *D, (float)eps, &r->err));
            f = 2;
        }
        if (act == NZ_ACT_GATED_GELU) {
            snprintf(a, sizeof a, "%slayer.%d.DenseReluDense.wi_0.weight", p, f);
            snprintf(e, sizeof e, "%slayer.%d.DenseReluDense.wi_1.weight", p, f);
        } else {
            snprintf(a, sizeof a, "%slayer.%d.DenseReluDense.wi.weight", p, f);
        }
        snprintf(c, sizeof c, "%slayer.%d.DenseReluDense.wo.weight", p, f);
        TRY(nz_ffn_bind(&blk->ffn, r->m, act, a, NULL, act == NZ_ACT_GATED_GELU ? e : NULL, c, NULL, *D,
                        &r->err));
        snprintf(a, sizeof a, "%slayer.%d.layer_norm.weight", p, f);
        TRY(nz_norm_bind(&blk->ffn_norm, r->m, NZ_NORM_RMS, a, NULL, *D, (float)eps, &r->err));
    } else {
        FAIL(NZ_E_FORMAT, "config: unknown family '%s'", fam);
    }
    if (cfg_bool(r, "adapter")) {
        snprintf(a, sizeof a, "%sadapter.", p);
        TRY(bind_adapter(r, &bc->adapter, a, *D));
        blk->adapter = &bc->adapter;
    }
    const json_t *ga = json_object_get(r->cfg, "group_adapters");
    if (ga) {
        if (!json_is_array(ga) || json_array_size(ga) > 8)
            FAIL(NZ_E_FORMAT, "config: group_adapters must be an array of at most 8");
        TRY(cfg_size(r, "group_B", &bc->group_B));
        for (size_t g = 0; g < json_array_size(ga); g++, bc->ngroups++) {
            const char *gp = json_string_value(json_array_get(ga, g));
            if (!gp) continue; /* no adapter for this group */
            snprintf(a, sizeof a, "%s%s", p, gp);
            TRY(bind_adapter(r, &bc->groups[g], a, *D));
            bc->group_ptr[g] = &bc->groups[g];
        }
    }
done:
    return rc;
}

/* T5 self-attention bias for queries q0.. q0+n-1 over keys 0.. q0+n-1. */
static int t5_self_bias(run *r, const block_case *bc, size_t n, size_t q0, int causal, float **out) {
    int rc = NZ_OK;
    float *bias;
    ALLOC(bias, bc->H * n * (q0 + n));
    nz_t5_position_bias(bias, bc->table, bc->H, n, q0 + n, (int64_t)q0, 0, !causal, bc->num_buckets,
                        bc->max_distance);
    *out = bias;
done:
    return rc;
}

static int block_step(run *r, void *ctx, const float *x, size_t B, size_t n, const uint8_t *pad, nz_kv *kv,
                      size_t q0, float *out) {
    int rc = NZ_OK;
    block_case *bc = ctx;
    nz_block_io io;
    memset(&io, 0, sizeof io);
    io.B = B;
    io.T = n;
    io.self_pad = pad;
    io.causal = 1;
    io.self_kv = kv;
    io.cross_kv = bc->cross_kv;
    io.kv_map = bc->kv_map;
    if (bc->ngroups) {
        io.adapters = bc->group_ptr;
        io.group_B = bc->group_B;
    }
    float *bias = NULL;
    if (bc->t5) TRY(t5_self_bias(r, bc, n, q0, 1, &bias));
    io.self_bias = bias;
    memcpy(out, x, B * n * bc->blk.self.d_model * sizeof *x);
    TRY(nz_block_fwd(r->mc, &bc->blk, out, &io, &r->err));
done:
    return rc;
}

static int do_block(run *r) {
    int rc = NZ_OK;
    size_t D = 0;
    int64_t sx[3], se[3];
    block_case bc;
    nz_kv ckv;
    memset(&bc, 0, sizeof bc);
    memset(&ckv, 0, sizeof ckv);
    TRY(bind_block(r, &bc, &D));
    int causal = cfg_bool(r, "causal");
    float *x, *y;
    uint8_t *pad = NULL;
    INPUT(x, "x", "F32", 3, sx);
    size_t B = (size_t)sx[0], T = (size_t)sx[1];
    if ((size_t)sx[2] != D) FAIL(NZ_E_FORMAT, "x is not %zu wide", D);
    if (in_has(r, "pad")) INPUT(pad, "pad", "U8", 2, NULL);
    if (bc.blk.has_cross) {
        float *enc;
        uint8_t *enc_pad = NULL;
        INPUT(enc, "enc", "F32", 3, se);
        size_t Be = (size_t)se[0], S = (size_t)se[1];
        if ((size_t)se[2] != D) FAIL(NZ_E_FORMAT, "enc is not %zu wide", D);
        if (in_has(r, "enc_pad")) INPUT(enc_pad, "enc_pad", "U8", 2, NULL);
        if (in_has(r, "kv_map")) {
            if (!(bc.kv_map = in_index(r, "kv_map", B, Be))) FAIL_RC();
        } else if (Be != B) {
            FAIL(NZ_E_FORMAT, "enc has %zu rows, x %zu, and no kv_map", Be, B);
        }
        TRY(nz_kv_init(&ckv, Be, S, bc.blk.cross.H * bc.blk.cross.dh, &r->err));
        TRY(nz_attn_cross_kv(r->mc, &bc.blk.cross, enc, Be, S, enc_pad, &ckv, &r->err));
        bc.cross_kv = &ckv;
    }
    nz_block_io io;
    memset(&io, 0, sizeof io);
    io.B = B;
    io.T = T;
    io.self_pad = pad;
    io.causal = causal;
    io.cross_kv = bc.cross_kv;
    io.kv_map = bc.kv_map;
    if (bc.ngroups) {
        if (bc.ngroups * bc.group_B != B)
            FAIL(NZ_E_FORMAT, "%zu adapter groups of %zu != B = %zu", bc.ngroups, bc.group_B, B);
        io.adapters = bc.group_ptr;
        io.group_B = bc.group_B;
    }
    float *bias = NULL;
    if (bc.t5) TRY(t5_self_bias(r, &bc, T, 0, causal, &bias));
    io.self_bias = bias;
    OUTPUT(y, "out", "F32", 3, sx[0], sx[1], sx[2]);
    memcpy(y, x, B * T * D * sizeof *x);
    TRY(nz_block_fwd(r->mc, &bc.blk, y, &io, &r->err));
    if (in_has(r, "chunks")) {
        float *o;
        OUTPUT(o, "inc_out", "F32", 3, sx[0], sx[1], sx[2]);
        TRY(incremental(r, B, T, D, bc.blk.self.H * bc.blk.self.dh, x, pad, block_step, &bc, o));
    }
done:
    nz_kv_free(&ckv);
    nz_block_free(&bc.blk);
    nz_adapter_free(&bc.adapter);
    for (size_t g = 0; g < bc.ngroups; g++) nz_adapter_free(&bc.groups[g]);
    return rc;
}

/* ------------------------------------------------------------------ output projection */

static int do_output(run *r) {
    int rc = NZ_OK;
    size_t D = 0, V = 0, k = 0;
    int64_t sh[3];
    const char *wname;
    nz_linear l;
    nz_weight w;
    memset(&l, 0, sizeof l);
    TRY(cfg_size(r, "d_model", &D));
    TRY(cfg_size(r, "vocab", &V));
    TRY(cfg_size(r, "k", &k));
    TRY(cfg_req_str(r, "weight", &wname));
    TRY(nz_linear_bind(&l, r->m, wname, cfg_str(r, "bias"), D, V, &r->err));
    TRY(nz_weight_bind(&w, r->m, wname, &r->err));
    float *h, *logits, *mm, *lp, *pr, *tv;
    int64_t *am, *ti;
    uint32_t *idx;
    INPUT(h, "h", "F32", 3, sh);
    if ((size_t)sh[2] != D) FAIL(NZ_E_FORMAT, "h is not %zu wide", D);
    size_t M = (size_t)(sh[0] * sh[1]);
    OUTPUT(logits, "logits", "F32", 3, sh[0], sh[1], (int64_t)V);
    OUTPUT(mm, "logits_mm", "F32", 3, sh[0], sh[1], (int64_t)V);
    OUTPUT(lp, "lprobs", "F32", 3, sh[0], sh[1], (int64_t)V);
    OUTPUT(pr, "probs", "F32", 3, sh[0], sh[1], (int64_t)V);
    OUTPUT(am, "argmax", "I64", 2, sh[0], sh[1]);
    OUTPUT(ti, "topk_idx", "I64", 3, sh[0], sh[1], (int64_t)k);
    OUTPUT(tv, "topk_val", "F32", 3, sh[0], sh[1], (int64_t)k);
    ALLOC(idx, k);
    TRY(nz_linear_fwd(r->mc, &l, h, M, logits, &r->err));
    TRY(nz_matmul_mt(r->mc, &w, h, M, mm, &r->err));
    memcpy(lp, logits, M * V * sizeof *lp);
    nz_log_softmax(lp, M, V);
    memcpy(pr, logits, M * V * sizeof *pr);
    nz_softmax(pr, M, V);
    for (size_t i = 0; i < M; i++) {
        am[i] = (int64_t)nz_argmax(logits + i * V, V);
        size_t got = nz_topk(lp + i * V, V, k, idx, tv + i * k);
        if (got != k) {
            rc = nz_fail(&r->err, NZ_E_FORMAT, "nz_topk returned %zu of %zu", got, k);
            goto done;
        }
        for (size_t j = 0; j < k; j++) ti[i * k + j] = idx[j];
    }
done:
    nz_linear_free(&l);
    return rc;
}

/* ------------------------------------------------------------------ main */

static const struct {
    const char *kind;
    int (*fn)(run *r);
} KINDS[] = {
    {"embed", do_embed},         {"t5_bias", do_t5_bias},       {"norm", do_norm},
    {"attn_self", do_attn_self}, {"attn_cross", do_attn_cross}, {"ffn", do_ffn},
    {"adapter", do_adapter},     {"block", do_block},           {"output", do_output},
};

static int parse_size(const char *s, size_t *v) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (!*s || *end || errno || s[0] == '-') return -1;
    *v = (size_t)x;
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: parity_runner MODEL.nzp INPUTS.safetensors OUT.safetensors [--cache BYTES] "
                    "[--threads N]\n");
    return 1;
}

int main(int argc, char **argv) {
    const char *pos[3];
    int npos = 0;
    size_t budget = 0, threads = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cache") && i + 1 < argc) {
            if (parse_size(argv[++i], &budget)) return usage();
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            if (parse_size(argv[++i], &threads) || threads < 1 || threads > 64) return usage();
        } else if (argv[i][0] == '-' || npos == 3) {
            return usage();
        } else {
            pos[npos++] = argv[i];
        }
    }
    if (npos != 3) return usage();

    run r;
    memset(&r, 0, sizeof r);
    nz_model *m = NULL;
    nz_st_file *in = NULL;
    nz_tile_cache *cache = NULL;
    nz_pool *pool = NULL;
    int rc = nz_model_open(pos[0], &m, &r.err);
    if (!rc) rc = nz_st_open(pos[1], &in, &r.err);
    if (!rc) {
        r.m = m;
        r.in = in;
        r.cfg = nz_model_config(m);
        cache = nz_cache_create(budget);
        pool = threads > 1 ? nz_pool_create((int)threads) : NULL;
        r.mc = cache && (threads == 1 || pool) ? nz_matmul_ctx_create(pool, cache) : NULL;
        if (!r.mc) rc = nz_fail(&r.err, NZ_E_NOMEM, "cannot create the cache, pool or matmul context");
    }
    if (!rc && !json_is_object(r.cfg)) rc = nz_fail(&r.err, NZ_E_FORMAT, "%s: no config", pos[0]);
    const char *kind = rc ? NULL : cfg_str(&r, "kind");
    if (!rc && !kind) rc = nz_fail(&r.err, NZ_E_FORMAT, "config: no 'kind'");
    if (!rc) {
        size_t i;
        for (i = 0; i < sizeof KINDS / sizeof KINDS[0]; i++)
            if (!strcmp(KINDS[i].kind, kind)) break;
        if (i == sizeof KINDS / sizeof KINDS[0])
            rc = nz_fail(&r.err, NZ_E_FORMAT, "config: unknown kind '%s'", kind);
        else
            rc = KINDS[i].fn(&r);
    }
    if (!rc) rc = write_outputs(&r, pos[2]);
    if (!rc) {
        nz_cache_stats st;
        nz_cache_get_stats(cache, &st);
        printf("{\"hits\": %" PRIu64 ", \"misses\": %" PRIu64 ", \"uncached\": %" PRIu64
               ", \"evictions\": %" PRIu64 ", \"peak_bytes\": %zu, \"budget\": %zu}\n",
               st.hits, st.misses, st.uncached, st.evictions, st.peak_bytes, st.budget);
    }

    for (size_t i = 0; i < r.nout; i++) nz_free(r.out[i].data);
    for (size_t i = 0; i < r.nalloc; i++) nz_free(r.allocs[i]);
    nz_matmul_ctx_free(r.mc);
    nz_cache_free(cache);
    nz_pool_free(pool);
    nz_st_free(in);
    nz_model_free(m);
    if (rc) {
        fprintf(stderr, "parity_runner: error: %s\n", r.err.msg);
        return 1;
    }
    /* every engine block must be gone */
    static const nz_mem_cat cats[] = {NZ_MEM_WEIGHTS, NZ_MEM_TILE_CACHE, NZ_MEM_SCRATCH, NZ_MEM_KV,
                                      NZ_MEM_ACTIVATIONS};
    for (size_t i = 0; i < sizeof cats / sizeof cats[0]; i++)
        if (nz_mem_current(cats[i])) {
            fprintf(stderr, "parity_runner: error: %zu bytes still allocated in category %s\n",
                    nz_mem_current(cats[i]), nz_mem_cat_name(cats[i]));
            return 1;
        }
    return 0;
}

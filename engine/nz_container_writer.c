/* .nzp container: the writer. See nz_container.h for the layout; the loader is
 * in nz_container.c. */
#include "nz_container.h"
#include "nz_hash.h"

#include "nz_alloc.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------- writer */

struct nz_writer {
    char *path, *tmp_path, *data_path;
    FILE *data;
    uint64_t data_size;
    json_t *root, *tensors, *blobs;
    json_t *cur_tiles; /* tiles array of the tensor being written */
    uint64_t cur_expected;
};

int nz_writer_create(const char *path, nz_writer **out, nz_error *err) {
    *out = NULL;
    nz_alloc_hook_json();
    nz_writer *w = nz_calloc(1, sizeof *w, NZ_MEM_OTHER);
    if (!w) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    size_t n = strlen(path) + 32;
    w->path = nz_strdup(path);
    w->tmp_path = nz_malloc(n, NZ_MEM_OTHER);
    w->data_path = nz_malloc(n, NZ_MEM_OTHER);
    w->root = json_object();
    w->tensors = json_array();
    w->blobs = json_object();
    if (!w->path || !w->tmp_path || !w->data_path || !w->root || !w->tensors || !w->blobs) {
        nz_writer_abort(w);
        return nz_fail(err, NZ_E_NOMEM, "out of memory");
    }
    snprintf(w->tmp_path, n, "%s.tmp.%ld", path, (long)getpid());
    snprintf(w->data_path, n, "%s.data.%ld", path, (long)getpid());
    w->data = fopen(w->data_path, "w+b");
    if (!w->data) {
        int e = errno;
        nz_writer_abort(w);
        return nz_fail(err, NZ_E_IO, "%s: %s", path, strerror(e));
    }
    json_object_set_new(w->root, "generator", json_string("nzp 1"));
    *out = w;
    return NZ_OK;
}

int nz_writer_set_config(nz_writer *w, const json_t *config, nz_error *err) {
    if (!json_is_object(config)) return nz_fail(err, NZ_E_INVALID_ARG, "config must be a JSON object");
    json_object_set_new(w->root, "config", json_deep_copy(config));
    return NZ_OK;
}

int nz_writer_set_metadata(nz_writer *w, const json_t *metadata, nz_error *err) {
    if (!json_is_object(metadata)) return nz_fail(err, NZ_E_INVALID_ARG, "metadata must be a JSON object");
    json_object_set_new(w->root, "metadata", json_deep_copy(metadata));
    return NZ_OK;
}

static char *hex64(uint64_t h, char buf[17]) {
    snprintf(buf, 17, "%016" PRIx64, h);
    return buf;
}

/* Append data at the next 64-byte boundary of the data section. */
static int put_data(nz_writer *w, const void *data, size_t size, uint64_t *offset, nz_error *err) {
    static const uint8_t zeros[NZ_CONTAINER_ALIGN];
    size_t pad = (size_t)((NZ_CONTAINER_ALIGN - w->data_size % NZ_CONTAINER_ALIGN) % NZ_CONTAINER_ALIGN);
    if ((pad && fwrite(zeros, 1, pad, w->data) != pad) || (size && fwrite(data, 1, size, w->data) != size))
        return nz_fail(err, NZ_E_IO, "%s: write: %s", w->data_path, strerror(errno));
    *offset = w->data_size + pad;
    w->data_size += pad + size;
    return NZ_OK;
}

int nz_writer_add_blob(nz_writer *w, const char *name, const void *data, size_t size, nz_error *err) {
    if (json_object_get(w->blobs, name)) return nz_fail(err, NZ_E_INVALID_ARG, "duplicate blob '%s'", name);
    uint64_t off;
    int rc = put_data(w, data, size, &off, err);
    if (rc) return rc;
    char h[17];
    json_object_set_new(w->blobs, name,
                        json_pack("{sIsIss}", "offset", (json_int_t)off, "size", (json_int_t)size, "xxh3",
                                  hex64(nz_hash(data, size), h)));
    return NZ_OK;
}

static json_t *pairs(const uint64_t *v) {
    json_t *a = json_array();
    for (int s = 0; s < 256; s++)
        if (v[s]) json_array_append_new(a, json_pack("[iI]", s, (json_int_t)v[s]));
    return a;
}

int nz_writer_begin_tensor(nz_writer *w, const char *name, const char *st_dtype, int ndim,
                           const int64_t *shape, const nz_tensor_desc *d, const uint64_t counts[256],
                           nz_error *err) {
    if (w->cur_tiles && json_array_size(w->cur_tiles) != w->cur_expected)
        return nz_fail(err, NZ_E_INVALID_ARG, "previous tensor is missing tiles");
    if (ndim < 0 || ndim > NZ_MAX_DIMS_C) return nz_fail(err, NZ_E_INVALID_ARG, "bad ndim %d", ndim);
    char mode[32];
    json_t *js = json_array();
    for (int i = 0; i < ndim; i++) json_array_append_new(js, json_integer(shape[i]));
    uint64_t fq[256];
    for (int s = 0; s < 256; s++) fq[s] = d->freq[s];
    json_t *t =
        json_pack("{sssssssosIsIsssIsssI}", "name", name, "dtype", nz_dtype_name(d->dtype), "st_dtype",
                  st_dtype, "shape", js, "rows", (json_int_t)d->rows, "cols", (json_int_t)d->cols, "mode",
                  nz_mode_name(&d->mode, mode, sizeof mode), "norm_block", (json_int_t)d->mode.norm_block,
                  "coder", nz_coder_name(d->coder), "tile_rows", (json_int_t)d->tile_rows);
    if (!t) return nz_fail(err, NZ_E_NOMEM, "cannot describe tensor '%s'", name);
    if (d->coder != NZ_CODER_NONE) {
        json_object_set_new(t, "freq", pairs(fq));
        if (counts) json_object_set_new(t, "counts", pairs(counts));
    }
    w->cur_tiles = json_array();
    json_object_set_new(t, "tiles", w->cur_tiles);
    json_array_append_new(w->tensors, t);
    w->cur_expected = nz_desc_ntiles(d);
    return NZ_OK;
}

int nz_writer_add_tile(nz_writer *w, const uint8_t *data, size_t size, nz_error *err) {
    if (!w->cur_tiles || json_array_size(w->cur_tiles) >= w->cur_expected)
        return nz_fail(err, NZ_E_INVALID_ARG, "tile outside a tensor, or too many tiles");
    uint64_t off;
    int rc = put_data(w, data, size, &off, err);
    if (rc) return rc;
    char h[17];
    json_array_append_new(
        w->cur_tiles, json_pack("[IIs]", (json_int_t)off, (json_int_t)size, hex64(nz_hash(data, size), h)));
    return NZ_OK;
}

static int writer_sink(void *ud, uint64_t t, const uint8_t *tile, size_t len, nz_error *err) {
    (void)t;
    return nz_writer_add_tile(ud, tile, len, err);
}

int nz_writer_add_tensor(nz_writer *w, const char *name, const char *st_dtype, int ndim, const int64_t *shape,
                         const nz_tensor_desc *desc, const uint64_t counts[256], const void *src,
                         nz_error *err) {
    int rc = nz_writer_begin_tensor(w, name, st_dtype, ndim, shape, desc, counts, err);
    return rc ? rc : nz_tensor_encode(desc, src, writer_sink, w, err);
}

int nz_writer_finish(nz_writer *w, nz_error *err) {
    int rc = NZ_OK;
    char *hdr = NULL;
    FILE *f = NULL;
    if (w->cur_tiles && json_array_size(w->cur_tiles) != w->cur_expected) {
        rc = nz_fail(err, NZ_E_INVALID_ARG, "last tensor is missing tiles");
        goto fail;
    }
    json_object_set(w->root, "blobs", w->blobs);
    json_object_set(w->root, "tensors", w->tensors);
    hdr = json_dumps(w->root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!hdr) {
        rc = nz_fail(err, NZ_E_NOMEM, "cannot serialise header");
        goto fail;
    }
    uint64_t hlen = strlen(hdr);
    uint64_t doff =
        (NZ_CONTAINER_PREFIX + hlen + NZ_CONTAINER_ALIGN - 1) / NZ_CONTAINER_ALIGN * NZ_CONTAINER_ALIGN;
    uint8_t pre[NZ_CONTAINER_PREFIX] = {0};
    memcpy(pre, NZ_CONTAINER_MAGIC, 8);
    pre[8] = NZ_CONTAINER_VERSION;
    nz_wr64le(pre + 16, hlen);
    nz_wr64le(pre + 24, doff);
    nz_wr64le(pre + 32, w->data_size);
    nz_wr64le(pre + 40, nz_hash(hdr, hlen));
    f = fopen(w->tmp_path, "wb");
    if (!f) goto io;
    static const uint8_t zeros[NZ_CONTAINER_ALIGN];
    if (fwrite(pre, 1, sizeof pre, f) != sizeof pre || fwrite(hdr, 1, hlen, f) != hlen ||
        fwrite(zeros, 1, doff - NZ_CONTAINER_PREFIX - hlen, f) != doff - NZ_CONTAINER_PREFIX - hlen)
        goto io;
    if (fflush(w->data) || fseek(w->data, 0, SEEK_SET)) goto io;
    char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, w->data)) > 0)
        if (fwrite(buf, 1, got, f) != got) goto io;
    if (ferror(w->data) || fclose(f) != 0) {
        f = NULL;
        goto io;
    }
    f = NULL;
    if (rename(w->tmp_path, w->path) != 0) goto io;
    nz_free(hdr);
    nz_writer_abort(w); /* removes the data temporary, frees */
    return NZ_OK;
io:
    rc = nz_fail(err, NZ_E_IO, "%s: %s", w->path, strerror(errno));
fail:
    if (f) fclose(f);
    nz_free(hdr); /* jansson allocates through nz_malloc (nz_alloc_hook_json) */
    nz_writer_abort(w);
    return rc;
}

void nz_writer_abort(nz_writer *w) {
    if (!w) return;
    if (w->data) fclose(w->data);
    if (w->data_path) unlink(w->data_path);
    if (w->tmp_path) unlink(w->tmp_path);
    json_decref(w->root);
    json_decref(w->tensors);
    json_decref(w->blobs);
    nz_free(w->path);
    nz_free(w->tmp_path);
    nz_free(w->data_path);
    nz_free(w);
}

/* pack / unpack / verify: see nz_pack.h. */
#include "nz_pack.h"

#include "nz_alloc.h"
#include "nz_safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <regex.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

void nz_pack_opts_default(nz_pack_opts *o) {
    memset(o, 0, sizeof *o);
    o->mode.kind = NZ_MODE_LOSSLESS;
    o->coder = NZ_CODER_ESC;
    o->raw_below = 4096;
    o->zstd_level = 3;
}

double nz_entropy_bits(const uint64_t counts[256]) {
    double total = 0, h = 0;
    for (int s = 0; s < 256; s++) total += (double)counts[s];
    if (total == 0) return 0;
    for (int s = 0; s < 256; s++)
        if (counts[s]) {
            double p = (double)counts[s] / total;
            h -= p * log2(p);
        }
    return h;
}

/* Read a whole (small) file into an NZ_MEM_OTHER buffer. */
static int read_file(const char *path, uint8_t **data, size_t *size, nz_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return nz_fail(err, NZ_E_IO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = nz_malloc(cap, NZ_MEM_OTHER);
    for (;;) {
        if (!buf) {
            fclose(f);
            return nz_fail(err, NZ_E_NOMEM, "%s: out of memory", path);
        }
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        uint8_t *nb = nz_realloc(buf, cap * 2);
        if (!nb) nz_free(buf);
        buf = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        nz_free(buf);
        return nz_fail(err, NZ_E_IO, "%s: read error", path);
    }
    *data = buf;
    *size = n;
    return NZ_OK;
}

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

int nz_json_merge_patch(json_t *target, const json_t *patch, nz_error *err) {
    if (!json_is_object(target) || !json_is_object(patch))
        return nz_fail(err, NZ_E_INVALID_ARG, "config patch: both the config and the patch must be objects");
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)patch, k, v) {
        json_t *cur = json_object_get(target, k);
        int rc = NZ_OK;
        if (json_is_null(v))
            json_object_del(target, k);
        else if (json_is_object(v) && json_is_object(cur))
            rc = nz_json_merge_patch(cur, v, err);
        else if (json_is_object(v)) {
            json_t *fresh = json_object();
            rc = fresh && !json_object_set_new(target, k, fresh) ? nz_json_merge_patch(fresh, v, err)
                                                                 : nz_fail(err, NZ_E_NOMEM, "out of memory");
        } else if (json_object_set(target, k, v))
            rc = nz_fail(err, NZ_E_NOMEM, "out of memory");
        if (rc) return rc;
    }
    return NZ_OK;
}

/* Embed the config: dir's config.json (dir may be NULL) with patch applied (may be NULL). */
static int add_config(nz_writer *w, const char *dir, const json_t *patch, nz_error *err) {
    char path[4096];
    json_t *cfg = NULL;
    struct stat st;
    snprintf(path, sizeof path, "%s/config.json", dir ? dir : ".");
    if (dir && stat(path, &st) == 0) {
        json_error_t je;
        if (!(cfg = json_load_file(path, JSON_REJECT_DUPLICATES, &je)))
            return nz_fail(err, NZ_E_FORMAT, "%s: %s (line %d column %d)", path, je.text, je.line, je.column);
        if (!json_is_object(cfg)) {
            json_decref(cfg);
            return nz_fail(err, NZ_E_FORMAT, "%s: not a JSON object", path);
        }
    }
    if (!cfg && !patch) return NZ_OK;
    if (!cfg && !(cfg = json_object())) return nz_fail(err, NZ_E_NOMEM, "out of memory");
    int rc = patch ? nz_json_merge_patch(cfg, patch, err) : NZ_OK;
    if (!rc) rc = nz_writer_set_config(w, cfg, err);
    json_decref(cfg);
    return rc;
}

/* Embed the tokenizer files (every other regular file) of a model directory. */
static int add_dir_files(nz_writer *w, const char *dir, nz_error *err) {
    char path[4096];
    struct stat st;
    DIR *d = opendir(dir);
    if (!d) return nz_fail(err, NZ_E_IO, "%s: %s", dir, strerror(errno));
    /* sorted names so packing is reproducible */
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    int rc = NZ_OK;
    while ((de = readdir(d))) {
        const char *nm = de->d_name;
        if (nm[0] == '.' || !strcmp(nm, "config.json") || ends_with(nm, ".safetensors") ||
            ends_with(nm, ".pt") || ends_with(nm, ".bin") || ends_with(nm, ".nzp"))
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, nm);
        if (stat(path, &st) || !S_ISREG(st.st_mode)) continue;
        if (st.st_size > (256 << 20)) {
            rc = nz_fail(err, NZ_E_UNSUPPORTED, "%s: %lld bytes is too large to embed", path,
                         (long long)st.st_size);
            break;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            char **nn = nz_realloc(names, cap * sizeof *names);
            if (!nn) {
                rc = nz_fail(err, NZ_E_NOMEM, "out of memory");
                break;
            }
            names = nn;
        }
        if (!(names[n] = nz_strdup(nm))) {
            rc = nz_fail(err, NZ_E_NOMEM, "out of memory");
            break;
        }
        n++;
    }
    closedir(d);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char *t = names[j];
            names[j] = names[j - 1];
            names[j - 1] = t;
        }
    for (size_t i = 0; i < n && rc == NZ_OK; i++) {
        uint8_t *data = NULL;
        size_t size = 0;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        rc = read_file(path, &data, &size, err);
        if (rc) break;
        rc = nz_writer_add_blob(w, names[i], data, size, err);
        nz_free(data);
    }
    for (size_t i = 0; i < n; i++) nz_free(names[i]);
    nz_free(names);
    return rc;
}

static int pack_tensor(nz_writer *w, const nz_st_tensor *t, const nz_pack_opts *o, const regex_t *excl,
                       nz_error *err) {
    uint64_t rows = t->ndim >= 2 ? (uint64_t)t->shape[0] : 1;
    uint64_t cols = rows ? t->nelem / rows : 0;
    if (t->ndim >= 2 && rows == 0) {
        cols = 1;
        for (int i = 1; i < t->ndim; i++) cols *= (uint64_t)t->shape[i];
    }
    nz_mode mode = o->mode;
    if (t->dt == NZ_DT_OTHER || t->ndim < 2 || t->nelem < o->raw_below ||
        (excl && regexec(excl, t->name, 0, NULL, 0) == 0))
        mode.kind = NZ_MODE_RAW;
    uint32_t tr = o->tile_rows ? o->tile_rows : nz_default_tile_rows(cols);
    if (rows && tr > rows) tr = (uint32_t)rows;
    nz_tensor_desc d;
    uint64_t counts[256];
    int rc = nz_desc_init(&d, t->dt, t->elem_size, &mode, o->coder, rows, cols, tr, err);
    if (!rc) {
        d.zstd_level = o->zstd_level;
        rc = nz_tensor_analyze(&d, t->data, counts, err);
    }
    if (!rc) rc = nz_writer_add_tensor(w, t->name, t->st_dtype, t->ndim, t->shape, &d, counts, t->data, err);
    if (rc) nz_fail_prefix(err, "tensor '%s'", t->name);
    return rc;
}

int nz_pack(const char *src, const char *out, const nz_pack_opts *o, nz_error *err) {
    nz_alloc_hook_json();
    char path[4096];
    int dir = is_dir(src);
    if (dir)
        snprintf(path, sizeof path, "%s/model.safetensors", src);
    else
        snprintf(path, sizeof path, "%s", src);
    regex_t re, *excl = NULL;
    if (o->exclude) {
        int e = regcomp(&re, o->exclude, REG_EXTENDED | REG_NOSUB);
        if (e) {
            char msg[128];
            regerror(e, &re, msg, sizeof msg);
            return nz_fail(err, NZ_E_INVALID_ARG, "--exclude '%s': %s", o->exclude, msg);
        }
        excl = &re;
    }
    nz_st_file *st = NULL;
    nz_writer *w = NULL;
    int rc = nz_st_open(path, &st, err);
    if (!rc) rc = nz_writer_create(out, &w, err);
    if (!rc) rc = add_config(w, dir ? src : NULL, o->config_patch, err);
    if (!rc && dir) rc = add_dir_files(w, src, err);
    if (!rc && nz_st_metadata(st)) rc = nz_writer_set_metadata(w, nz_st_metadata(st), err);
    nz_progress pr = {0};
    for (size_t i = 0; !rc && i < nz_st_count(st); i++) pr.total += nz_st_get(st, i)->size;
    pr.items_total = rc ? 0 : nz_st_count(st);
    for (size_t i = 0; !rc && i < nz_st_count(st); i++) {
        const nz_st_tensor *t = nz_st_get(st, i);
        pr.name = t->name;
        if (o->progress) o->progress(o->progress_ud, &pr);
        rc = pack_tensor(w, t, o, excl, err);
        pr.done += t->size;
        pr.items_done++;
    }
    if (!rc && o->progress) {
        pr.name = "writing";
        o->progress(o->progress_ud, &pr);
    }
    if (!rc) {
        rc = nz_writer_finish(w, err);
        w = NULL;
    }
    if (!rc && o->progress) {
        pr.name = NULL;
        o->progress(o->progress_ud, &pr);
    }
    nz_writer_abort(w);
    nz_st_free(st);
    if (excl) regfree(excl);
    return rc;
}

int nz_unpack(const nz_model *m, const char *out, nz_error *err) {
    size_t n = nz_model_ntensors(m);
    nz_st_out *desc = nz_calloc(n ? n : 1, sizeof *desc, NZ_MEM_OTHER);
    nz_dctx *dc = nz_dctx_create();
    nz_st_writer *w = NULL;
    uint8_t *buf = NULL;
    int rc = desc && dc ? NZ_OK : nz_fail(err, NZ_E_NOMEM, "out of memory");
    for (size_t i = 0; !rc && i < n; i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        desc[i].name = t->name;
        nz_dtype nd = nz_desc_native_dtype(&t->desc);
        desc[i].st_dtype = nd == t->desc.dtype ? t->st_dtype : nd == NZ_DT_BF16 ? "BF16" : "F16";
        desc[i].ndim = t->ndim;
        memcpy(desc[i].shape, t->shape, sizeof t->shape);
    }
    if (!rc) rc = nz_st_writer_open(out, desc, n, nz_model_metadata(m), &w, err);
    for (size_t i = 0; !rc && i < n; i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        size_t esz = nz_desc_native_dtype(&t->desc) == NZ_DT_OTHER
                         ? t->desc.elem_size
                         : nz_dtype_size(nz_desc_native_dtype(&t->desc));
        size_t tile_bytes = (size_t)(nz_desc_tile_nrows(&t->desc, 0) * t->desc.cols * esz);
        nz_free(buf);
        buf = nz_malloc(tile_bytes, NZ_MEM_SCRATCH);
        if (!buf && tile_bytes) rc = nz_fail(err, NZ_E_NOMEM, "out of memory");
        for (uint64_t j = 0; !rc && j < t->ntiles; j++) {
            rc = nz_model_decode_native(m, dc, i, j, buf, err);
            if (!rc)
                rc = nz_st_writer_put(w, buf, (size_t)(nz_desc_tile_nrows(&t->desc, j) * t->desc.cols * esz),
                                      err);
        }
    }
    nz_free(buf);
    if (!rc) {
        rc = nz_st_writer_close(w, err);
        w = NULL;
    }
    nz_st_writer_abort(w);
    nz_dctx_free(dc);
    nz_free(desc);
    return rc;
}

int nz_verify(const nz_model *m, void (*report)(void *ud, const nz_error *e), void *ud, uint64_t *nbad) {
    nz_verify_opts o = {report, NULL, ud};
    return nz_verify_with(m, &o, nbad);
}

int nz_verify_with(const nz_model *m, const nz_verify_opts *o, uint64_t *nbad) {
    static const nz_verify_opts none;
    if (!o) o = &none;
    void (*report)(void *, const nz_error *) = o->report;
    void *ud = o->ud;
    nz_progress pr = {0};
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        pr.total += nz_model_tensor(m, i)->stored_bytes;
        pr.items_total += nz_model_tensor(m, i)->ntiles;
    }
    uint64_t bad = 0;
    int first = NZ_OK;
    nz_error e;
    nz_dctx *dc = nz_dctx_create();
    if (!dc) return NZ_E_NOMEM;
    if ((first = nz_model_check_padding(m, &e)) != NZ_OK) {
        bad++;
        if (report) report(ud, &e);
    }
    for (size_t i = 0; i < nz_model_nblobs(m); i++) {
        const uint8_t *p;
        size_t sz;
        int rc = nz_model_blob(m, nz_model_blob_name(m, i), &p, &sz, &e);
        if (rc) {
            bad++;
            if (!first) first = rc;
            if (report) report(ud, &e);
        }
    }
    float *buf = NULL;
    uint64_t cap = 0;
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        uint64_t esz = t->desc.elem_size > 4 ? t->desc.elem_size : 4;
        uint64_t need = nz_desc_tile_nrows(&t->desc, 0) * t->desc.cols * esz;
        if (need > cap) {
            nz_free(buf);
            buf = nz_malloc(need, NZ_MEM_SCRATCH);
            cap = buf ? need : 0;
            if (!buf) {
                nz_dctx_free(dc);
                return NZ_E_NOMEM;
            }
        }
        pr.name = t->name;
        for (uint64_t j = 0; j < t->ntiles; j++) {
            int rc = t->desc.dtype == NZ_DT_OTHER ? nz_model_decode_native(m, dc, i, j, buf, &e)
                                                  : nz_model_decode_f32(m, dc, i, j, buf, &e);
            if (rc) {
                bad++;
                if (!first) first = rc;
                if (report) report(ud, &e);
            }
            pr.items_done++;
            pr.done += t->tiles[j].size;
            if (o->progress) o->progress(ud, &pr);
        }
    }
    nz_free(buf);
    nz_dctx_free(dc);
    if (o->progress) {
        pr.name = NULL;
        o->progress(ud, &pr);
    }
    if (nbad) *nbad = bad;
    return first;
}

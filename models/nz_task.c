/* nz_task — see nz_task.h: the list of served model families and what is common to all of them. */
#include "nz_task.h"

#include "nz_codec.h"

#include <stdio.h>
#include <string.h>

/* Every served family; a new one adds its descriptor here. */
static const nz_task *const TASKS[] = {&NZ_TASK_TRANSLATE, &NZ_TASK_DIALOGUE};
#define N_TASKS (sizeof TASKS / sizeof TASKS[0])

const nz_task *nz_task_find(const char *name, size_t n) {
    for (size_t i = 0; name && i < N_TASKS; i++)
        if (strlen(TASKS[i]->name) == n && !memcmp(TASKS[i]->name, name, n)) return TASKS[i];
    return NULL;
}

char *nz_task_names(char *buf, size_t n) {
    size_t o = 0;
    buf[0] = 0;
    for (size_t i = 0; i < N_TASKS && o < n; i++) {
        const char *sep = !i ? "" : i + 1 == N_TASKS ? " or " : ", ";
        int k = snprintf(buf + o, n - o, "%s\"%s\"", sep, TASKS[i]->name);
        if (k < 0) break;
        o += (size_t)k;
    }
    return buf;
}

/* The architecture a model's config.json names, or NULL. */
static const char *architecture(const nz_model *m) {
    const json_t *a = json_object_get(nz_model_config(m), "architecture");
    return json_is_string(a) ? json_string_value(a) : NULL;
}

static int check_architecture(const nz_task *t, const char *path, const nz_model *m, nz_error *err) {
    const char *a = architecture(m);
    if (a && !strcmp(a, t->architecture)) return NZ_OK;
    return nz_fail(err, NZ_E_FORMAT, "%s: task %s needs architecture \"%s\", found %s%s%s", path, t->name,
                   t->architecture, a ? "\"" : "", a ? a : "none", a ? "\"" : "");
}

int nz_task_check_file(const nz_task *t, const char *path, nz_error *err) {
    nz_model *m = NULL;
    int rc = nz_model_open(path, &m, err);
    if (!rc) rc = check_architecture(t, path, m, err);
    nz_model_free(m);
    return rc;
}

/* Sizes and the dominant weight mode of m. */
static void describe_weights(const nz_model *m, nz_task_info *in) {
    uint64_t by_mode[8] = {0};
    char names[8][32] = {{0}};
    memset(in, 0, sizeof *in);
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        uint64_t n = 1;
        for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
        in->compressed_bytes += t->stored_bytes;
        in->source_bytes += n * t->desc.elem_size;
        if (t->desc.dtype == NZ_DT_OTHER) {
            in->decoded_bytes += n * t->desc.elem_size;
            continue;
        }
        in->params += n;
        in->decoded_bytes += n * 4;
        char name[32];
        nz_mode_name(&t->desc.mode, name, sizeof name);
        for (int k = 0; k < 8; k++)
            if (!names[k][0] || !strcmp(names[k], name)) {
                snprintf(names[k], sizeof names[k], "%s", name);
                by_mode[k] += n;
                break;
            }
    }
    int best = 0;
    for (int k = 1; k < 8; k++)
        if (by_mode[k] > by_mode[best]) best = k;
    snprintf(in->mode, sizeof in->mode, "%s", names[best][0] ? names[best] : "none");
    const char *a = architecture(m);
    snprintf(in->architecture, sizeof in->architecture, "%s", a ? a : "?");
}

int nz_task_open(const nz_task *t, const char *path, int verify, void **out, nz_task_info *info,
                 nz_error *err) {
    *out = NULL;
    void *m = NULL;
    int rc = t->open(path, &m, err);
    if (!rc) rc = check_architecture(t, path, t->model(m), err);
    if (!rc && verify) rc = nz_model_verify_tiles(t->model(m), err);
    if (rc) {
        t->free(m);
        return rc;
    }
    describe_weights(t->model(m), info);
    *out = m;
    return NZ_OK;
}

void nz_task_close(const nz_task *t, void *m, nz_tile_cache *cache) {
    if (!m) return;
    if (cache) nz_cache_forget_model(cache, t->model(m));
    t->free(m);
}

int nz_task_faulted(const nz_task *t, const void *m) { return m && nz_model_faulted(t->model(m)); }
